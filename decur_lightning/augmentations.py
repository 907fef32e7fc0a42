"""Per-modality view augmentations, batched on the device.

DeCUR makes two augmented views of each modality (Fig. 2). The paper (Appendix B.1) follows
BYOL's optical pipeline and removes what a modality cannot take. Where the paper is silent
(the per-data-set RGB recipes) the kinds follow the authors' released pretraining code:

==========  =====================================================================================
kind        augmentations
==========  =====================================================================================
optical     resized crop, brightness/contrast (p=0.8), grayscale as band mean (p=0.2), Gaussian
            blur, solarize, horizontal and vertical flip (multispectral: any band count)
rgb         resized crop, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
            p=0.8, torchvision/BYOL semantics), luminance grayscale (p=0.2), Gaussian blur,
            solarize, horizontal and vertical flip (3 bands)
aerial_rgb  GeoNRW aerial RGB as in the released code: resized crop, brightness/contrast only
            (p=0.8), luminance grayscale (p=0.2), Gaussian blur, solarize, horizontal and
            vertical flip (3 bands)
indoor_rgb  SUN-RGBD / NYU indoor RGB as in the released code: resized crop, brightness/contrast
            only (p=0.8), luminance grayscale (p=0.2), Gaussian blur, horizontal flip; no
            vertical flip and no solarize (3 bands)
sar         resized crop, grayscale as band mean (p=0.2), Gaussian blur, horizontal and vertical
            flip
dem         resized crop, horizontal and vertical flip
hha         resized crop, horizontal flip
generic     resized crop, horizontal and vertical flip (any modality)
==========  =====================================================================================

Strengths (BYOL, which Appendix B.1 follows): crop area (0.08, 1) and aspect (3/4, 4/3),
brightness and contrast factors drawn from (0.6, 1.4), saturation (0.8, 1.2), hue (-0.1, 0.1),
Gaussian blur sigma from (0.1, 2.0) per image with a kernel of about 10 % of the view (23 px at
224 px), solarize threshold 0.5.

Colour semantics are torchvision's and BYOL's: brightness multiplies (``x * f``) and contrast
scales around the image mean (``(x - m) * c + m``), so a black image stays black. For any band
count (:class:`RandomBrightnessContrast`) ``m`` is the mean over all bands and pixels of that
image (the analogue of torchvision's grey mean), brightness is applied before contrast (the
released code's order; torchvision's ``ColorJitter`` draws a random order), and the two are one
per-image affine map ``x * f * c + f * m * (1 - c)`` clipped once to [0, 1] (torchvision also
clips between the two steps, which differs only where brightness pushes pixels above 1).

Two-view asymmetry (``asymmetry=``):

* ``"byol"`` (default, the paper follows BYOL): Gaussian blur p=1.0 for view 1 and p=0.1 for
  view 2, solarize p=0.0 for view 1 and p=0.2 for view 2.
* ``"symmetric"`` (the authors' released code): blur p=0.5 and solarize p=0.2 on both views.

Inputs are expected in [0, 1] (the datamodules of this package normalise so); colour
operations clip to [0, 1].

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
import kornia.filters as KF
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import RandomResizedCrop as _TVRandomResizedCrop

__all__ = [
    "ASYMMETRIES",
    "RGB_KINDS",
    "VIEW_KINDS",
    "RandomBrightnessContrast",
    "RandomGaussianBlur",
    "RandomGrayscale",
    "RandomResizedCropFlip",
    "RandomSolarize",
    "ViewPair",
    "make_view_augmentation",
    "make_view_pair",
]

ViewKind = Literal["optical", "rgb", "aerial_rgb", "indoor_rgb", "sar", "dem", "hha", "generic"]
VIEW_KINDS: tuple[str, ...] = get_args(ViewKind)
Asymmetry = Literal["byol", "symmetric"]
ASYMMETRIES: tuple[str, ...] = get_args(Asymmetry)

#: Kinds whose colour operations need exactly 3 bands (RGB).
RGB_KINDS: tuple[str, ...] = ("rgb", "aerial_rgb", "indoor_rgb")

# (blur p, solarize p) per view and asymmetry setting.
_VIEW_PROBS: dict[str, dict[int, tuple[float, float]]] = {
    "byol": {1: (1.0, 0.0), 2: (0.1, 0.2)},
    "symmetric": {1: (0.5, 0.2), 2: (0.5, 0.2)},
}

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
_LUMA = (0.2989, 0.587, 0.114)


def _blur_kernel(size: int) -> int:
    """BYOL uses a 23 px kernel at 224 px: about 10 % of the crop, odd, at least 3."""
    kernel = max(3, round(0.1 * size))
    return kernel if kernel % 2 == 1 else kernel + 1


def _check_range(name: str, value: tuple[float, float], low: float = 0.0) -> tuple[float, float]:
    if len(value) != 2 or not (low <= value[0] <= value[1]):
        raise ValueError(f"{name} must be a (min, max) pair with {low} <= min <= max; got {value!r}.")
    return float(value[0]), float(value[1])


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"The probability p must be in [0, 1]; got {p!r}.")
    return float(p)


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(
            f"{name} expects a batch tensor (N, C, H, W); got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}."
        )


def _selected(n: int, p: float, device: torch.device) -> Tensor:
    """Indices of the images an operation with probability ``p`` applies to.

    Random draws are made on the CPU generator (as kornia's), then moved: a seed gives the
    same views on every device, and ``torch.random.fork_rng(devices=[])`` covers them.
    """
    if p >= 1.0:
        return torch.arange(n, device=device)
    if p <= 0.0:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.nonzero(torch.rand(n) < p).flatten().to(device)


def _uniform(n: int, bounds: tuple[float, float], like: Tensor) -> Tensor:
    return torch.empty(n).uniform_(*bounds).to(device=like.device, dtype=like.dtype)


class _SubsetOp(nn.Module):
    """An operation applied with probability ``p`` per image, computed only on the chosen images.

    With ``inplace=True`` the input batch is overwritten (the view pipelines use it after the
    crop, which returns a fresh tensor); otherwise the input is left untouched.
    """

    def __init__(self, p: float, inplace: bool = False) -> None:
        super().__init__()
        self.p = _check_p(p)
        self.inplace = inplace

    def apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, type(self).__name__)
        index = _selected(x.shape[0], self.p, x.device)
        if index.numel() == 0:
            return x
        # .to(x.dtype): under autocast a convolution (the blur) returns the autocast dtype;
        # views keep the dtype of their input.
        if index.numel() == x.shape[0]:
            return self.apply(x).to(x.dtype).contiguous()
        out = x if self.inplace else x.clone()
        out[index] = self.apply(x[index]).to(x.dtype)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomBrightnessContrast(nn.Module):
    """Multiplicative brightness and mean-centred contrast for any band count, in one pass.

    For each image, with probability ``p``: brightness factor ``f`` and contrast factor ``c``
    drawn uniformly from their ranges, then ``y = clip((x * f - f * m) * c + f * m, 0, 1)``
    with ``m`` the mean of the image over all bands and pixels; i.e. torchvision's
    ``adjust_brightness`` then ``adjust_contrast`` (BYOL's colour jitter, paper Appendix B.1)
    with the band mean in place of the grey mean, as the single affine map ``x * a + b``.
    Kornia has no multiplicative multispectral brightness (its ``RandomBrightness`` adds).

    Args:
        brightness: range of the brightness factor (BYOL: strength 0.4, i.e. (0.6, 1.4)).
        contrast: range of the contrast factor (BYOL: (0.6, 1.4)).
        p: probability per image.
        inplace: overwrite the input batch (the view pipelines do, after the crop).
    """

    def __init__(
        self,
        brightness: tuple[float, float] = (0.6, 1.4),
        contrast: tuple[float, float] = (0.6, 1.4),
        p: float = 0.8,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.brightness = _check_range("brightness", brightness)
        self.contrast = _check_range("contrast", contrast)
        self.p = _check_p(p)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, "RandomBrightnessContrast")
        n = x.shape[0]
        apply = (torch.rand(n) < self.p).to(x.device)
        f = torch.where(apply, _uniform(n, self.brightness, x), 1.0)
        c = torch.where(apply, _uniform(n, self.contrast, x), 1.0)
        mean = x.mean(dim=(1, 2, 3))
        a = (f * c).view(n, 1, 1, 1)
        b = (f * mean * (1.0 - c)).view(n, 1, 1, 1)
        return torch.addcmul(b, x, a, out=x if self.inplace else None).clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"brightness={self.brightness}, contrast={self.contrast}, p={self.p}"


class RandomGrayscale(_SubsetOp):
    """Grayscale with probability ``p`` per image, keeping the band count.

    Args:
        p: probability per image (BYOL: 0.2).
        weights: per-band weights of the grey value; ``None`` is the plain band mean (any band
            count, as the released code's ``ToGray``); RGB kinds use torchvision's luma weights.
        inplace: overwrite the input batch (see :class:`_SubsetOp`).
    """

    def __init__(self, p: float = 0.2, weights: tuple[float, ...] | None = None, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.weights = None if weights is None else tuple(float(w) for w in weights)

    def apply(self, x: Tensor) -> Tensor:
        if self.weights is None:
            grey = x.mean(dim=1, keepdim=True)
        else:
            if x.shape[1] != len(self.weights):
                raise ValueError(
                    f"RandomGrayscale with {len(self.weights)} weights needs {len(self.weights)} bands; "
                    f"got {x.shape[1]}. Use weights=None (band mean) for other band counts."
                )
            w = torch.tensor(self.weights, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            grey = (x * w).sum(dim=1, keepdim=True)
        return grey.expand_as(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, weights={self.weights}"


class RandomSolarize(_SubsetOp):
    """BYOL's solarize: pixels at or above ``threshold`` become ``1 - x``, with probability ``p``.

    The released code's ``Solarize(0.5)`` runs on uint8 images and so inverts only zeros (0 ->
    255); this is BYOL's (and torchvision's) solarize on [0, 1] data.
    """

    def __init__(self, p: float = 0.2, threshold: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.threshold = float(threshold)

    def apply(self, x: Tensor) -> Tensor:
        return torch.where(x < self.threshold, x, 1.0 - x)

    def extra_repr(self) -> str:
        return f"p={self.p}, threshold={self.threshold}"


class RandomGaussianBlur(_SubsetOp):
    """Gaussian blur with a per-image random sigma, computed only on the images it applies to.

    Uses ``kornia.filters.gaussian_blur2d(..., separable=True)`` (two 1-D passes, about ``2k``
    instead of ``k**2`` multiply-adds per pixel) with reflect padding, as torchvision's
    ``GaussianBlur``. Kornia's ``RandomGaussianBlur`` computes the whole batch whatever ``p``.

    Args:
        kernel_size: odd kernel side (BYOL: 23 px at 224 px).
        sigma: range of the per-image sigma (BYOL: (0.1, 2.0)).
        p: probability per image.
        inplace: overwrite the input batch (see :class:`_SubsetOp`).
    """

    def __init__(
        self,
        kernel_size: int,
        sigma: tuple[float, float] = (0.1, 2.0),
        p: float = 0.5,
        inplace: bool = False,
    ) -> None:
        super().__init__(p, inplace)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}.")
        self.kernel_size = int(kernel_size)
        self.sigma = _check_range("sigma", sigma)
        if self.sigma[0] <= 0:
            raise ValueError(f"sigma must be positive; got {sigma!r}.")

    def apply(self, x: Tensor) -> Tensor:
        sigma = _uniform(x.shape[0], self.sigma, x)
        # reflect padding needs the kernel radius below the image side
        k = min(self.kernel_size, 2 * min(x.shape[-2:]) - 1)
        return KF.gaussian_blur2d(x, (k, k), sigma[:, None].expand(-1, 2), border_type="reflect", separable=True)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, p={self.p}"


class RandomResizedCropFlip(nn.Module):
    """Random resized crop with random horizontal and vertical flips, in one pass per image.

    The crop boxes are torchvision's (``RandomResizedCrop.get_params``: area ``scale`` and
    aspect ``ratio``, ten tries, then a centre crop); each crop is flipped (flips commute with
    every other view operation) and resized bilinearly to ``size`` (antialiased when it shrinks,
    as torchvision's ``antialias=True``), straight into the output batch.

    Args:
        size: side of the square output.
        scale: range of the crop area as a fraction of the image.
        ratio: range of the crop aspect ratio.
        hflip: probability of a horizontal flip per image.
        vflip: probability of a vertical flip per image.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.5,
    ) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"The view size must be at least 2 px, got {size}.")
        self.size = int(size)
        self.scale = _check_range("scale", scale)
        if not 0 < self.scale[1] <= 1:
            raise ValueError(f"scale must lie in (0, 1]; got {scale!r}.")
        self.ratio = _check_range("ratio", ratio)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be positive; got {ratio!r}.")
        self.hflip = _check_p(hflip)
        self.vflip = _check_p(vflip)

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, "RandomResizedCropFlip")
        n, c, h, w = x.shape
        out = torch.empty(n, c, self.size, self.size, device=x.device, dtype=x.dtype)
        hflips = (torch.rand(n) < self.hflip).tolist()
        vflips = (torch.rand(n) < self.vflip).tolist()
        shape_only = x.new_empty((1, h, w), device="meta")
        for i in range(n):
            top, left, ch, cw = _TVRandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
            crop = x[i : i + 1, :, top : top + ch, left : left + cw]
            dims = [d for d, flip in ((-1, hflips[i]), (-2, vflips[i])) if flip]
            if dims:
                crop = crop.flip(dims)
            if (ch, cw) == (self.size, self.size):
                out[i] = crop[0]
            else:
                # antialiasing only changes a downscale (upscales agree to ~1e-5) but costs 2x
                antialias = ch > self.size or cw > self.size
                out[i] = F.interpolate(
                    crop, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=antialias
                )[0]
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, vflip={self.vflip}"


