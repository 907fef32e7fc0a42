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

Every encoder starts from random weights unless ``weights="imagenet"`` (the ImageNet
initialisation of the authors' released pretraining runs; the paper does not mention it): see
:func:`create_encoder`. Every other weight source (checkpoints, exports, torchgeo weights, the
authors' files) is read by :mod:`decur_lightning.weights`, which this package does not import:
each encoder family keeps its own checkpoint knowledge beside it (timm's ``checkpoint_filter_fn``
pattern), and :mod:`decur_lightning.weights` dispatches to it without knowing the families:

- an encoder's ``checkpoint_filter_fn(state_dict, source)`` adapts a state dict to it (e.g.
  :class:`MiTEncoder` drops a classifier head) and ``optional_keys(state_dict, source)`` names the
  key prefixes it may lack (e.g. :class:`ResNetRDA`'s attention blocks for a plain trunk);
- :data:`AUTHORS_STATE_DICT_CONVERTERS` map the authors' released layouts onto this package's
  keys (e.g. :func:`~decur_lightning.models.resnet_rda.convert_authors_state_dict`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .mit import MIT_NAMES, MiTEncoder, mit_imagenet_source
from .resnet_rda import ResNetRDA, convert_authors_state_dict

__all__ = [
    "AUTHORS_STATE_DICT_CONVERTERS",
    "IMAGENET",
    "AuthorsStateDictConverter",
    "ImageNetWeightsError",
    "SPECIAL_ENCODER_NAMES",
    "create_encoder",
    "is_imagenet_source",
    "encoder_feature_channels",
    "encoder_feature_maps",
    "encoder_feature_strides",
]

#: ``converter(state_dict, position, *, source, **options) -> state dict | None``: maps one
#: encoder family's layout in the authors' released files (a flat state dict with ``backbone.*``
#: keys; ``position`` the modality's 1-based position, or what was asked for) onto this
#: package's keys, or returns ``None`` when the layout is not its family's.
AuthorsStateDictConverter = Callable[..., dict[str, torch.Tensor] | None]
#: The converters :mod:`decur_lightning.weights` tries, in order, on the authors' files; append
#: a family's converter here to teach it another layout.
AUTHORS_STATE_DICT_CONVERTERS: list[AuthorsStateDictConverter] = [convert_authors_state_dict]

#: Names with DeCUR-specific construction; every other timm name works as well.
SPECIAL_ENCODER_NAMES: tuple[str, ...] = ("resnet18_rda", "resnet50_rda", "vit_small_patch16_224", *MIT_NAMES)

_RDA_SUFFIX = "_rda"
#: Number of feature levels :func:`encoder_feature_maps` returns for plain timm models.
_TIMM_FEATURE_LEVELS = 3
#: ``weights`` value for ImageNet initialisation; ``"imagenet:<file>"`` reads a local file instead.
IMAGENET = "imagenet"


class ImageNetWeightsError(RuntimeError):
    """ImageNet weights could not be fetched or do not fit; the message says what was tried."""


def is_imagenet_source(weights: Any) -> bool:
    """Whether ``weights`` asks for ImageNet initialisation (``"imagenet"`` or ``"imagenet:<file>"``)."""
    return isinstance(weights, str) and (weights == IMAGENET or weights.startswith(IMAGENET + ":"))


def create_encoder(
    name: str,
    in_channels: int,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a modality encoder by name.

    Args:
        name: ``"resnet50"`` or any timm name, ``"resnet50_rda"`` / ``"resnet18_rda"`` (any
            timm ResNet + ``"_rda"``), ``"vit_small_patch16_224"``, ``"mit_b0"`` ...
            ``"mit_b5"`` (see the module docstring).
        in_channels: number of input bands of this modality (2 for Sentinel-1 VV/VH,
            13 for Sentinel-2 L1C, 3 for RGB, ...).
        weights: ``None`` (random initialisation) or ``"imagenet"`` / ``"imagenet:<file>"``
            (below), which need the encoder's construction. Other sources (a checkpoint, an
            export, a torchgeo weight, an authors' file) are loaded after construction with
            :func:`decur_lightning.weights.load_pretrained_encoder`, or by a module from
            ``modalities={name: {"weights": ...}}``.
        **kwargs: passed to ``timm.create_model`` (plain timm names), to :class:`ResNetRDA`
            (``img_size`` and timm arguments) or to :class:`MiTEncoder` (``num_features``).
            ViTs default to ``global_pool="token"`` and ``dynamic_img_size=True``.

    Returns:
        The encoder, with ``num_features`` and pooled ``forward``.

    ImageNet initialisation (the authors' released pretraining runs all start from it; the paper
    does not say so; default: random weights):

    - ``weights="imagenet"`` downloads through the libraries' own mechanisms: plain timm names
      with ``timm.create_model(name, pretrained=True)`` (timm's default tag of the name, from
      the Hugging Face hub, e.g. ``timm/resnet50.a1_in1k``; name a tag to choose others:
      ``"resnet50.tv_in1k"`` is the torchvision ResNet-50 the authors started from);
      ``*_rda``: the same for the ResNet trunk, the attention blocks keep their own (small)
      initialisation; ``mit_b*``: the official ImageNet MiT weights from smp's hub repository
      (``smp-hub/mit_b2.imagenet``, the SegFormer ``mit_b2.pth`` weights). Files are cached
      (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only the cache is read.
    - ``weights="imagenet:<file>"`` reads the same weights from a local file instead (no
      network): a timm/torchvision state dict of the 3-band model (``.pth``, ``.bin`` or
      ``.safetensors``; its classifier is dropped), passed to timm as
      ``pretrained_cfg_overlay=dict(file=...)``; for ``mit_b*`` the official ``mit_b*.pth`` or
      smp's ``model.safetensors`` (``head.*`` ignored).

    The first convolution (``conv1``, ``patch_embed.proj``, ``patch_embed1.proj``) is adapted
    from 3 bands to ``in_channels`` as ``timm.models.adapt_input_conv`` does: one band gets the
    sum of the RGB filters; ``C`` bands get the RGB filters repeated in order (R, G, B, R, G,
    ...) and cut to ``C``, times ``3 / C`` (a 2-band encoder: ``1.5 * [R, G]``; 13 bands:
    ``3/13 * [R, G, B, R, ..., R]``): the scale keeps the first layer's output in the RGB
    model's range (a constant image gets exactly the RGB response when ``C`` is a multiple of
    3). Everything else loads unchanged (strictly: a missing or unexpected key
    raises :class:`ImageNetWeightsError`); the pooled encoders have no classifier, MiT's
    2048-wide ``head`` stays randomly initialised.

    Example:
        >>> enc = create_encoder("resnet18", in_channels=2)
        >>> enc(torch.randn(2, 2, 32, 32)).shape
        torch.Size([2, 512])
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be a positive band count, got {in_channels}.")
    if weights is not None and not is_imagenet_source(weights):
        raise ValueError(
            f"create_encoder takes weights=None, 'imagenet' or 'imagenet:<file>' only; got {weights!r}. Load other "
            "weight sources (a checkpoint, an export folder or file, a torchgeo weight, an authors' file) into the "
            "built encoder with decur_lightning.weights.load_pretrained_encoder(encoder, source, modality), or give "
            "them to a module as modalities={name: {'weights': source}}."
        )
    if is_imagenet_source(weights):
        return _create_imagenet_encoder(name, in_channels, _imagenet_file(weights), **kwargs)
    if name.endswith(_RDA_SUFFIX):
        if not timm.is_model(name[: -len(_RDA_SUFFIX)]):
            raise _unknown_encoder(name)
        model: nn.Module = ResNetRDA(name[: -len(_RDA_SUFFIX)], in_channels=in_channels, **kwargs)
    elif name in MIT_NAMES:
        model = MiTEncoder(name, in_channels=in_channels, **kwargs)
    else:
        model = _create_timm_encoder(name, in_channels, **kwargs)
    return model


def _create_timm_encoder(name: str, in_channels: int, **kwargs: Any) -> nn.Module:
    if name.startswith("vit_"):
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("dynamic_img_size", True)
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError('Unknown model (...)')
        raise _unknown_encoder(name) from err


def _imagenet_file(weights: str) -> Path | None:
    if weights == IMAGENET:
        return None
    path = Path(weights[len(IMAGENET) + 1 :]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights={weights!r}: {path} is not a file. Give the ImageNet weights of the 3-band model as "
            "'imagenet:/path/to/file' (a .pth, .bin or .safetensors state dict), or 'imagenet' to download them."
        )
    return path


def _create_imagenet_encoder(name: str, in_channels: int, file: Path | None, **kwargs: Any) -> nn.Module:
    if name in MIT_NAMES:
        model = MiTEncoder(name, in_channels=in_channels, **kwargs)
        source = str(file) if file is not None else mit_imagenet_source(name)
        try:
            model.load_imagenet(file)
        except Exception as err:  # download, hub and format errors of several libraries
            raise ImageNetWeightsError(_imagenet_failure(name, source, file, err)) from err
        return model
    if name.endswith(_RDA_SUFFIX):
        trunk_name = name[: -len(_RDA_SUFFIX)]
        if not timm.is_model(trunk_name):
            raise _unknown_encoder(name)
        model = ResNetRDA(trunk_name, in_channels=in_channels, **kwargs)
        # img_size and the rda_* switches are ResNetRDA's own; the rest goes to the timm trunk.
        timm_kwargs = {k: v for k, v in kwargs.items() if k != "img_size" and not k.startswith("rda_")}
        trunk = _timm_imagenet(trunk_name, in_channels, file, **timm_kwargs)
        with warnings.catch_warnings():  # loading trunk-only weights is the intent here
            warnings.filterwarnings("ignore", message="Loaded trunk-only")
            model.load_pretrained_state_dict(trunk.state_dict())
        return model
    if name.startswith("vit_"):
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("dynamic_img_size", True)
    return _timm_imagenet(name, in_channels, file, **kwargs)


def _timm_imagenet(name: str, in_channels: int, file: Path | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(pretrained=True)`` (from ``file`` if given), loaded strictly."""
    if not timm.is_model(name):
        raise _unknown_encoder(name)
    overlay = {"file": str(file)} if file is not None else None
    source = str(file) if file is not None else _timm_source(name)
    try:
        with _timm_load_problems() as problems:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=in_channels, num_classes=0, **kwargs
            )
    except Exception as err:  # download, hub and format errors of several libraries
        raise ImageNetWeightsError(_imagenet_failure(name, source, file, err)) from err
    if problems:
        raise ImageNetWeightsError(
            f"The ImageNet weights from {source} do not fit the timm model {name!r}: "
            + "; ".join(problems)
            + ". Give the weights of this very architecture (a state dict of timm.create_model(name) or its "
            "torchvision equivalent)."
        )
    return model


def _timm_source(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return f"timm's pretrained weights of {name!r} (none are registered)"
    if cfg.hf_hub_id:
        return f"the Hugging Face hub repository {cfg.hf_hub_id!r} (timm's pretrained weights)"
    return cfg.url or f"timm's pretrained weights of {name!r}"


def _imagenet_failure(name: str, source: str, file: Path | None, err: Exception) -> str:
    if file is not None:
        return f"Could not load the ImageNet weights of {name!r} from {source}: {err}"
    return (
        f"Could not get the ImageNet weights of {name!r}: tried {source} (cache: HF_HOME, offline with "
        f"HF_HUB_OFFLINE=1): {type(err).__name__}: {err}\nWithout network, download the file on a machine "
        "that has it (e.g. `huggingface-cli download <repository>`, then copy the Hugging Face cache), or give "
        "the file: weights='imagenet:/path/to/weights.pth' (a state dict of the 3-band ImageNet model)."
    )


@contextmanager
def _timm_load_problems() -> Iterator[list[str]]:
    """Collect the missing / unexpected keys timm reports (it loads non-strictly once it drops the
    classifier), so that a file of another architecture is an error, not a silent partial load."""
    problems: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(("Missing keys", "Unexpected keys", "Unable to convert")):
                problems.append(message)

    logger = logging.getLogger("timm.models._builder")
    handler, level = _Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield problems
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
