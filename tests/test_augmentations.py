"""View augmentations: torchvision/BYOL colour semantics, per-data-set kinds, asymmetry option.

Only ``VIEW_KINDS``, ``make_view_augmentation`` and ``make_view_pair`` are imported at module
level, so the pipeline-level tests also run (and fail) against the former kornia pipelines.
"""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from decur_lightning.augmentations import (
    VIEW_KINDS,
    make_view_augmentation,
    make_view_pair,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bands(kind: str) -> int:
    return 3 if "rgb" in kind else 13


# ------------------------------------------------------------------ whole pipelines
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_zero_image_stays_zero_through_every_view_kind(kind):
    zeros = torch.zeros(32, _bands(kind), 40, 40)
    for asymmetry in ("byol", "symmetric"):
        try:
            views = make_view_pair(kind, size=24, asymmetry=asymmetry)  # type: ignore[call-arg]
        except TypeError:  # the former API had no asymmetry argument
            views = make_view_pair(kind, size=24)
        xa, xb = views(zeros)
        assert float(xa.abs().max()) == 0.0 and float(xb.abs().max()) == 0.0


def test_constant_image_is_scaled_not_shifted_through_optical_views():
    # crop, contrast, grayscale and blur keep a constant image constant; brightness multiplies it
    # by f in (0.6, 1.4): 0.25 -> [0.15, 0.35] (below the solarize threshold). The former
    # additive brightness gave 0.25 + f - 1 in [0, 0.65].
    x = torch.full((64, 13, 40, 40), 0.25)
    for view in (1, 2):
        y = make_view_augmentation("optical", 24, view)(x)
        values = y.flatten(1)
        torch.testing.assert_close(values.min(1).values, values.max(1).values, atol=1e-5, rtol=0)
        assert float(values.min()) >= 0.25 * 0.6 - 1e-5 and float(values.max()) <= 0.25 * 1.4 + 1e-5
        assert (values[:, 0] - 0.25).abs().max() > 0.01  # brightness did run


def test_rgb_pipeline_jitter_multiplies_brightness():
    # on a constant grey image, contrast, saturation and hue do nothing; brightness scales by f
    jitter = next(op for op in make_view_augmentation("rgb", 8) if "Color" in type(op).__name__)
    grey = torch.full((64, 3, 8, 8), 0.5)
    y = jitter(grey).flatten(1)
    assert float(y.min()) >= 0.5 * 0.6 - 1e-5 and float(y.max()) <= 0.5 * 1.4 + 1e-5
    assert float(y.std(0).max()) > 0.01


def test_views_do_not_modify_the_input():
    for kind in VIEW_KINDS:
        x = torch.rand(8, _bands(kind), 32, 32)
        before = x.clone()
        make_view_pair(kind, 16)(x)
        assert torch.equal(x, before), kind


# ------------------------------------------------------------------ colour operations
def test_colour_ops_keep_a_zero_image_zero():
    from decur_lightning.augmentations import (
        RandomBrightnessContrast,
        RandomGaussianBlur,
        RandomGrayscale,
        RandomSolarize,
    )

    zeros = torch.zeros(16, 13, 24, 24)
    for op in (
        RandomBrightnessContrast(p=1.0),
        RandomGrayscale(p=1.0),
        RandomSolarize(p=1.0),
        RandomGaussianBlur(5, p=1.0),
    ):
        assert float(op(zeros).abs().max()) == 0.0, op
    rgb = torch.zeros(16, 3, 24, 24)
    for op in (K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=1.0), RandomGrayscale(1.0, weights=(0.2989, 0.587, 0.114))):
        assert float(op(rgb).abs().max()) == 0.0, op


def test_brightness_multiplies():
    from decur_lightning.augmentations import RandomBrightnessContrast

    x = torch.rand(4, 13, 8, 8) * 0.5
    y = RandomBrightnessContrast(brightness=(1.4, 1.4), contrast=(1.0, 1.0), p=1.0)(x)
    torch.testing.assert_close(y, x * 1.4)
    y = RandomBrightnessContrast(brightness=(0.6, 0.6), contrast=(1.0, 1.0), p=1.0)(x)
    torch.testing.assert_close(y, x * 0.6)


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_contrast_keeps_each_image_mean(factor):
    from decur_lightning.augmentations import RandomBrightnessContrast

    x = 0.3 + 0.4 * torch.rand(6, 13, 8, 8)  # nothing clips: |x - m| * 1.4 < 0.3
    y = RandomBrightnessContrast(brightness=(1.0, 1.0), contrast=(factor, factor), p=1.0)(x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3), keepdim=True), mean)
    torch.testing.assert_close(y - mean, (x - mean) * factor)


