"""SUN-RGBD / NYU-Depth v2 (CMX layout) RGB + HHA on fake files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_factories import make_rgbd
from PIL import Image
from test_datamodules_common import assert_moved_together, block_batch
from torchgeo.datasets import DatasetNotFoundError

from decur_lightning.datamodules import RGBDMM, RGBDMMDataModule, RGBDMMPretrainDataModule

SIZE = (20, 24)


@pytest.fixture(scope="module")
def sunrgbd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("SUNRGBD")
    return root, make_rgbd(root, num_classes=37, train=8, test=3)


@pytest.fixture(scope="module")
def nyudv2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("NYUDepthv2")
    return root, make_rgbd(root, num_classes=40, train=4, test=2, sizes=((24, 32),), hha_extension=".jpg")


def test_sample_keys_shapes_dtypes_and_range(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    data = RGBDMM(sunrgbd[0], dataset="sunrgbd", image_size=SIZE)
    assert len(data) == 8
    for index in (0, 1):  # two native sizes, one output size
        sample = data[index]
        assert set(sample) == {"image_rgb", "image_hha", "mask"}
        assert sample["image_rgb"].shape == (3, *SIZE) and sample["image_rgb"].dtype == torch.float32
        assert sample["image_hha"].shape == (3, *SIZE) and sample["image_hha"].dtype == torch.float32
        assert sample["mask"].shape == SIZE and sample["mask"].dtype == torch.int64
        for key in ("image_rgb", "image_hha"):
            assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0


def test_default_sizes(sunrgbd: tuple[Path, dict[str, list[str]]], nyudv2: tuple[Path, dict[str, list[str]]]) -> None:
    assert RGBDMM(sunrgbd[0]).image_size == (480, 480)
    assert RGBDMM(nyudv2[0], dataset="nyudv2").image_size == (480, 640)


def test_native_size_reads_exact_pixels(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    root, names = sunrgbd
    sample = RGBDMM(root, image_size=(24, 32))[0]
    hha = np.asarray(Image.open(root / "HHA" / f"{names['train'][0]}.png")).transpose(2, 0, 1)
    torch.testing.assert_close(sample["image_hha"], torch.from_numpy(hha.astype(np.float32)) / 255)
    labels = torch.from_numpy(np.asarray(Image.open(root / "Label" / f"{names['train'][0]}.png")).astype(np.int64))
    assert torch.equal(sample["mask"], torch.where(labels == 0, 255, labels - 1))
    rgb = np.asarray(Image.open(root / "RGB" / f"{names['train'][0]}.jpg")).transpose(2, 0, 1)
    torch.testing.assert_close(sample["image_rgb"], torch.from_numpy(rgb.astype(np.float32)) / 255)


@pytest.mark.parametrize(("dataset", "num_classes"), [("sunrgbd", 37), ("nyudv2", 40)])
def test_mask_follows_cmx_convention(
    sunrgbd: tuple[Path, dict[str, list[str]]], nyudv2: tuple[Path, dict[str, list[str]]], dataset: str, num_classes: int
) -> None:
    root = (sunrgbd if dataset == "sunrgbd" else nyudv2)[0]
    data = RGBDMM(root, dataset=dataset, image_size=(24, 32), split="all")  # type: ignore[arg-type]
    assert data.num_classes == num_classes
    values = set(torch.cat([data[i]["mask"].flatten() for i in range(len(data))]).unique().tolist())
    assert values == set(range(num_classes)) | {255}


def test_wrong_dataset_for_labels_is_explained(nyudv2: tuple[Path, dict[str, list[str]]]) -> None:
    data = RGBDMM(nyudv2[0], dataset="sunrgbd", image_size=(24, 32))
    with pytest.raises(ValueError, match="dataset= set right"):
        data[0]


def test_splits(sunrgbd: tuple[Path, dict[str, list[str]]], nyudv2: tuple[Path, dict[str, list[str]]]) -> None:
    root, names = sunrgbd
    assert RGBDMM(root, split="test").names == names["test"]
    assert RGBDMM(root, split="all").names == names["train"] + names["test"]
    nyu = RGBDMM(nyudv2[0], dataset="nyudv2", split="train")
    assert nyu.files[0]["hha"].endswith(".jpg")


def test_missing_root_raises_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="RGBX_Semantic_Segmentation"):
        RGBDMM(tmp_path / "nowhere")


def test_missing_sample_file_is_explained(tmp_path: Path) -> None:
    names = make_rgbd(tmp_path, num_classes=37, train=2, test=1)
    (tmp_path / "HHA" / f"{names['train'][1]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=names["train"][1]):
        RGBDMM(tmp_path)


def test_validation_split_is_reproducible_and_disjoint(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    root = sunrgbd[0]

    def split(seed: int) -> tuple[list[int], list[int]]:
        datamodule = RGBDMMDataModule(root, batch_size=2, image_size=SIZE, val_fraction=0.25, seed=seed)
        datamodule.setup("fit")
        return list(datamodule.train_dataset.indices), list(datamodule.val_dataset.indices)

    train, val = split(5)
    assert (train, val) == split(5)
    assert not set(train) & set(val) and sorted(train + val) == list(range(8)) and len(val) == 2
    default = RGBDMMDataModule(root, batch_size=2, image_size=SIZE)
    default.setup("fit")
    assert len(default.train_dataset) == 8 and default.val_dataset.split == "test"


def test_train_augmentation_moves_rgb_hha_and_mask_together() -> None:
    torch.manual_seed(0)
    datamodule = RGBDMMDataModule(crop_size=(40, 48))
    batch = block_batch()
    datamodule.trainer = SimpleNamespace(training=True, validating=False, sanity_checking=False, testing=False, predicting=False)  # type: ignore[assignment]
    out = datamodule.on_after_batch_transfer(batch, 0)
    assert out["image_hha"].shape == (4, 3, 40, 48) and out["mask"].shape == (4, 40, 48)
    assert_moved_together(batch, out)


def test_segmentation_batch_from_loader(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    datamodule = RGBDMMDataModule(sunrgbd[0], batch_size=3, image_size=SIZE)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_rgb"].shape == (3, 3, *SIZE) and batch["mask"].shape == (3, *SIZE)
    assert datamodule.num_classes == 37


def test_pretrain_datamodule_batch(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    datamodule = RGBDMMPretrainDataModule(sunrgbd[0], batch_size=4, split="all", image_size=SIZE)
    assert datamodule.modality_kinds == {"rgb": "rgb", "hha": "hha"}
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 11
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image_rgb", "image_hha"} and batch["image_hha"].shape == (4, 3, *SIZE)


def test_decur_fit_fast_dev_run(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    import lightning as L

    from decur_lightning import DeCURModule

    model = DeCURModule(
        encoder1="resnet18",
        encoder2="resnet18",
        in_channels1=3,
        in_channels2=3,
        modality1="rgb",
        modality2="hha",
        projector_dims=(64, 64),
        common_ratio=0.75,
        crop_size=32,
    )
    datamodule = RGBDMMPretrainDataModule(sunrgbd[0], batch_size=4, image_size=(40, 40))
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule)
    assert trainer.state.finished
