"""Encoders, projectors and heads."""

from .encoders import (
    SPECIAL_ENCODER_NAMES,
    create_encoder,
    encoder_feature_channels,
    encoder_feature_maps,
    encoder_feature_strides,
    load_encoder_weights,
)
from .mit import MIT_NAMES, MiTEncoder
from .rda import ResidualDeformableAttention
from .resnet_rda import ResNetRDA

__all__ = [
    "MIT_NAMES",
    "SPECIAL_ENCODER_NAMES",
    "MiTEncoder",
    "ResNetRDA",
    "ResidualDeformableAttention",
    "create_encoder",
    "encoder_feature_channels",
    "encoder_feature_maps",
    "encoder_feature_strides",
    "load_encoder_weights",
]
