"""Multimodal datamodules. Every batch is a dict with one ``image_<modality>`` tensor per modality."""

from .bigearthnet import BigEarthNetMM, BigEarthNetMMDataModule
from .geonrw import GeoNRWMM, GeoNRWMMDataModule, GeoNRWMMPretrainDataModule
from .rasters import RasterPatches, RasterPretrainDataModule, RasterSource
from .rgbd import RGBDMM, RGBDMMDataModule, RGBDMMPretrainDataModule
from .ssl4eo import SSL4EOS12MM, SSL4EOS12MMDataModule
from .streaming import StreamingPretrainDataModule
from .synthetic import SyntheticMultimodalDataModule, SyntheticMultimodalDataset

__all__ = [
    "BigEarthNetMM",
    "BigEarthNetMMDataModule",
    "GeoNRWMM",
    "GeoNRWMMDataModule",
    "GeoNRWMMPretrainDataModule",
    "RGBDMM",
    "RGBDMMDataModule",
    "RGBDMMPretrainDataModule",
    "RasterPatches",
    "RasterPretrainDataModule",
    "RasterSource",
    "SSL4EOS12MM",
    "SSL4EOS12MMDataModule",
    "StreamingPretrainDataModule",
    "SyntheticMultimodalDataModule",
    "SyntheticMultimodalDataset",
]
