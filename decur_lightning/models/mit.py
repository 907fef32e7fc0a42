"""MiT (SegFormer's Mix Transformer) encoders for DeCUR RGB-depth pretraining (Appendix B.1).

The trunk is segmentation_models_pytorch's ``mit_b0`` ... ``mit_b5`` encoder, whose parameter
names equal the official SegFormer/MiT ones. Its modules are registered on the encoder itself,
so the state dict is the official layout (``patch_embed1.proj.weight``,
``block1.0.attn.q.weight``, ..., ``norm4.weight``) plus ``head.*``: the same keys as the
authors' ``mit_b2(num_classes=2048)`` backbones.

Checkpoint knowledge of this family (used generically by :mod:`decur_lightning.weights`):
:meth:`MiTEncoder.checkpoint_filter_fn` drops a classifier ``head`` (ImageNet's 1000 classes) and
:meth:`MiTEncoder.optional_keys` lets head-less files (the authors' MiT backbones) load.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders import get_encoder
from timm.models import adapt_input_conv
from torch import nn

__all__ = ["MiTEncoder", "MIT_NAMES", "mit_imagenet_source"]

MIT_NAMES: tuple[str, ...] = tuple(f"mit_b{i}" for i in range(6))


class MiTEncoder(nn.Module):
    """MiT-B0..B5 with mean-pooled stage-4 tokens mapped by a linear head (DeCUR Appendix B.1).

    ``forward(x)`` averages the stage-4 map (512 channels for B1-B5, 256 for B0) over space
    and maps it with ``head`` (``nn.Linear``) to ``num_features`` (2048, as the paper) before
    the projector. The paper trains MiT-B2/B5 with AdamW at lr 1e-4 (Appendix B.1), not
    LARS: set ``optimizer: adamw`` and ``lr: 1.0e-4`` in the run's config.

    Args:
        variant: ``"mit_b0"`` ... ``"mit_b5"``.
        in_channels: input bands (3 for RGB and for HHA-encoded depth).
        num_features: width of the pooled output (the head's output).
        **smp_kwargs: passed to ``segmentation_models_pytorch.encoders.get_encoder``
            (not ``weights``: use :meth:`load_mit_state_dict`).

    Example:
        >>> enc = MiTEncoder("mit_b0", in_channels=3)
        >>> enc(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 2048])
    """

    def __init__(
        self, variant: str = "mit_b2", in_channels: int = 3, num_features: int = 2048, **smp_kwargs: Any
    ) -> None:
        super().__init__()
        if variant not in MIT_NAMES:
            raise ValueError(f"Unknown MiT variant {variant!r}; expected one of {list(MIT_NAMES)}.")
        trunk = get_encoder(variant, in_channels=in_channels, weights=None, **smp_kwargs)
        for name, child in trunk.named_children():
            self.add_module(name, child)
        self.variant = variant
        self.feature_channels: list[int] = [getattr(trunk, f"norm{i}").normalized_shape[0] for i in range(1, 5)]
        self.feature_strides: list[int] = [4, 8, 16, 32]
        self.num_features: int = num_features
        self.head = nn.Linear(self.feature_channels[-1], num_features)

    def forward_feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs ``(N, C_i, H / s_i, W / s_i)``, strides 4 / 8 / 16 / 32.

        Channels :attr:`feature_channels` (64 / 128 / 320 / 512 for B1-B5).
        """
        maps = []
        for stage in range(1, 5):
            x = getattr(self, f"patch_embed{stage}")(x)
            x = getattr(self, f"block{stage}")(x)
            x = getattr(self, f"norm{stage}")(x).contiguous()
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, projected features ``(N, num_features)``, the projector's input."""
        return self.head(self.forward_feature_maps(x)[-1].mean(dim=(2, 3)))

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The MiT weights in the official layout, without ``head.*``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}

    def load_mit_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load official-layout MiT weights (SegFormer ``mit_b*.pth``, or the authors'
        head-less backbone files) strictly into the trunk.

        ``head.*`` entries are ignored (an ImageNet checkpoint's head is a 1000-class
        classifier); the head keeps its current weights. To load a full ``MiTEncoder`` state
        dict, head included, use ``load_state_dict``. Missing or unexpected trunk keys raise a
        ``RuntimeError`` that lists them.
        """
        trunk_weights = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        try:
            _Trunk(self).load_state_dict(trunk_weights, strict=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"These weights do not fit the {self.variant} trunk: expected the official MiT "
                "layout (patch_embed1.proj.weight, block1.0.attn.q.weight, ..., norm4.weight); "
                f"check the variant, in_channels and any key prefix (e.g. 'module.backbone_1.').\n{err}"
            ) from err

    def load_imagenet(self, file: str | Path | None = None) -> None:
        """Load the official ImageNet MiT weights into the trunk (the head stays as it is).

        ``file``: the SegFormer ``mit_b*.pth`` or smp's ``model.safetensors`` of this variant;
        ``None`` downloads smp's copy (:func:`mit_imagenet_source`, cached by Hugging Face).
        The 3-band ``patch_embed1.proj`` is adapted to ``in_channels`` with
        ``timm.models.adapt_input_conv`` (see :func:`decur_lightning.models.create_encoder`).
        """
        path = _download_mit_imagenet(self.variant) if file is None else Path(file)
        state_dict = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("head.")}
        stem = "patch_embed1.proj.weight"
        if stem in state_dict:
            in_channels = self.patch_embed1.proj.in_channels
            state_dict[stem] = adapt_input_conv(in_channels, state_dict[stem], base_chans=3)
        self.load_mit_state_dict(state_dict)

    def checkpoint_filter_fn(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict"
    ) -> dict[str, torch.Tensor]:
        """``state_dict`` without a ``head`` of another shape (:mod:`decur_lightning.weights` hook).

        A head that is not this encoder's ``(num_features, C)`` projection is a classifier (the
        official ImageNet MiT's 1000 classes): it is left out with a warning and the head keeps
        its initialisation. Everything else passes unchanged.
        """
        state_dict = dict(state_dict)
        head = state_dict.get("head.weight")
        if head is not None and tuple(head.shape) != tuple(self.head.weight.shape):
            warnings.warn(
                f"{source} has a MiT head of shape {tuple(head.shape)} (a classifier), not this encoder's "
                f"{tuple(self.head.weight.shape)} projection: the head keeps its initialisation.",
                stacklevel=3,
            )
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        return state_dict

    def optional_keys(self, state_dict: Mapping[str, Any], source: str = "the state dict") -> tuple[str, ...]:
        """Key prefixes ``state_dict`` may lack (:mod:`decur_lightning.weights` hook): ``head.*``
        when it has no head at all (the authors' MiT files drop it; it only serves the pooled
        ``forward``, not the segmentation feature maps): the head keeps its initialisation."""
        return () if any(k.startswith("head.") for k in state_dict) else ("head.",)

    def load_pretrained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights strictly: a full ``MiTEncoder`` state dict when its ``head.weight`` has
        this encoder's shape, otherwise official MiT weights via :meth:`load_mit_state_dict`."""
        head = state_dict.get("head.weight")
        if head is not None and head.shape == self.head.weight.shape:
            self.load_state_dict(state_dict, strict=True)
        else:
            self.load_mit_state_dict(state_dict)


def mit_imagenet_source(variant: str) -> str:
    """Where ``"imagenet"`` weights of a MiT variant come from: smp's Hugging Face repository."""
    settings = smp_encoders[variant]["pretrained_settings"]["imagenet"]
    return f"the Hugging Face hub repository {settings['repo_id']!r} (model.safetensors, smp's ImageNet MiT weights)"


def _download_mit_imagenet(variant: str) -> Path:
    """smp's own download of the official ImageNet MiT weights (``get_encoder(weights="imagenet")``)."""
    from huggingface_hub import hf_hub_download

    settings = smp_encoders[variant]["pretrained_settings"]["imagenet"]
    return Path(hf_hub_download(settings["repo_id"], filename="model.safetensors", revision=settings["revision"]))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    return state_dict


class _Trunk(nn.Module):
    """View of a :class:`MiTEncoder` without its head (for strict trunk loading)."""

    def __init__(self, encoder: MiTEncoder) -> None:
        super().__init__()
        for name, child in encoder.named_children():
            if name != "head":
                self.add_module(name, child)