def test_brightness_contrast_equals_torchvision_on_one_band():
    # one band: torchvision's grey mean is the band mean, so the single affine map must equal
    # adjust_brightness followed by adjust_contrast (nothing clips here)
    from decur_lightning.augmentations import RandomBrightnessContrast

    x = 0.2 + 0.4 * torch.rand(5, 1, 12, 12)
    for f, c in ((1.3, 0.7), (0.6, 1.4), (1.0, 1.2)):
        ours = RandomBrightnessContrast(brightness=(f, f), contrast=(c, c), p=1.0)(x)
        expected = torch.stack([TF.adjust_contrast(TF.adjust_brightness(img, f), c) for img in x])
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_brightness_contrast_probability_and_clipping():
    from decur_lightning.augmentations import RandomBrightnessContrast

    x = torch.rand(200, 2, 4, 4)
    y = RandomBrightnessContrast(p=0.8)(x)
    changed = (y != x).flatten(1).any(1).float().mean()
    assert 0.7 < float(changed) < 0.9
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(RandomBrightnessContrast(p=0.0)(x), x)
    with pytest.raises(ValueError, match="brightness"):
        RandomBrightnessContrast(brightness=(1.4, 0.6))


def test_rgb_colour_jitter_equals_torchvision_functional():
    x = torch.rand(1, 3, 16, 16)
    b, c, s, h = 1.3, 0.7, 1.2, 0.08
    jitter = K.ColorJitter((b, b), (c, c), (s, s), (h, h), p=1.0, order=(0, 1, 2, 3))
    expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s), h)
    torch.testing.assert_close(jitter(x), expected, atol=2e-3, rtol=0)
    # the rgb kind's jitter has BYOL's strengths
    op = next(m for m in make_view_augmentation("rgb", 8) if isinstance(m, K.ColorJitter))
    assert (op.brightness, op.contrast, op.saturation, op.hue, op.p) == (0.4, 0.4, 0.2, 0.1, 0.8)


def test_grayscale_band_mean_and_luma():
    from decur_lightning.augmentations import RandomGrayscale

    x = torch.rand(3, 13, 6, 6)
    torch.testing.assert_close(RandomGrayscale(p=1.0)(x), x.mean(1, keepdim=True).expand_as(x))
    rgb = torch.rand(3, 3, 6, 6)
    ours = RandomGrayscale(p=1.0, weights=(0.2989, 0.587, 0.114))(rgb)
    torch.testing.assert_close(ours, TF.rgb_to_grayscale(rgb, num_output_channels=3))
    with pytest.raises(ValueError, match="needs 3 bands"):
        RandomGrayscale(p=1.0, weights=(0.2989, 0.587, 0.114))(x)


def test_solarize_inverts_at_and_above_threshold():
    from decur_lightning.augmentations import RandomSolarize

    x = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.7, 1.0]).view(1, 1, 1, 6)
    y = RandomSolarize(p=1.0)(x)
    torch.testing.assert_close(y.flatten(), torch.tensor([0.0, 0.2, 0.49, 0.5, 0.3, 0.0]))


def test_blur_equals_torchvision_and_only_touches_chosen_images():
    from decur_lightning.augmentations import RandomGaussianBlur

    x = torch.rand(6, 13, 20, 20)
    ours = RandomGaussianBlur(7, sigma=(1.3, 1.3), p=1.0)(x)
    expected = TF.gaussian_blur(x, [7, 7], [1.3, 1.3])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # p=0.5: each image either untouched or blurred with its own sigma in (0.1, 2.0)
    y = RandomGaussianBlur(7, p=0.5)(torch.rand(40, 2, 20, 20))
    assert y.shape == (40, 2, 20, 20)
    z = torch.rand(40, 2, 20, 20)
    y = RandomGaussianBlur(7, p=0.5)(z)
    same = (y == z).flatten(1).all(1)
    assert 0 < int(same.sum()) < 40
    blurred = y[~same]
    assert float(blurred.std()) < float(z.std())  # smoothing lowers the spread


def test_crop_flip_full_scale():
    from decur_lightning.augmentations import RandomResizedCropFlip

    x = torch.rand(4, 2, 16, 16)
    torch.testing.assert_close(RandomResizedCropFlip(16, (1.0, 1.0), hflip=1.0, vflip=0.0)(x), x.flip(-1))
    torch.testing.assert_close(RandomResizedCropFlip(16, (1.0, 1.0), hflip=0.0, vflip=1.0)(x), x.flip(-2))
    torch.testing.assert_close(RandomResizedCropFlip(16, (1.0, 1.0), hflip=0.0, vflip=0.0)(x), x)
    y = RandomResizedCropFlip(8, (0.08, 1.0))(x)
    assert y.shape == (4, 2, 8, 8)
    assert float(y.min()) >= float(x.min()) - 1e-6 and float(y.max()) <= float(x.max()) + 1e-6


