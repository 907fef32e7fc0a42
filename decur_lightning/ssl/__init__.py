"""Self-supervised LightningModules: DeCUR and the shared multimodal base."""

from .base import MultimodalSSLModule, build_projector, embedding_std
from .decur import DeCURModule, resolve_common_dims

__all__ = ["DeCURModule", "MultimodalSSLModule", "build_projector", "embedding_std", "resolve_common_dims"]
