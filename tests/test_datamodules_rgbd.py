"""SUN-RGBD / NYU-Depth v2 (CMX layout) RGB + HHA on fake files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_datamodules_common import assert_moved_together, assert_specs_describe_batch, block_batch
from torchgeo.datasets import DatasetNotFoundError

from decur_lightning.datamodules import RGBDMM, RGBDMMDataModule, RGBDMMPretrainDataModule
from decur_lightning.datamodules.rgbd import (
    CMX_SCALES,
    CMXTrainTransform,
    ImageNetNormalize,
    ResizedCropTransform,
    pad_collate,
)

from data_factories import make_rgbd

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
    sunrgbd: tuple[Path, dict[str, list[str]]],
    nyudv2: tuple[Path, dict[str, list[str]]],
    dataset: str,
    num_classes: int,
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


def test_resized_crop_option_moves_rgb_hha_and_mask_together() -> None:
    torch.manual_seed(0)
    batch = block_batch()
    transform = ResizedCropTransform((40, 48))
    samples = [transform({key: value[i] for key, value in batch.items()}) for i in range(4)]
    out = {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}
    assert out["image_hha"].shape == (4, 3, 40, 48) and out["mask"].shape == (4, 40, 48)
    assert_moved_together(batch, out)


def test_unknown_dataset_name_is_a_value_error_naming_the_choices() -> None:
    # Was a bare KeyError: 'nyu' from the class-count lookup.
    with pytest.raises(ValueError, match=r"\['nyudv2', 'sunrgbd'\].*'nyu'"):
        RGBDMMDataModule(dataset="nyu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\['nyudv2', 'sunrgbd'\]"):
        RGBDMMPretrainDataModule(dataset="nyu")  # type: ignore[arg-type]


def test_bad_options_are_explained() -> None:
    with pytest.raises(ValueError, match="augmentation"):
        RGBDMMDataModule(augmentation="flip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization"):
        RGBDMMDataModule(normalization="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_size"):
        RGBDMMDataModule(crop_size=(480,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_batch_size"):
        RGBDMMDataModule(eval_batch_size=0)
    with pytest.raises(ValueError, match="scales"):
        CMXTrainTransform((8, 8), scales=())


def test_cmx_defaults() -> None:
    sun, nyu = RGBDMMDataModule(), RGBDMMDataModule(dataset="nyudv2")
    assert sun.crop_size == (480, 480) and nyu.crop_size == (480, 640)
    assert sun.augmentation == "cmx" and sun.normalization == "imagenet"
    assert sun.kwargs["image_size"] == "original" and sun.val_batch_size == sun.test_batch_size == 1
    assert isinstance(sun.train_transform.transforms[1], CMXTrainTransform)
    assert sun.train_transform.transforms[1].scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) == CMX_SCALES


def _position_sample(height: int = 40, width: int = 60) -> dict[str, torch.Tensor]:
    """Channel 0 holds the column, channel 1 the row; the mask ``row * 1000 + col``."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([cols.float(), rows.float(), torch.zeros(height, width)])
    return {"image_rgb": image, "image_hha": image.clone(), "mask": rows * 1000 + cols}