class _RequireBands(nn.Module):
    """Fails early, with the fix, when an RGB view kind gets another band count."""

    def __init__(self, kind: str, bands: int = 3) -> None:
        super().__init__()
        self.kind = kind
        self.bands = bands

    def forward(self, x: Tensor) -> Tensor:
        _check_batch(x, f"The {self.kind!r} views")
        if x.shape[1] != self.bands:
            raise ValueError(
                f"View kind {self.kind!r} needs {self.bands} bands (RGB); got {x.shape[1]}. "
                "Use 'optical' for multispectral data."
            )
        return x


def make_view_augmentation(
    kind: ViewKind,
    size: int,
    view: Literal[1, 2] = 1,
    scale: tuple[float, float] = (0.08, 1.0),
    asymmetry: Asymmetry = "byol",
) -> nn.Module:
    """One view's pipeline for a modality kind (Appendix B.1; kinds in the module docstring).

    Args:
        kind: one of :data:`VIEW_KINDS`.
        size: side of the square output crop in pixels (the paper: 224).
        view: 1 or 2, selects the view's blur/solarize probabilities.
        scale: area range of the random resized crop.
        asymmetry: ``"byol"`` (default; blur p 1.0/0.1, solarize p 0.0/0.2 for views 1/2) or
            ``"symmetric"`` (the released code: blur p=0.5, solarize p=0.2 on both views).

    Returns:
        An ``nn.Sequential`` mapping a batch ``(N, C, H, W)`` in [0, 1] to
        ``(N, C, size, size)``, without the operations whose probability is 0 for this view.
        The crop returns a fresh tensor, so the operations after it work in place: the input
        batch is never modified.
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"Unknown view augmentation kind {kind!r}; expected one of {VIEW_KINDS}.")
    if view not in (1, 2):
        raise ValueError(f"view must be 1 or 2, got {view!r}.")
    if asymmetry not in ASYMMETRIES:
        raise ValueError(f"asymmetry must be one of {ASYMMETRIES}; got {asymmetry!r}.")
    if size < 2:
        raise ValueError(f"The view size must be at least 2 px, got {size}.")
    blur_p, solarize_p = _VIEW_PROBS[asymmetry][view]
    vflip = 0.0 if kind in ("hha", "indoor_rgb") else 0.5
    ops: list[nn.Module] = [_RequireBands(kind)] if kind in RGB_KINDS else []
    ops.append(RandomResizedCropFlip(size, scale, hflip=0.5, vflip=vflip))
    blur = RandomGaussianBlur(_blur_kernel(size), (0.1, 2.0), p=blur_p, inplace=True)
    solarize = RandomSolarize(p=solarize_p, inplace=True)
    if kind == "optical":
        ops += [RandomBrightnessContrast(p=0.8, inplace=True), RandomGrayscale(0.2, inplace=True), blur, solarize]
    elif kind == "rgb":
        ops += [
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            RandomGrayscale(0.2, weights=_LUMA, inplace=True),
            blur,
            solarize,
        ]
    elif kind == "aerial_rgb":
        ops += [
            RandomBrightnessContrast(p=0.8, inplace=True),
            RandomGrayscale(0.2, weights=_LUMA, inplace=True),
            blur,
            solarize,
        ]
    elif kind == "indoor_rgb":
        ops += [RandomBrightnessContrast(p=0.8, inplace=True), RandomGrayscale(0.2, weights=_LUMA, inplace=True), blur]
    elif kind == "sar":
        ops += [RandomGrayscale(0.2, inplace=True), blur]
    # dem, hha, generic: crop and flips only
    return nn.Sequential(*(op for op in ops if getattr(op, "p", 1.0) > 0))


class ViewPair(nn.Module):
    """Two view pipelines of one modality; ``forward(x)`` returns ``(view1(x), view2(x))``.

    ``forward(x, second)`` makes view 2 from ``second`` instead (e.g. another season of the same
    location). Runs under ``torch.no_grad``: views are inputs, not part of the graph.
    """

    def __init__(self, view1: nn.Module, view2: nn.Module) -> None:
        super().__init__()
        self.view1 = view1
        self.view2 = view2

    @torch.no_grad()
    def forward(self, x: Tensor, second: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.view1(x), self.view2(x if second is None else second)


def make_view_pair(
    kind: ViewKind,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    asymmetry: Asymmetry = "byol",
) -> ViewPair:
    """The two view pipelines for one modality kind (Appendix B.1).

    ``asymmetry="byol"`` (default) gives BYOL's asymmetric blur/solarize, ``"symmetric"`` the
    released code's (see :func:`make_view_augmentation`).
    """
    return ViewPair(
        make_view_augmentation(kind, size, 1, scale, asymmetry),
        make_view_augmentation(kind, size, 2, scale, asymmetry),
    )
