"""SSL4EO-S12 pairs: GeoTIFF reads vs the litdata streaming format (issue 14 section 3).

Writes fake SSL4EO-S12 data of real size (per location 4 seasons x (2 float32 S1 + 13 uint16 S2)
GeoTIFFs of 264 x 264 px, uncompressed, random values; :mod:`ssl4eo_io`'s writer), prepares it
with ``decur prepare`` (:func:`decur_lightning.prepare.prepare`) in the native types (lossless,
all 4 seasons per record) and, for comparison, as lossy uint8, then measures in the same run, for
each worker count, the samples per second of:

* ``geotiff``: :class:`~decur_lightning.datamodules.SSL4EOS12MM` (torchgeo reads, the paper's
  normalisation in the loader) through a PyTorch DataLoader;
* ``stream, normalise in loader``: :class:`~decur_lightning.datamodules.StreamingPretrainDataModule`
  (``normalize_on="loader"``): the same samples, bit for bit;
* ``stream, native to device``: ``normalize_on="device"``: the loader ships uint16/float32 and the
  normalisation runs after the transfer (its CPU cost per sample is printed separately: on a GPU it
  is a small fraction of the step);
* ``stream uint8``: the lossy 8-bit copy (only normalisation-free decoding in the loader).

Samples/s per worker = samples/s divided by max(1, workers) (with 0 workers the main process
reads). Bytes per sample: files on disk divided by locations (every location holds 4 seasons in
both formats), plus the bytes a GeoTIFF sample reads (one season, 15 files). The page cache is
warm (the files were just written): this measures decoding, assembly and normalisation, not cold
storage. Not part of the test suite.

Usage:
    python benchmarks/streaming.py                      # 32 locations, workers 0 and 2
    python benchmarks/streaming.py --locations 64 --workers 0 2 4 --root /fast/disk/tmp
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl4eo_io import write_fake_ssl4eo  # noqa: E402

from decur_lightning.datamodules import SSL4EOS12MM, SSL4EOS12MMDataModule, StreamingPretrainDataModule  # noqa: E402
from decur_lightning.prepare import prepare  # noqa: E402


def rate(make_loader, repeats: int, on_batch=None) -> float:
    """Median samples/s over ``repeats`` full passes after one warm-up pass."""
    rates = []
    for step in range(repeats + 1):
        loader = make_loader()
        start = time.perf_counter()
        count = 0
        for batch in loader:
            if on_batch is not None:
                batch = on_batch(batch)
            count += batch["image_s1"].shape[0]
        if step > 0:
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locations", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="parent of the temporary data folder")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        raw, native, uint8 = Path(tmp) / "raw", Path(tmp) / "native", Path(tmp) / "uint8"
        start = time.perf_counter()
        write_fake_ssl4eo(raw, args.locations)
        print(f"wrote {args.locations} locations of fake SSL4EO-S12 in {time.perf_counter() - start:.1f} s")
        source = SSL4EOS12MMDataModule(root=raw, batch_size=args.batch_size)
        for target, quantize in ((native, None), (uint8, "uint8")):
            start = time.perf_counter()
            prepare(source, str(target), quantize=quantize, num_workers=2)
            print(f"prepared {target.name} in {time.perf_counter() - start:.1f} s")

        tif_bytes = folder_bytes(raw, "*.tif") / args.locations
        bytes_per_sample = {
            "geotiff": tif_bytes,
            "stream native": folder_bytes(native, "*.bin") / args.locations,
            "stream uint8": folder_bytes(uint8, "*.bin") / args.locations,
        }
        one_season_read = tif_bytes / 4

        dataset = SSL4EOS12MM(raw, normalize=True, seed=0)
        streams = {
            "stream, normalise in loader": (native, "loader"),
            "stream, native to device": (native, "device"),
            "stream uint8": (uint8, "loader"),
        }
        print(
            f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) per process, torch {torch.__version__}"
        )
        print(f"batch size {args.batch_size}, {args.locations} samples per pass, median of {args.repeats} passes")
        print("\n| reader | workers | samples/s | samples/s per worker | vs geotiff |")
        print("|---|---:|---:|---:|---:|")
        results = {}
        for workers in args.workers:
            geotiff = rate(
                lambda workers=workers: DataLoader(
                    dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
                ),
                args.repeats,
            )
            results[("geotiff", workers)] = geotiff
            per = max(1, workers)
            print(f"| geotiff (SSL4EOS12MM) | {workers} | {geotiff:.1f} | {geotiff / per:.1f} | 1.00 |")
            for name, (folder, normalize_on) in streams.items():
                datamodule = StreamingPretrainDataModule(
                    str(folder), batch_size=args.batch_size, num_workers=workers, normalize_on=normalize_on
                )
                datamodule._shuffle_seed = 0
                value = rate(datamodule.train_dataloader, args.repeats)
                results[(name, workers)] = value
                print(f"| {name} | {workers} | {value:.1f} | {value / per:.1f} | {value / geotiff:.2f} |")

        device_dm = StreamingPretrainDataModule(str(native), batch_size=args.batch_size, normalize_on="device")
        device_dm._shuffle_seed = 0
        batches = list(device_dm.train_dataloader())
        start = time.perf_counter()
        for batch in batches:
            device_dm.on_after_batch_transfer(batch, 0)
        normalise_ms = 1000 * (time.perf_counter() - start) / (len(batches) * args.batch_size)
        print(
            f"\nnormalisation of a native sample on the CPU (what normalize_on='device' moves to the accelerator): "
            f"{normalise_ms:.1f} ms/sample"
        )

        print("\n| format | bytes per sample on disk | MiB |")
        print("|---|---:|---:|")
        for name, value in bytes_per_sample.items():
            print(f"| {name} (4 seasons x 2 + 13 bands) | {value:.0f} | {value / 2**20:.2f} |")
        print(
            f"| geotiff, read per sample (1 season, 15 files) | {one_season_read:.0f} | {one_season_read / 2**20:.2f} |"
        )


if __name__ == "__main__":
    main()