def test_cmx_transform_scales_flips_and_crops_like_cmx() -> None:
    torch.manual_seed(0)
    crop = (32, 48)
    transform = CMXTrainTransform(crop)
    sample = _position_sample()
    scales, flips = set(), set()
    for _ in range(150):
        out = transform(sample)
        assert out["image_rgb"].shape == (3, *crop) and out["mask"].shape == crop
        assert out["mask"].dtype == torch.int64
        torch.testing.assert_close(out["image_hha"], out["image_rgb"])
        valid = out["mask"] != 255
        rows, cols = valid.any(1).nonzero()[:, 0], valid.any(0).nonzero()[:, 0]
        block = out["image_rgb"][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        # Bilinear on a ramp: neighbours differ by 1 / scale (median: clamped edge pixels aside).
        step_x = (block[0, :, 1:] - block[0, :, :-1]).flatten().median().item()
        step_y = (block[1, 1:] - block[1, :-1]).flatten().median().item()
        assert step_y > 0 and abs(abs(step_x) - step_y) < 1e-4  # isotropic scaling, rows never flip
        scale = min(CMX_SCALES, key=lambda s: abs(s - 1 / step_y))
        assert abs(scale - 1 / step_y) < 1e-3  # 40 x 60 scales to whole pixels at every CMX scale
        scales.add(scale)
        flips.add(step_x < 0)
        # The mask (nearest) moved with the images: its row/column agree within one pixel.
        mask = out["mask"][valid]
        assert (mask // 1000 - out["image_rgb"][1][valid]).abs().max() <= 1
        assert (mask % 1000 - out["image_rgb"][0][valid]).abs().max() <= 1
        # A scaled image smaller than the crop is centred and padded: mask 255, images 0.
        scaled = (int(40 * scale), int(60 * scale))
        assert (int(valid.sum(0).max()), int(valid.sum(1).max())) == (
            min(scaled[0], crop[0]),
            min(scaled[1], crop[1]),
        )
        if scaled[0] < crop[0]:
            assert rows.min() == (crop[0] - scaled[0]) // 2
        assert (out["image_rgb"][:, ~valid] == 0).all()
    assert scales == set(CMX_SCALES) and flips == {True, False}


def test_imagenet_normalisation_values() -> None:
    ones = {"image_rgb": torch.ones(3, 2, 2), "image_hha": torch.ones(3, 2, 2), "mask": torch.zeros(2, 2).long()}
    out = ImageNetNormalize()(ones)
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    for key in ("image_rgb", "image_hha"):  # CMX normalises HHA with the same statistics
        torch.testing.assert_close(out[key][:, 0, 0], expected)
    assert torch.equal(out["mask"], ones["mask"])
    mean = {"image_rgb": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1).expand(3, 2, 2)}
    torch.testing.assert_close(ImageNetNormalize()(mean)["image_rgb"], torch.zeros(3, 2, 2))


def test_eval_samples_keep_original_size_and_are_normalised(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    root, names = sunrgbd
    datamodule = RGBDMMDataModule(root)
    datamodule.setup("test")
    raw = RGBDMM(root, split="test", image_size="original")
    batches = list(datamodule.test_dataloader())
    assert len(batches) == 3
    for index, (batch, name) in enumerate(zip(batches, names["test"])):
        size = Image.open(root / "Label" / f"{name}.png").size[::-1]
        assert batch["mask"].shape == (1, *size) and batch["image_rgb"].shape == (1, 3, *size)
        expected = raw[index]
        assert torch.equal(batch["mask"][0], expected["mask"])
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        for key in ("image_rgb", "image_hha"):
            torch.testing.assert_close(batch[key][0], (expected[key] - mean) / std)
    assert {tuple(batch["mask"].shape[1:]) for batch in batches} == {(24, 32), (30, 20)}


def test_larger_eval_batches_are_padded_with_the_ignore_label(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    datamodule = RGBDMMDataModule(sunrgbd[0], eval_batch_size=2)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["mask"].shape == (2, 30, 32) and batch["image_hha"].shape == (2, 3, 30, 32)
    first, second = datamodule.test_dataset[0], datamodule.test_dataset[1]  # (24, 32) and (30, 20)
    assert torch.equal(batch["mask"][0, :24], first["mask"]) and (batch["mask"][0, 24:] == 255).all()
    assert torch.equal(batch["mask"][1, :, :20], second["mask"]) and (batch["mask"][1, :, 20:] == 255).all()
    torch.testing.assert_close(batch["image_rgb"][1, :, :, :20], second["image_rgb"])
    assert (batch["image_rgb"][1, :, :, 20:] == 0).all()
    same = pad_collate([first, first])  # one size: plain stacking
    assert torch.equal(same["mask"], torch.stack([first["mask"]] * 2))


def test_distributed_evaluation_scores_each_image_on_one_process(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    # Lightning's default DistributedSampler would pad 3 images on 2 processes to 4 (one twice).
    seen = []
    for rank in (0, 1):
        datamodule = RGBDMMDataModule(sunrgbd[0])
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        datamodule.setup("test")
        loader = datamodule.test_dataloader()
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # Lightning keeps it
        seen += list(loader.sampler)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("eval_batch_size", [1, 2])
def test_metrics_score_every_pixel_of_the_original_images_once(
    sunrgbd: tuple[Path, dict[str, list[str]]], eval_batch_size: int
) -> None:
    import lightning as L

    from decur_lightning.downstream import MultimodalSegmentationModule

    class Count(L.Callback):
        def __init__(self) -> None:
            self.scored: list[int] = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.scored.append(int(pl_module.test_metrics["miou"].confmat.sum()))

    torch.manual_seed(0)
    model = MultimodalSegmentationModule(modalities={"rgb": 3, "hha": 3}, encoder="resnet18", num_classes=37)
    datamodule = RGBDMMDataModule(sunrgbd[0], eval_batch_size=eval_batch_size)
    counter = Count()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[counter],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result = trainer.test(model, datamodule)[0]
    datamodule.setup("test")
    samples = [datamodule.test_dataset[i] for i in range(3)]
    labelled = sum(int((sample["mask"] != 255).sum()) for sample in samples)
    assert counter.scored[-1] == labelled  # every labelled pixel once; padding never
    correct = 0
    model.eval()
    with torch.no_grad():  # reference: each image alone at its own size
        for sample in samples:
            prediction = model({"rgb": sample["image_rgb"][None], "hha": sample["image_hha"][None]}).argmax(1)[0]
            valid = sample["mask"] != 255
            correct += int((prediction[valid] == sample["mask"][valid]).sum())
    if eval_batch_size == 1:
        assert result["test/oa"] == pytest.approx(correct / labelled, abs=1e-6)


def test_train_batches_are_normalised_cmx_crops(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    torch.manual_seed(0)
    datamodule = RGBDMMDataModule(sunrgbd[0], batch_size=3, crop_size=(16, 24))
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_rgb"].shape == (3, 3, 16, 24) and batch["mask"].shape == (3, 16, 24)
    assert batch["image_rgb"].min() < 0  # ImageNet-normalised, no longer in [0, 1]
    assert datamodule.val_dataset.transforms is datamodule.eval_transform


def test_segmentation_batch_from_loader(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    # Today's pipeline stays reachable: stretched samples, RandomResizedCrop, inputs in [0, 1].
    datamodule = RGBDMMDataModule(
        sunrgbd[0], batch_size=3, image_size=SIZE, crop_size=SIZE, augmentation="resized_crop", normalization="none"
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_rgb"].shape == (3, 3, *SIZE) and batch["mask"].shape == (3, *SIZE)
    assert 0 <= batch["image_rgb"].min() and batch["image_rgb"].max() <= 1
    assert datamodule.num_classes == 37
    val = next(iter(datamodule.val_dataloader()))
    assert val["mask"].shape == (1, *SIZE)
    assert_specs_describe_batch(datamodule, batch, RGBD_SPECS)


RGBD_SPECS = {
    "rgb": (3, "indoor_rgb", ["R", "G", "B"]),
    "hha": (3, "hha", ["horizontal_disparity", "height_above_ground", "angle_with_gravity"]),
}


def test_pretrain_datamodule_batch(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    datamodule = RGBDMMPretrainDataModule(sunrgbd[0], batch_size=4, split="all", image_size=SIZE)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 11
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image_rgb", "image_hha"} and batch["image_hha"].shape == (4, 3, *SIZE)
    assert_specs_describe_batch(datamodule, batch, RGBD_SPECS)


def test_decur_fit_fast_dev_run(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    import lightning as L

    from decur_lightning import DeCURModule

    model = DeCURModule(  # modalities, band counts and view kinds from the datamodule
        encoder="resnet18",
        projector_dims=(64, 64),
        common_ratio=0.75,
        crop_size=32,
    )
    datamodule = RGBDMMPretrainDataModule(sunrgbd[0], batch_size=4, image_size=(40, 40))
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule)
    assert trainer.state.finished


def test_unreadable_image_raise_names_the_file_and_skip_replaces_it(tmp_path: Path) -> None:
    root = tmp_path / "SUNRGBD"
    names = make_rgbd(root, num_classes=37, train=4, test=2)
    broken = root / "RGB" / f"{names['train'][1]}.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated JPEG
    strict = RGBDMMPretrainDataModule(root, batch_size=2, image_size=SIZE)
    strict.setup("fit")
    with pytest.raises(OSError, match=rf"{broken.name}.*on_read_error='skip'") as info:
        strict.train_dataset[1]
    assert str(broken) in str(info.value)
    lenient = RGBDMMPretrainDataModule(root, batch_size=2, image_size=SIZE, on_read_error="skip")
    lenient.setup("fit")
    with pytest.warns(RuntimeWarning, match=broken.name):
        replaced = lenient.train_dataset[1]
    torch.testing.assert_close(replaced["image_rgb"], lenient.train_dataset[2]["image_rgb"])
    assert list(lenient.train_dataset.skipped) == [1]
    segmentation = RGBDMMDataModule(root, batch_size=2, on_read_error="skip", crop_size=(16, 16))
    segmentation.setup("fit")
    with pytest.warns(RuntimeWarning, match=broken.name):
        assert segmentation.train_dataset[1]["image_rgb"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="on_read_error"):
        RGBDMMDataModule(root, on_read_error="ignore")


def test_fewer_pairs_than_a_batch_fail_at_setup(sunrgbd: tuple[Path, dict[str, list[str]]]) -> None:
    with pytest.raises(
        ValueError, match=r"RGB-D pretraining \(train\) split has 8 sample\(s\), fewer than batch_size=16"
    ):
        RGBDMMPretrainDataModule(sunrgbd[0], batch_size=16, image_size=SIZE).setup("fit")
    with pytest.raises(ValueError, match=r"RGB-D train split has 8 sample\(s\), fewer than batch_size=9"):
        RGBDMMDataModule(sunrgbd[0], batch_size=9).setup("fit")
