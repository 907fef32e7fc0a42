"""Every benchmark of the project in one table: measured figure, baseline from the same run, ratio.

    python benchmarks/run.py             # small settings for a 2-core CPU (about 10 minutes)
    python benchmarks/run.py --paper     # paper-size settings (resnet50, 224 px, K=8192, N=256)
    python benchmarks/run.py --only loss step
    python benchmarks/run.py --only step --switches   # + channels_last and torch.compile

On a machine with a GPU a CUDA section (bf16 autocast) is added. Writes the table as Markdown
and JSON to ``--out`` (default ``benchmarks/results/``) and prints it. Targets are those of
the performance issue; they are reported, never asserted (timings vary by machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import augment  # noqa: E402
import loss  # noqa: E402
import rda  # noqa: E402
import step  # noqa: E402


def loss_rows(paper: bool, device: str) -> list[dict[str, Any]]:
    cases = loss.FULL_CASES if paper else loss.DEFAULT_CASES
    rows = []
    for r in loss.run(cases, device, repeats=3):
        setting = f"N={r['N']}, K={r['K']}, {device}"
        rows.append(
            {
                "row": "DeCUR loss fwd+bwd time: cheap vs dense",
                "setting": setting,
                "measured": r["cheap_ms"],
                "baseline": r["dense_ms"],
                "unit": "ms",
                "ratio": r["dense_ms"] / r["cheap_ms"],
                "ratio_meaning": "dense / cheap (speed-up)",
                "target": ">= 20 at N=256, K=8192",
            }
        )
        rows.append(
            {
                "row": "DeCUR loss fwd+bwd peak memory: cheap vs dense",
                "setting": setting,
                "measured": r["cheap_mb"],
                "baseline": r["dense_mb"],
                "unit": "MB",
                "ratio": r["memory_ratio"],
                "ratio_meaning": "dense / cheap",
                "target": ">= 5 at N=256, K=8192",
            }
        )
    return rows


def step_rows(paper: bool, device: str, precision: str, switches: bool) -> list[dict[str, Any]]:
    rows = []
    cfg = step.config(paper, device, precision)
    for r in step.run(cfg) + (step.run_switches(cfg) if switches else []):
        rows.append(
            {
                "row": r["row"],
                "setting": r["setting"],
                "measured": 1e3 * r["measured_s"],
                "baseline": 1e3 * r["baseline_s"],
                "unit": "ms/step",
                "ratio": r["ratio"],
                "ratio_meaning": "measured / baseline",
                "target": r["target"],
            }
        )
    return rows


def augment_rows(device: str) -> list[dict[str, Any]]:
    return [{**r, "ratio_meaning": "batched / per-sample"} for r in augment.run(device=device)]


def rda_rows(paper: bool, device: str) -> list[dict[str, Any]]:
    from decur_lightning.models import create_encoder

    batch, size = (32, 224) if paper else (8, 224)
    x = torch.randn(batch, 13, size, size, device=device)
    times: dict[str, list[float]] = {"resnet50": [], "resnet50_rda": []}
    encoders = {name: create_encoder(name, 13).to(device).train() for name in times}
    for repeat in range(4):
        for name, encoder in encoders.items():
            seconds = rda.time_step(encoder, x, amp=device == "cuda")
            if repeat:
                times[name].append(seconds)
    base, with_rda = statistics.median(times["resnet50"]), statistics.median(times["resnet50_rda"])
    return [
        {
            "row": "ResNet-50 fwd+bwd with RDA vs without",
            "setting": f"13 bands, {size} px, batch {batch}, {device}",
            "measured": 1e3 * with_rda,
            "baseline": 1e3 * base,
            "unit": "ms",
            "ratio": with_rda / base,
            "ratio_meaning": "RDA / plain (overhead)",
            "target": "reported",
        }
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | setting | measured | baseline | unit | ratio | target |", "|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['setting']} | {r['measured']:.1f} | {r['baseline']:.1f} | {r['unit']} | "
            f"{r['ratio']:.2f} ({r['ratio_meaning']}) | {r['target']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="paper-size settings")
    parser.add_argument(
        "--only", nargs="+", choices=["loss", "step", "augment", "rda"], default=["loss", "step", "augment", "rda"]
    )
    parser.add_argument(
        "--switches", action="store_true", help="also measure channels_last and torch.compile (slow: compiles)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sections = [("cpu", "32-true")]
    if torch.cuda.is_available():
        sections.append(("cuda", "bf16-mixed"))
    rows: list[dict[str, Any]] = []
    for device, precision in sections:
        if "loss" in args.only:
            rows += loss_rows(args.paper, device)
        if "step" in args.only:
            rows += step_rows(args.paper, device, precision, args.switches)
        if "augment" in args.only:
            rows += augment_rows(device)
        if "rda" in args.only:
            rows += rda_rows(args.paper, device)
    header = (
        f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`".rstrip() + "\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}. "
        "Medians over repeats; every baseline measured in the same run.\n\n"
    )
    table = header + format_table(rows) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "paper" if args.paper else "default"
    (args.out / f"{name}.md").write_text(table)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
