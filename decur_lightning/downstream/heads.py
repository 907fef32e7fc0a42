"""The paper's three-level FCN head (Section 5.2, Appendix B.2).

Hand-written: segmentation_models_pytorch has no FCN, and torchvision's FCN head is
single-scale (one 3x3 conv block on the last map), not the paper's sum over three levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FCNHead"]


class FCNHead(nn.Module):
    """Sum of per-level class maps, each upsampled to the output size (FCN, Long et al. 2015).

    Paper B.2: "The last three feature maps from both modalities are concatenated and
    upsampled to the input size. They are further followed by 1x1 convolution outputting three
    segmentation maps, which are added together to form the final output map." Here each
    level's 1x1 convolution runs *before* the upsampling: bilinear interpolation is a per-channel
    convex combination of pixels (weights sum to 1) and a 1x1 convolution an affine map per
    pixel, so the two commute (bias included) and the result is the same, while the
    convolution runs on the small maps (for ResNet-50, 3584 channels at 1/8 .. 1/32 size instead
    of at full size).

    Args:
        level_channels: channels of each level's input (after concatenating the modalities),
            e.g. ``[512 + 512, 1024 + 1024, 2048 + 2048]`` for two ResNet-50s.
        num_classes: output classes.

    Example:
        >>> import torch
        >>> head = FCNHead([256, 512, 1024], num_classes=10)
        >>> levels = [torch.randn(2, 256, 8, 8), torch.randn(2, 512, 4, 4), torch.randn(2, 1024, 2, 2)]
        >>> head(levels, size=(64, 64)).shape
        torch.Size([2, 10, 64, 64])
    """

    def __init__(self, level_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not level_channels:
            raise ValueError("FCNHead needs at least one feature level.")
        self.classifiers = nn.ModuleList(nn.Conv2d(int(c), num_classes, kernel_size=1) for c in level_channels)

    def forward(self, levels: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Class logits ``(N, num_classes, *size)`` from the per-level maps (finest first)."""
        if len(levels) != len(self.classifiers):
            raise ValueError(f"FCNHead was built for {len(self.classifiers)} levels, got {len(levels)}.")
        logits: Tensor | None = None
        for classifier, level in zip(self.classifiers, levels):
            upsampled = F.interpolate(classifier(level), size=size, mode="bilinear", align_corners=False)
            logits = upsampled if logits is None else logits + upsampled
        assert logits is not None
        return logits
