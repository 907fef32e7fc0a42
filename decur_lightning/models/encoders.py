"""Encoder factory: one function, names not flags (timm style).

Every encoder returned by :func:`create_encoder` is an ``nn.Module`` with

- ``num_features: int``: the width of the pooled feature vector;
- ``forward(x) -> Tensor`` of shape ``(N, num_features)``: pooled features, the input of
  the DeCUR projector (Fig. 2, ``E_1`` / ``E_2``);

and multi-scale maps for segmentation through :func:`encoder_feature_maps` (channels and
strides without a forward pass: :func:`encoder_feature_channels`,
:func:`encoder_feature_strides`).

Names (paper, Section 4 and Appendix B.1):

- ``resnet50`` (any timm name): the timm model itself, built with ``num_classes=0``, so its
  state dict loads into ``timm.create_model(name, in_chans=C, num_classes=0)`` with no key
  surgery;
- ``resnet50_rda``, ``resnet18_rda`` (any timm ResNet + ``_rda``): :class:`ResNetRDA`,
  residual deformable attention after layer3 and layer4 (Section 3.2);
- ``vit_small_patch16_224``: timm ViT-S/16 with CLS-token features and any input size (at least
  16 px; ``global_pool="token"``, ``dynamic_img_size=True``; Appendix C, Table 6);
- ``mit_b0`` ... ``mit_b5``: :class:`MiTEncoder`, smp MiT with a 2048-wide linear head
  (RGB-depth, Appendix B.1; train with AdamW, lr 1e-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .mit import MIT_NAMES, MiTEncoder
from .resnet_rda import ResNetRDA

__all__ = [
    "SPECIAL_ENCODER_NAMES",
    "create_encoder",
    "encoder_feature_channels",
    "encoder_feature_maps",
    "encoder_feature_strides",
    "load_encoder_weights",
]

#: Names with DeCUR-specific construction; every other timm name works as well.
SPECIAL_ENCODER_NAMES: tuple[str, ...] = ("resnet18_rda", "resnet50_rda", "vit_small_patch16_224", *MIT_NAMES)

_RDA_SUFFIX = "_rda"
#: Number of feature levels :func:`encoder_feature_maps` returns for plain timm models.
_TIMM_FEATURE_LEVELS = 3


def create_encoder(
    name: str,
    in_channels: int,
    weights: str | Path | Any | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a modality encoder by name.

    Args:
        name: ``"resnet50"`` or any timm name, ``"resnet50_rda"`` / ``"resnet18_rda"`` (any
            timm ResNet + ``"_rda"``), ``"vit_small_patch16_224"``, ``"mit_b0"`` ...
            ``"mit_b5"`` (see the module docstring).
        in_channels: number of input bands of this modality (2 for Sentinel-1 VV/VH,
            13 for Sentinel-2 L1C, 3 for RGB, ...).
        weights: optional pretrained weights: a path to a state dict, a torchgeo
            ``WeightsEnum`` member, or its name (``"ResNet50_Weights.SENTINEL1_ALL_DECUR"``).
        **kwargs: passed to ``timm.create_model`` (plain timm names), to :class:`ResNetRDA`
            (``img_size`` and timm arguments) or to :class:`MiTEncoder` (``num_features``).
            ViTs default to ``global_pool="token"`` and ``dynamic_img_size=True``.

    Returns:
        The encoder, with ``num_features`` and pooled ``forward``.

    Example:
        >>> enc = create_encoder("resnet18", in_channels=2)
        >>> enc(torch.randn(2, 2, 32, 32)).shape
        torch.Size([2, 512])
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be a positive band count, got {in_channels}.")
    if name.endswith(_RDA_SUFFIX):
        if not timm.is_model(name[: -len(_RDA_SUFFIX)]):
            raise _unknown_encoder(name)
        model: nn.Module = ResNetRDA(name[: -len(_RDA_SUFFIX)], in_channels=in_channels, **kwargs)
    elif name in MIT_NAMES:
        model = MiTEncoder(name, in_channels=in_channels, **kwargs)
    else:
        model = _create_timm_encoder(name, in_channels, **kwargs)
    if weights is not None:
        load_encoder_weights(model, weights)
    return model


def _create_timm_encoder(name: str, in_channels: int, **kwargs: Any) -> nn.Module:
    if name.startswith("vit_"):
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("dynamic_img_size", True)
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError('Unknown model (...)')
        raise _unknown_encoder(name) from err


def _unknown_encoder(name: str) -> ValueError:
    return ValueError(
        f"Unknown encoder {name!r}: expected one of {list(SPECIAL_ENCODER_NAMES)}, a timm "
        f"ResNet name + '{_RDA_SUFFIX}', or a timm model name such as 'resnet18' or 'resnet50' "
        "(see timm.list_models())."
    )


def encoder_feature_maps(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Multi-scale feature maps ``(N, C_i, H_i, W_i)`` of ``x``, finest first, for segmentation.

    - ResNets (plain timm and ``*_rda``): layer2, layer3, layer4 at strides 8 / 16 / 32
      (512 / 1024 / 2048 channels for ResNet-50); for ``*_rda`` the layer3/4 maps include
      the attention blocks. These are the FCN inputs of the paper (Sections 5.2-5.3, Appendix B.2).
    - MiT (``mit_b*``): the four stages at strides 4 / 8 / 16 / 32 (64 / 128 / 320 / 512
      channels for B1-B5), the CMX inputs.
    - Other timm models: the last three levels timm reports (``forward_intermediates``);
      for a ViT, the last three blocks, all at stride 16.

    Channels and strides are known without a forward pass: :func:`encoder_feature_channels`
    and :func:`encoder_feature_strides`.
    """
    if hasattr(encoder, "forward_feature_maps"):
        return list(encoder.forward_feature_maps(x))
    if hasattr(encoder, "forward_intermediates") and hasattr(encoder, "feature_info"):
        return list(encoder.forward_intermediates(x, indices=_timm_feature_indices(encoder), intermediates_only=True))
    raise TypeError(
        f"{type(encoder).__name__} has neither forward_feature_maps nor timm's forward_intermediates; "
        "build the encoder with create_encoder."
    )


