"""decur-lightning: DeCUR multimodal self-supervised learning in PyTorch Lightning.

Example:
    >>> import lightning as L
    >>> from decur_lightning import DeCURModule
    >>> from decur_lightning.datamodules import SyntheticMultimodalDataModule
    >>> model = DeCURModule(encoder="resnet18", projector_dims=(64, 64))  # modalities from the datamodule
"""

from .encoder_set import EncoderSet
from .losses import (
    DeCURLoss,
    DeCURLossTerms,
    MultimodalDeCURTerms,
    barlow_twins_loss,
    decur_loss,
    multimodal_decur_loss,
)
from .modalities import Modality
from .ssl import DeCURModule, MultimodalSSLModule

__version__ = "0.1.0"

__all__ = [
    "DeCURLoss",
    "DeCURLossTerms",
    "DeCURModule",
    "EncoderSet",
    "Modality",
    "MultimodalDeCURTerms",
    "MultimodalSSLModule",
    "barlow_twins_loss",
    "decur_loss",
    "multimodal_decur_loss",
]
