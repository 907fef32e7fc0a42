"""Per-modality view augmentations, batched on the device (kornia).

DeCUR makes two augmented views of each modality (Fig. 2). The paper (Appendix B.1) follows
BYOL's optical pipeline and removes what a modality cannot take:

==========  =====================================================================================
kind        augmentations
==========  =====================================================================================
optical     resized crop, brightness/contrast (p=0.8), grayscale (p=0.2), Gaussian blur,
            solarize, horizontal and vertical flip (multispectral: any band count)
rgb         as optical, with full colour jitter (brightness, contrast, saturation, hue)
sar         resized crop, grayscale (p=0.2), Gaussian blur, horizontal and vertical flip
dem         resized crop, horizontal and vertical flip
hha         resized crop, horizontal flip
generic     resized crop, horizontal and vertical flip (any modality)
==========  =====================================================================================

As in BYOL, the two views are asymmetric: Gaussian blur with p=1.0 for view 1 and p=0.1 for
view 2, solarize with p=0.0 for view 1 and p=0.2 for view 2. Inputs are expected in [0, 1]
(the datamodules of this package normalise so); brightness/contrast clip to [0, 1].

Example:
    >>> views = make_view_pair("sar", size=32)
    >>> x = torch.rand(8, 2, 48, 48)
    >>> xa, xb = views(x)
    >>> xa.shape
    torch.Size([8, 2, 32, 32])
"""

from __future__ import annotations

from typing import Literal, get_args

import kornia.augmentation as K
import torch
from torch import Tensor, nn

__all__ = ["VIEW_KINDS", "ViewPair", "make_view_augmentation", "make_view_pair"]

ViewKind = Literal["optical", "rgb", "sar", "dem", "hha", "generic"]
VIEW_KINDS: tuple[str, ...] = get_args(ViewKind)

# BYOL's asymmetric probabilities (blur, solarize) for view 1 and view 2.
_BLUR_P = {1: 1.0, 2: 0.1}
_SOLARIZE_P = {1: 0.0, 2: 0.2}


def _blur_kernel(size: int) -> int:
    """BYOL uses a 23 px kernel at 224 px: about 10 % of the crop, odd, at least 3."""
    kernel = max(3, int(round(0.1 * size)))
    return kernel if kernel % 2 == 1 else kernel + 1


def make_view_augmentation(
    kind: ViewKind,
    size: int,
    view: Literal[1, 2] = 1,
    scale: tuple[float, float] = (0.08, 1.0),
) -> nn.Module:
    """One view's kornia pipeline for a modality kind (Appendix B.1).

    Args:
        kind: one of ``"optical"``, ``"rgb"``, ``"sar"``, ``"dem"``, ``"hha"``, ``"generic"``.
        size: side of the square output crop in pixels (the paper: 224).
        view: 1 or 2, selects BYOL's asymmetric blur/solarize probabilities.
        scale: area range of the random resized crop.

    Returns:
        A module mapping a batch ``(N, C, H, W)`` in [0, 1] to ``(N, C, size, size)``: the
        kornia augmentations in an ``nn.Sequential`` (no transform tracking, which views never
        need), without the operations whose probability is 0 for this view.
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"Unknown view augmentation kind {kind!r}; expected one of {VIEW_KINDS}.")
    if view not in (1, 2):
        raise ValueError(f"view must be 1 or 2, got {view!r}.")
    if size < 2:
        raise ValueError(f"The view size must be at least 2 px, got {size}.")
    crop = K.RandomResizedCrop((size, size), scale=scale)
    hflip, vflip = K.RandomHorizontalFlip(), K.RandomVerticalFlip()
    blur = K.RandomGaussianBlur((_blur_kernel(size),) * 2, (0.1, 2.0), p=_BLUR_P[view])
    if kind == "optical":
        ops = [
            crop,
            K.RandomBrightness((0.6, 1.4), p=0.8),
            K.RandomContrast((0.6, 1.4), p=0.8),
            K.RandomGrayscale(p=0.2),
            blur,
            K.RandomSolarize(0.0, 0.0, p=_SOLARIZE_P[view]),
            hflip,
            vflip,
        ]
    elif kind == "rgb":
        ops = [
            crop,
            K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            blur,
            K.RandomSolarize(0.0, 0.0, p=_SOLARIZE_P[view]),
            hflip,
            vflip,
        ]
    elif kind == "sar":
        ops = [crop, K.RandomGrayscale(p=0.2), blur, hflip, vflip]
    elif kind == "hha":
        ops = [crop, hflip]
    else:  # dem, generic
        ops = [crop, hflip, vflip]
    return nn.Sequential(*(op for op in ops if op.p > 0))


class ViewPair(nn.Module):
    """Two view pipelines of one modality; ``forward(x)`` returns ``(view1, view2)``.

    Runs under ``torch.no_grad``: views are inputs, not part of the graph.
    """

    def __init__(self, view1: nn.Module, view2: nn.Module) -> None:
        super().__init__()
        self.view1 = view1
        self.view2 = view2

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.view1(x), self.view2(x)


def make_view_pair(
    kind: ViewKind, size: int, scale: tuple[float, float] = (0.08, 1.0)
) -> ViewPair:
    """The paper's two asymmetric view pipelines for one modality kind (Appendix B.1)."""
    return ViewPair(
        make_view_augmentation(kind, size, 1, scale),
        make_view_augmentation(kind, size, 2, scale),
    )
