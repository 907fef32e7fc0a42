"""Read throughput of the own-raster datamodule (samples per second), rasters of realistic size.

Writes three co-registered sources over one 54.9 km square near 50 N, 9 E (a quarter of a
Sentinel-2 tile), each in another CRS and resolution, as tiled uncompressed GeoTIFFs:

* ``s2``: UTM 32N, 10 m, 4 bands uint16, 5490 x 5490 px (241 MB), nodata 0;
* ``s1``: WGS 84 lon/lat, 0.00018 deg (about 13 x 20 m), 2 bands float32 (about 95 MB);
* ``dem``: Web Mercator, 30 m, 1 band float32 (about 34 MB).

Then serves random 264 px patches (the SSL4EO-S12 patch size) at 10 m in UTM 32N through
:class:`~decur_lightning.datamodules.RasterPretrainDataModule`'s training loader (batch 16, the
paper's normalisation) for each worker count, for two sources (``s2`` + ``s1``) and for all three,
and prints the median samples/s over repeated passes. Every source but ``s2`` is reprojected and
resampled at read time. The files sit in the OS page cache after writing: this measures decoding,
warping and normalisation, not cold-storage reads. GDAL's block cache is limited to 64 MiB
(``--gdal-cache-mb``) so that, as with a data set larger than memory, random patches are decoded
from the files: with GDAL's default (5 % of RAM) the main process ends up holding the whole mosaic
decoded after a few passes while each DataLoader worker starts empty, which flatters 0 workers.
Not part of the test suite.

Usage:
    python benchmarks/rasters.py                         # workers 0 and 2, 160 samples per pass
    python benchmarks/rasters.py --workers 0 2 4 --samples 320 --root /fast/disk/tmp --out result.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from decur_lightning.datamodules import RasterPretrainDataModule

UTM_ORIGIN = (500_000.0, 5_600_000.0)
SIDE_M = 54_900.0
PATCH = 264
BATCH = 16


def _write(
    path: Path, data_fn, count: int, width: int, height: int, dtype: str, crs: str, transform, nodata=None
) -> None:
    """A tiled uncompressed GeoTIFF filled block row by block row (bounded memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        tiled=True,
        blockxsize=512,
        blockysize=512,
    )
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, height, 512):
            rows = min(512, height - row)
            dst.write(data_fn(row, rows, width).astype(dtype), window=rasterio.windows.Window(0, row, width, rows))


