"""Streaming (issue 14 section 2): ``decur prepare`` writes litdata chunks; the streaming datamodule's
samples equal the source datamodule's (pixels, location, season), native dtypes round-trip bit for
bit, uint8 only when asked, ranks get disjoint shards, and a resumed run repeats the uninterrupted
one step for step."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import LightningDataModule
from litdata import StreamingDataset

from decur_lightning.datamodules import (
    SSL4EOS12MM,
    GeoNRWMM,
    GeoNRWMMPretrainDataModule,
    SSL4EOS12MMDataModule,
    StreamingPretrainDataModule,
)
from decur_lightning.datamodules.samplers import EpochIndex
from decur_lightning.datamodules.streaming import METADATA_FILE, SSL4EOCodec
from decur_lightning.modalities import Modality
from decur_lightning.prepare import main as prepare_main
from decur_lightning.prepare import prepare

from data_factories import SSL4EO_SEASON_DATES, make_geonrw, make_ssl4eo_s12, ssl4eo_s1_value, ssl4eo_s2_value

LOCATIONS = (3, 5, 7, 9)


@pytest.fixture(scope="module")
def ssl4eo(tmp_path_factory) -> tuple[Path, Path]:
    """Fake SSL4EO-S12 (4 locations x 4 seasons) and its prepared stream."""
    tmp = tmp_path_factory.mktemp("ssl4eo")
    root = make_ssl4eo_s12(tmp / "raw", LOCATIONS, size=8)
    prepare(SSL4EOS12MMDataModule(root=root, batch_size=2), str(tmp / "stream"))
    return root, tmp / "stream"


@pytest.fixture(scope="module")
def geonrw(tmp_path_factory) -> tuple[Path, Path]:
    """Fake GeoNRW (3 training tiles of 32 px = 12 patches of 16 px) and its prepared stream."""
    tmp = tmp_path_factory.mktemp("geonrw")
    root = tmp / "raw"
    make_geonrw(root, train_cities=("aachen", "bergisch", "bielefeld"), test_cities=("duesseldorf",), size=32)
    source = GeoNRWMMPretrainDataModule(root=root, batch_size=4, patch_size=16, tile_size=32, dem_channels=3)
    prepare(source, str(tmp / "stream"))
    return root, tmp / "stream"


def _batches(datamodule: StreamingPretrainDataModule, epochs: int) -> list[list[dict[str, torch.Tensor]]]:
    loader = datamodule.train_dataloader()
    return [[dict(batch) for batch in loader] for _ in range(epochs)]


def _rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    size = next(iter(batch.values())).shape[0]
    return [{key: value[i] for key, value in batch.items()} for i in range(size)]


def test_ssl4eo_prepare_stores_all_seasons_in_native_dtypes_bit_for_bit(ssl4eo):
    """Each record holds the 4 seasons of both modalities: S2 uint16 and S1 float32 equal to the files."""
    _, stream = ssl4eo
    metadata = json.loads((stream / METADATA_FILE).read_text())
    assert metadata["num_samples"] == len(LOCATIONS) and metadata["lossy"] is False
    assert metadata["codec"]["name"] == "ssl4eo_s12"
    assert metadata["record_keys"]["scenes_s2"] == ["uint16", [4, 13, 264, 264]]
    assert metadata["record_keys"]["scenes_s1"] == ["float32", [4, 2, 264, 264]]
    raw = StreamingDataset(str(stream))
    seen = set()
    for i in range(len(raw)):
        record = raw[i]
        location = int(record["location"])
        seen.add(location)
        assert record["scenes_s2"].dtype == np.uint16 and record["scenes_s1"].dtype == np.float32
        s2 = np.array([[ssl4eo_s2_value(location, s, b) for b in range(13)] for s in range(4)], dtype=np.uint16)
        s1 = np.array([[ssl4eo_s1_value(location, s, b) for b in range(2)] for s in range(4)], dtype=np.float32)
        np.testing.assert_array_equal(record["scenes_s2"], np.broadcast_to(s2[..., None, None], (4, 13, 264, 264)))
        np.testing.assert_array_equal(record["scenes_s1"], np.broadcast_to(s1[..., None, None], (4, 2, 264, 264)))
        assert record["times_s1"].shape == (4,) and np.all(np.diff(record["times_s1"]) > 0)  # sorted by date
    assert seen == set(LOCATIONS)
    assert len(SSL4EO_SEASON_DATES) == 4


@pytest.mark.parametrize("normalize_on", ["loader", "device"])
def test_ssl4eo_streamed_samples_equal_the_source_for_every_epoch(ssl4eo, normalize_on):
    """Same pixels, location and seasons (drawn anew per epoch) as SSL4EOS12MM with the same seed."""
    root, stream = ssl4eo
    datamodule = StreamingPretrainDataModule(str(stream), batch_size=2, normalize_on=normalize_on, num_workers=1)
    source = SSL4EOS12MM(root, seed=datamodule.shuffle_seed)
    seasons_seen: dict[int, set[float]] = {}
    for epoch, batches in enumerate(_batches(datamodule, epochs=3)):
        assert len(batches) == 2
        locations = []
        for batch in batches:
            if normalize_on == "device":
                assert batch["image_s2"].dtype == torch.uint16  # native type until the device
                batch = datamodule.on_after_batch_transfer(batch, 0)
            for row in _rows(batch):
                location = int(row["location"])
                locations.append(location)
                expected = source[EpochIndex(source.locations.index(location), epoch)]
                assert set(expected) <= set(row)
                for key, value in expected.items():
                    assert torch.equal(row[key], value), (key, location, epoch)
                seasons_seen.setdefault(location, set()).add(float(row["t_s2"][0]))
        assert sorted(locations) == sorted(LOCATIONS)  # every location once per epoch
    assert any(len(times) > 1 for times in seasons_seen.values())  # seasons change between epochs


def test_ssl4eo_season_per_view_and_seasons_follow_the_source(tmp_path, ssl4eo):
    """Other source settings (2 seasons, a season per view) are recorded and reproduced."""
    root, _ = ssl4eo
    prepare(SSL4EOS12MMDataModule(root=root, batch_size=2, seasons=2, season_per_view=True), str(tmp_path / "s"))
    datamodule = StreamingPretrainDataModule(str(tmp_path / "s"), batch_size=2)
    assert datamodule.modality_specs["s2"].bands == 26
    assert datamodule.modality_specs["s1"].band_names == ["VV_season1", "VH_season1", "VV_season2", "VH_season2"]
    source = SSL4EOS12MM(root, seasons=2, season_per_view=True, seed=datamodule.shuffle_seed)
    for row in _rows(_batches(datamodule, epochs=1)[0][0]):
        expected = source[EpochIndex(source.locations.index(int(row["location"])), 0)]
        assert {"image2_s1", "t2_s2"} <= set(expected)
        for key, value in expected.items():
            assert torch.equal(row[key], value), key


def test_codec_season_draws_match_the_dataset():
    """The codec's draw is SSL4EOS12MM.draw_seasons (same rule, same numbers)."""
    dataset = SSL4EOS12MM.__new__(SSL4EOS12MM)
    dataset.seed, dataset.seasons = 17, 2
    codec = SSL4EOCodec(seasons=2, season_per_view=False, normalize=True, modalities={"s1": "s1", "s2": "s2c"})
    for args in [(0, 5, 0, 0, 4), (3, 9, 1, 1, 4), (7, 250000, 1, 0, 4)]:
        assert codec._draw(17, *args) == dataset.draw_seasons(*args)


