"""decur-lightning: DeCUR multimodal self-supervised learning in PyTorch Lightning.

Example:
    >>> import lightning as L
    >>> from decur_lightning import DeCURModule
    >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
"""

from .losses import DeCURLoss, DeCURLossTerms, barlow_twins_loss, decur_loss
from .ssl import DeCURModule, MultimodalSSLModule

__version__ = "0.1.0"

__all__ = [
    "DeCURLoss",
    "DeCURLossTerms",
    "DeCURModule",
    "MultimodalSSLModule",
    "barlow_twins_loss",
    "decur_loss",
]
