"""ResNet with residual deformable attention after layer3 and layer4 (DeCUR Section 3.2, Fig. 2).

The trunk is a timm ResNet; its modules are registered on the encoder itself, so the trunk's
state-dict keys stay bare (``conv1.weight``, ``layer3.0.conv1.weight``, ...) and load plain
torchvision / timm ResNet weights (e.g. torchgeo's ``ResNet50_Weights.SENTINEL1_ALL_DECUR``).
The two attention blocks live under ``da_l3.*`` and ``da_l4.*``.

Checkpoint knowledge of this family (timm's ``checkpoint_filter_fn`` pattern, used generically
by :mod:`decur_lightning.weights`): :func:`convert_authors_state_dict` maps the authors' RDA
layouts (``backbone.*`` plus ``da{k}_l3.*`` / ``da{k}_l4.*``) onto this encoder's keys, and
:meth:`ResNetRDA.optional_keys` lets a plain ResNet trunk load without the attention blocks.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models import ResNet
from torch import nn

from .rda import DEFAULT_INIT_GAIN, ReferencePoints, ResidualDeformableAttention, reference_points_state

__all__ = ["ResNetRDA", "RDA_LAYER3", "RDA_LAYER4", "convert_authors_state_dict"]

#: Appendix B.1 settings of the block after layer3 (14x14 map at 224 px).
RDA_LAYER3: dict[str, int] = {"num_heads": 8, "num_groups": 4, "offset_stride": 2, "offset_kernel_size": 5}
#: Appendix B.1 settings of the block after layer4 (7x7 map at 224 px).
RDA_LAYER4: dict[str, int] = {"num_heads": 16, "num_groups": 8, "offset_stride": 1, "offset_kernel_size": 3}


class ResNetRDA(nn.Module):
    """A timm ResNet with a :class:`ResidualDeformableAttention` block after layer3 and layer4.

    Appendix B.1: after layer3, 8 heads, 4 groups, offset stride 2, kernel 5; after layer4,
    16 heads, 8 groups, stride 1, kernel 3. The attention width is the layer's channel count,
    and **head_dim = channels // heads** with the paper's head counts: for ResNet-50
    (1024 / 2048 channels) this gives the paper's 128 channels per head; for ResNet-18
    (256 / 512 channels) 32 per head. Each encoder owns its blocks (the authors' code ran
    modality 2 through modality 1's blocks; this one does not).

    Both blocks start close to the identity (``proj_out`` at ``rda_init_gain`` = 0.1 times
    PyTorch's default initialisation: the attention branch starts at about 2 % of its input), so
    a fresh ``ResNetRDA`` computes nearly its trunk's function, also after loading trunk-only
    weights, while every block weight has a non-zero norm for LARS's trust ratio (see
    :class:`ResidualDeformableAttention`).

    The ``rda_*`` arguments (names that cannot collide with timm's) set both blocks; the
    reference grid is saved in the state dict, and loading the authors' RDA files through
    :mod:`decur_lightning.weights` switches it to ``"dat"``.

    Args:
        trunk: timm ResNet name (``"resnet50"``, ``"resnet18"``, ``"resnet50d"``, ...).
        in_channels: input bands.
        img_size: training image size; lays out the relative position bias tables for the
            ``img_size/16`` and ``img_size/32`` maps (14 and 7 at 224 px). Other input sizes
            work (the tables are sampled); inputs need at least 64x64 pixels (2x2 at layer4).
        rda_reference_points: ``"centre"`` (cell centres, default) or ``"dat"`` (DAT's and
            the authors' grid ``(i + 0.5) / (H_G - 1)``).
        rda_residual: ``True``: ``x + DA(x)`` (RDA, the paper's module); ``False``: ``DA(x)``
            alone (the "DA" ablation of Tables 4 and 7).
        rda_init_gain: scale of ``proj_out``'s default initialisation (``1.0``: DAT's and the
            authors').
        **timm_kwargs: passed to ``timm.create_model`` for the trunk.

    Example:
        >>> enc = ResNetRDA("resnet18", in_channels=2)
        >>> enc(torch.randn(2, 2, 64, 64)).shape
        torch.Size([2, 512])
    """

    def __init__(
        self,
        trunk: str = "resnet50",
        in_channels: int = 3,
        img_size: int = 224,
        *,
        rda_reference_points: ReferencePoints = "centre",
        rda_residual: bool = True,
        rda_init_gain: float = DEFAULT_INIT_GAIN,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        model = timm.create_model(trunk, pretrained=False, in_chans=in_channels, num_classes=0, **timm_kwargs)
        if not isinstance(model, ResNet):
            raise ValueError(
                f"'{trunk}_rda': residual deformable attention needs a timm ResNet trunk "
                f"(resnet18, resnet50, ...), but {trunk!r} is a {type(model).__name__}."
            )
        for name, child in model.named_children():
            self.add_module(name, child)
        channels = {info["module"]: info["num_chs"] for info in model.feature_info}
        self.trunk_name = trunk
        self.num_features: int = model.num_features
        self.feature_channels: list[int] = [channels["layer2"], channels["layer3"], channels["layer4"]]
        self.feature_strides: list[int] = [8, 16, 32]
        block_kwargs: dict[str, Any] = {
            "reference_points": rda_reference_points,
            "residual": rda_residual,
            "init_gain": rda_init_gain,
        }
        self.da_l3 = ResidualDeformableAttention(
            channels["layer3"], fmap_size=max(img_size // 16, 2), feature_stride=16, **RDA_LAYER3, **block_kwargs
        )
        self.da_l4 = ResidualDeformableAttention(
            channels["layer4"], fmap_size=max(img_size // 32, 2), feature_stride=32, **RDA_LAYER4, **block_kwargs
        )

    def forward_feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps for segmentation: layer2, layer3 + RDA, layer4 + RDA.

        Strides 8 / 16 / 32, channels :attr:`feature_channels` (512 / 1024 / 2048 for
        ResNet-50, 128 / 256 / 512 for ResNet-18).
        """
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        layer2 = self.layer2(self.layer1(x))
        layer3 = self.da_l3(self.layer3(layer2))
        layer4 = self.da_l4(self.layer4(layer3))
        return [layer2, layer3, layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)``, the projector's input."""
        return self.fc(self.global_pool(self.forward_feature_maps(x)[-1]))

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The ResNet weights alone (no ``da_*``), loadable by
        ``timm.create_model(trunk, in_chans=C, num_classes=0)`` (or torchvision without ``fc``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("da_l3.", "da_l4."))}

    def optional_keys(self, state_dict: Mapping[str, Any], source: str = "the state dict") -> tuple[str, ...]:
        """Key prefixes ``state_dict`` may lack when loaded strictly (:mod:`decur_lightning.weights` hook).

        A plain ResNet state dict (no ``da_l3.*`` / ``da_l4.*``: torchvision, timm, torchgeo, the
        authors' backbone-only files) loads into the trunk; the attention blocks keep their
        initialisation (close to the identity), with a warning. A state dict with attention
        blocks must hold all of them.
        """
        if any(k.startswith(_BLOCK_PREFIXES) for k in state_dict):
            return ()
        warnings.warn(
            f"{source} holds a plain ResNet (no da_l3/da_l4 attention blocks): loading the trunk; the "
            "residual deformable attention blocks keep their initialisation (close to the identity).",
            stacklevel=3,
        )
        return _BLOCK_PREFIXES

    def load_pretrained_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights strictly: a full ``ResNetRDA`` state dict, or a plain ResNet one.

        A dict without ``da_l3.*`` / ``da_l4.*`` keys is a plain torchvision/timm ResNet (its
        ``fc.*`` classifier is dropped): it is loaded into the trunk, and the attention blocks
        keep their initialisation (a warning says so). A state dict without the blocks'
        ``_extra_state`` (reference grid) leaves their grid as constructed. Any other mismatch raises a
        ``RuntimeError`` listing the missing and unexpected keys.
        """
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        has_attention = any(k.startswith(("da_l3.", "da_l4.")) for k in state_dict)
        target = self if has_attention else _Trunk(self)
        try:
            target.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            what = "a ResNetRDA" if has_attention else f"a plain {self.trunk_name}"
            raise RuntimeError(
                f"These weights look like {what} state dict but do not fit this "
                f"'{self.trunk_name}_rda' encoder; check the encoder name and in_channels.\n{err}"
            ) from err
        if not has_attention:
            warnings.warn(
                f"Loaded trunk-only {self.trunk_name} weights into '{self.trunk_name}_rda'; the "
                "deformable attention blocks keep their initialisation (close to the identity).",
                stacklevel=2,
            )


_BLOCK_PREFIXES: tuple[str, ...] = ("da_l3.", "da_l4.")
_AUTHORS_BLOCK = re.compile(r"^da(\d+)_(l3|l4)\.")


def convert_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    position: int | str | None = None,
    *,
    source: str = "the state dict",
    rda_blocks: int | None = None,
    **_: Any,
) -> dict[str, torch.Tensor] | None:
    """The authors' RDA layout mapped onto :class:`ResNetRDA`'s keys, or ``None`` if not that layout.

    The authors' code (github.com/zhu-xlab/DeCUR) keeps the attention blocks beside the
    backbone: ``backbone.*`` (the ResNet; in a joint checkpoint the chosen ``backbone_<k>``)
    plus ``da1_l3.*``, ``da1_l4.*`` (modality 1's blocks) and/or ``da2_l3.*``, ``da2_l4.*``.
    They become the trunk's bare keys and ``da_l3.*`` / ``da_l4.*``, and the blocks'
    ``_extra_state`` is set to DAT's reference grid ``"dat"`` (the grid they were trained
    with; a warning says so). The authors' pretraining ran modality 2 through modality 1's
    blocks and never trained ``da2_*``: taking them warns.

    Args:
        state_dict: a flat state dict (``module.`` stripped) with ``backbone.*`` keys.
        position: the modality's 1-based position (``k`` of ``da{k}_*``); needed when both
            block groups are present. A file holding one group gives it to any position (with a
            warning when the numbers differ).
        source: how to name the source in messages.
        rda_blocks: take ``da{rda_blocks}_*`` whatever the position (``1``: the blocks modality
            2 actually ran through in the authors' pretraining).

    Returns:
        The encoder's state dict (trunk and blocks, classifier not removed), or ``None`` when
        ``state_dict`` has no ``da{k}_l3/l4`` blocks (not this family's layout).

    Raises:
        ValueError: other keys beside ``backbone.*`` and the blocks (nothing is dropped
            silently), or an ambiguous / unknown block group.
    """
    groups = sorted({int(m.group(1)) for k in state_dict if (m := _AUTHORS_BLOCK.match(k))})
    if not groups:
        return None
    if rda_blocks is not None and (isinstance(rda_blocks, bool) or rda_blocks not in groups):
        raise ValueError(
            f"rda_blocks={rda_blocks!r}: {source} holds the attention blocks of groups {groups} (da<k>_*)."
        )
    others = [k for k in state_dict if not k.startswith("backbone.") and not _AUTHORS_BLOCK.match(k)]
    if others:
        raise ValueError(
            f"{source} looks like an authors' RDA backbone file (backbone.*, da<k>_l3/l4.*) but also holds "
            f"{others[:20]}; nothing is dropped silently: remove them or map the file yourself."
        )
    if rda_blocks is not None:
        group = rda_blocks
    elif len(groups) == 1:
        group = groups[0]
        if isinstance(position, int) and not isinstance(position, bool) and position != group:
            warnings.warn(
                f"{source} holds only the attention blocks da{group}_*: taking them for the modality at position "
                f"{position}.",
                stacklevel=3,
            )
    elif isinstance(position, int) and not isinstance(position, bool) and position in groups:
        group = position
    else:
        raise ValueError(
            f"{source} holds the attention blocks {[f'da{g}_*' for g in groups]} and records no modality names, "
            f"so modality {position!r} cannot be resolved: pass modality=1 or 2 (the position; in the authors' "
            "SAR-optical checkpoints 1 is SAR, 2 optical), or rda_blocks."
        )
    converted = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    for level in ("l3", "l4"):
        prefix = f"da{group}_{level}."
        block = {f"da_{level}.{k[len(prefix) :]}": v for k, v in state_dict.items() if k.startswith(prefix)}
        if block:
            converted.update(block)
            converted[f"da_{level}._extra_state"] = reference_points_state("dat")
    warnings.warn(
        f"The attention blocks of {source} were trained with DAT's reference grid ((i + 0.5) / (H_G - 1)): "
        "the encoder switches to rda_reference_points='dat' (saved with its state dict).",
        stacklevel=3,
    )
    if group == 2:
        warnings.warn(
            f"Loading the da2_* attention blocks of {source}: the authors' pretraining code ran modality 2 "
            "through modality 1's blocks (da1_*) and never trained da2_*, so these are untrained. "
            "Use load_encoder_state_dict(..., rda_blocks=1) for the blocks modality 2 ran through.",
            stacklevel=3,
        )
    return converted


class _Trunk(nn.Module):
    """View of a :class:`ResNetRDA` without its attention blocks (for strict trunk loading)."""

    def __init__(self, encoder: ResNetRDA) -> None:
        super().__init__()
        for name, child in encoder.named_children():
            if name not in ("da_l3", "da_l4"):
                self.add_module(name, child)
