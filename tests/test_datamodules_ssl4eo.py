"""SSL4EO-S12 S1/S2 pairs on fake files in torchgeo's on-disk layout."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from test_datamodules_common import assert_specs_describe_batch
from torchgeo.datasets import DatasetNotFoundError

from decur_lightning.datamodules import SSL4EOS12MM, SSL4EOS12MMDataModule
from decur_lightning.datamodules.samplers import EpochIndex

from data_factories import SSL4EO_SEASON_DATES, make_ssl4eo_s12, ssl4eo_s1_value, ssl4eo_s2_value

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
        torch.testing.assert_close(
            sample["image_s1"][:, 5, 5], torch.tensor([ssl4eo_s1_value(location, s1_season, b) for b in (0, 1)])
        )
        assert sample["image_s2"][12, 0, 0] == ssl4eo_s2_value(location, s2_season, 12)


def test_seasons_are_drawn_independently_per_modality(root: Path) -> None:
    dataset = SSL4EOS12MM(root, normalize=False)
    draws = []
    for epoch in range(12):
        sample = dataset[EpochIndex(1, epoch)]
        assert int(sample["location"]) == dataset.locations[1]
        draws.append((decode_s1(sample["image_s1"])[1], decode_s2(sample["image_s2"])[1]))
    s1_seasons, s2_seasons = zip(*draws)
    assert len(set(s1_seasons)) > 1 and len(set(s2_seasons)) > 1
    assert any(a != b for a, b in draws)


def test_season_draws_do_not_use_the_global_rngs(root: Path) -> None:
    dataset = SSL4EOS12MM(root, normalize=False, season_per_view=True)
    random.seed(1)
    torch.manual_seed(1)
    first = dataset[2]
    random.seed(2)
    torch.manual_seed(2)
    second = dataset[2]
    for key in ("image_s1", "image2_s1", "image_s2", "image2_s2"):
        assert torch.equal(first[key], second[key])


def test_season_per_view_keys_shapes_and_pixels(root: Path) -> None:
    dataset = SSL4EOS12MM(root, normalize=False, season_per_view=True, seed=3)
    for index in (0, EpochIndex(1, 1), EpochIndex(3, 5)):
        sample = dataset[index]
        epoch, location = dataset.decode_index(index)
        assert set(sample) == {
            "location",
            "image_s1",
            "image_s2",
            "t_s1",
            "t_s2",
            "image2_s1",
            "image2_s2",
            "t2_s1",
            "t2_s2",
        }
        assert sample["image2_s1"].shape == sample["image_s1"].shape == (2, 264, 264)
        assert sample["image2_s2"].shape == sample["image_s2"].shape == (13, 264, 264)
        for modality, (name, decode) in enumerate((("s1", decode_s1), ("s2", decode_s2))):
            for view, key in enumerate(("image", "image2")):
                found_location, season, _ = decode(sample[f"{key}_{name}"])
                assert found_location == location
                assert [season] == dataset.draw_seasons(epoch, location, modality, view, 4)
            # the times belong to the drawn scenes
            assert (sample[f"t_{name}"] == sample[f"t2_{name}"]) == (
                decode(sample[f"image_{name}"])[1] == decode(sample[f"image2_{name}"])[1]
            )
    # the first view is the same with and without season_per_view
    plain = SSL4EOS12MM(root, normalize=False, seed=3)[EpochIndex(1, 1)]
    assert torch.equal(plain["image_s2"], dataset[EpochIndex(1, 1)]["image_s2"])
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]


def test_season_draws_cover_all_combinations_independently(root: Path) -> None:
    """image vs image2 of one modality, and S1 vs S2, are independent uniform draws over 4 seasons."""
    dataset = SSL4EOS12MM(root, season_per_view=True, seed=0)
    location = 7
    pairs: dict[str, list[tuple[int, int]]] = {"s1": [], "s2": [], "s1-s2": [], "s1-s2 view 2": []}
    for epoch in range(1600):
        draws = {(m, v): dataset.draw_seasons(epoch, location, m, v, 4)[0] for m in (0, 1) for v in (0, 1)}
        pairs["s1"].append((draws[0, 0], draws[0, 1]))
        pairs["s2"].append((draws[1, 0], draws[1, 1]))
        pairs["s1-s2"].append((draws[0, 0], draws[1, 0]))
        pairs["s1-s2 view 2"].append((draws[0, 1], draws[1, 1]))
    for name, values in pairs.items():
        counts = {
            combination: values.count(combination) for combination in {(a, b) for a in range(4) for b in range(4)}
        }
        # 1600 draws, 100 expected per cell (sd about 10)
        assert all(60 <= count <= 140 for count in counts.values()), (name, counts)
    # the same (seed, epoch, index) always gives the same seasons; another seed other ones
    again = SSL4EOS12MM(root, season_per_view=True, seed=0)
    other = SSL4EOS12MM(root, season_per_view=True, seed=1)
    same = [again.draw_seasons(e, location, 1, 1, 4) == dataset.draw_seasons(e, location, 1, 1, 4) for e in range(50)]
    differ = [other.draw_seasons(e, location, 1, 1, 4) != dataset.draw_seasons(e, location, 1, 1, 4) for e in range(50)]
    assert all(same) and sum(differ) > 25


def test_several_seasons_per_view_are_distinct_scenes(root: Path) -> None:
    dataset = SSL4EOS12MM(root, seasons=4, season_per_view=True)
    for epoch in range(5):
        for view in (0, 1):
            assert sorted(dataset.draw_seasons(epoch, 1, 1, view, 4)) == [0, 1, 2, 3]


def test_invalid_seed_rejected(root: Path) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        SSL4EOS12MM(root, seed=-1)


def test_datamodule_sampler_passes_the_epoch_and_resumes_identically(root: Path) -> None:
    """Seasons depend on (seed, epoch, index) only: a fresh datamodule with the same seed, set to
    epoch 2, reads what the first one read in epoch 2 (as after a resume), also in a DataLoader
    worker; epochs differ."""

    def epoch_seasons(datamodule: SSL4EOS12MMDataModule, epoch: int) -> dict[int, tuple[int, ...]]:
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        seasons = {}
        for batch in loader:
            for i, location in enumerate(batch["location"].tolist()):
                seasons[location] = tuple(
                    decode(batch[key][i])[1]
                    for key, decode in (
                        ("image_s1", decode_s1),
                        ("image2_s1", decode_s1),
                        ("image_s2", decode_s2),
                        ("image2_s2", decode_s2),
                    )
                )
        return seasons

    torch.manual_seed(11)
    first = SSL4EOS12MMDataModule(root, batch_size=2, season_per_view=True, normalize=False)
    first.setup("fit")
    by_epoch = {epoch: epoch_seasons(first, epoch) for epoch in (0, 2)}
    assert by_epoch[0] != by_epoch[2]
    torch.manual_seed(11)
    # read in a worker process this time: the epoch travels with the index, not the worker's RNG
    resumed = SSL4EOS12MMDataModule(root, batch_size=2, season_per_view=True, normalize=False, num_workers=1)
    resumed.setup("fit")
    assert resumed.shuffle_seed == first.shuffle_seed
    assert epoch_seasons(resumed, 2) == by_epoch[2]


def test_only_l2a_present_says_l1c_is_required(tmp_path: Path) -> None:
    make_ssl4eo_s12(tmp_path, (0,))
    (tmp_path / "s2c").rename(tmp_path / "s2a")
    with pytest.raises(ValueError, match=r"s2a.*L2A.*s2c") as info:
        SSL4EOS12MM(tmp_path)
    assert str(tmp_path / "s2a") in str(info.value)


def test_fewer_locations_than_a_batch_fail_at_setup(root: Path) -> None:
    datamodule = SSL4EOS12MMDataModule(root, batch_size=len(LOCATIONS) + 1)
    with pytest.raises(ValueError, match=rf"{len(LOCATIONS)} sample\(s\), fewer than batch_size={len(LOCATIONS) + 1}"):
        datamodule.setup("fit")
    SSL4EOS12MMDataModule(root, batch_size=len(LOCATIONS)).setup("fit")


def test_unreadable_geotiff_raise_names_the_file_and_skip_replaces_it(tmp_path: Path) -> None:
    make_ssl4eo_s12(tmp_path, (0, 1, 2))
    scene = sorted((tmp_path / "s2c" / "0000001").iterdir())[2]
    bad = scene / "B4.tif"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="on_read_error"):
        SSL4EOS12MMDataModule(tmp_path, on_read_error="ignore")

    strict = SSL4EOS12MMDataModule(tmp_path, batch_size=1, normalize=False, seasons=4)
    strict.setup("fit")
    with pytest.raises(OSError, match="on_read_error='skip'") as info:
        strict.train_dataset[1]
    assert str(bad) in str(info.value) and "sample 1 of SSL4EOS12MM" in str(info.value)

    lenient = SSL4EOS12MMDataModule(tmp_path, batch_size=1, normalize=False, seasons=4, on_read_error="skip")
    lenient.setup("fit")
    dataset = lenient.train_dataset
    with pytest.warns(RuntimeWarning, match=str(bad)):
        sample = dataset[1]
    assert int(sample["location"]) == 2  # the next readable one
    assert dataset[EpochIndex(1, epoch=1)]["location"] == 2  # the replacement keeps the epoch
    assert dataset.skipped == {1: [str(bad)]}
    assert [int(dataset[i]["location"]) for i in (0, 2)] == [0, 2]

    limited = SSL4EOS12MMDataModule(tmp_path, seasons=4, on_read_error="skip", max_read_errors=0)
    limited.setup("validate")
    with pytest.warns(RuntimeWarning), pytest.raises(OSError, match="max_read_errors=0"):
        limited.train_dataset[1]


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


S2_NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def test_datamodule_batch(root: Path) -> None:
    datamodule = SSL4EOS12MMDataModule(root, batch_size=2)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image_s1"].shape == (2, 2, 264, 264) and batch["image_s2"].shape == (2, 13, 264, 264)
    assert datamodule.on_after_batch_transfer(batch, 0) is batch
    assert_specs_describe_batch(datamodule, batch, {"s1": (2, "sar", ["VV", "VH"]), "s2": (13, "optical", S2_NAMES)})


def test_modality_specs_follow_seasons_and_the_files_band_order(root: Path) -> None:
    datamodule = SSL4EOS12MMDataModule(root, batch_size=2, seasons=2, season_per_view=True)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert_specs_describe_batch(
        datamodule,
        batch,
        {
            "s1": (4, "sar", ["VV_season1", "VH_season1", "VV_season2", "VH_season2"]),
            "s2": (26, "optical", [f"{band}_season{k}" for k in (1, 2) for band in S2_NAMES]),
        },
    )
    # The names follow the order the band files are read in (torchgeo's band lists).
    read = SSL4EOS12MM(root).datasets
    assert [f"B{int(b[1:]):02d}" if b[1:].isdigit() else b for b in read["s2"].bands] == S2_NAMES
    assert list(read["s1"].bands) == ["VV", "VH"]


def test_decur_fit_fast_dev_run(root: Path) -> None:
    import lightning as L

    from decur_lightning import DeCURModule

    model = DeCURModule(  # modalities, band counts and view kinds from the datamodule
        encoder="resnet18",
        projector_dims=(64, 64),
        crop_size=32,
    )
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(model, SSL4EOS12MMDataModule(root, batch_size=2))
    assert trainer.state.finished
    assert {name: (spec["bands"], spec["view"]) for name, spec in model.hparams.modalities.items()} == {
        "s1": (2, "sar"),
        "s2": (13, "optical"),
    }


def test_scenes_are_read_exactly_as_torchgeo_reads_them(root: Path) -> None:
    from torchgeo.datasets import SSL4EOS12

    dataset = SSL4EOS12MM(root, normalize=False)
    for split, decode, bands in (("s1", decode_s1, 2), ("s2c", decode_s2, 13)):
        reference = SSL4EOS12(root, split=split, seasons=4)[7]  # all four scenes, in random order
        scenes = dataset.scene_folders(split, 7)
        for chunk in range(4):
            image = reference["image"][bands * chunk : bands * (chunk + 1)]
            season = decode(image)[1]
            ours, times = dataset._read_scenes(split, [scenes[season]])
            assert torch.equal(ours, image) and times.tolist() == [reference["t"][chunk].item()]


def test_distributed_loader_shards_one_permutation_and_keeps_the_epoch(root: Path) -> None:
    """Under DDP each rank reads its shard of the seeded permutation, with the epoch attached
    (Lightning keeps a DistributedSampler; it would replace a RandomSampler by one that drops it)."""
    from types import SimpleNamespace

    from decur_lightning.datamodules.samplers import EpochIndex, EpochSeededDistributedSampler

    shards = []
    for rank in (0, 1):
        datamodule = SSL4EOS12MMDataModule(root, batch_size=1, season_per_view=True, normalize=False)
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        datamodule.setup("fit")
        sampler = datamodule.train_dataloader().sampler
        assert isinstance(sampler, EpochSeededDistributedSampler)
        sampler.set_epoch(3)
        indices = list(sampler)
        assert all(isinstance(i, EpochIndex) and i.epoch == 3 for i in indices)
        shards.append([int(i) for i in indices])
    size = len(datamodule.train_dataset)
    assert set(shards[0]) | set(shards[1]) == set(range(size))  # every location, padded to equal shards
    assert len(shards[0]) == len(shards[1]) == -(-size // 2)


def test_season_draws_follow_the_restored_shuffle_seed(root: Path) -> None:
    """Lightning restores the datamodule's state after setup: the season seed must follow it."""
    datamodule = SSL4EOS12MMDataModule(root, batch_size=2, season_per_view=True)
    datamodule.setup("fit")
    datamodule.load_state_dict({"shuffle_seed": 123})  # as a resume does, after setup
    datamodule.train_dataloader()
    assert datamodule.train_dataset.guarded.seed == 123