def write_sources(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three sources (see the module docstring); return name -> folder."""
    rng = np.random.default_rng(seed)
    x0, y0 = UTM_ORIGIN
    n = int(SIDE_M / 10)

    def s2(row, rows, width):  # reflectance-like digital numbers, 4 bands
        return rng.integers(200, 4000, size=(4, rows, width), dtype=np.uint16)

    _write(root / "s2" / "s2.tif", s2, 4, n, n, "uint16", "EPSG:32632", from_origin(x0, y0 + SIDE_M, 10, 10), 0)
    to_geo = Transformer.from_crs(32632, 4326, always_xy=True)
    lon0, lat1 = to_geo.transform(x0, y0 + SIDE_M)
    lon1, lat0 = to_geo.transform(x0 + SIDE_M, y0)
    res = 0.00018
    w, h = int((lon1 - lon0) / res) + 1, int((lat1 - lat0) / res) + 1

    def s1(row, rows, width):  # backscatter in dB
        return rng.normal(-15, 4, size=(2, rows, width))

    _write(root / "s1" / "s1.tif", s1, 2, w, h, "float32", "EPSG:4326", from_origin(lon0, lat1, res, res))
    to_merc = Transformer.from_crs(32632, 3857, always_xy=True)
    mx0, my1 = to_merc.transform(x0, y0 + SIDE_M)
    mx1, my0 = to_merc.transform(x0 + SIDE_M, y0)
    w, h = int((mx1 - mx0) / 30) + 1, int((my1 - my0) / 30) + 1

    def dem(row, rows, width):
        return rng.normal(300, 50, size=(1, rows, width))

    _write(root / "dem" / "dem.tif", dem, 1, w, h, "float32", "EPSG:3857", from_origin(mx0, my1, 30, 30))
    return {name: root / name for name in ("s2", "s1", "dem")}


def sources(paths: dict[str, Path], names: tuple[str, ...]) -> dict[str, dict]:
    spec = {
        "s2": {"band_names": ["B02", "B03", "B04", "B08"], "view": "optical", "nodata": 0},
        "s1": {"band_names": ["VV", "VH"], "view": "sar"},
        "dem": {"band_names": ["elevation"], "view": "dem"},
    }
    return {name: {"paths": str(paths[name]), **spec[name]} for name in names}


def read_times(paths: dict[str, Path], count: int = 40) -> dict[str, float]:
    """Milliseconds per patch read of each source alone (torchgeo query, warp, merge), one process."""
    dm = RasterPretrainDataModule(
        sources(paths, ("s2", "s1", "dem")),
        patch_size=PATCH,
        batch_size=BATCH,
        length=count + 5,
        stats_patches=16,
        stats_file=str(paths["s2"].parent / "stats.json"),
    )
    dataset = dm.build_dataset()
    res = dataset.joined.res
    totals = dict.fromkeys(dataset.names, 0.0)
    for i in range(count):
        x, y, t = dataset.location(i)
        for name, source in dataset.datasets.items():
            start = time.perf_counter()
            source[slice(x.start, x.stop, res[0]), slice(y.start, y.stop, res[1]), t]
            totals[name] += time.perf_counter() - start
    return {name: 1000 * total / count for name, total in totals.items()}


def measure(
    paths: dict[str, Path], names: tuple[str, ...], workers: int, samples: int, repeats: int
) -> tuple[float, float]:
    """Median samples/s over ``repeats`` passes of ``samples`` samples; and the setup time in s."""
    dm = RasterPretrainDataModule(
        sources(paths, names),
        patch_size=PATCH,
        batch_size=BATCH,
        num_workers=workers,
        length=samples,
        stats_patches=16,
        stats_file=str(paths["s2"].parent / "stats.json"),
    )
    start = time.perf_counter()
    dm.setup("fit")
    setup = time.perf_counter() - start
    rates = []
    loader = dm.train_dataloader()
    next(iter(loader))  # start the workers and open the files once
    for _ in range(repeats):
        start = time.perf_counter()
        count = sum(batch[f"image_{names[0]}"].shape[0] for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--samples", type=int, default=160, help="samples per pass (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="where to write the rasters (a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--gdal-cache-mb", type=int, default=64, help="GDAL block cache per process (MiB)")
    args = parser.parse_args()
    os.environ["GDAL_CACHEMAX"] = str(args.gdal_cache_mb)  # read when GDAL first opens a file
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        start = time.perf_counter()
        paths = write_sources(Path(tmp))
        sizes = {name: sum(f.stat().st_size for f in path.glob("*.tif")) / 2**20 for name, path in paths.items()}
        print(f"wrote {', '.join(f'{n} {s:.0f} MiB' for n, s in sizes.items())} in {time.perf_counter() - start:.0f} s")
        reads = read_times(paths)
        rows = []
        for names in (("s2", "s1"), ("s2", "s1", "dem")):
            for workers in args.workers:
                rate, setup = measure(paths, names, workers, args.samples, args.repeats)
                rows.append((" + ".join(names), workers, rate, 1000 / rate, setup))
                print(f"{rows[-1][0]:<16} workers {workers}: {rate:6.1f} samples/s")
    load = os.getloadavg()[0]
    table = [
        f"Own-raster datamodule, random {PATCH} px patches at 10 m, batch {BATCH}, paper normalisation, "
        f"page cache warm, GDAL block cache {args.gdal_cache_mb} MiB per process, {os.cpu_count()} CPUs (1-min load average at the end: {load:.1f}).",
        "Sources: s2 UTM 32N 10 m 4 x uint16 5490 px; s1 WGS 84 0.00018 deg 2 x float32 (reprojected); "
        "dem Web Mercator 30 m float32 (reprojected).",
        "",
        "| sources | workers | samples/s | ms/sample | setup s |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |" for r in rows],
        "",
        "setup: join, grid/sampler and band statistics (16 patches; computed at the first set-up of a set of "
        "sources, read from the JSON cache afterwards: here computed only on the first row).",
        "Read time per 264 px patch and source alone (one process): "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in reads.items())
        + ".",
    ]
    print("\n".join(table))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
