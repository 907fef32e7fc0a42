"""BigEarthNet-MM (v1) on fake patches in torchgeo's on-disk layout."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_datamodules_common import assert_specs_describe_batch, block_batch
from torchgeo.datasets import BigEarthNet, DatasetNotFoundError

from decur_lightning.datamodules import BigEarthNetMM, BigEarthNetMMDataModule
from decur_lightning.datamodules.bigearthnet import B10_INDEX, S2_L1C_BANDS, S2_L2A_BANDS

from data_factories import bigearthnet_s1_values, bigearthnet_s2_value, make_bigearthnet

SAMPLES = {"train": 20, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def bigearthnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[int]]]:
    root = tmp_path_factory.mktemp("bigearthnet")
    return root, make_bigearthnet(root, SAMPLES)


def test_sample_keys_shapes_dtypes_and_range(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    sample = BigEarthNetMM(bigearthnet[0])[0]
    assert set(sample) == {"image_s1", "image_s2", "label"}
    assert sample["image_s1"].shape == (2, 120, 120) and sample["image_s1"].dtype == torch.float32
    assert sample["image_s2"].shape == (13, 120, 120) and sample["image_s2"].dtype == torch.float32
    assert sample["label"].shape == (19,) and sample["label"].dtype == torch.int64
    for key in ("image_s1", "image_s2"):
        assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0
    assert torch.count_nonzero(sample["image_s2"][B10_INDEX]) == 0


def test_band_order_and_empty_b10(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    root, ids = bigearthnet
    data = BigEarthNetMM(root, split="val", normalize=False)
    for index, sample_id in enumerate(ids["val"]):
        sample = data[index]
        vv, vh = bigearthnet_s1_values(sample_id)
        # fractional dB survive (torchgeo's own reader casts to int32: -10.25 becomes -10)
        assert torch.all(sample["image_s1"][0] == vv) and torch.all(sample["image_s1"][1] == vh)
        assert S2_L1C_BANDS.index("B10") == B10_INDEX == 10
        for position, band in enumerate(S2_L1C_BANDS):
            channel = sample["image_s2"][position]
            if band == "B10":
                assert torch.all(channel == 0)
            else:
                expected = bigearthnet_s2_value(sample_id, S2_L2A_BANDS.index(band))
                assert torch.allclose(channel, torch.full_like(channel, expected)), band


def test_torchgeo_all_bands_start_with_vh_vv(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    root, ids = bigearthnet
    image = BigEarthNet(root, split="val", bands="all")[0]["image"]
    vv, vh = bigearthnet_s1_values(ids["val"][0])
    assert image[0, 0, 0] == round(vh) and image[1, 0, 0] == round(vv)  # VH first, whole dB


def test_labels_match_metadata(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    root, ids = bigearthnet
    data = BigEarthNetMM(root, split="train")
    names = BigEarthNet.class_sets[19]
    expected = ["Mixed forest", "Pastures", "Marine waters", "Coniferous forest", "Inland waters"]
    for index in range(5):
        label = data[index]["label"]
        assert label.sum() == 1 and names[int(label.argmax())] == expected[ids["train"][index] % 5]


def test_train_fraction_is_reproducible_and_within_train(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    root = bigearthnet[0]

    def subset(seed: int) -> list[int]:
        datamodule = BigEarthNetMMDataModule(root, batch_size=2, train_fraction=0.25, seed=seed)
        datamodule.setup("fit")
        assert len(datamodule.val_dataset) == SAMPLES["val"]
        return list(datamodule.train_dataset.indices)

    first = subset(7)
    assert first == subset(7) and len(first) == 5 == len(set(first))
    assert first != subset(8)
    assert all(0 <= i < SAMPLES["train"] for i in first)
    datamodule = BigEarthNetMMDataModule(root, batch_size=2, train_fraction=0.25, seed=7)
    datamodule.setup("fit")
    datamodule.setup("test")
    train_folders = {datamodule.train_dataset.dataset.folders[i]["s2"] for i in first}
    other = {f["s2"] for d in (datamodule.val_dataset, datamodule.test_dataset) for f in d.folders}
    assert not train_folders & other
    with pytest.raises(ValueError, match="train_fraction"):
        BigEarthNetMMDataModule(root, train_fraction=0.0)


def test_augmentation_on_device(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    torch.manual_seed(0)
    datamodule = BigEarthNetMMDataModule(bigearthnet[0], batch_size=4, size=40)
    datamodule.setup("fit")
    loaded = next(iter(datamodule.train_dataloader()))
    assert loaded["image_s2"].shape == (4, 13, 120, 120)
    assert_specs_describe_batch(
        datamodule, loaded, {"s1": (2, "sar", ["VV", "VH"]), "s2": (13, "optical", list(S2_L1C_BANDS))}
    )
    assert datamodule.modality_specs["s2"].band_names[B10_INDEX] == "B10"  # the inserted empty band
    assert torch.count_nonzero(loaded["image_s2"][:, B10_INDEX]) == 0
    blocks = block_batch()["image_rgb"]
    batch = {
        "image_s1": blocks[:, :2].clone(),
        "image_s2": torch.cat([blocks, torch.zeros(4, 10, 64, 64)], 1),
        "label": loaded["label"],
    }
    datamodule.trainer = SimpleNamespace(
        training=True, validating=False, sanity_checking=False, testing=False, predicting=False
    )  # type: ignore[assignment]
    out = datamodule.on_after_batch_transfer(dict(batch), 0)
    assert out["image_s1"].shape == (4, 2, 40, 40) and out["image_s2"].shape == (4, 13, 40, 40)
    torch.testing.assert_close(out["image_s1"], out["image_s2"][:, :2])
    assert not torch.equal(out["image_s1"][0], out["image_s1"][1])
    assert torch.equal(out["label"], batch["label"]) and out["label"].dtype == torch.int64
    assert torch.count_nonzero(out["image_s2"][:, 3:]) == 0
    datamodule.trainer = SimpleNamespace(
        training=False, validating=True, sanity_checking=False, testing=False, predicting=False
    )  # type: ignore[assignment]
    evaluated = datamodule.on_after_batch_transfer(dict(batch), 0)
    assert evaluated["image_s2"].shape == (4, 13, 40, 40)
    torch.testing.assert_close(evaluated["image_s1"], evaluated["image_s2"][:, :2])


def test_missing_root_raises_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        BigEarthNetMM(tmp_path / "nowhere")


def test_missing_band_file_is_explained(tmp_path: Path) -> None:
    make_bigearthnet(tmp_path, {"train": 1, "val": 1, "test": 1})
    data = BigEarthNetMM(tmp_path, split="train")
    next(Path(data.folders[0]["s2"]).glob("*_B8A.tif")).unlink()
    with pytest.raises(FileNotFoundError, match="B8A"):
        data[0]


@pytest.mark.parametrize("num_classes", [10, 0, "19"])
def test_unknown_class_count_is_refused_at_init(num_classes: object) -> None:
    with pytest.raises(ValueError, match=r"num_classes must be 19 .* or 43"):
        BigEarthNetMMDataModule(num_classes=num_classes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_classes must be 19 .* or 43"):
        BigEarthNetMM("nowhere", num_classes=num_classes)  # type: ignore[arg-type]


def test_43_classes_still_work(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    assert BigEarthNetMM(bigearthnet[0], split="val", num_classes=43)[0]["label"].shape == (43,)


def test_training_fraction_smaller_than_a_batch_fails_at_setup(bigearthnet: tuple[Path, dict[str, list[int]]]) -> None:
    datamodule = BigEarthNetMMDataModule(bigearthnet[0], batch_size=8, train_fraction=0.25)  # 5 of 20 samples
    with pytest.raises(
        ValueError, match=r"BigEarthNet train .* 5 sample\(s\), fewer than batch_size=8.*train_fraction"
    ):
        datamodule.setup("fit")
    datamodule.setup("test")  # evaluation needs no full batch
    BigEarthNetMMDataModule(bigearthnet[0], batch_size=5, train_fraction=0.25).setup("fit")


def test_unreadable_band_raise_names_the_file_and_skip_replaces_the_sample(tmp_path: Path) -> None:
    make_bigearthnet(tmp_path, {"train": 4, "val": 3, "test": 1})
    plain = BigEarthNetMM(tmp_path, split="val", normalize=False)
    bad = Path(plain.sample_files(1)[5])  # an S2 band of val sample 1
    assert bad.exists() and bad.name.endswith("_B04.tif")
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)  # a corrupt TIFF header

    strict = BigEarthNetMMDataModule(tmp_path, batch_size=2, normalize=False)
    strict.setup("validate")
    with pytest.raises(OSError, match="on_read_error='skip'") as info:
        strict.val_dataset[1]
    assert str(bad) in str(info.value) and "sample 1 of BigEarthNetMM val" in str(info.value)

    lenient = BigEarthNetMMDataModule(tmp_path, batch_size=2, normalize=False, on_read_error="skip")
    lenient.setup("validate")
    with pytest.warns(RuntimeWarning, match=str(bad)):
        batch = list(lenient.val_dataloader())
    samples = torch.cat([b["image_s1"][:, 0, 0, 0] for b in batch])
    expected = [plain[i]["image_s1"][0, 0, 0] for i in (0, 2, 2)]  # sample 1 replaced by sample 2
    assert samples.tolist() == [float(v) for v in expected]
    assert lenient.val_dataset.skipped == {1: [str(bad)]}
