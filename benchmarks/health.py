"""Training health of every paper pretraining config, shrunk (see tests/config_health.py).

Prints, per ``examples/configs/pretrain_*.yaml``: the loss of a fixed probe batch (fixed views)
before and after ``--steps`` optimiser steps, the training loss over the first and last three steps (the config's optimiser, learning rates and schedule), the range of
the embedding standard deviation (about 1 healthy, towards 0 collapsed), and the parameter
tensors whose norm grew most (``||p_end|| / max(||p_start||, 1)``).

    python benchmarks/health.py                 # all configs, 20 steps each
    python benchmarks/health.py --only rda      # configs whose name contains "rda"
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from config_health import pretrain_configs, run_health_check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", default="", help="run the configs whose file name contains this")
    parser.add_argument("--top", type=int, default=3, help="tensors with the largest norm growth to list")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        "| config | probe loss before | after | train loss first 3 | last 3 | emb. std min-max | largest norm growth | s |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for config in pretrain_configs():
        if args.only not in config.name:
            continue
        start = time.perf_counter()
        report = run_health_check(config, steps=args.steps, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        first, last = sum(report.losses[:3]) / 3, sum(report.losses[-3:]) / 3
        worst = sorted(report.norm_growth.items(), key=lambda item: -item[1])[: args.top]
        low, high = min(report.embedding_stds), max(report.embedding_stds)
        growth = ", ".join(f"`{tensor}` {ratio:.2f}x" for tensor, ratio in worst)
        print(
            f"| {config.name} | {report.probe_before:.2f} | {report.probe_after:.2f} | {first:.1f} | {last:.1f} "
            f"| {low:.3f}-{high:.3f} | {growth} | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
