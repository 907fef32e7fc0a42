"""Own-raster datamodule: torchgeo sources in different CRSs and resolutions joined over one place."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from lightning.pytorch.loggers import CSVLogger
from pyproj import Transformer
from rasterio.transform import from_origin
from torchgeo.datasets import RasterDataset

from decur_lightning import DeCURModule
from decur_lightning.datamodules import RasterPatches, RasterPretrainDataModule, RasterSource
from decur_lightning.datamodules.samplers import EpochIndex

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "pretrain_own_rasters.yaml"

# Source "utm": UTM 32N, 10 m, 120 x 120 px; its two bands hold each pixel centre's easting and northing.
UTM_ORIGIN = (500_000.0, 5_602_000.0)
# Source "geo": WGS 84 lon/lat, 0.0002 deg (~14 x 22 m), its bands hold each pixel centre's lon and lat.
# Source "merc": Web Mercator, 25 m, one band: the pixel centre's mercator x.
GEO_RES = 0.0002
MERC_RES = 25.0


def _write(path: Path, data: np.ndarray, crs: str, transform, nodata=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data)


def _centres(x0: float, y0: float, res: float, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.mgrid[0:rows, 0:cols]
    return x0 + (c + 0.5) * res, y0 - (r + 0.5) * res


def make_rasters(root: Path, nodata_rows: int = 0) -> dict[str, Path]:
    """Three overlapping rasters in three CRSs and resolutions whose values are their positions.

    With ``nodata_rows``, the top rows of the UTM raster are set to its nodata value (-9999).
    """
    x0, y0 = UTM_ORIGIN
    x, y = _centres(x0, y0, 10.0, 120, 120)
    utm = np.stack([x, y]).astype(np.float64)
    utm[:, :nodata_rows] = -9999
    _write(root / "utm" / "utm.tif", utm, "EPSG:32632", from_origin(x0, y0, 10.0, 10.0), nodata=-9999)
    to_geo = Transformer.from_crs(32632, 4326, always_xy=True)
    lon0, lat0 = to_geo.transform(x0 + 100, y0 - 50)  # starts inside the UTM raster, reaches beyond it
    lon, lat = _centres(lon0, lat0, GEO_RES, 60, 100)
    _write(root / "geo" / "geo.tif", np.stack([lon, lat]), "EPSG:4326", from_origin(lon0, lat0, GEO_RES, GEO_RES))
    to_merc = Transformer.from_crs(32632, 3857, always_xy=True)
    mx0, my0 = to_merc.transform(x0 - 200, y0 + 200)
    mx, _ = _centres(mx0, my0, MERC_RES, 90, 90)
    _write(root / "merc" / "merc.tif", mx[None], "EPSG:3857", from_origin(mx0, my0, MERC_RES, MERC_RES))
    return {"utm": root / "utm", "geo": root / "geo", "merc": root / "merc"}


def sources(paths: dict[str, Path], names=("utm", "geo"), **extra) -> dict[str, dict]:
    band_names = {"utm": ["easting", "northing"], "geo": ["lon", "lat"], "merc": ["mx"]}
    views = {"utm": "optical", "geo": "sar", "merc": "dem"}
    return {
        name: {"paths": str(paths[name]), "band_names": band_names[name], "view": views[name], **extra.get(name, {})}
        for name in names
    }


@pytest.fixture(scope="module")
def rasters(tmp_path_factory) -> dict[str, Path]:
    return make_rasters(tmp_path_factory.mktemp("rasters"))


def _pixel_centres(bounds: torch.Tensor, size: int, res: float) -> tuple[np.ndarray, np.ndarray]:
    xmin, _, _, ymax = bounds.tolist()
    return _centres(xmin, ymax, res, size, size)


@pytest.mark.parametrize("sampling", ["random", "grid"])
def test_every_sample_shows_the_same_place_in_every_modality(rasters, tmp_path, sampling):
    dm = RasterPretrainDataModule(
        sources(rasters, ("utm", "geo", "merc")),
        patch_size=16,
        batch_size=4,
        sampling=sampling,
        length=12,
        stats_file=str(tmp_path / "stats.json"),
    )
    dataset = dm.build_dataset(seed=3, normalize=False)
    assert dataset.crs.to_epsg() == 32632 and dataset.joined.res == (10.0, 10.0)
    assert dataset.file_dtypes() == {"utm": "float64", "geo": "float64", "merc": "float64"}
    from_geo = Transformer.from_crs(4326, 32632, always_xy=True)
    to_merc = Transformer.from_crs(32632, 3857, always_xy=True)
    places = set()
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image_utm"].shape == (2, 16, 16) and sample["image_merc"].shape == (1, 16, 16)
        x, y = _pixel_centres(sample["bounds"], 16, 10.0)
        # where a grid cell overhangs the overlap (torchgeo's last row and column do), pixels are missing: NaN
        inside = ~np.isnan(sample["image_utm"].numpy()).any(0)
        assert inside.mean() >= 0.5
        # the first source is read on its own grid: its values are exactly the pixel centres
        np.testing.assert_allclose(sample["image_utm"][0].numpy()[inside], x[inside], atol=1e-6)
        np.testing.assert_allclose(sample["image_utm"][1].numpy()[inside], y[inside], atol=1e-6)
        # the others are reprojected onto it: their values, mapped back to UTM, are the pixel centres
        # (to within 1.5 m of the 10 m pixel, torchgeo's own warping leaves up to 10 m: see _RasterFiles;
        # up to half a source pixel where a patch touches the source's edge, as bilinear resampling clamps there)
        lon, lat = sample["image_geo"].double().numpy()
        east, north = from_geo.transform(lon, lat)
        distance = np.hypot(east - x, north - y)
        seen = ~np.isnan(distance)
        assert seen.mean() >= 0.5
        interior = np.zeros_like(seen)
        interior[1:-1, 1:-1] = True
        assert distance[seen & interior].max() < 1.5 and distance[seen].max() < 7.0
        merc_error = np.abs(sample["image_merc"][0].double().numpy() - to_merc.transform(x, y)[0])
        assert np.nanmax(merc_error) < 0.1
        places.add(tuple(sample["bounds"].tolist()))
    assert len(places) == len(dataset)  # distinct patches (grid cells, random draws)


def test_batches_are_named_normalised_and_described(rasters, tmp_path):
    dm = RasterPretrainDataModule(
        sources(rasters, ("utm", "geo", "merc")),
        patch_size=16,
        batch_size=4,
        length=8,
        stats_file=str(tmp_path / "stats.json"),
    )
    specs = dm.modality_specs
    assert list(specs) == ["utm", "geo", "merc"]
    assert [(s.bands, s.view, s.band_names) for s in specs.values()] == [
        (2, "optical", ["easting", "northing"]),
        (2, "sar", ["lon", "lat"]),
        (1, "dem", ["mx"]),
    ]
    dm.setup("fit")
    assert dm.train_dataset.normalizations == {"utm": "mean_std", "geo": "sar", "merc": "percentile"}
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_before_batch_transfer(batch, 0)
    assert set(batch) == {"image_utm", "image_geo", "image_merc", "bounds"}
    for name, channels in (("utm", 2), ("geo", 2), ("merc", 1)):
        image = batch[f"image_{name}"]
        assert image.shape == (4, channels, 16, 16) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.05
    # mean_std: the raw easting minus (mean - 2 std), over 4 std (paper B.1)
    dataset = dm.train_dataset
    mean, std = dataset.stats["utm"]
    raw = dataset.read(dataset.location(0))["utm"]
    expected = ((raw[0] - (mean[0] - 2 * std[0])) / (4 * std[0])).clamp(0, 1)
    torch.testing.assert_close(dataset[0]["image_utm"][0], expected)


def test_statistics_are_computed_once_cached_and_keyed_by_the_inputs(rasters, tmp_path, monkeypatch):
    cache = tmp_path / "stats.json"
    dm = RasterPretrainDataModule(sources(rasters), patch_size=16, batch_size=2, length=4, stats_file=str(cache))
    first = dm.build_dataset().stats
    stored = json.loads(cache.read_text())
    assert len(stored) == 1
    (entry,) = stored.values()
    assert entry["utm"]["bands"] == ["easting", "northing"] and entry["utm"]["mean"] == first["utm"][0]
    # eastings of the sampled patches: inside the overlap, spread over hundreds of metres
    assert 500_100 < first["utm"][0][0] < 501_200 and 50 < first["utm"][1][0] < 400

    def fail(*args, **kwargs):
        raise AssertionError("statistics recomputed despite the cache")

    monkeypatch.setattr(RasterPatches, "band_statistics", fail)
    again = RasterPretrainDataModule(sources(rasters), patch_size=16, batch_size=2, length=4, stats_file=str(cache))
    assert again.build_dataset().stats == first
    # other inputs, another key
    monkeypatch.undo()
    other = RasterPretrainDataModule(sources(rasters), patch_size=24, batch_size=2, length=4, stats_file=str(cache))
    other.build_dataset()
    assert len(json.loads(cache.read_text())) == 2
    # given statistics are used as they are, nothing computed
    monkeypatch.setattr(RasterPatches, "band_statistics", fail)
    given = sources(rasters, utm={"mean": [1.0, 2.0], "std": [3.0, 4.0]}, geo={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    dm = RasterPretrainDataModule(given, patch_size=16, batch_size=2, length=4, stats_file="")
    assert dm.build_dataset().stats["utm"] == ([1.0, 2.0], [3.0, 4.0])


def test_default_cache_lies_beside_the_first_source(tmp_path):
    paths = make_rasters(tmp_path)
    RasterPretrainDataModule(sources(paths), patch_size=16, batch_size=2, length=4).build_dataset()
    assert (paths["utm"] / "decur_raster_stats.json").is_file()


def test_mostly_nodata_patches_are_skipped_and_counted(tmp_path):
    paths = make_rasters(tmp_path, nodata_rows=60)  # the top half of the UTM raster is nodata
    dm = RasterPretrainDataModule(
        sources(paths),
        patch_size=16,
        batch_size=4,
        length=24,
        max_nodata_fraction=0.25,
        stats_file="",
    )
    dataset = dm.build_dataset(normalize=False)
    assert dataset.nodata == {"utm": -9999.0, "geo": None}
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:
        missing = torch.isnan(sample["image_utm"]).any(0).float().mean()
        assert missing <= 0.25  # never a mostly-nodata patch
        assert not (sample["image_utm"] == -9999).any()  # missing pixels are NaN, not the fill value
    counted = sum(int(s["nodata_skipped"]) for s in samples)
    assert counted == dataset.skipped > 0
    # the datamodule sums the counts of the batches it receives and drops the key
    batch = {"nodata_skipped": torch.tensor([2, 0, 1]), "image_utm": torch.zeros(3)}
    assert "nodata_skipped" not in dm.on_before_batch_transfer(batch, 0) and dm.nodata_skipped == 3
    # after normalisation the few accepted missing pixels are 0 and nothing else is NaN
    dataset.stats = {"utm": ([500_600.0, 5_601_400.0], [300.0, 300.0]), "geo": ([9.0, 50.5], [0.01, 0.01])}
    normalised = dataset.normalize_sample(samples[0])
    assert not torch.isnan(normalised["image_utm"]).any()


def test_pixels_outside_a_source_are_missing_not_zero(rasters, tmp_path):
    """The geo raster declares no nodata value and starts at easting 500100: a patch straddling its
    western edge reads NaN there (torchgeo's merge would fill 0, a valid-looking longitude)."""
    dm = RasterPretrainDataModule(sources(rasters), patch_size=16, batch_size=2, length=2, stats_file="")
    dataset = dm.build_dataset(normalize=False)
    query = (slice(500_020.0, 500_180.0), slice(5_601_500.0, 5_601_660.0), dataset.location(0)[2])
    images = dataset.read(query)
    x, _ = _centres(500_020.0, 5_601_660.0, 10.0, 16, 16)
    outside, inside = x < 500_095, x > 500_115
    assert torch.isnan(images["geo"][:, torch.from_numpy(outside)]).all()
    assert torch.isfinite(images["geo"][:, torch.from_numpy(inside)]).all()
    assert torch.isfinite(images["utm"]).all()
    assert dataset.missing_fraction(images)["geo"] == pytest.approx(0.5)


def test_nothing_but_nodata_fails_clearly(tmp_path):
    paths = make_rasters(tmp_path, nodata_rows=120)
    dm = RasterPretrainDataModule(sources(paths), patch_size=16, batch_size=2, length=4, max_tries=5, stats_file="")
    with pytest.raises(ValueError, match="max_nodata_fraction"):
        dm.build_dataset()


def test_random_patches_are_a_function_of_seed_epoch_and_index(rasters, tmp_path):
    dm = RasterPretrainDataModule(
        sources(rasters), patch_size=16, batch_size=2, length=6, stats_file=str(tmp_path / "s.json")
    )
    a, b = dm.build_dataset(seed=1), dm.build_dataset(seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    torch.testing.assert_close(a[2], b[2])
    assert a.location(2) == b.location(2)
    assert a.location(2, epoch=1) != a.location(2, epoch=0)
    torch.testing.assert_close(
        a[EpochIndex(2, 1)]["bounds"],
        torch.tensor(
            [a.location(2, 1)[0].start, a.location(2, 1)[1].start, a.location(2, 1)[0].stop, a.location(2, 1)[1].stop],
            dtype=torch.float64,
        ),
    )
    assert dm.build_dataset(seed=2).location(2) != a.location(2)


def test_accepts_torchgeo_raster_datasets(rasters, tmp_path):
    class Utm(RasterDataset):
        filename_glob = "*.tif"
        all_bands = ("easting", "northing")

    dm = RasterPretrainDataModule(
        {
            "utm": Utm(str(rasters["utm"]), bands=["northing"]),
            "geo": RasterSource(paths=str(rasters["geo"]), band_names=["lon", "lat"]),
        },
        patch_size=16,
        batch_size=2,
        length=2,
        stats_file=str(tmp_path / "s.json"),
    )
    assert dm.modality_specs["utm"].band_names == ["northing"] and dm.modality_specs["utm"].view == "generic"
    sample = dm.build_dataset(normalize=False)[0]
    _, y = _pixel_centres(sample["bounds"], 16, 10.0)
    np.testing.assert_allclose(sample["image_utm"][0].numpy(), y, atol=1e-6)


def test_sources_that_do_not_overlap_name_both_bounds_and_crs(tmp_path):
    paths = make_rasters(tmp_path)
    far = np.ones((1, 20, 20), dtype=np.float32)
    _write(tmp_path / "far" / "far.tif", far, "EPSG:4326", from_origin(-70.0, -30.0, 0.001, 0.001))
    srcs = {"utm": sources(paths)["utm"], "far": {"paths": str(tmp_path / "far"), "band_names": ["v"]}}
    with pytest.raises(ValueError, match="do not overlap") as error:
        RasterPretrainDataModule(srcs, patch_size=8, batch_size=2, stats_file="").build_dataset()
    message = str(error.value)
    assert "'utm' has bounds x [500000, 501200]" in message and "EPSG:32632" in message
    assert "'far'" in message and "EPSG:4326" in message and "x [-70, -69.98]" in message


def test_missing_files_name_the_glob_and_the_folder(tmp_path):
    paths = make_rasters(tmp_path)
    srcs = sources(paths)
    srcs["geo"]["filename_glob"] = "*.jp2"
    with pytest.raises(FileNotFoundError, match=r"filename_glob='\*\.jp2'") as error:
        RasterPretrainDataModule(srcs, patch_size=8, batch_size=2, stats_file="").setup("fit")
    assert str(paths["geo"]) in str(error.value) and "'geo'" in str(error.value)
    srcs = sources(paths)
    srcs["utm"]["paths"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="do\\(es\\) not exist"):
        RasterPretrainDataModule(srcs, patch_size=8, batch_size=2, stats_file="").setup("fit")


def test_wrong_band_names_list_both(tmp_path):
    paths = make_rasters(tmp_path)
    srcs = sources(paths, utm={"bands": ["northing", "red"]})
    with pytest.raises(ValueError, match=r"\['red'\].*\['easting', 'northing'\]"):
        RasterPretrainDataModule(srcs, patch_size=8, batch_size=2)
    srcs = sources(paths, geo={"band_names": ["lon", "lat", "height"]})
    with pytest.raises(ValueError, match=r"lists 3 bands \['lon', 'lat', 'height'\] but .*geo.tif has 2"):
        RasterPretrainDataModule(srcs, patch_size=8, batch_size=2, stats_file="").setup("fit")
    with pytest.raises(ValueError, match="at least two"):
        RasterPretrainDataModule({"utm": sources(paths)["utm"]})
    with pytest.raises(ValueError, match="unknown field"):
        RasterPretrainDataModule(sources(paths, utm={"nodata_value": 0}))
    with pytest.raises(ValueError, match="needs band_names"):
        RasterSource(paths=str(paths["utm"]))


def test_decur_fits_two_steps_on_three_sources(rasters, tmp_path):
    pl.seed_everything(0)
    dm = RasterPretrainDataModule(
        sources(rasters, ("utm", "geo", "merc")),
        patch_size=32,
        batch_size=4,
        length=8,
        stats_patches=8,
        stats_file=str(tmp_path / "s.json"),
    )
    module = DeCURModule(encoder="resnet18", projector_dims=(32, 32), crop_size=32, optimizer="adamw", lr=1e-3)
    logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    assert module.modalities == ("utm", "geo", "merc")
    assert module.hparams["modalities"]["geo"]["bands"] == 2 and module.hparams["modalities"]["merc"]["view"] == "dem"
    metrics = trainer.callback_metrics
    assert {"train/common_utm_geo", "train/unique_geo_merc", "train/intra_merc"} <= set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())
    # the skipped-patch count reaches the logger (0 here: these rasters have no nodata inside the overlap)
    logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert "data/nodata_skipped" in logged[0].split(",")


def test_example_config_runs_with_decur_fit_on_the_test_rasters(rasters, tmp_path):
    from decur_lightning.cli import main

    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--data.init_args.sources.s1.paths={rasters['geo']}",
            "--data.init_args.sources.s1.band_names=[VV, VH]",
            f"--data.init_args.sources.s2.paths={rasters['utm']}",
            "--data.init_args.sources.s2.band_names=[B04, B08]",
            "--data.init_args.sources.s2.bands=[B04, B08]",
            "--data.init_args.stats_patches=4",
            "--data.init_args.num_workers=0",
            "--data.init_args.patch_size=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.length=8",
            f"--data.init_args.stats_file={tmp_path / 's.json'}",
            "--model.init_args.encoder=resnet18",
            "--model.init_args.projector_dims=[32, 32]",
            "--model.init_args.crop_size=32",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert json.loads((tmp_path / "s.json").read_text())