def test_geonrw_streamed_patches_equal_the_source(geonrw):
    """RGB uint8 and raw DEM stored; RGB / 255 and the per-patch DEM scaling at read time equal GeoNRWMM."""
    root, stream = geonrw
    metadata = json.loads((stream / METADATA_FILE).read_text())
    assert metadata["record_keys"]["image_rgb"] == ["uint8", [3, 16, 16]]
    assert metadata["record_keys"]["image_dem"] == ["float32", [1, 16, 16]]
    source = GeoNRWMM(root, split="train", patch_size=16, tile_size=32, include_mask=False, dem_channels=3)
    datamodule = StreamingPretrainDataModule(str(stream), batch_size=4)
    assert list(datamodule.modality_specs) == ["rgb", "dem"] and datamodule.modality_specs["dem"].bands == 3
    indices = []
    for batch in _batches(datamodule, epochs=1)[0]:
        for row in _rows(batch):
            indices.append(int(row["index"]))
            expected = source[int(row["index"])]
            assert set(row) == {*expected, "index"}
            for key, value in expected.items():
                assert torch.equal(row[key], value), key
    assert sorted(indices) == list(range(12))


class _RawDataModule(LightningDataModule):
    """A generic pretraining datamodule whose samples hold full-range uint16, NaN floats and ints."""

    def __init__(self, num: int = 6) -> None:
        super().__init__()
        self.num = num

    @property
    def modality_specs(self) -> dict[str, Modality]:
        return {"a": Modality(bands=3), "b": Modality(bands=1)}

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(0)
        data = []
        for i in range(self.num):
            a = torch.randint(0, 65536, (3, 5, 7), generator=generator, dtype=torch.int32).to(torch.uint16)
            a[0, 0, 0], a[0, 0, 1] = 0, 65535
            b = torch.randn(1, 5, 7, generator=generator)
            b[0, 0, 0] = float("nan")
            data.append({"image_a": a, "image_b": b, "id": torch.tensor(i), "crs": object()})
        self.train_dataset = data


