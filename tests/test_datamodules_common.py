"""Shared datamodule helpers: modality descriptions, normalisation, seeded subsets, paired augmentation,
read errors."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import pytest
import torch
from rasterio.errors import RasterioIOError
from torch.utils.data import Subset

import decur_lightning.datamodules as datamodules
from decur_lightning.datamodules._common import (
    DescribesModalities,
    PairedAugmentation,
    ReadErrorGuard,
    check_enough_for_a_batch,
    clip_outliers,
    normalize_sar,
    percentile_min_max,
    scale_mean_std,
    seasonal_band_names,
    seeded_subset,
    unreadable_files,
)
from decur_lightning.datamodules.samplers import EpochIndex, EpochSeededRandomSampler

from data_factories import write_geotiff


def assert_specs_describe_batch(
    datamodule: DescribesModalities,
    batch: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, str, list[str] | None]],
) -> None:
    """``modality_specs`` is ``expected`` (name -> bands, view, band names, in order) and fits the batch.

    Every ``image_<name>`` key of the batch is a described modality, in the same order, with
    ``bands`` channels (second views ``image2_<name>`` too); the module's fields are left unset.
    """
    specs = datamodule.modality_specs
    assert {name: (spec.bands, spec.view, spec.band_names) for name, spec in specs.items()} == expected
    assert list(specs) == list(expected)
    assert [key[len("image_") :] for key in batch if key.startswith("image_")] == list(specs)
    for name, spec in specs.items():
        assert batch[f"image_{name}"].shape[1] == spec.bands, name
        if f"image2_{name}" in batch:
            assert batch[f"image2_{name}"].shape[1] == spec.bands, name
        assert (spec.encoder, spec.weights, spec.weights_modality, spec.encoder_kwargs) == (None,) * 4


def test_every_datamodule_describes_its_modalities() -> None:
    classes = [getattr(datamodules, name) for name in datamodules.__all__ if name.endswith("DataModule")]
    assert len(classes) == 9  # SSL4EO, GeoNRW x2, BigEarthNet, RGB-D x2, synthetic, own rasters, streaming
    for cls in classes:
        assert issubclass(cls, DescribesModalities), cls.__name__
        assert cls.modality_specs is not DescribesModalities.modality_specs, cls.__name__
        assert not hasattr(cls, "modality_kinds"), cls.__name__
    with pytest.raises(NotImplementedError, match="does not describe its modalities"):
        _ = DescribesModalities().modality_specs


def test_seasonal_band_names() -> None:
    assert seasonal_band_names(["VV", "VH"], 1) == ["VV", "VH"]
    assert seasonal_band_names(("VV", "VH"), 2) == ["VV_season1", "VH_season1", "VV_season2", "VH_season2"]


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


class FlakyFiles(torch.utils.data.Dataset):
    """Sample i reads ``files[i]``; a missing or corrupt file raises from rasterio."""

    def __init__(self, files: list[Path], epoch_indexed: bool = False) -> None:
        self.files = files
        self.epoch_indexed = epoch_indexed

    def __len__(self) -> int:
        return len(self.files)

    def sample_files(self, index: int) -> list[str]:
        return [str(self.files[index])]

    def __getitem__(self, index: int) -> int:
        import rasterio

        with rasterio.open(self.files[index]) as src:
            return int(src.read()[0, 0, 0]) + 1000 * getattr(index, "epoch", 0)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(5):
        write_geotiff(tmp_path / f"{i}.tif", np.full((4, 4), i, dtype=np.uint8))
        paths.append(tmp_path / f"{i}.tif")
    paths[1].write_bytes(b"garbage")
    paths[3].write_bytes(paths[3].read_bytes()[:-20])  # truncated pixel data
    return paths


def test_unreadable_files_finds_corrupt_truncated_and_missing(files: list[Path]) -> None:
    candidates = [str(f) for f in files] + [str(files[0].parent / "missing.tif")]
    assert unreadable_files(candidates) == [str(files[1]), str(files[3]), candidates[-1]]


def test_guard_raise_names_file_index_and_data_set(files: list[Path]) -> None:
    guard = ReadErrorGuard(FlakyFiles(files), name="Flaky")
    assert [guard[i] for i in (0, 2, 4)] == [0, 2, 4]
    with pytest.raises(
        OSError, match=r"cannot read sample 3 of Flaky: unreadable file\(s\) .*3\.tif.*on_read_error='skip'"
    ) as info:
        guard[3]
    assert isinstance(info.value.__cause__, RasterioIOError)


def test_guard_skip_replaces_deterministically_warns_once_and_counts(files: list[Path]) -> None:
    guard = ReadErrorGuard(FlakyFiles(files), on_read_error="skip", max_read_errors=2)
    with pytest.warns(RuntimeWarning, match="skipping unreadable sample") as record:
        values = [guard[i] for i in range(5)]
    assert values == [0, 2, 2, 4, 4]
    assert guard.skipped == {1: [str(files[1])], 3: [str(files[3])]}
    assert len(record) == 2 and str(files[1]) in str(record[0].message) and str(files[3]) in str(record[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert guard[1] == 2  # the same bad sample again: no new warning, no new count
    assert len(guard.skipped) == 2


def test_guard_skip_fails_past_max_read_errors(files: list[Path]) -> None:
    guard = ReadErrorGuard(FlakyFiles(files), on_read_error="skip", max_read_errors=1)
    with pytest.warns(RuntimeWarning):
        assert guard[1] == 2
        with pytest.raises(OSError, match=r"2 unreadable samples, more than max_read_errors=1.*3\.tif"):
            guard[3]


def test_guard_keeps_epoch_and_looks_through_subsets(files: list[Path]) -> None:
    epoch_guard = ReadErrorGuard(FlakyFiles(files, epoch_indexed=True), on_read_error="skip")
    assert epoch_guard.epoch_indexed
    with pytest.warns(RuntimeWarning):
        assert epoch_guard[EpochIndex(3, epoch=2)] == 2000 + 4  # sample 3 -> sample 4, same epoch
        assert epoch_guard[EpochIndex(4, epoch=2)] == 2000 + 4
    subset_guard = ReadErrorGuard(Subset(FlakyFiles(files), [4, 3, 0]), name="Flaky subset")
    assert subset_guard.indices == [4, 3, 0]  # attributes of the wrapped Subset stay reachable
    with pytest.raises(OSError, match=r"sample 1 of Flaky subset: unreadable file\(s\) .*3\.tif"):
        subset_guard[1]
    with pytest.warns(RuntimeWarning):
        skipping = ReadErrorGuard(Subset(FlakyFiles(files), [4, 3, 0]), on_read_error="skip")
        assert [skipping[i] for i in range(3)] == [4, 0, 0]  # replaced within the subset


def test_guard_pickles_for_worker_processes(files: list[Path]) -> None:
    guard = pickle.loads(pickle.dumps(ReadErrorGuard(FlakyFiles(files), on_read_error="skip", max_read_errors=7)))
    assert guard.max_read_errors == 7 and guard[0] == 0 and len(guard) == 5


@pytest.mark.parametrize(("policy", "limit"), [("ignore", 1), ("skip", -1), ("skip", 1.5)])
def test_guard_rejects_bad_policies(files: list[Path], policy: str, limit: int) -> None:
    with pytest.raises(ValueError, match="on_read_error|max_read_errors"):
        ReadErrorGuard(FlakyFiles(files), on_read_error=policy, max_read_errors=limit)


def test_check_enough_for_a_batch() -> None:
    check_enough_for_a_batch("x", 4, 4, "")
    with pytest.raises(
        ValueError, match=r"the demo split has 3 sample\(s\), fewer than batch_size=4.*at most 3, or raise it"
    ):
        check_enough_for_a_batch("demo", 3, 4, "raise it")


def test_sampler_encodes_the_epoch_only_for_epoch_indexed_data(files: list[Path]) -> None:
    plain = EpochSeededRandomSampler(FlakyFiles(files), seed=5)
    indexed = EpochSeededRandomSampler(FlakyFiles(files, epoch_indexed=True), seed=5)
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        indexed.set_epoch(epoch)
        order = list(plain)
        assert sorted(order) == list(range(5))
        drawn = list(indexed)
        assert drawn == order and all(type(i) is EpochIndex and i.epoch == epoch for i in drawn)
        assert all(type(i) is int for i in order)


def test_epoch_index_is_an_int_that_keeps_its_epoch_through_pickling() -> None:
    index = EpochIndex(7, epoch=3)
    assert index == 7 and hash(index) == hash(7) and [10 * i for i in range(9)][index] == 70
    copy = pickle.loads(pickle.dumps(index))
    assert type(copy) is EpochIndex and copy == 7 and copy.epoch == 3
    assert repr(copy) == "EpochIndex(7, epoch=3)"
