"""SSL4EO-S12 S1/S2 pairs on fake files in torchgeo's on-disk layout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from data_factories import SSL4EO_SEASON_DATES, make_ssl4eo_s12, ssl4eo_s1_value, ssl4eo_s2_value
from torchgeo.datasets import DatasetNotFoundError

from decur_lightning.datamodules import SSL4EOS12MM, SSL4EOS12MMDataModule

LOCATIONS = (0, 1, 2, 7)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ssl4eo_s12(tmp_path_factory.mktemp("ssl4eo"), LOCATIONS)


def decode_s1(image: torch.Tensor) -> tuple[int, int, list[int]]:
    """(location, season, band ids) of a raw single-season S1 image."""
    values = image[:, 0, 0].double() - 0.25
    location = int(values[0] // 1000)
    season = int((values[0] - 1000 * location) // 100)
    bands = [int(v - 1000 * location - 100 * season) for v in values]
    return location, season, bands


def decode_s2(image: torch.Tensor) -> tuple[int, int, list[int]]:
    values = image[:, 0, 0].long()
    location = int(values[0] // 1000)
    season = int((values[0] - 1000 * location) // 100)
    return location, season, [int(v - 1000 * location - 100 * season) for v in values]


def test_length_counts_location_folders(root: Path) -> None:
    dataset = SSL4EOS12MM(root)
    assert len(dataset) == len(LOCATIONS)
    assert dataset.locations == sorted(LOCATIONS)


def test_sample_keys_shapes_dtypes_and_range(root: Path) -> None:
    sample = SSL4EOS12MM(root)[0]
    assert set(sample) == {"image_s1", "image_s2", "location", "t_s1", "t_s2"}
    assert sample["image_s1"].shape == (2, 264, 264) and sample["image_s1"].dtype == torch.float32
    assert sample["image_s2"].shape == (13, 264, 264) and sample["image_s2"].dtype == torch.float32
    for key in ("image_s1", "image_s2"):
        assert 0.0 <= sample[key].min() and sample[key].max() <= 1.0
    assert sample["location"].dtype == torch.int64 and sample["t_s1"].shape == (1,)


def test_pairs_share_location_and_bands_keep_their_order(root: Path) -> None:
    dataset = SSL4EOS12MM(root, normalize=False)
    for index, location in enumerate(dataset.locations):
        sample = dataset[index]
        s1_location, s1_season, s1_bands = decode_s1(sample["image_s1"])
        s2_location, s2_season, s2_bands = decode_s2(sample["image_s2"])
        assert s1_location == s2_location == location == int(sample["location"])
        assert s1_bands == [0, 1]  # VV, VH
        assert s2_bands == list(range(13))  # B1 .. B8, B8A, B9, B10, B11, B12
        torch.testing.assert_close(sample["image_s1"][:, 5, 5], torch.tensor([ssl4eo_s1_value(location, s1_season, b) for b in (0, 1)]))
        assert sample["image_s2"][12, 0, 0] == ssl4eo_s2_value(location, s2_season, 12)


def test_seasons_are_drawn_independently_per_modality(root: Path) -> None:
    random.seed(0)
    dataset = SSL4EOS12MM(root, normalize=False)
    draws = []
    for _ in range(40):
        sample = dataset[1]
        draws.append((decode_s1(sample["image_s1"])[1], decode_s2(sample["image_s2"])[1]))
    s1_seasons, s2_seasons = zip(*draws)
    assert len(set(s1_seasons)) > 1 and len(set(s2_seasons)) > 1
    assert any(a != b for a, b in draws)


def test_timestamps_match_the_drawn_season(root: Path) -> None:
    dataset = SSL4EOS12MM(root, normalize=False)
    sample = dataset[2]
    season = decode_s2(sample["image_s2"])[1]
    date = SSL4EO_SEASON_DATES[season]
    from datetime import datetime, timezone

    day = datetime.strptime(date[:8], "%Y%m%d").replace(tzinfo=timezone.utc).timestamp()
    assert abs(float(sample["t_s2"][0]) - day) < 86400 * 1.5


def test_several_seasons_stack_along_channels(root: Path) -> None:
    sample = SSL4EOS12MM(root, seasons=3, normalize=False)[0]
    assert sample["image_s1"].shape == (6, 264, 264) and sample["image_s2"].shape == (39, 264, 264)
    seasons = {decode_s2(sample["image_s2"][13 * i : 13 * (i + 1)])[1] for i in range(3)}
    assert len(seasons) == 3
    normalized = SSL4EOS12MM(root, seasons=3)[0]
    assert normalized["image_s2"].shape == (39, 264, 264) and normalized["image_s2"].max() <= 1.0


def test_unpaired_locations_are_reported_and_skipped(tmp_path: Path) -> None:
    make_ssl4eo_s12(tmp_path, (0, 1), s1_only=(3,))
    with pytest.warns(UserWarning, match="only one modality"):
        dataset = SSL4EOS12MM(tmp_path)
    assert dataset.locations == [0, 1]


def test_missing_root_raises_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        SSL4EOS12MM(tmp_path / "nowhere")


def test_invalid_seasons_rejected(root: Path) -> None:
    with pytest.raises(ValueError, match="seasons"):
        SSL4EOS12MM(root, seasons=5)


def test_datamodule_batch(root: Path) -> None:
    datamodule = SSL4EOS12MMDataModule(root, batch_size=2)
    assert datamodule.modality_kinds == {"s1": "sar", "s2": "optical"}
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_s1"].shape == (2, 2, 264, 264) and batch["image_s2"].shape == (2, 13, 264, 264)
    assert datamodule.on_after_batch_transfer(batch, 0) is batch


def test_decur_fit_fast_dev_run(root: Path) -> None:
    import lightning as L

    from decur_lightning import DeCURModule

    model = DeCURModule(
        encoder1="resnet18",
        encoder2="resnet18",
        in_channels1=2,
        in_channels2=13,
        modality1="s1",
        modality2="s2",
        projector_dims=(64, 64),
        crop_size=32,
    )
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, SSL4EOS12MMDataModule(root, batch_size=2))
    assert trainer.state.finished
