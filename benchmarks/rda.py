"""Cost of residual deformable attention: ResNet-50 vs ResNet-50 + RDA (paper Section 3.2).

Times one forward + backward pass of each encoder (training mode) at the paper's 224 px crops
and prints the median over repeats and the RDA overhead ratio. The two encoders alternate
within each repeat, so a load change on a shared machine hits both alike; the ratio column is
the median of the per-repeat ratios. Not part of the test suite.

Usage:
    python benchmarks/rda.py                      # CPU, batch 8, 224 px, 13 bands
    python benchmarks/rda.py --device cuda --batch-size 64 --amp
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from decur_lightning.models import create_encoder


def time_step(encoder: torch.nn.Module, x: torch.Tensor, amp: bool) -> float:
    """Seconds for one forward + backward."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else nullcontext()
    encoder.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        loss = encoder(x).float().square().mean()
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=13, help="input bands (13: Sentinel-2 L1C)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, device=device)
    names = ("resnet50", "resnet50_rda")
    encoders = {name: create_encoder(name, in_channels=args.channels).to(device).train() for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(args.warmup + args.repeats):
        for name in names:
            seconds = time_step(encoders[name], x, args.amp)
            if step >= args.warmup:
                times[name].append(seconds)
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times[names[0]])) for name in names}

    print(
        f"forward+backward, batch {args.batch_size}, {args.channels}x{args.size}x{args.size}, "
        f"{device.type}{' bf16 autocast' if args.amp else ''}, torch threads {torch.get_num_threads()}, "
        f"median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(f"{'encoder':<14} {'params (M)':>10} {'median (s)':>11} {'min (s)':>9} {'ratio':>7}")
    for name in names:
        params = sum(p.numel() for p in encoders[name].parameters())
        print(
            f"{name:<14} {params / 1e6:>10.2f} {statistics.median(times[name]):>11.3f} "
            f"{min(times[name]):>9.3f} {ratios[name]:>7.2f}"
        )


if __name__ == "__main__":
    main()
