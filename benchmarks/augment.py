"""View augmentation throughput: batched on-device view pipelines vs per-sample torchvision v2.

Two views per image, Sentinel-2 L1C (13 bands) and Sentinel-1 (2 bands) at 264 px to 224 px
views with the paper's pipelines (Appendix B.1). The baseline is what users write by hand: a
per-sample torchvision v2 pipeline inside a Dataset, read through a DataLoader (0 and 2 worker
processes). torchvision's colour ops need 1 or 3 bands, so the per-sample optical pipeline
uses brightness/contrast written as tensor arithmetic, and grayscale as the band mean, as a
user would for multispectral data. Target: batched at least 3x faster.

The batched pipelines are :func:`decur_lightning.augmentations.make_view_pair` (one-pass
crop+flip, one-pass brightness/contrast, blur/solarize/grayscale computed only on the images
they apply to, kornia's separable Gaussian blur). Use ``--threads`` to pin torch's intra-op
threads (default: torch's choice, i.e. OMP_NUM_THREADS or the core count).

    python benchmarks/augment.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from decur_lightning.augmentations import make_view_pair


class _Jitter(torch.nn.Module):
    """Brightness/contrast (p=0.8) and band-mean grayscale (p=0.2) for any band count."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.rand(()) < 0.8:
            x = (x * torch.empty(()).uniform_(0.6, 1.4)).clamp(0, 1)
            mean = x.mean()
            x = ((x - mean) * torch.empty(()).uniform_(0.6, 1.4) + mean).clamp(0, 1)
        if torch.rand(()) < 0.2:
            x = x.mean(0, keepdim=True).expand_as(x)
        return x


def per_sample_pipeline(kind: str, size: int, view: int) -> v2.Compose:
    ops: list[Any] = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)]
    if kind == "optical":
        ops.append(_Jitter())
    ops.append(v2.RandomApply([v2.GaussianBlur(23, (0.1, 2.0))], p=1.0 if view == 1 else 0.1))
    if kind == "optical":
        ops.append(v2.RandomSolarize(0.5, p=0.0 if view == 1 else 0.2))
    ops += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    return v2.Compose(ops)


class _PerSampleViews(Dataset):
    def __init__(self, images: Tensor, kind: str, size: int) -> None:
        self.images = images
        self.views = [per_sample_pipeline(kind, size, 1), per_sample_pipeline(kind, size, 2)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        return self.views[0](x), self.views[1](x)


def per_sample_rate(images: Tensor, kind: str, size: int, workers: int, batch: int) -> float:
    loader = DataLoader(_PerSampleViews(images, kind, size), batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return images.shape[0] / (time.perf_counter() - start)


def batched_rate(images: Tensor, kind: str, size: int, batch: int, device: str) -> float:
    views = make_view_pair(kind, size)
    views(images[:batch].to(device))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, images.shape[0], batch):
        views(images[i : i + batch].to(device, non_blocking=True))
    if device == "cuda":
        torch.cuda.synchronize()
    return images.shape[0] / (time.perf_counter() - start)


def run(
    n: int = 128, batch: int = 32, input_size: int = 264, size: int = 224, device: str = "cpu", repeats: int = 3
) -> list[dict[str, Any]]:
    """Rows per modality: batched images/s vs per-sample images/s (best of 0 and 2 workers)."""
    rows = []
    for kind, bands in (("optical", 13), ("sar", 2)):
        images = torch.rand(n, bands, input_size, input_size)
        batched = statistics.median(batched_rate(images, kind, size, batch, device) for _ in range(repeats))
        per_sample = {
            w: statistics.median(per_sample_rate(images, kind, size, w, batch) for _ in range(repeats)) for w in (0, 2)
        }
        best_workers = max(per_sample, key=per_sample.get)
        rows.append(
            {
                "row": f"views/s, {kind} {bands} bands {input_size}->{size} px: batched vs per-sample torchvision v2 ({best_workers} workers)",
                "setting": f"N={n}, batch {batch}, {device}",
                "measured": batched,
                "baseline": per_sample[best_workers],
                "ratio": batched / per_sample[best_workers],
                "unit": "images/s (2 views each)",
                "target": ">= 3",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in run(args.n, device=args.device, repeats=args.repeats):
        print(
            f"{row['row']}: {row['measured']:.1f} vs {row['baseline']:.1f} {row['unit']} = {row['ratio']:.2f}x (target {row['target']})"
        )


if __name__ == "__main__":
    main()