def encoder_feature_channels(encoder: nn.Module) -> list[int]:
    """Channels of each map :func:`encoder_feature_maps` returns."""
    if hasattr(encoder, "feature_channels"):
        return list(encoder.feature_channels)
    return [encoder.feature_info[i]["num_chs"] for i in _timm_feature_indices(encoder)]


def encoder_feature_strides(encoder: nn.Module) -> list[int]:
    """Stride (input size / map size) of each map :func:`encoder_feature_maps` returns."""
    if hasattr(encoder, "feature_strides"):
        return list(encoder.feature_strides)
    return [encoder.feature_info[i]["reduction"] for i in _timm_feature_indices(encoder)]


def _timm_feature_indices(encoder: nn.Module) -> list[int]:
    if not hasattr(encoder, "feature_info"):
        raise TypeError(f"{type(encoder).__name__} is not a timm model with feature_info.")
    levels = len(encoder.feature_info)
    return list(range(max(levels - _TIMM_FEATURE_LEVELS, 0), levels))


def load_encoder_weights(encoder: nn.Module, weights: str | Path | Any) -> None:
    """Load pretrained ``weights`` into ``encoder`` strictly.

    ``weights`` is any single-encoder source of
    :func:`decur_lightning.weights.load_encoder_state_dict`: a state-dict file, an export of
    this package, a torchgeo ``WeightsEnum`` member or its name
    (``"ResNet50_Weights.SENTINEL2_ALL_DECUR"``), or an authors' backbone file. Weights that do
    not fit raise :class:`~decur_lightning.weights.EncoderWeightsMismatchError` (a
    ``RuntimeError``) listing the missing, unexpected and mis-shaped keys; a classifier
    (``fc.*``) is left out with a warning.

    :class:`ResNetRDA` also takes a plain ResNet state dict (attention blocks keep their initialisation),
    :class:`MiTEncoder` also takes official MiT weights (``head.*`` ignored).
    """
    from ..weights import load_pretrained_encoder  # weights.py imports this package

    load_pretrained_encoder(encoder, weights)


