"""CMX RGB-X fusion for semantic segmentation (Zhang et al., "CMX: Cross-Modal Fusion for RGB-X
Semantic Segmentation with Transformers", T-ITS 2023), as DeCUR transfers its MiT-B2/B5 encoders
to it (paper Section 5.3, Table 3).

Two MiT branches run stage by stage. After each stage a Feature Rectify Module (FRM) lets each
branch correct the other (its output feeds both next stages) and a Feature Fusion Module (FFM)
merges the rectified pair into one map; the four fused maps go to SegFormer's all-MLP decoder.

Hand-written: no installed library has CMX's FRM and FFM. The MiT trunks are smp's (via
:class:`~decur_lightning.models.MiTEncoder`) and the decoder is smp's ``SegformerDecoder``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from torch import Tensor, nn

from ..models.mit import MiTEncoder

__all__ = [
    "CMXFusion",
    "EfficientCrossAttention",
    "FeatureFusionModule",
    "FeatureRectifyModule",
    "SegFormerHead",
]


class FeatureRectifyModule(nn.Module):
    r"""CMX's FRM: each modality's features rectified by the other's, channel- and space-wise.

    From the concatenation of both maps ``X = [x_1, x_2]`` (``2C`` channels):

    - channel weights ``W_C = sigmoid(MLP([avgpool(X), maxpool(X)]))``, ``2C`` values, one
      ``C``-vector per modality (MLP: Linear(4C, 4C/r)-ReLU-Linear(4C/r, 2C));
    - spatial weights ``W_S = sigmoid(conv1x1(relu(conv1x1(X))))``, one ``H x W`` map per
      modality (2C -> C/r -> 2 channels).

    .. math::
        x_1' = x_1 + \lambda_c W_C^{(2)} \odot x_2 + \lambda_s W_S^{(2)} \odot x_2, \quad
        x_2' = x_2 + \lambda_c W_C^{(1)} \odot x_1 + \lambda_s W_S^{(1)} \odot x_1

    with ``lambda_c = lambda_s = 0.5`` (CMX).

    Args:
        channels: channels ``C`` of each modality's map.
        reduction: hidden-width reduction ``r`` (CMX: 1).
        lambda_c, lambda_s: weights of the channel- and spatial-wise rectification.
    """

    def __init__(self, channels: int, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.lambda_c = lambda_c
        self.lambda_s = lambda_s
        self.channel_mlp = nn.Sequential(
            nn.Linear(4 * channels, 4 * channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(4 * channels // reduction, 2 * channels),
            nn.Sigmoid(),
        )
        self.spatial_mlp = nn.Sequential(
            nn.Conv2d(2 * channels, channels // reduction, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, 2, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, rgb: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Rectified ``(rgb', x')`` (``x_1'``, ``x_2'`` above), same shapes as the inputs ``(N, C, H, W)``."""
        both = torch.cat([rgb, x], dim=1)
        pooled = torch.cat([both.mean(dim=(2, 3)), both.amax(dim=(2, 3))], dim=1)
        channel = self.channel_mlp(pooled).view(rgb.shape[0], 2, self.channels, 1, 1)
        spatial = self.spatial_mlp(both).unsqueeze(2)  # (N, 2, 1, H, W)
        rgb_out = rgb + self.lambda_c * channel[:, 1] * x + self.lambda_s * spatial[:, 1] * x
        x_out = x + self.lambda_c * channel[:, 0] * rgb + self.lambda_s * spatial[:, 0] * rgb
        return rgb_out, x_out


class EfficientCrossAttention(nn.Module):
    r"""CMX's cross-attention with a global context per head (linear in the number of tokens).

    Per modality, keys and values come from one linear layer; the queries are the tokens
    themselves. The context ``G = softmax(K^T V / sqrt(d))`` (softmax over the key channels) is a
    ``d x d`` matrix per head, and each modality reads the *other* modality's context:
    ``U_1 = Q_1 G_2``, ``U_2 = Q_2 G_1``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv1 = nn.Linear(dim, 2 * dim, bias=False)
        self.kv2 = nn.Linear(dim, 2 * dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def _context(self, x: Tensor, kv: nn.Linear) -> Tensor:
        key, value = (self._heads(t) for t in kv(x).chunk(2, dim=-1))
        return (key.transpose(-2, -1) @ value * self.scale).softmax(dim=-2)  # (N, heads, d, d)

    def forward(self, rgb: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attended tokens ``(N, L, dim)`` of each modality (RGB, then X)."""
        # kv1 / kv2: CMX's names (its checkpoints' keys) for the RGB and the X branch.
        rgb_context, x_context = self._context(rgb, self.kv1), self._context(x, self.kv2)
        rgb_out = self._heads(rgb) @ x_context
        x_out = self._heads(x) @ rgb_context
        return rgb_out.transpose(1, 2).flatten(2), x_out.transpose(1, 2).flatten(2)


