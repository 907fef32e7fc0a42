"""Encoders, projectors and heads."""

from .encoders import (
    AUTHORS_STATE_DICT_CONVERTERS,
    SPECIAL_ENCODER_NAMES,
    create_encoder,
    encoder_feature_channels,
    encoder_feature_maps,
    encoder_feature_strides,
)
from .mit import MIT_NAMES, MiTEncoder
from .rda import ResidualDeformableAttention
from .resnet_rda import ResNetRDA

__all__ = [
    "AUTHORS_STATE_DICT_CONVERTERS",
    "MIT_NAMES",
    "SPECIAL_ENCODER_NAMES",
    "MiTEncoder",
    "ResNetRDA",
    "ResidualDeformableAttention",
    "create_encoder",
    "encoder_feature_channels",
    "encoder_feature_maps",
    "encoder_feature_strides",
]
