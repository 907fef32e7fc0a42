"""Writers of tiny fake datasets in the real on-disk layouts (as torchgeo's own tests do).

Pixel values encode identity so tests can check pairing, band order and windows:

* SSL4EO-S12: S1 ``value = 1000 * location + 100 * season + band + 0.25`` (float32; band 0 = VV,
  1 = VH); S2 ``value = 1000 * location + 100 * season + band`` (uint16; band = index in
  B1..B12 incl. B8A, B10).
* GeoNRW: RGB channel ``c`` holds ``(row + 2 * col + 40 * c + 7 * tile) % 256``; the DEM
  ``100 * tile + row + col / 100``; the labels ``(row // 4 + col // 4) % 11``.
* BigEarthNet: S2 band ``b`` (index in B01..B12 without B10) is constant ``100 * (b + 1) + sample``;
  S1 VV is ``-10.25 - sample``, VH ``-20.75 - sample`` (fractional dB).
* RGB-D: labels cycle through ``0..num_classes`` in raster order, two pixels per value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from torchgeo.datasets import GeoNRW

SSL4EO_S1_BANDS = ("VV", "VH")
SSL4EO_S2C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
SSL4EO_SEASON_DATES = ("20200315T101021", "20200614T101031", "20200912T101029", "20201211T101409")


def write_geotiff(path: str | Path, array: np.ndarray) -> None:
    """Write a ``(bands, H, W)`` or ``(H, W)`` array as a GeoTIFF (UTM 32N, 10 m)."""
    array = array[None] if array.ndim == 2 else array
    profile = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype,
        "crs": "EPSG:32632",
        "transform": Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5700000.0),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def ssl4eo_s1_value(location: int, season: int, band: int) -> float:
    return 1000.0 * location + 100.0 * season + band + 0.25


def ssl4eo_s2_value(location: int, season: int, band: int) -> int:
    return 1000 * location + 100 * season + band


def make_ssl4eo_s12(root: str | Path, locations: Sequence[int], size: int = 8, s1_only: Sequence[int] = ()) -> Path:
    """SSL4EO-S12 layout ``root/{s1,s2c}/{index:07d}/{scene}/{band}.tif``, 4 seasons each.

    Scene folder names follow the real ones (torchgeo parses dates out of them). ``s1_only``
    locations get S1 data but no S2 folder.
    """
    root = Path(root)
    for location in [*locations, *s1_only]:
        for season, date in enumerate(SSL4EO_SEASON_DATES):
            s1_scene = root / "s1" / f"{location:07d}" / f"S1A_IW_GRDH_1SDV_{date}_{date}_031684_03A6E8_1A2B"
            for band, name in enumerate(SSL4EO_S1_BANDS):
                value = ssl4eo_s1_value(location, season, band)
                write_geotiff(s1_scene / f"{name}.tif", np.full((size, size), value, dtype=np.float32))
            if location in s1_only:
                continue
            s2_scene = root / "s2c" / f"{location:07d}" / f"{date}_{date}_T32UMA"
            for band, name in enumerate(SSL4EO_S2C_BANDS):
                value = ssl4eo_s2_value(location, season, band)
                write_geotiff(s2_scene / f"{name}.tif", np.full((size, size), value, dtype=np.uint16))
    return root


def geonrw_tile(tile: int, size: int) -> dict[str, np.ndarray]:
    """The arrays of fake GeoNRW tile number ``tile``: rgb (3,H,W) uint8, dem (H,W), seg (H,W)."""
    rows, cols = np.mgrid[0:size, 0:size]
    rgb = np.stack([(rows + 2 * cols + 40 * c + 7 * tile) % 256 for c in range(3)]).astype(np.uint8)
    dem = (100.0 * tile + rows + cols / 100.0).astype(np.float32)
    seg = ((rows // 4 + cols // 4) % 11).astype(np.uint8)
    return {"rgb": rgb, "dem": dem, "seg": seg}


def make_geonrw(
    root: str | Path,
    train_cities: Sequence[str] = ("aachen", "bergisch", "bielefeld", "bochum", "bonn"),
    test_cities: Sequence[str] = ("duesseldorf", "herne"),
    size: int = 64,
) -> dict[str, dict[str, np.ndarray]]:
    """GeoNRW layout ``root/<city>/<x>_<y>_{rgb.jp2,dem.tif,seg.tif}``, one tile per listed city.

    Every city folder torchgeo checks for is created (empty unless listed). RGB tiles are
    lossless JPEG 2000 written by Pillow. Returns the written arrays by rgb file path.
    """
    root = Path(root)
    for city in (*GeoNRW.train_list, *GeoNRW.test_list):
        (root / city).mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, np.ndarray]] = {}
    for tile, city in enumerate((*train_cities, *test_cities)):
        x, y = 300 + tile, 5600 + tile
        arrays = geonrw_tile(tile, size)
        rgb_path = root / city / f"{x}_{y}_rgb.jp2"
        Image.fromarray(arrays["rgb"].transpose(1, 2, 0)).save(rgb_path)
        write_geotiff(root / city / f"{x}_{y}_dem.tif", arrays["dem"])
        write_geotiff(root / city / f"{x}_{y}_seg.tif", arrays["seg"])
        written[str(rgb_path)] = arrays
    return written


BIGEARTHNET_S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
_BIGEARTHNET_S2_SIZES = {"B02": 12, "B03": 12, "B04": 12, "B08": 12, "B01": 2, "B09": 2}
_BIGEARTHNET_LABELS = ("Mixed forest", "Pastures", "Sea and ocean", "Coniferous forest", "Water bodies")


def bigearthnet_s2_value(sample: int, band: int) -> int:
    return 100 * (band + 1) + sample


def bigearthnet_s1_values(sample: int) -> tuple[float, float]:
    """(VV, VH) dB of fake sample ``sample``."""
    return -10.25 - sample, -20.75 - sample


def make_bigearthnet(root: str | Path, samples_per_split: dict[str, int] | None = None) -> dict[str, list[int]]:
    """BigEarthNet v1 layout (torchgeo's): split CSVs, S2 and S1 patch folders, S1 label JSON.

    Sample ids are global and consecutive over train, val, test. S2 bands are written at their
    native relative resolutions (10/20/60 m -> 12/6/2 px); torchgeo resamples to 120 px.
    Returns the sample ids per split.
    """
    root = Path(root)
    samples_per_split = samples_per_split or {"train": 20, "val": 4, "test": 4}
    ids: dict[str, list[int]] = {}
    next_id = 0
    for split, count in samples_per_split.items():
        lines = []
        ids[split] = list(range(next_id, next_id + count))
        for sample in ids[split]:
            s2_name = f"S2A_MSIL2A_20170613T101031_{sample}_45"
            s1_name = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{sample}_39"
            for band, name in enumerate(BIGEARTHNET_S2_BANDS):
                side = _BIGEARTHNET_S2_SIZES.get(name, 6)
                array = np.full((side, side), bigearthnet_s2_value(sample, band), dtype=np.uint16)
                write_geotiff(root / "BigEarthNet-v1.0" / s2_name / f"{s2_name}_{name}.tif", array)
            for name, value in zip(("VV", "VH"), bigearthnet_s1_values(sample), strict=True):
                array = np.full((12, 12), value, dtype=np.float32)
                write_geotiff(root / "BigEarthNet-S1-v1.0" / s1_name / f"{s1_name}_{name}.tif", array)
            labels = [_BIGEARTHNET_LABELS[sample % len(_BIGEARTHNET_LABELS)]]
            with open(root / "BigEarthNet-S1-v1.0" / s1_name / f"{s1_name}_labels_metadata.json", "w") as f:
                json.dump({"labels": labels}, f)
            lines.append(f"{s2_name},{s1_name}")
        next_id += count
        (root / f"bigearthnet-{split}.csv").write_text("\n".join(lines) + "\n")
    return ids


def make_rgbd(
    root: str | Path,
    num_classes: int,
    train: int = 6,
    test: int = 3,
    sizes: Sequence[tuple[int, int]] = ((24, 32), (30, 20)),
    hha_extension: str = ".png",
) -> dict[str, list[str]]:
    """CMX layout ``root/{RGB,HHA,Label}/<name>.*`` plus ``train.txt`` / ``test.txt``.

    RGB is JPEG, HHA ``hha_extension`` (PNG keeps pixels exact), labels PNG. Image sizes cycle
    through ``sizes`` (SUN-RGBD's vary). HHA channel 0 is a copy of RGB's red channel before JPEG.
    """
    root = Path(root)
    for folder in ("RGB", "HHA", "Label"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = {"train": [f"{i:06d}" for i in range(train)], "test": [f"{train + i:06d}" for i in range(test)]}
    for index, name in enumerate([*names["train"], *names["test"]]):
        height, width = sizes[index % len(sizes)]
        rows, cols = np.mgrid[0:height, 0:width]
        rgb = np.stack([(8 * cols + index) % 256, (8 * rows) % 256, np.full_like(rows, 40 * index % 256)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(root / "RGB" / f"{name}.jpg", quality=95)
        hha = np.stack([rgb[..., 0], 255 - rgb[..., 1], rgb[..., 2]], -1).astype(np.uint8)
        Image.fromarray(hha).save(root / "HHA" / f"{name}{hha_extension}")
        labels = ((rows * width + cols) // 2) % (num_classes + 1)
        Image.fromarray(labels.astype(np.uint8)).save(root / "Label" / f"{name}.png")
    for split, split_names in names.items():
        (root / f"{split}.txt").write_text("\n".join(split_names) + "\n")
    return names
