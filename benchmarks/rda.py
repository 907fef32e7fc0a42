"""Residual deformable attention (paper Section 3.2): cost, and behaviour under LARS.

Default mode: times one forward + backward pass of ResNet-50 and ResNet-50 + RDA (training
mode) at the paper's 224 px crops and prints the median over repeats and the RDA overhead
ratio. The two encoders alternate within each repeat, so a load change on a shared machine
hits both alike; the ratio column is the median of the per-repeat ratios.

``--lars``: ten DeCUR steps (two resnet18_rda encoders, 3-layer projectors of width K, the
DeCUR loss, the paper's LARS: lr 0.2, lr_bias 0.0048, wd 1e-6, momentum 0.9) on synthetic
two-view data, once per ``proj_out`` initialisation (``--init-gains``; ``0`` is the old zero
initialisation, set after construction), printing per step ``||proj_out||`` of the layer3
block and the norm ratio of its attention branch to its input (measured in the training
forward of each step; the last row after the last update). Not part of the test suite.

Usage:
    python benchmarks/rda.py                      # CPU, batch 8, 224 px, 13 bands
    python benchmarks/rda.py --device cuda --batch-size 64 --amp
    python benchmarks/rda.py --lars               # 64 px, K=2048, N=16, gains 0 0.1 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from decur_lightning.losses import decur_loss
from decur_lightning.models import create_encoder
from decur_lightning.optim import build_optimizer
from decur_lightning.ssl.base import build_projector


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


def lars_trace(init_gain: float, args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """``(step, ||proj_out|| of da_l3, ||DA(x)|| / ||x|| at da_l3)`` over ``args.steps`` LARS steps."""
    torch.manual_seed(0)
    channels = (2, 13)
    encoders = [create_encoder("resnet18_rda", in_channels=c, rda_init_gain=1.0) for c in channels]
    for encoder in encoders:
        for block in (encoder.da_l3, encoder.da_l4):
            with torch.no_grad():  # rescale PyTorch's default init (gain 0: the old zero init)
                block.proj_out.weight.mul_(init_gain)
                block.proj_out.bias.mul_(init_gain)
    width = args.embedding_dim
    projectors = [build_projector(e.num_features, (width, width, width)) for e in encoders]
    optimizer = build_optimizer([*encoders, *projectors])
    ratios: list[float] = []
    block = encoders[0].da_l3
    block.register_forward_hook(lambda m, i, o: ratios.append(float((o - i[0]).detach().norm() / i[0].detach().norm())))
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(args.batch_size, c, args.size, args.size, generator=generator) for c in channels]
    trace = []
    for step in range(args.steps + 1):
        views = [[x + 0.05 * torch.randn(x.shape, generator=generator) for _ in range(2)] for x in images]
        if step == args.steps:  # the state after the last update
            with torch.no_grad():
                encoders[0](views[0][0])
            trace.append((step, float(block.proj_out.weight.detach().norm()), ratios[-1]))
            break
        z = [[p(e(v)) for v in pair] for e, p, pair in zip(encoders, projectors, views)]
        trace.append((step, float(block.proj_out.weight.detach().norm()), ratios[-1]))
        loss = decur_loss(z[0][0], z[0][1], z[1][0], z[1][1], common_dims=int(0.875 * width)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return trace


def main_lars(args: argparse.Namespace) -> None:
    print(
        f"resnet18_rda x2 (2 and 13 bands), {args.size} px, N={args.batch_size}, K={args.embedding_dim}, "
        f"LARS lr 0.2 / lr_bias 0.0048 / wd 1e-6 / momentum 0.9, torch threads {torch.get_num_threads()}"
    )
    print("step: ||proj_out|| of da_l3 / ||DA(x)||/||x|| at da_l3 (before the step's update)")
    for gain in args.init_gains:
        trace = lars_trace(gain, args)
        print(f"init gain {gain:g}: " + "  ".join(f"{s}: {n:.3g}/{r:.3g}" for s, n, r in trace))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (16 with --lars)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels; default 224 (64 with --lars)")
    parser.add_argument("--channels", type=int, default=13, help="input bands (13: Sentinel-2 L1C)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--lars", action="store_true", help="trace proj_out and the branch ratio under LARS")
    parser.add_argument("--init-gains", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--embedding-dim", type=int, default=2048, help="projector width K (--lars)")
    args = parser.parse_args()
    if args.lars:
        args.size, args.batch_size = args.size or 64, args.batch_size or 16
        main_lars(args)
        return
    args.size, args.batch_size = args.size or 224, args.batch_size or 8

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
