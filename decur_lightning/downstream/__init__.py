"""Downstream tasks of the paper (Section 5): multimodal classification and segmentation.

- :class:`MultimodalClassificationModule`: late-fusion scene classification over any named
  modalities, linear probing or fine-tuning (``freeze_encoders``), multimodal or single-modal
  (BigEarthNet-MM, Section 5.1).
- :class:`MultimodalSegmentationModule`: the paper's three-level FCN over any named modalities
  (GeoNRW, Section 5.2; RGB on SUN-RGBD/NYUDv2) or CMX on an RGB and an X MiT branch
  (SUN-RGBD/NYUDv2, Section 5.3).

Pretrained encoders come in through each modality's ``weights``, e.g.
``modalities={"s1": {"weights": "pretrain.ckpt"}, "s2": {"weights": "pretrain.ckpt"}}``
(:func:`decur_lightning.weights.load_encoder_state_dict`). A modality missing from an
evaluation batch is replaced by its running mean features over training
(:class:`MultimodalDownstreamModule`).
"""

from .base import MultimodalDownstreamModule, RunningFeatureMeans
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
    "RunningFeatureMeans",
    "SegFormerHead",
]