@pytest.mark.parametrize("box", [(3, 5, 9, 11), (0, 1, 30, 28)])  # upscale, downscale
def test_crop_equals_torchvision_resized_crop(monkeypatch, box):
    from torchvision.transforms import RandomResizedCrop

    from decur_lightning.augmentations import RandomResizedCropFlip

    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(lambda img, scale, ratio: box))
    x = torch.rand(3, 4, 32, 32)
    ours = RandomResizedCropFlip(20, hflip=0.0, vflip=0.0)(x)
    expected = TF.resized_crop(x, *box, size=[20, 20], antialias=True)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ kinds and asymmetry
def _probs(pipeline, name: str) -> float:
    ops = [op for op in pipeline if type(op).__name__ == name]
    return ops[0].p if ops else 0.0


@pytest.mark.parametrize(
    ("asymmetry", "expected"),
    [("byol", {1: (1.0, 0.0), 2: (0.1, 0.2)}), ("symmetric", {1: (0.5, 0.2), 2: (0.5, 0.2)})],
)
def test_asymmetry_option(asymmetry, expected):
    for view in (1, 2):
        pipe = make_view_augmentation("optical", 32, view, asymmetry=asymmetry)
        assert (_probs(pipe, "RandomGaussianBlur"), _probs(pipe, "RandomSolarize")) == expected[view]
        sar = make_view_augmentation("sar", 32, view, asymmetry=asymmetry)
        assert (_probs(sar, "RandomGaussianBlur"), _probs(sar, "RandomSolarize")) == (expected[view][0], 0.0)
    # behaviour: images of 0.9 come out above 0.5 unless solarized (grey, blur keep a constant)
    x = torch.full((200, 13, 16, 16), 0.9)
    pair = make_view_pair("optical", 16, asymmetry=asymmetry)
    for view, y in zip((1, 2), pair(x)):
        solarized = float((y.flatten(1)[:, 0] < 0.5).float().mean())
        assert abs(solarized - expected[view][1]) < 0.08, (view, solarized)


def test_asymmetry_rejects_unknown_setting():
    with pytest.raises(ValueError, match="asymmetry"):
        make_view_pair("optical", 16, asymmetry="released")  # type: ignore[arg-type]


def test_per_dataset_rgb_kinds():
    aerial = [type(op).__name__ for op in make_view_augmentation("aerial_rgb", 32, 2)]
    assert "RandomBrightnessContrast" in aerial and "ColorJitter" not in aerial and "RandomSolarize" in aerial
    for view in (1, 2):
        indoor = make_view_augmentation("indoor_rgb", 32, view, asymmetry="symmetric")
        names = [type(op).__name__ for op in indoor]
        assert "RandomSolarize" not in names and "ColorJitter" not in names
        crop = next(op for op in indoor if type(op).__name__ == "RandomResizedCropFlip")
        assert (crop.hflip, crop.vflip) == (0.5, 0.0)
    # no vertical flip: an image whose rows differ keeps its row order at full scale
    rows = torch.linspace(0.2, 0.8, 16).view(1, 1, 16, 1).expand(64, 3, 16, 16).contiguous()
    for y in make_view_pair("indoor_rgb", 16, scale=(1.0, 1.0))(rows):
        column = y[..., 0]  # (64, 3, 16): must increase down the image unless solarize ran (it cannot)
        assert bool((column[..., 1:] >= column[..., :-1] - 1e-5).all())


@pytest.mark.parametrize("kind", ["rgb", "aerial_rgb", "indoor_rgb"])
def test_rgb_kinds_need_three_bands(kind):
    with pytest.raises(ValueError, match="needs 3 bands"):
        make_view_pair(kind, 16)(torch.rand(2, 13, 20, 20))


def test_views_are_reproducible_under_a_seed():
    x = torch.rand(6, 13, 32, 32)
    pair = make_view_pair("optical", 16, asymmetry="symmetric")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        first = pair(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        second = pair(x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])


def test_views_keep_their_dtype_under_autocast():
    """bf16 autocast (the CPU's mixed precision) must not break or retype the views."""
    x = torch.rand(8, 13, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for kind in ("optical", "sar"):
            for view in make_view_pair(kind, 24, asymmetry="symmetric")(x):
                assert view.dtype == torch.float32 and view.shape == (8, 13, 24, 24)
