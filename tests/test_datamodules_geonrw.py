"""GeoNRW RGB + DEM patches on fake tiles in torchgeo's on-disk layout."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_datamodules_common import assert_moved_together, assert_specs_describe_batch, block_batch
from torchgeo.datasets import DatasetNotFoundError

from decur_lightning.datamodules import GeoNRWMM, GeoNRWMMDataModule, GeoNRWMMPretrainDataModule
from decur_lightning.datamodules._common import percentile_min_max

from data_factories import make_geonrw

TILE, PATCH = 64, 16
TRAIN_CITIES = ("aachen", "bergisch", "bielefeld", "bochum", "bonn")
TEST_CITIES = ("duesseldorf", "herne")


@pytest.fixture(scope="module")
def geonrw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("geonrw")
    written = make_geonrw(root, TRAIN_CITIES, TEST_CITIES, size=TILE)
    return root, written


def dataset(root: Path, **kwargs: object) -> GeoNRWMM:
    return GeoNRWMM(root, patch_size=PATCH, tile_size=TILE, **kwargs)  # type: ignore[arg-type]


def test_fake_jp2_is_lossless(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    for path, arrays in geonrw[1].items():
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1), arrays["rgb"])


def test_length_is_tiles_times_patches(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    root, _ = geonrw
    assert len(dataset(root)) == len(TRAIN_CITIES) * (TILE // PATCH) ** 2
    assert len(dataset(root, split="test")) == len(TEST_CITIES) * (TILE // PATCH) ** 2


def test_sample_keys_shapes_dtypes_and_range(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    sample = dataset(geonrw[0])[5]
    assert set(sample) == {"image_rgb", "image_dem", "mask"}
    assert sample["image_rgb"].shape == (3, PATCH, PATCH) and sample["image_rgb"].dtype == torch.float32
    assert sample["image_dem"].shape == (1, PATCH, PATCH) and sample["image_dem"].dtype == torch.float32
    assert sample["mask"].shape == (PATCH, PATCH) and sample["mask"].dtype == torch.int64
    for key in ("image_rgb", "image_dem"):
        assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0
    assert sample["image_dem"].max() > 0.9


@pytest.mark.parametrize("index", [0, 1, 4, 6, 15, 16, 37, 79])
def test_patches_are_the_right_windows(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]], index: int) -> None:
    root, written = geonrw
    data = dataset(root)
    sample = data[index]
    path, window = data.patch_location(index)
    per_side = TILE // PATCH
    tile, patch = divmod(index, per_side**2)
    row, col = divmod(patch, per_side)
    assert (window.row_off, window.col_off) == (row * PATCH, col * PATCH)
    assert path == data.file_list[tile]
    rows, cols = slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)
    arrays = written[path]
    expected_rgb = torch.from_numpy(arrays["rgb"][:, rows, cols].astype(np.float32)) / 255
    torch.testing.assert_close(sample["image_rgb"], expected_rgb)
    expected_dem = percentile_min_max(torch.from_numpy(arrays["dem"][None, rows, cols].copy()))
    torch.testing.assert_close(sample["image_dem"], expected_dem)
    seg = torch.from_numpy(arrays["seg"][rows, cols].astype(np.int64))
    assert torch.equal(sample["mask"], torch.where(seg == 0, 255, seg - 1))


def test_mask_mapping_ignores_background(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    data = dataset(geonrw[0])
    values = set(torch.cat([data[i]["mask"].flatten() for i in range(16)]).unique().tolist())
    assert 255 in values and values - {255} <= set(range(10)) and 9 in values
    assert GeoNRWMM.num_classes == 10 and GeoNRWMM.ignore_index == 255
    with pytest.raises(ValueError, match="0..10"):
        GeoNRWMM.labels_to_mask(torch.tensor([[11]]))


def test_dem_channels_repeat(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    sample = dataset(geonrw[0], dem_channels=3, include_mask=False)[3]
    assert "mask" not in sample and sample["image_dem"].shape == (3, PATCH, PATCH)
    assert torch.equal(sample["image_dem"][0], sample["image_dem"][2])


def test_tile_size_mismatch_is_explained(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    data = GeoNRWMM(geonrw[0], patch_size=PATCH, tile_size=2 * TILE)
    with pytest.raises(ValueError, match="tile_size"):
        data[0]
    with pytest.raises(ValueError, match="multiple"):
        GeoNRWMM(geonrw[0], patch_size=24, tile_size=TILE)


def test_missing_root_raises_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        GeoNRWMM(tmp_path / "nowhere")


def test_city_split_is_reproducible_and_disjoint(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    root = geonrw[0]
    splits = []
    for _ in range(2):
        datamodule = GeoNRWMMDataModule(root, batch_size=4, patch_size=PATCH, tile_size=TILE, seed=3)
        datamodule.setup("fit")
        splits.append((datamodule.train_dataset.indices, datamodule.val_dataset.indices))
    assert splits[0] == splits[1]
    train_indices, val_indices = splits[0]
    assert not set(train_indices) & set(val_indices)
    assert len(train_indices) + len(val_indices) == len(TRAIN_CITIES) * (TILE // PATCH) ** 2
    data = datamodule.train_dataset.dataset
    train_cities = {data.patch_city(i) for i in train_indices}
    val_cities = {data.patch_city(i) for i in val_indices}
    assert not train_cities & val_cities and len(val_cities) == 1
    datamodule.setup("test")
    test_cities = {os.path.basename(os.path.dirname(path)) for path in datamodule.test_dataset.file_list}
    assert test_cities == set(TEST_CITIES)


def test_train_fraction_is_a_reproducible_subset_of_the_city_split(
    geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]],
) -> None:
    root = geonrw[0]

    def split(fraction: float, seed: int = 3) -> tuple[list[int], list[int]]:
        datamodule = GeoNRWMMDataModule(
            root, batch_size=4, patch_size=PATCH, tile_size=TILE, seed=seed, train_fraction=fraction
        )
        datamodule.setup("fit")
        return list(datamodule.train_dataset.indices), list(datamodule.val_dataset.indices)

    full_train, full_val = split(1.0)
    part_train, part_val = split(0.25)
    assert part_train == split(0.25)[0]
    assert len(part_train) == round(0.25 * len(full_train)) and set(part_train) < set(full_train)
    assert part_val == full_val  # validation is never reduced
    with pytest.raises(ValueError, match="train_fraction must lie in"):
        GeoNRWMMDataModule(root, train_fraction=0.0)


def test_train_augmentation_moves_rgb_dem_and_mask_together() -> None:
    torch.manual_seed(0)
    datamodule = GeoNRWMMDataModule(crop_size=40)
    batch = block_batch()
    batch.pop("image_hha")
    datamodule.trainer = SimpleNamespace(
        training=True, validating=False, sanity_checking=False, testing=False, predicting=False
    )  # type: ignore[assignment]
    out = datamodule.on_after_batch_transfer(batch, 0)
    assert out["image_rgb"].shape == (4, 3, 40, 40) and out["mask"].shape == (4, 40, 40)
    out["image_hha"] = out["image_rgb"]
    assert_moved_together(batch, out)
    datamodule.trainer = SimpleNamespace(
        training=False, validating=True, sanity_checking=False, testing=False, predicting=False
    )  # type: ignore[assignment]
    evaluated = datamodule.on_after_batch_transfer(batch, 0)
    assert all(torch.equal(evaluated[key], batch[key]) for key in ("image_rgb", "image_dem", "mask"))


def test_segmentation_batch_from_loader(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    datamodule = GeoNRWMMDataModule(geonrw[0], batch_size=4, patch_size=PATCH, tile_size=TILE, dem_channels=3)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image_rgb"].shape == (4, 3, PATCH, PATCH) and batch["image_dem"].shape == (4, 3, PATCH, PATCH)
    assert batch["mask"].shape == (4, PATCH, PATCH) and batch["mask"].dtype == torch.int64
    assert_specs_describe_batch(
        datamodule, batch, {"rgb": (3, "aerial_rgb", ["R", "G", "B"]), "dem": (3, "dem", ["DEM"] * 3)}
    )
    single = GeoNRWMMDataModule(geonrw[0], patch_size=PATCH, tile_size=TILE).modality_specs
    assert (single["dem"].bands, single["dem"].band_names) == (1, ["DEM"])


def test_pretrain_datamodule_batch(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    datamodule = GeoNRWMMPretrainDataModule(geonrw[0], batch_size=4, patch_size=PATCH, tile_size=TILE)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == len(TRAIN_CITIES) * (TILE // PATCH) ** 2
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image_rgb", "image_dem"}
    assert batch["image_rgb"].shape == (4, 3, PATCH, PATCH) and batch["image_dem"].shape == (4, 1, PATCH, PATCH)
    assert_specs_describe_batch(
        datamodule, batch, {"rgb": (3, "aerial_rgb", ["R", "G", "B"]), "dem": (1, "dem", ["DEM"])}
    )
    tripled = GeoNRWMMPretrainDataModule(geonrw[0], batch_size=4, patch_size=PATCH, tile_size=TILE, dem_channels=3)
    tripled.setup("fit")
    assert_specs_describe_batch(
        tripled,
        next(iter(tripled.train_dataloader())),
        {"rgb": (3, "aerial_rgb", ["R", "G", "B"]), "dem": (3, "dem", ["DEM"] * 3)},
    )


def test_decur_fit_fast_dev_run(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    import lightning as L

    from decur_lightning import DeCURModule

    model = DeCURModule(  # modalities, band counts and view kinds from the datamodule
        encoder="resnet18",
        projector_dims=(64, 64),
        common_ratio=0.75,
        crop_size=32,
    )
    datamodule = GeoNRWMMPretrainDataModule(
        geonrw[0], batch_size=4, patch_size=2 * PATCH, tile_size=TILE, dem_channels=3
    )
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule)
    assert trainer.state.finished
    assert model.encoders["dem"].conv1.in_channels == 3 and model.encoders.specs["rgb"].view == "aerial_rgb"


def test_val_fraction_zero_means_no_validation_split(geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]]) -> None:
    datamodule = GeoNRWMMDataModule(geonrw[0], batch_size=4, patch_size=PATCH, tile_size=TILE, val_fraction=0.0)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == len(TRAIN_CITIES) * (TILE // PATCH) ** 2
    assert not hasattr(datamodule, "val_dataset") or datamodule.val_dataset is None
    assert datamodule.val_dataloader() == []
    assert len(datamodule.train_dataloader()) == len(TRAIN_CITIES) * (TILE // PATCH) ** 2 // 4


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_val_fraction_out_of_range_is_refused_at_init(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\)"):
        GeoNRWMMDataModule(val_fraction=fraction)


def test_val_fraction_leaving_no_city_names_the_usable_range(
    geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]],
) -> None:
    datamodule = GeoNRWMMDataModule(geonrw[0], batch_size=4, patch_size=PATCH, tile_size=TILE, val_fraction=0.05)
    with pytest.raises(ValueError, match=r"leaves 0 validation .* between 0.1 and 0.9"):
        datamodule.setup("fit")


def test_training_split_smaller_than_a_batch_fails_at_setup(
    geonrw: tuple[Path, dict[str, dict[str, np.ndarray]]],
) -> None:
    root = geonrw[0]
    # 4 training cities x 16 patches = 64 patches; 5 % of them is 3 < batch_size 4
    datamodule = GeoNRWMMDataModule(root, batch_size=4, patch_size=PATCH, tile_size=TILE, train_fraction=0.05)
    with pytest.raises(ValueError, match=r"GeoNRW train .* 3 sample\(s\), fewer than batch_size=4.*train_fraction"):
        datamodule.setup("fit")
    datamodule.setup("validate")  # only training needs a full batch
    pretrain = GeoNRWMMPretrainDataModule(root, batch_size=81, patch_size=PATCH, tile_size=TILE)
    with pytest.raises(ValueError, match=r"80 sample\(s\), fewer than batch_size=81"):
        pretrain.setup("fit")


def test_unreadable_tile_raise_names_the_file_and_skip_replaces_its_patches(tmp_path: Path) -> None:
    make_geonrw(tmp_path, ("aachen", "bergisch", "bielefeld"), ("duesseldorf",), size=TILE)
    plain = dataset(tmp_path, include_mask=False)
    bad = Path(plain.sample_files(16)[1])  # the DEM of tile 1
    assert bad.name.endswith("_dem.tif")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated: opens, fails to read
    patches = TILE // PATCH * (TILE // PATCH)

    strict = GeoNRWMMPretrainDataModule(tmp_path, batch_size=4, patch_size=PATCH, tile_size=TILE)
    strict.setup("fit")
    with pytest.raises(OSError, match="on_read_error='skip'") as info:
        strict.train_dataset[17]
    assert str(bad) in str(info.value) and "sample 17 of GeoNRWMM train" in str(info.value)
    assert torch.equal(strict.train_dataset[3]["image_dem"], plain[3]["image_dem"])  # good tiles still read

    lenient = GeoNRWMMPretrainDataModule(tmp_path, batch_size=4, patch_size=PATCH, tile_size=TILE, on_read_error="skip")
    lenient.setup("fit")
    with pytest.warns(RuntimeWarning, match=str(bad)):
        sample = lenient.train_dataset[patches]
    expected = plain[2 * patches]  # first patch of the next, readable tile
    assert torch.equal(sample["image_rgb"], expected["image_rgb"]) and torch.equal(
        sample["image_dem"], expected["image_dem"]
    )
    assert sorted(lenient.train_dataset.skipped) == list(range(patches, 2 * patches))
    assert all(files == [str(bad)] for files in lenient.train_dataset.skipped.values())

    capped = GeoNRWMMPretrainDataModule(
        tmp_path, patch_size=PATCH, tile_size=TILE, on_read_error="skip", max_read_errors=3
    )
    capped.setup("validate")
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(OSError, match="4 unreadable samples, more than max_read_errors=3"),
    ):
        capped.train_dataset[patches]

    segmentation = GeoNRWMMDataModule(tmp_path, batch_size=4, patch_size=PATCH, tile_size=TILE, val_fraction=0.0)
    segmentation.setup("fit")
    with pytest.raises(OSError, match="GeoNRWMM train") as info:
        for index in range(len(segmentation.train_dataset)):
            segmentation.train_dataset[index]
    assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match="on_read_error must be one of"):
        GeoNRWMMDataModule(tmp_path, on_read_error="warn")