class FeatureFusionModule(nn.Module):
    """CMX's FFM: information exchange by cross-attention, then fusion by channel embedding.

    Stage 1 (per modality, on tokens): a linear layer + ReLU embeds each token into a residual
    half and an interaction half; the interaction halves go through
    :class:`EfficientCrossAttention`; ``[residual, cross-attended]`` is projected back by a
    linear layer, added to the input and layer-normalised. Stage 2 (on the concatenated maps,
    ``2C`` channels): channel embedding ``conv1x1 -> depthwise conv3x3 -> ReLU -> conv1x1 -> BN``
    plus a ``conv1x1`` skip, then batch norm, giving the fused ``C``-channel map.

    Args:
        channels: channels ``C`` of each modality's map (and of the output).
        num_heads: heads of the cross-attention (CMX: the MiT stage's head count).
        reduction: width reduction of the embeddings (CMX: 1).
    """

    def __init__(self, channels: int, num_heads: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = channels // reduction
        self.channel_proj1 = nn.Linear(channels, 2 * hidden)
        self.channel_proj2 = nn.Linear(channels, 2 * hidden)
        self.cross_attention = EfficientCrossAttention(hidden, num_heads)
        self.end_proj1 = nn.Linear(2 * hidden, channels)
        self.end_proj2 = nn.Linear(2 * hidden, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.skip = nn.Conv2d(2 * channels, channels, kernel_size=1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, rgb: Tensor, x: Tensor) -> Tensor:
        """The fused map ``(N, C, H, W)`` of the two rectified maps ``(N, C, H, W)`` (RGB, then X).

        Layers ending in 1 / 2 (CMX's names, its checkpoints' keys) act on the RGB / the X tokens.
        """
        batch, channels, height, width = rgb.shape
        t1, t2 = rgb.flatten(2).transpose(1, 2), x.flatten(2).transpose(1, 2)
        residual1, inter1 = F.relu(self.channel_proj1(t1)).chunk(2, dim=-1)
        residual2, inter2 = F.relu(self.channel_proj2(t2)).chunk(2, dim=-1)
        cross1, cross2 = self.cross_attention(inter1, inter2)
        t1 = self.norm1(t1 + self.end_proj1(torch.cat([residual1, cross1], dim=-1)))
        t2 = self.norm2(t2 + self.end_proj2(torch.cat([residual2, cross2], dim=-1)))
        merged = torch.cat([t1, t2], dim=-1).transpose(1, 2).reshape(batch, 2 * channels, height, width)
        return self.norm(self.skip(merged) + self.channel_embed(merged))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (Xie et al. 2021) with a classifier: logits at stride 4.

    Each of the four maps is embedded to ``embed_dim`` channels by a linear layer, upsampled to
    the first map's size, concatenated, fused (1x1 conv, batch norm, ReLU: smp's
    ``SegformerDecoder``), then dropout and a 1x1 classifier. SegFormer and CMX use
    ``embed_dim=512`` for B2-B5 (256 for B0/B1).

    Args:
        in_channels: channels of the four maps (e.g. 64 / 128 / 320 / 512 for MiT-B2).
        num_classes: output classes.
        embed_dim: decoder width.
        dropout: dropout before the classifier (SegFormer, CMX: 0.1).
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 512, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SegFormerHead takes the four MiT stage maps; got channels {list(in_channels)}.")
        # smp's decoder expects encoder channel lists that start with the image and an empty stride-2
        # level; only the four stage entries are used.
        self.decoder = SegformerDecoder([0, 0, *in_channels], encoder_depth=5, segmentation_channels=embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits ``(N, num_classes, H1, W1)`` at the size of the first (stride-4) map."""
        first = features[0]
        batch, _, height, width = first.shape
        # smp sizes its output as a quarter of its first entry (the image): give it an empty
        # tensor four times the stride-4 map.
        image_stub = first.new_empty(batch, 0, 4 * height, 4 * width)
        empty_level = first.new_empty(batch, 0, 2 * height, 2 * width)
        fused = self.decoder([image_stub, empty_level, *features])
        return self.classifier(self.dropout(fused))


class CMXFusion(nn.Module):
    """The CMX network around two MiT branches (RGB and X): FRM + FFM per stage and the MLP decoder.

    The branches are passed to :meth:`forward` (they belong to the caller, e.g.
    :class:`~decur_lightning.downstream.MultimodalSegmentationModule`, which initialises each
    from a DeCUR-pretrained MiT of its modality). Per stage ``i`` (1..4): both branches run
    ``patch_embed{i} -> block{i} -> norm{i}``; :class:`FeatureRectifyModule` rectifies the pair,
    which both feeds the next stage and goes to :class:`FeatureFusionModule`; the four fused
    maps feed :class:`SegFormerHead`.

    Args:
        channels: the MiT stage widths (``MiTEncoder.feature_channels``).
        num_heads: the MiT stage head counts (1 / 2 / 5 / 8 for B1-B5; CMX's FFM heads).
        num_classes: output classes.
        embed_dim: decoder width (512 for B2+).
        lambda_c, lambda_s: FRM weights (0.5).
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_heads: Sequence[int],
        num_classes: int,
        embed_dim: int = 512,
        lambda_c: float = 0.5,
        lambda_s: float = 0.5,
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(num_heads) != 4:
            raise ValueError(f"CMX needs four stages; got channels {list(channels)}, heads {list(num_heads)}.")
        self.rectify = nn.ModuleList(FeatureRectifyModule(c, lambda_c=lambda_c, lambda_s=lambda_s) for c in channels)
        self.fuse = nn.ModuleList(FeatureFusionModule(c, h) for c, h in zip(channels, num_heads))
        self.decode_head = SegFormerHead(channels, num_classes, embed_dim)

    @classmethod
    def for_branches(
        cls, rgb_branch: MiTEncoder, x_branch: MiTEncoder, num_classes: int, embed_dim: int = 512
    ) -> CMXFusion:
        """Build the fusion modules for two MiT branches (RGB and X) of the same variant."""
        for branch in (rgb_branch, x_branch):
            if not isinstance(branch, MiTEncoder):
                raise TypeError(
                    f"CMX runs two MiT branches stage by stage; got {type(branch).__name__}. Use encoder names "
                    "mit_b0 ... mit_b5 for both modalities."
                )
        if rgb_branch.variant != x_branch.variant:
            raise ValueError(
                f"CMX needs two branches of one MiT variant; got {rgb_branch.variant} and {x_branch.variant}."
            )
        return cls(rgb_branch.feature_channels, stage_num_heads(rgb_branch), num_classes, embed_dim)

    def forward(self, rgb: Tensor, x: Tensor, rgb_branch: MiTEncoder, x_branch: MiTEncoder) -> Tensor:
        """Logits at stride 4 ``(N, num_classes, H/4, W/4)`` from the RGB and the X images."""
        fused = []
        for stage, (rectify, fuse) in enumerate(zip(self.rectify, self.fuse), start=1):
            rgb = _run_stage(rgb_branch, stage, rgb)
            x = _run_stage(x_branch, stage, x)
            rgb, x = rectify(rgb, x)
            fused.append(fuse(rgb, x))
        return self.decode_head(fused)


def _run_stage(branch: MiTEncoder, stage: int, x: Tensor) -> Tensor:
    """One MiT stage as smp runs it: overlapping patch embedding, transformer blocks, norm."""
    x = getattr(branch, f"patch_embed{stage}")(x)
    x = getattr(branch, f"block{stage}")(x)
    return getattr(branch, f"norm{stage}")(x).contiguous()


def stage_num_heads(branch: MiTEncoder) -> list[int]:
    """Attention heads of each MiT stage (read from the first block of the stage)."""
    return [int(getattr(branch, f"block{stage}")[0].attn.num_heads) for stage in range(1, 5)]
