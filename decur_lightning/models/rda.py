"""Residual deformable attention (RDA), DeCUR Section 3.2 and Appendix B.1.

Hand-written: no installed library has this block. kornia's ``MultiScaleDeformableAttention``
is the DETR-style algorithm (learned sampling weights, no softmax over keys), not the DAT one
the paper uses. The block follows DAT (Xia et al., CVPR 2022) and DAT++ (arXiv 2309.01430),
``DAttentionBaseline`` in the setting DeCUR uses (no offset range scaling, a learned relative
position bias table, no dropout), plus the residual connection of Section 3.2.

Parameter names equal DAT's (``proj_q``, ``proj_k``, ``proj_v``, ``proj_out``,
``conv_offset.{0,1.norm,3}``, ``rpe_table``), so the authors' RDA checkpoints
(``da1_l3.*`` / ``da1_l4.*``) map onto it by renaming the prefix only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_INIT_GAIN",
    "REFERENCE_POINTS",
    "ReferencePoints",
    "ResidualDeformableAttention",
    "reference_points_state",
]

#: Reference grid layouts: ``"centre"`` (cell centres, this package's default) and ``"dat"``
#: (DAT's and the authors' ``(i + 0.5) / (H_G - 1)``).
ReferencePoints = Literal["centre", "dat"]
REFERENCE_POINTS: tuple[str, ...] = ("centre", "dat")
#: Default scale of ``proj_out``'s PyTorch initialisation (see :class:`ResidualDeformableAttention`).
DEFAULT_INIT_GAIN = 0.1


def reference_points_state(mode: ReferencePoints) -> torch.Tensor:
    """The state-dict entry (``<block>._extra_state``) that records a block's reference grid.

    A 0-d integer tensor (the index of ``mode`` in :data:`REFERENCE_POINTS`), so state dicts
    stay all-tensor and load with ``torch.load(weights_only=True)``.
    """
    _check_reference_points(mode)
    return torch.tensor(REFERENCE_POINTS.index(mode))


def _check_reference_points(mode: Any) -> None:
    if mode not in REFERENCE_POINTS:
        raise ValueError(
            f"reference_points must be 'centre' (cell centres) or 'dat' (DAT's and the authors' grid), got {mode!r}."
        )


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of an ``(N, C, H, W)`` map.

    The LayerNorm lives under ``.norm`` (DAT's ``LayerNormProxy``), so DAT state dicts load.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualDeformableAttention(nn.Module):
    r"""Deformable multi-head attention with a residual connection: ``y = x + DA(x)``.

    DeCUR Section 3.2 (after DAT): queries ``q = proj_q(x)`` at every position of the
    ``H x W`` map. Per group of channels, an offset network (depthwise conv with
    ``offset_kernel_size`` and ``offset_stride`` -> LayerNorm over channels -> GELU -> 1x1 conv
    to 2 channels) predicts offsets ``dp`` for a reference grid ``p`` of ``H_G x W_G`` points
    (``H_G = H / r``, ``r = offset_stride``). Features are sampled bilinearly from ``x`` at
    ``clamp(p + dp, -1, 1)``, projected to keys and values, and every query attends to them:

    .. math:: \mathrm{DA}(x) = W_{out}\,\mathrm{softmax}\big(q k^T / \sqrt{d} + B\big)\, v

    with ``B`` a learned relative position bias: a table ``rpe_table`` of shape
    ``(heads, 2 H_0 - 1, 2 W_0 - 1)`` sampled bilinearly at the query-minus-sample
    displacement, in coordinates normalised to the map, so any map size works (``H_0 x W_0``,
    ``fmap_size``, is only the size the table is laid out for). Section 3.2 adds the input back
    (residual) "to restrict unexpected influences of the attention module ... especially
    helpful in early training"; ``residual=False`` gives the plain deformable attention ``DA(x)``
    of the ablations (Tables 4 and 7, "DA").

    Initialisation: every layer has PyTorch's default initialisation (as DAT and the authors'
    code), except that ``proj_out`` (weight and bias) is scaled by ``init_gain`` (0.1): the
    attention branch starts at about 2 % of its input's norm (ResNet-18, 64 px), so the block
    starts close to, but not exactly, the identity. ``proj_out`` is deliberately *not*
    zero-initialised: LARS (lightly's, Appendix B.1) skips the trust ratio for a weight of norm
    0, so a zero ``proj_out`` gets a raw SGD step at the full learning rate (0.2) and the branch
    blows up to many times its input within ten steps (``benchmarks/rda.py --lars``).
    ``init_gain=1.0`` is DAT's and the authors' initialisation (branch about 20 % of the input).

    Paper settings (Appendix B.1, ResNet-50 at 224 px): after layer3, a 14x14 map, 8 heads x
    128 channels, 4 groups, stride 2, kernel 5; after layer4, 7x7, 16 heads x 128 channels,
    8 groups, stride 1, kernel 3.

    Reference points: the centres of the ``H_G x W_G`` cells that tile the map, in the
    ``align_corners=True`` frame of ``grid_sample`` (-1 and +1 are the centres of the first
    and last pixel), so they lie inside ``[-1, 1]`` for every map size. (DAT's code places
    them at ``(i + 0.5) / (H_G - 1)``, which runs past +1 at the last row and column and is
    undefined for ``H_G = 1``.) ``reference_points="dat"`` uses DAT's grid: weights trained
    with it (the authors' RDA checkpoints) expect it. The mode is part of the state dict
    (``<block>._extra_state``, see :func:`reference_points_state`), so a saved block reloads
    with the grid it was trained with; a state dict without that entry (written before the
    switch existed, or a trunk-only file) leaves the block's mode as constructed.

    Args:
        channels: input and output channels ``C``; the attention width (heads x head_dim).
        num_heads: attention heads; ``channels`` must be divisible by it (head_dim =
            ``channels // num_heads``).
        num_groups: offset groups; ``num_heads`` must be divisible by it. Each group of
            ``channels // num_groups`` channels gets its own sampling points, shared by its
            ``num_heads // num_groups`` heads.
        offset_stride: stride ``r`` of the offset network's depthwise conv (downsampling of the
            reference grid).
        offset_kernel_size: kernel size of the depthwise conv (padding ``k // 2``).
        fmap_size: ``(H_0, W_0)`` (or one int) the bias table is laid out for.
        feature_stride: stride of the input map relative to the image, if known; only used to
            tell the user which image size is needed when the map is too small.
        reference_points: ``"centre"`` (cell centres, default) or ``"dat"`` (DAT's
            ``(i + 0.5) / (H_G - 1)`` mapped to ``[-1, 1]``; needs ``H_G, W_G >= 2``).
        residual: return ``x + DA(x)`` (RDA, the paper's module) or ``DA(x)`` alone (the "DA"
            rows of Tables 4 and 7).
        init_gain: scale of ``proj_out``'s default initialisation; positive (``1.0``: DAT's
            and the authors' initialisation).

    Example:
        >>> block = ResidualDeformableAttention(256, num_heads=8, num_groups=4,
        ...                                     offset_stride=2, offset_kernel_size=5)
        >>> block(torch.randn(2, 256, 14, 14)).shape
        torch.Size([2, 256, 14, 14])
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        num_groups: int,
        offset_stride: int,
        offset_kernel_size: int,
        fmap_size: int | tuple[int, int] = 14,
        feature_stride: int | None = None,
        reference_points: ReferencePoints = "centre",
        residual: bool = True,
        init_gain: float = DEFAULT_INIT_GAIN,
    ) -> None:
        super().__init__()
        _check_reference_points(reference_points)
        if not isinstance(init_gain, (int, float)) or isinstance(init_gain, bool) or not init_gain > 0:
            raise ValueError(
                f"init_gain must be a positive number (0.1 by default, 1.0 for DAT's initialisation), got "
                f"{init_gain!r}. A zero proj_out is not allowed: LARS skips the trust ratio for zero-norm "
                "weights and the first step then blows the attention branch up."
            )
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        if num_heads % num_groups:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_groups ({num_groups}).")
        fmap_h, fmap_w = (fmap_size, fmap_size) if isinstance(fmap_size, int) else fmap_size
        if fmap_h < 2 or fmap_w < 2:
            raise ValueError(f"fmap_size must be at least 2x2, got {fmap_h}x{fmap_w}.")
        self.channels = channels
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.head_dim = channels // num_heads
        self.group_channels = channels // num_groups
        self.feature_stride = feature_stride
        self.reference_points: ReferencePoints = reference_points
        self.residual = bool(residual)

        self.proj_q = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_k = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        group_channels = self.group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(
                group_channels,
                group_channels,
                kernel_size=offset_kernel_size,
                stride=offset_stride,
                padding=offset_kernel_size // 2,
                groups=group_channels,
            ),
            ChannelLayerNorm(group_channels),
            nn.GELU(),
            nn.Conv2d(group_channels, 2, kernel_size=1, bias=False),
        )
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * fmap_h - 1, 2 * fmap_w - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)
        with torch.no_grad():
            self.proj_out.weight.mul_(init_gain)
            self.proj_out.bias.mul_(init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + DA(x)`` (``DA(x)`` with ``residual=False``), the shape of ``x`` ``(N, C, H, W)``, ``H, W >= 2``."""
        branch = self.attention(x)[0]
        return x + branch if self.residual else branch

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reference_points={self.reference_points!r}, residual={self.residual}"

    def get_extra_state(self) -> torch.Tensor:
        """The reference grid mode, saved as ``<prefix>_extra_state`` (:func:`reference_points_state`)."""
        return reference_points_state(self.reference_points)

    def set_extra_state(self, state: Any) -> None:
        """Restore the reference grid mode from a state dict (a 0-d index tensor, or the name)."""
        if isinstance(state, torch.Tensor) and state.numel() == 1 and 0 <= int(state) < len(REFERENCE_POINTS):
            state = REFERENCE_POINTS[int(state)]
        _check_reference_points(state)
        self.reference_points = state

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Like BatchNorm's num_batches_tracked: state dicts written before the reference-grid
        # switch existed have no '_extra_state'; they load strictly and keep the mode as built.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention branch alone (no residual) and its sampling points.

        Returns:
            ``DA(x)`` of shape ``(N, C, H, W)`` and the sampling points of shape
            ``(N, groups, H_G, W_G, 2)`` as ``(y, x)`` in ``[-1, 1]`` (for visualising where
            each modality looks, Section 6 / Fig. 5b).
        """
        batch, channels, height, width = x.shape
        self._check_input(channels, height, width)
        groups, heads = self.num_groups, self.num_heads

        query = self.proj_q(x)
        offset = self.conv_offset(query.reshape(batch * groups, self.group_channels, height, width))
        key_h, key_w = offset.shape[-2:]
        # Positions in float32 even under autocast: bf16 would move them by up to half a pixel.
        reference = self._reference_points(height, width, key_h, key_w, offset.device, self.reference_points)
        points = (reference + offset.float().permute(0, 2, 3, 1)).clamp(-1.0, 1.0)  # (B*G, Hg, Wg, 2): y, x

        sampled = F.grid_sample(
            x.reshape(batch * groups, self.group_channels, height, width),
            points.flip(-1).to(x.dtype),  # grid_sample wants (x, y)
            mode="bilinear",
            align_corners=True,
        ).reshape(batch, channels, key_h, key_w)
        num_keys = key_h * key_w

        def split_heads(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.reshape(batch, heads, self.head_dim, length).transpose(-1, -2)

        q = split_heads(query, height * width)
        k = split_heads(self.proj_k(sampled), num_keys)
        v = split_heads(self.proj_v(sampled), num_keys)
        bias = self._position_bias(points, height, width).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        return self.proj_out(out), points.reshape(batch, groups, key_h, key_w, 2)

    def _check_input(self, channels: int, height: int, width: int) -> None:
        if channels != self.channels:
            raise ValueError(f"ResidualDeformableAttention was built for {self.channels} channels, got {channels}.")
        if height < 2 or width < 2:
            hint = ""
            if self.feature_stride is not None:
                side = 2 * self.feature_stride
                hint = (
                    f" This block sees the image at stride {self.feature_stride}: use input images"
                    f" of at least {side}x{side} pixels."
                )
            raise ValueError(
                f"ResidualDeformableAttention needs a feature map of at least 2x2, got {height}x{width}.{hint}"
            )

    @staticmethod
    def _reference_points(
        height: int, width: int, key_h: int, key_w: int, device: torch.device, mode: ReferencePoints = "centre"
    ) -> torch.Tensor:
        """The ``key_h x key_w`` reference grid as ``(y, x)`` in the ``[-1, 1]`` frame of the map.

        ``"centre"``: centres of a ``key_h x key_w`` tiling of the map. ``"dat"``: DAT's
        ``(i + 0.5) / (H_G - 1) * 2 - 1`` (the last row and column lie past +1).
        """
        if mode == "dat" and min(key_h, key_w) < 2:
            raise ValueError(
                f"DAT's reference grid (i + 0.5) / (H_G - 1) needs at least 2x2 reference points, got "
                f"{key_h}x{key_w}: use larger inputs or reference_points='centre'."
            )

        def centres(size: int, cells: int) -> torch.Tensor:
            index = torch.arange(cells, dtype=torch.float32, device=device) + 0.5
            if mode == "dat":
                return index / (cells - 1) * 2.0 - 1.0
            pixel = index * (size / cells) - 0.5
            return pixel / (size - 1) * 2.0 - 1.0

        ref_y, ref_x = torch.meshgrid(centres(height, key_h), centres(width, key_w), indexing="ij")
        return torch.stack((ref_y, ref_x), dim=-1)

    def _position_bias(self, points: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Relative position bias ``(B, heads, H*W, num_keys)`` sampled from ``rpe_table``.

        Query positions and sampling points are both in ``[-1, 1]``, so their displacement lies
        in ``[-2, 2]``; halved, it addresses the whole table (its centre is zero displacement).
        """
        batch_groups, key_h, key_w, _ = points.shape
        batch = batch_groups // self.num_groups
        dtype, device = points.dtype, points.device
        query_y, query_x = torch.meshgrid(
            torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device),
            torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device),
            indexing="ij",
        )
        queries = torch.stack((query_y, query_x), dim=-1).reshape(1, height * width, 1, 2)
        displacement = 0.5 * (queries - points.reshape(batch_groups, 1, key_h * key_w, 2))
        heads_per_group = self.num_heads // self.num_groups
        table = self.rpe_table.to(dtype).reshape(1, self.num_groups, heads_per_group, *self.rpe_table.shape[1:])
        table = table.expand(batch, -1, -1, -1, -1).reshape(batch_groups, heads_per_group, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table, displacement.flip(-1), mode="bilinear", align_corners=True)
        return bias.reshape(batch, self.num_heads, height * width, key_h * key_w)