def test_generic_datamodule_round_trips_uint16_and_float_bit_for_bit(tmp_path):
    """Any datamodule: samples stored as numpy arrays of their dtype and read back identical."""
    source = _RawDataModule()
    metadata = prepare(source, str(tmp_path / "s"))
    assert metadata["codec"]["name"] == "generic" and metadata["dropped_keys"] == ["crs"]
    source.setup("fit")
    datamodule = StreamingPretrainDataModule(str(tmp_path / "s"), batch_size=3)
    assert datamodule.modality_specs == {"a": Modality(bands=3), "b": Modality(bands=1)}
    rows = [row for batch in _batches(datamodule, 1)[0] for row in _rows(batch)]
    assert len(rows) == 6
    for row in rows:
        expected = source.train_dataset[int(row["id"])]
        assert row["image_a"].dtype == torch.uint16
        assert torch.equal(row["image_a"].int(), expected["image_a"].int())
        assert torch.equal(row["image_b"].view(torch.int32), expected["image_b"].view(torch.int32))  # bits, NaN too


def test_uint8_only_when_asked_and_said_in_the_metadata(tmp_path, ssl4eo):
    """quantize='uint8': records are uint8, marked lossy; the streamed images are within 1/510 of the source's."""
    root, _ = ssl4eo
    metadata = prepare(SSL4EOS12MMDataModule(root=root, batch_size=2), str(tmp_path / "q"), quantize="uint8")
    assert metadata["lossy"] is True and metadata["quantize"] == "uint8" and metadata["codec"]["quantized"] is True
    assert metadata["record_keys"]["scenes_s2"] == ["uint8", [4, 13, 264, 264]]
    assert metadata["record_keys"]["scenes_s1"] == ["uint8", [4, 2, 264, 264]]
    datamodule = StreamingPretrainDataModule(str(tmp_path / "q"), batch_size=2)
    source = SSL4EOS12MM(root, seed=datamodule.shuffle_seed)
    for row in _rows(_batches(datamodule, 1)[0][0]):
        expected = source[EpochIndex(source.locations.index(int(row["location"])), 0)]
        for key in ("image_s1", "image_s2"):
            assert row[key].dtype == torch.float32
            assert (row[key] - expected[key]).abs().max() <= 1 / 510 + 1e-6
        assert torch.equal(row["t_s1"], expected["t_s1"])


