"""DeCUR loss: dense (build C, Algorithm 1) vs cheap (Gram-matrix identity) forward+backward.

Run by hand:  python benchmarks/loss.py            (N=256, K=8192, a small sweep and M=3)
              python benchmarks/loss.py --full     (larger sweep)
              python benchmarks/loss.py --device cuda

Each case runs in a fresh subprocess so that its peak memory is its own: on CPU the peak
resident set size above the inputs (ru_maxrss), on CUDA ``torch.cuda.max_memory_allocated``.
Times are medians over ``--repeats`` runs after one warm-up. Prints a Markdown table with the
dense/cheap ratios measured in the same run. A case ``(N, K)`` measures ``decur_loss`` (M = 2
modalities); a case ``(N, K, M)`` measures ``multimodal_decur_loss`` with M modalities, each
with two views (M intra-modal terms and M(M-1)/2 cross-modal pairs), in a second table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CASES = [(256, 8192), (64, 2048), (256, 2048), (1024, 8192)]
FULL_CASES = DEFAULT_CASES + [(64, 8192), (512, 8192), (2048, 8192), (256, 16384)]
MULTIMODAL_CASES = [(256, 8192, 3)]


def _measure_in_process(
    n: int, k: int, method: str, device: str, repeats: int, modalities: int = 2
) -> dict[str, float]:
    import resource

    import torch

    from decur_lightning.losses import decur_loss, multimodal_decur_loss

    torch.manual_seed(0)
    common = int(0.875 * k)
    z = [torch.randn(n, k, device=device, requires_grad=True) for _ in range(2 * modalities)]

    def step() -> None:
        if modalities == 2:
            total = decur_loss(*z, common_dims=common, method=method).total
        else:
            views = {f"m{i}": (z[2 * i], z[2 * i + 1]) for i in range(modalities)}
            total = multimodal_decur_loss(views, common, method=method).total
        total.backward()
        for t in z:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (and the peak)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_mb": max(peak, 0) / 2**20}


def _measure(n: int, k: int, method: str, device: str, repeats: int, modalities: int = 2) -> dict[str, float]:
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import json, sys; sys.path.insert(0, {here!r}); from loss import _measure_in_process; "
        f"print(json.dumps(_measure_in_process({n}, {k}, {method!r}, {device!r}, {repeats}, {modalities})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cases: list[tuple[int, ...]], device: str = "cpu", repeats: int = 5) -> list[dict[str, float]]:
    """Measure every case ``(N, K)`` or ``(N, K, M)`` with both methods; return rows with the ratios."""
    rows = []
    for case in cases:
        n, k, m = (*case, 2) if len(case) == 2 else case
        dense = _measure(n, k, "dense", device, repeats, m)
        cheap = _measure(n, k, "cheap", device, repeats, m)
        rows.append(
            {
                "M": m,
                "N": n,
                "K": k,
                "dense_ms": 1e3 * dense["time_s"],
                "cheap_ms": 1e3 * cheap["time_s"],
                "speedup": dense["time_s"] / cheap["time_s"],
                "dense_mb": dense["peak_mb"],
                "cheap_mb": cheap["peak_mb"],
                "memory_ratio": dense["peak_mb"] / max(cheap["peak_mb"], 1e-3),
            }
        )
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| N | K | dense ms | cheap ms | speed-up | dense peak MB | cheap peak MB | memory ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['K']} | {r['dense_ms']:.1f} | {r['cheap_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{r['dense_mb']:.0f} | {r['cheap_mb']:.0f} | {r['memory_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="larger sweep over N and K")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = run(FULL_CASES if args.full else DEFAULT_CASES, args.device, args.repeats)
    print(f"DeCUR loss forward+backward on {args.device} (median of {args.repeats}), dense vs cheap:")
    print(format_table(rows))
    for m in sorted({case[2] for case in MULTIMODAL_CASES}):
        rows = run([case for case in MULTIMODAL_CASES if case[2] == m], args.device, args.repeats)
        print(f"\nM = {m} modalities (multimodal_decur_loss, 2 views each, K_c = 0.875 K), dense vs cheap:")
        print(format_table(rows))


if __name__ == "__main__":
    main()
