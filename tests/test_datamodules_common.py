"""Shared datamodule helpers: normalisation, seeded subsets, paired augmentation."""

from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch

from decur_lightning.datamodules._common import (
    PairedAugmentation,
    clip_outliers,
    normalize_sar,
    percentile_min_max,
    scale_mean_std,
    seeded_subset,
)


def test_scale_mean_std_maps_two_std_range_to_unit_interval() -> None:
    mean, std = [10.0, -5.0], [2.0, 1.0]
    image = torch.tensor([[6.0, 10.0, 14.0, 100.0], [-7.0, -5.0, -3.0, -100.0]]).view(2, 1, 4)
    out = scale_mean_std(image, mean, std)
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.0], [0.0, 0.5, 1.0, 0.0]]).view(2, 1, 4)
    torch.testing.assert_close(out, expected)


def test_scale_mean_std_rejects_wrong_band_count() -> None:
    with pytest.raises(ValueError, match="expected 3 per-band statistics"):
        scale_mean_std(torch.zeros(3, 2, 2), [0.0, 0.0], [1.0, 1.0])


def test_clip_outliers_cuts_two_percent_per_band() -> None:
    band = torch.linspace(0, 99, 100).view(1, 10, 10)
    image = torch.cat([band, band * 10])
    image[0, 0, 0] = -1e6
    out = clip_outliers(image, 0.02)
    for index in range(2):
        low, high = torch.quantile(image[index].flatten(), torch.tensor([0.01, 0.99]))
        assert out[index].min() == pytest.approx(low.item())
        assert out[index].max() == pytest.approx(high.item())
    assert torch.equal(clip_outliers(image, 0.0), image)


def test_normalize_sar_is_robust_to_a_single_spike() -> None:
    image = torch.full((2, 20, 20), -12.0)
    image[:, 0, 0] = 60.0
    out = normalize_sar(image, [-12.0, -12.0], [5.0, 5.0])
    assert torch.allclose(out, torch.full_like(out, 0.5))


def test_missing_values_do_not_poison_a_band() -> None:
    image = torch.linspace(-20, 0, 400).view(1, 20, 20).repeat(2, 1, 1)
    image[0, 3, 3] = float("nan")
    out = normalize_sar(image, [-10.0, -10.0], [5.0, 5.0])
    assert torch.isfinite(out).all() and out[0, 3, 3] == 0
    torch.testing.assert_close(out[0, 10:], out[1, 10:], atol=0.02, rtol=0)
    dem = torch.arange(100.0).view(1, 10, 10)
    dem[0, 0, 0] = float("nan")
    assert torch.isfinite(percentile_min_max(dem)).all()


def test_percentile_min_max_unit_range_and_flat_patch() -> None:
    dem = torch.arange(100.0).view(1, 10, 10) + 350.0
    out = percentile_min_max(dem)
    assert out.min() == 0 and out.max() == pytest.approx(1.0, abs=1e-4)
    flat = percentile_min_max(torch.full((1, 4, 4), 80.0))
    assert torch.equal(flat, torch.zeros_like(flat))


def test_seeded_subset_reproducible_without_duplicates() -> None:
    first = seeded_subset(1000, 0.1, seed=3)
    assert first == seeded_subset(1000, 0.1, seed=3)
    assert first != seeded_subset(1000, 0.1, seed=4)
    assert len(first) == len(set(first)) == 100 and first == sorted(first)
    assert seeded_subset(50, 0.01, seed=0) and len(seeded_subset(50, 0.01, seed=0)) == 1
    assert seeded_subset(7, 1.0, seed=0) == list(range(7))
    with pytest.raises(ValueError):
        seeded_subset(10, 0.0, seed=0)


def block_batch(batch: int = 4, size: int = 64, block: int = 8) -> dict[str, torch.Tensor]:
    """Piecewise-constant images: channels 0 and 1 hold random values per block, mask the block id.

    Two independent random values per block make a bilinear mix of neighbouring blocks match a
    third block's pair with negligible probability. DEM is a copy of RGB channel 0, HHA a copy of
    RGB; a label rides along untouched.
    """
    generator = torch.Generator().manual_seed(0)
    blocks = size // block
    ids = torch.arange(blocks * blocks).view(blocks, blocks)
    ids = ids.repeat_interleave(block, 0).repeat_interleave(block, 1)
    values = torch.rand(batch, blocks * blocks, 2, generator=generator)
    rgb = torch.stack([values[:, :, 0][:, ids], values[:, :, 1][:, ids], torch.rand(batch, size, size)], 1)
    return {
        "image_rgb": rgb,
        "image_dem": rgb[:, :1].clone(),
        "image_hha": rgb.clone(),
        "mask": ids.expand(batch, -1, -1).clone(),
        "label": torch.tensor([[1, 0, 1]] * batch),
        "values": values,
    }


def assert_moved_together(batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """DEM/HHA equal the transformed RGB; mask ids agree with the block values they came from."""
    torch.testing.assert_close(out["image_dem"], out["image_rgb"][:, :1])
    torch.testing.assert_close(out["image_hha"], out["image_rgb"])
    assert out["mask"].dtype == torch.int64
    assert set(out["mask"].unique().tolist()) <= set(batch["mask"].unique().tolist())
    matched = 0
    for sample in range(out["mask"].shape[0]):
        pixels = out["image_rgb"][sample, :2].permute(1, 2, 0)[..., None, :]
        distance, block_id = (pixels - batch["values"][sample]).abs().amax(-1).min(-1)
        interior = distance < 1e-5  # pixels whose bilinear sample lies inside one block
        assert torch.equal(out["mask"][sample][interior], block_id[interior])
        matched += int(interior.sum())
    assert matched > 0.3 * out["mask"].numel()


def test_paired_augmentation_moves_images_and_mask_together() -> None:
    torch.manual_seed(0)
    batch = block_batch()
    aug = PairedAugmentation(K.RandomResizedCrop((40, 40), scale=(0.2, 1.0)), K.RandomHorizontalFlip(p=0.5))
    out = aug(batch)
    assert out["image_rgb"].shape == (4, 3, 40, 40) and out["image_dem"].shape == (4, 1, 40, 40)
    assert out["mask"].shape == (4, 40, 40)
    assert torch.equal(out["label"], batch["label"]) and out["label"].dtype == torch.int64
    assert not torch.equal(out["image_rgb"][0], out["image_rgb"][1])
    assert_moved_together(batch, out)


def test_paired_augmentation_flip_is_exact_mirror_for_every_key() -> None:
    batch = block_batch(batch=2, size=16, block=4)
    out = PairedAugmentation(K.RandomHorizontalFlip(p=1.0))(batch)
    for key in ("image_rgb", "image_dem", "image_hha", "mask"):
        assert torch.equal(out[key], batch[key].flip(-1)), key


def test_paired_augmentation_without_augmentations_is_identity() -> None:
    batch = block_batch(batch=2, size=16, block=4)
    out = PairedAugmentation()(batch)
    assert out is not batch and all(torch.equal(out[key], batch[key]) for key in batch)