def test_ranks_read_disjoint_shards(geonrw, monkeypatch):
    """Under 2 ranks (litdata's distributed environment) each reads half of the patches, none twice."""
    from litdata.utilities import env

    _, stream = geonrw
    shards = []
    for rank in range(2):
        monkeypatch.setattr(env._DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(2, r, 1)))
        datamodule = StreamingPretrainDataModule(str(stream), batch_size=2)
        datamodule._shuffle_seed = 0
        shards.append([int(i) for batch in _batches(datamodule, 1)[0] for i in batch["index"]])
    assert len(shards[0]) == len(shards[1]) == 6
    assert sorted(shards[0] + shards[1]) == list(range(12))


@pytest.mark.slow  # about 70 s on 2 cores; the loader-state test below covers the position in the default run
def test_resume_inside_an_epoch_repeats_every_step(tmp_path, geonrw):
    """A run resumed from a mid-epoch checkpoint continues with the next streamed batch (tests/test_resume.py)."""
    from test_resume import _assert_resume_is_exact

    from helpers import tiny_decur

    _, stream = geonrw
    _assert_resume_is_exact(
        tmp_path,
        lambda: tiny_decur(
            modalities={"rgb": 3, "dem": 3}, projector_dims=(32, 32), optimizer="adamw", lr=1e-3, crop_size=16
        ),
        lambda: StreamingPretrainDataModule(str(stream), batch_size=4),
        batches_per_epoch=3,
        resume_steps=[4],  # inside epoch 1: the position and the epoch are restored
    )


def test_ssl4eo_loader_state_restores_position_and_season_epoch(ssl4eo):
    """The loader's state taken inside epoch 2 restores the next batches, seasons included."""
    _, stream = ssl4eo
    datamodule = StreamingPretrainDataModule(str(stream), batch_size=1)
    datamodule._shuffle_seed = 5
    loader = datamodule.train_dataloader()
    list(loader)
    list(loader)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    rest = [dict(b) for b in iterator]
    resumed = StreamingPretrainDataModule(str(stream), batch_size=1)
    resumed.load_state_dict({"shuffle_seed": 5})
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    again = [dict(b) for b in resumed_loader]
    assert len(again) == len(rest) == 3
    for a, b in zip(again, rest, strict=True):
        assert int(a["location"]) == int(b["location"]) and torch.equal(a["t_s1"], b["t_s1"])
        assert torch.equal(a["image_s2"], b["image_s2"])


def test_prepare_cli_and_errors(tmp_path, geonrw):
    """`decur prepare` from a fit config's data: section; clear errors; the caller's start method is kept."""
    import yaml

    root, stream = geonrw
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 3,
                "model": {"class_path": "DeCURModule"},
                "trainer": {"max_epochs": 1},
                "data": {
                    "class_path": "GeoNRWMMPretrainDataModule",
                    "init_args": {"root": str(root), "batch_size": 4, "patch_size": 16, "tile_size": 32},
                },
            }
        )
    )
    method = multiprocessing.get_start_method(allow_none=True)
    prepare_main(["--config", str(config), "--output", str(tmp_path / "out"), "--quantize", "uint8"])
    assert multiprocessing.get_start_method(allow_none=True) == method
    metadata = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert metadata["source"].endswith("GeoNRWMMPretrainDataModule") and metadata["lossy"] is True
    assert metadata["record_keys"]["image_dem"][0] == "uint8"
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_main(["--config", str(config), "--output", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="quantize must be one of"):
        prepare(
            GeoNRWMMPretrainDataModule(root=root, patch_size=16, tile_size=32), str(tmp_path / "x"), quantize="int4"
        )
    with pytest.raises(FileNotFoundError, match="decur prepare"):
        StreamingPretrainDataModule(str(tmp_path))
    with pytest.raises(ValueError, match="normalize_on"):
        StreamingPretrainDataModule(str(stream), normalize_on="gpu")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        StreamingPretrainDataModule(str(stream), batch_size=64).setup("fit")
