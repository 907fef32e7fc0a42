"""Downstream tasks of the paper (Section 5): multimodal classification and segmentation.

- :class:`MultimodalClassificationModule`: late-fusion scene classification, linear probing
  or fine-tuning, multimodal or single-modal (BigEarthNet-MM, Section 5.1).
- :class:`MultimodalSegmentationModule`: the paper's three-level FCN (GeoNRW, Section 5.2;
  RGB on SUN-RGBD/NYUDv2) or CMX on two MiT branches (SUN-RGBD/NYUDv2, Section 5.3).

Pretrained encoders come in through ``weights1`` / ``weights2``
(:func:`decur_lightning.weights.load_encoder_state_dict`).
"""

from .base import MultimodalDownstreamModule
from .classification import MultimodalClassificationModule
from .cmx import CMXFusion, EfficientCrossAttention, FeatureFusionModule, FeatureRectifyModule, SegFormerHead
from .heads import FCNHead
from .segmentation import MultimodalSegmentationModule

__all__ = [
    "CMXFusion",
    "EfficientCrossAttention",
    "FCNHead",
    "FeatureFusionModule",
    "FeatureRectifyModule",
    "MultimodalClassificationModule",
    "MultimodalDownstreamModule",
    "MultimodalSegmentationModule",
    "SegFormerHead",
]
