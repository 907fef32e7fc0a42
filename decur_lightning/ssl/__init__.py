"""Self-supervised LightningModules: DeCUR, the paper's baselines, and their shared base."""

from .base import MultimodalSSLModule, build_projector, embedding_std
from .baselines import (
    CLIPModule,
    CrossModalBarlowTwinsModule,
    SimCLRCrossModule,
    SingleModalBarlowTwinsModule,
    VICRegCrossModule,
)
from .decur import DeCURModule, resolve_common_dims

__all__ = [
    "CLIPModule",
    "CrossModalBarlowTwinsModule",
    "DeCURModule",
    "MultimodalSSLModule",
    "SimCLRCrossModule",
    "SingleModalBarlowTwinsModule",
    "VICRegCrossModule",
    "build_projector",
    "embedding_std",
    "resolve_common_dims",
]
