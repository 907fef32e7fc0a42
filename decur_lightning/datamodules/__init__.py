"""Multimodal datamodules. Every batch is a dict with one ``image_<modality>`` tensor per modality."""

from .synthetic import SyntheticMultimodalDataModule, SyntheticMultimodalDataset

__all__ = ["SyntheticMultimodalDataModule", "SyntheticMultimodalDataset"]
