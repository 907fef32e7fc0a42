"""Read throughput of the SSL4EO-S12 S1/S2 pair dataset (samples per second).

Writes fake SSL4EO-S12 data of real size into a temporary directory: per location 4 seasons,
each with 2 float32 Sentinel-1 GeoTIFFs and 13 uint16 Sentinel-2 GeoTIFFs of 264 x 264 px
(uncompressed, random values), in torchgeo's layout ``root/{s1,s2c}/{index:07d}/{scene}/{band}.tif``.
Then reads every location through :class:`~decur_lightning.datamodules.SSL4EOS12MM` with a
PyTorch DataLoader for each worker count, with and without the paper's normalisation, and prints
the median samples/s over repeated passes. One sample = one S1 and one S2 season (15 files).

The files sit in the OS page cache after writing, so this measures decoding, assembly and
normalisation, not cold-storage reads. Not part of the test suite.

Usage:
    python benchmarks/ssl4eo_io.py                     # 32 locations, workers 0 and 2
    python benchmarks/ssl4eo_io.py --locations 64 --workers 0 2 4 --root /fast/disk/tmp
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from torch.utils.data import DataLoader

from decur_lightning.datamodules import SSL4EOS12MM

SIZE = 264
S1_BANDS = ("VV", "VH")
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
DATES = ("20200315T101021", "20200614T101031", "20200912T101029", "20201211T101409")


def write_band(path: Path, array: np.ndarray) -> None:
    """One single-band GeoTIFF (UTM 32N, 10 m)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "height": SIZE,
        "width": SIZE,
        "count": 1,
        "dtype": array.dtype,
        "crs": "EPSG:32632",
        "transform": Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5700000.0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array[None])


def write_fake_ssl4eo(root: Path, locations: int, seed: int = 0) -> None:
    """Fake SSL4EO-S12 s1/s2c data of real size for ``locations`` locations."""
    rng = np.random.default_rng(seed)
    for location in range(locations):
        for date in DATES:
            s1_scene = root / "s1" / f"{location:07d}" / f"S1A_IW_GRDH_1SDV_{date}_{date}_031684_03A6E8_1A2B"
            for band in S1_BANDS:
                write_band(s1_scene / f"{band}.tif", rng.normal(-15.0, 5.0, (SIZE, SIZE)).astype(np.float32))
            s2_scene = root / "s2c" / f"{location:07d}" / f"{date}_{date}_T32UMA"
            for band in S2_BANDS:
                write_band(s2_scene / f"{band}.tif", rng.integers(0, 10000, (SIZE, SIZE), dtype=np.uint16))


def samples_per_second(dataset: SSL4EOS12MM, workers: int, batch_size: int, repeats: int) -> float:
    """Median samples/s of full passes over ``dataset`` (one warm-up pass first)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    rates = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        count = sum(batch["image_s1"].shape[0] for batch in loader)
        if step > 0:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locations", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="parent of the temporary data folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_fake_ssl4eo(root, args.locations)
        size_mb = sum(f.stat().st_size for f in root.rglob("*.tif")) / 2**20
        print(
            f"wrote {args.locations} locations x 4 seasons x 15 GeoTIFFs ({size_mb:.0f} MiB) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        print(f"{'workers':>7}  {'normalize':>9}  {'samples/s':>9}  {'ms/sample':>9}")
        for workers in args.workers:
            for normalize in (True, False):
                dataset = SSL4EOS12MM(root, normalize=normalize)
                rate = samples_per_second(dataset, workers, args.batch_size, args.repeats)
                print(f"{workers:>7}  {normalize!s:>9}  {rate:>9.1f}  {1000 / rate:>9.1f}")


if __name__ == "__main__":
    main()
