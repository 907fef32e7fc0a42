"""Decoupling benchmark: the paper's claims tested on synthetic data with a known answer.

Data: :class:`~decur_lightning.datamodules.SyntheticMultimodalDataModule` with
``rendering="structure"``: two 4-band modalities ("sar", "optical"), four latent factors per
modality, one home band each (brightness and grating contrast). A share ``p`` of each
modality's factors and bands is private (``p = 0.5``: 2 shared + 2 private factors; ``p = 0.25``:
3 + 1), so the share of common information is ``1 - p`` in factors, in bands and in signal
variance alike: the ``common_ratio`` the data says DeCUR should use.

Parts (all by default):

* ``compare``: Table 5 on this data, ``--seeds`` paired seeds (per seed the same data and the
  same initial encoder and projector weights for every method; a checksum of the initial
  weights is recorded): DeCUR, DeCUR without intra-modal terms, without decoupling, cross-modal
  Barlow Twins (without both), untrained encoders, and the paper's other cross-modal baselines
  (SimCLR, CLIP, VICReg). Linear (ridge) probes on each modality's
  frozen encoder features predict the shared factors and that modality's private factors;
  a late-fusion probe on both modalities' features predicts all factors, with all probe labels
  and with few. Fig. 5a: the per-dimension alignment loss (eq. 7) of DeCUR against cross-modal
  Barlow Twins, on training samples and on held-out samples.
* ``sweep``: Fig. 3a on data with a known answer: DeCUR at ``--ratios`` for each private share in
  ``--shares``, ``--sweep-seeds`` seeds; where does the downstream (late-fusion probe) optimum sit?
* ``estimate``: :func:`decur_lightning.analysis.estimate_common_ratio` on untrained encoders and on
  one cross-modal Barlow Twins run per share and seed, against the known share and the sweep's best.

    python examples/decoupling_benchmark.py                 # full mode, writes docs/decoupling_results.md
    python examples/decoupling_benchmark.py --quick         # < 10 min on 2 CPU cores (2 runs at a time), writes runs/decoupling_quick/
    python examples/decoupling_benchmark.py --jobs 2        # two runs at a time (one thread each)

Every run's result is cached as JSON under ``--cache`` (keyed by its settings), so an interrupted
benchmark resumes where it stopped and ``--report-only`` rebuilds the report from the cache.
Writes ``--out`` (Markdown tables and claim-by-claim verdicts), a JSON with every run, and figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from decur_lightning import DeCURModule
from decur_lightning.analysis import alignment_loss_per_dimension, collect_embeddings, estimate_common_ratio
from decur_lightning.analysis.alignment import alignment_histogram_figure
from decur_lightning.analysis.decoupling import extract_features, probe_factors, probe_fusion
from decur_lightning.analysis.plotting import save_figure
from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.ssl import CLIPModule, CrossModalBarlowTwinsModule, SimCLRCrossModule, VICRegCrossModule

#: The two modalities: 4 bands each, crop-and-flip views (the factors are band brightness and
#: contrast, which colour jitter would scramble).
MODALITIES = {"sar": {"bands": 4, "view": "generic"}, "optical": {"bands": 4, "view": "generic"}}
FACTORS = 4  # latent factors per modality, one home band each
DEFAULT_RATIO = 0.875  # DeCURModule's default common_ratio (the paper's SAR-optical value), not tuned here

METHODS: dict[str, str] = {
    "random": "Untrained encoders",
    "decur": "DeCUR",
    "no_intra": "DeCUR w/o intra-modal terms",
    "no_decouple": "DeCUR w/o decoupling",
    "barlow_cross": "Cross-modal Barlow Twins (w/o intra & decoupling)",
    "simclr_cross": "SimCLR (cross-modal)",
    "clip": "CLIP",
    "vicreg_cross": "VICReg (cross-modal)",
}
TABLE5 = ["decur", "no_intra", "no_decouple", "barlow_cross", "random"]
#: The comparison's methods: Table 5's, then the paper's other cross-modal baselines.
COMPARE = [*TABLE5, "simclr_cross", "clip", "vicreg_cross"]


def factor_counts(share: float) -> tuple[int, int]:
    """(shared, private) factors per modality for a private share ``p`` (``p * 4`` must be whole)."""
    private = share * FACTORS
    if abs(private - round(private)) > 1e-9:
        raise ValueError(f"private shares are multiples of 1/{FACTORS} here; got {share}.")
    return FACTORS - round(private), round(private)


def datamodule(share: float, seed: int, args: argparse.Namespace) -> SyntheticMultimodalDataModule:
    shared, private = factor_counts(share)
    dm = SyntheticMultimodalDataModule(
        modality_specs=MODALITIES,
        rendering="structure",
        private_share=share,
        num_shared=shared,
        num_private=private,
        size=args.size,
        num_train=args.num_train,
        num_val=args.num_probe,
        num_test=args.num_probe,
        batch_size=args.batch_size,
        seed=seed,
    )
    dm.setup()
    return dm


def build(method: str, ratio: float, args: argparse.Namespace) -> torch.nn.Module:
    """The method's module; built eagerly (band counts given) so the initial weights depend on the seed only."""
    settings = dict(
        modalities={name: spec["bands"] for name, spec in MODALITIES.items()},
        encoder="resnet18",
        projector_dims=(args.dim, args.dim, args.dim),
        crop_size=args.size,
        crop_scale=(0.5, 1.0),
        warmup_epochs=1,
        optimizer="adamw",
        lr=1e-3,
        weight_decay=1e-4,
    )
    baselines = {
        "barlow_cross": CrossModalBarlowTwinsModule,
        "simclr_cross": SimCLRCrossModule,
        "clip": CLIPModule,
        "vicreg_cross": VICRegCrossModule,
    }
    if method in baselines:
        return baselines[method](**settings)
    extra = {"no_intra": {"intra": False}, "no_decouple": {"decouple": False}}.get(method, {})
    return DeCURModule(common_ratio=ratio, **settings, **extra)


def run_key(spec: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class OtherView(torch.utils.data.Dataset):
    """Another view of a split: every image rotated by 180 degrees (a horizontal and a vertical flip,
    which keep grating orientations) and its central 3/4 resized back (a crop)."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[index])
        for key, image in sample.items():
            if key.startswith("image_"):
                size = image.shape[-1]
                margin = size // 8
                crop = image.flip(-1, -2)[:, margin : size - margin, margin : size - margin]
                sample[key] = torch.nn.functional.interpolate(
                    crop[None], size=(size, size), mode="bilinear", align_corners=False
                )[0]
        return sample


def estimates(result: dict[str, Any], cache: Path) -> dict[str, float]:
    """The common-ratio estimates of one run, from its saved features."""
    path = cache / f"{run_key({k: result[k] for k in ('method', 'share', 'ratio', 'seed', 'settings')})}.pt"
    if not path.exists():
        return {}
    saved = torch.load(path, weights_only=True)
    f, v, z = saved["features"], saved["view_features"], saved["embeddings"]
    names = list(f)
    a, b = (f[n].float() for n in names)
    start = time.perf_counter()
    out = {
        "predictability": estimate_common_ratio(a, b).ratio,
        "predictability_view": estimate_common_ratio(
            a, b, z_m_view=v[names[0]].float(), z_n_view=v[names[1]].float()
        ).ratio,
        "alignment": estimate_common_ratio(*(z[n].float() for n in names), method="alignment").ratio,
    }
    out["seconds"] = (time.perf_counter() - start) / 3
    return out


def one_run(spec: dict[str, Any], cache: str, threads: int) -> dict[str, Any]:
    """Pretrain one method on one data set and seed, probe it, cache and return the result."""
    path = Path(cache) / f"{run_key(spec)}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(threads)
    args = argparse.Namespace(**spec["settings"])
    dm = datamodule(spec["share"], spec["seed"], args)
    L.seed_everything(spec["seed"], verbose=False)
    model = build(spec["method"], spec["ratio"], args)
    # equal across the methods of a seed (encoders and projectors; CLIP adds its temperature)
    init = sum(
        float(p.detach().double().sum()) for part in (model.encoders, model.projectors) for p in part.parameters()
    )
    start = time.perf_counter()
    if spec["method"] != "random":
        L.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        ).fit(model, dm)
    train_seconds = time.perf_counter() - start
    fit = extract_features(model, DataLoader(dm.datasets["val"], batch_size=256))
    test = extract_features(model, DataLoader(dm.datasets["test"], batch_size=256))
    result: dict[str, Any] = dict(spec, init_checksum=init, train_seconds=train_seconds)
    result["probe"] = probe_factors(fit, test, target="value")
    result["fusion"] = probe_fusion(fit, test)
    result["fusion_few"] = probe_fusion({k: v[: args.few_labels] for k, v in fit.items()}, test)
    names = list(MODALITIES)
    held = collect_embeddings(model, DataLoader(dm.datasets["test"], batch_size=256), args.num_probe)
    seen = collect_embeddings(model, DataLoader(dm.datasets["train"], batch_size=256), args.num_probe)
    result["alignment"] = {
        "held_out": alignment_loss_per_dimension(*held.values()).tolist(),
        "training": alignment_loss_per_dimension(*seen.values()).tolist(),
    }
    # Features for the common-ratio estimators (computed in the report, so they can be revisited
    # without retraining): both splits, another view of them, and the held-out embeddings.
    views = [OtherView(dm.datasets[split]) for split in ("val", "test")]
    saved = {
        "features": {n: torch.cat([fit[f"features_{n}"], test[f"features_{n}"]]).half() for n in names},
        "view_features": {
            n: torch.cat(
                [extract_features(model, DataLoader(v, batch_size=256))[f"features_{n}"] for v in views]
            ).half()
            for n in names
        },
        "embeddings": {n: z.half() for n, z in held.items()},
    }
    Path(cache).mkdir(parents=True, exist_ok=True)
    torch.save(saved, path.with_suffix(".pt"))
    result["common_dims"] = int(model.common_dims_of(*names)) if spec["method"] in ("decur", "no_intra") else args.dim
    Path(cache).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- statistics


def t_quantile(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t interval."""
    if len(values) < 2:
        return (values[0] if values else float("nan")), float("nan")
    return statistics.mean(values), t_quantile(len(values)) * statistics.stdev(values) / math.sqrt(len(values))


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired difference a - b over seeds: mean, 95 % interval, paired t-test p, wins of a."""
    from scipy.stats import ttest_rel

    diff = [x - y for x, y in zip(a, b, strict=True)]
    mean, half = mean_ci(diff)
    p = float(ttest_rel(a, b).pvalue) if len(a) > 1 and any(d != diff[0] for d in diff) else float("nan")
    return {"mean": mean, "half": half, "p": p, "wins": sum(d > 0 for d in diff), "n": len(diff)}


def fmt(mean: float, half: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_pair(d: dict[str, float]) -> str:
    p = "" if math.isnan(d["p"]) else f", p = {d['p']:.3g}"
    return (
        f"{d['mean']:+.4f} [{d['mean'] - d['half']:+.4f}, {d['mean'] + d['half']:+.4f}]{p}, {d['wins']}/{d['n']} seeds"
    )


METRICS = {
    "fusion": ("late fusion, all factors", lambda r: r["fusion"]["all"]),
    "fusion_few": ("late fusion, few labels", lambda r: r["fusion_few"]["all"]),
    "shared": ("shared (mean of modalities)", lambda r: statistics.mean(r["probe"][m]["shared"] for m in MODALITIES)),
    "private": (
        "own private (mean of modalities)",
        lambda r: statistics.mean(r["probe"][m]["private_own"] for m in MODALITIES),
    ),
}


def block_median(result: dict[str, Any], split: str, block: str) -> float:
    values = result["alignment"][split]
    k = result["common_dims"]
    part = values[:k] if block == "common" else values[k:]
    return statistics.median(part) if part else float("nan")


# --------------------------------------------------------------------------- the benchmark


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = {
        k: getattr(args, k) for k in ("epochs", "num_train", "num_probe", "batch_size", "size", "dim", "few_labels")
    }
    runs: list[dict[str, Any]] = []

    def add(method: str, share: float, ratio: float, seed: int) -> None:
        spec = dict(method=method, share=share, ratio=ratio, seed=seed, settings=settings)
        if spec not in runs:
            runs.append(spec)

    if "compare" in args.parts:
        for seed in args.seeds:
            for method in args.methods:
                add(method, args.share, args.ratio, seed)
    if "sweep" in args.parts:
        for share in args.shares:
            for seed in args.sweep_seeds:
                for ratio in args.ratios:
                    add("decur", share, ratio, seed)
    if "estimate" in args.parts:
        for share in args.shares:
            for seed in args.sweep_seeds:
                add("random", share, args.ratio, seed)
                add("barlow_cross", share, args.ratio, seed)
    return runs


def select(runs: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return sorted(
        (
            r
            for r in runs
            if all(math.isclose(r[k], v) if isinstance(v, float) else r[k] == v for k, v in where.items())
        ),
        key=lambda r: r["seed"],
    )


def compare_section(runs: list[dict[str, Any]], args: argparse.Namespace, lines: list[str]) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    by = {m: select(runs, method=m, share=args.share, ratio=args.ratio) for m in args.methods}
    by = {m: rs for m, rs in by.items() if rs}
    if "decur" not in by:
        return verdicts
    seeds = [r["seed"] for r in by["decur"]]
    # distinct initial-weight checksums per seed over the methods (1: every method starts from the same weights)
    checks = {s: len({r["init_checksum"] for m in by for r in by[m] if r["seed"] == s}) for s in seeds}
    lines += [
        f"## Table 5 on data with a known answer (private share {args.share}, common_ratio {args.ratio})",
        "",
        f"R^2 of ridge probes on frozen encoder features, mean ± 95 % t-interval over seeds {seeds} "
        f"(paired: one data set and one set of initial weights per seed for every method; initial-weight "
        f"checksums per seed: {sorted(set(checks.values()))} distinct value(s)).",
        "",
        "| method | " + " | ".join(label for label, _ in METRICS.values()) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for m, rs in by.items():
        cells = [fmt(*mean_ci([f(r) for r in rs])) for _, f in METRICS.values()]
        lines.append(f"| {METHODS[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences, DeCUR minus each method (mean [95 % interval], paired t-test, seeds where DeCUR is higher):",
        "",
    ]
    lines += [
        "| DeCUR minus | " + " | ".join(label for label, _ in METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for m, rs in by.items():
        if m == "decur":
            continue
        row = []
        for key, (_, f) in METRICS.items():
            common = [s for s in seeds if s in {r["seed"] for r in rs}]
            d = paired([f(r) for r in by["decur"] if r["seed"] in common], [f(r) for r in rs if r["seed"] in common])
            verdicts[f"{m}:{key}"] = d
            row.append(fmt_pair(d))
        lines.append(f"| {METHODS[m]} | " + " | ".join(row) + " |")
    lines += ["", "### Fig. 5a: alignment loss per dimension (eq. 7), median over dimensions", ""]
    lines += ["| method | split | common dims | unique dims | all dims |", "|---|---|---:|---:|---:|"]
    for m in ("decur", "no_decouple", "barlow_cross"):
        for split in ("training", "held_out"):
            if m not in by:
                continue
            common = mean_ci([block_median(r, split, "common") for r in by[m]])
            unique = [block_median(r, split, "unique") for r in by[m]]
            every = mean_ci([statistics.median(r["alignment"][split]) for r in by[m]])
            u = "–" if all(math.isnan(v) for v in unique) else fmt(*mean_ci(unique))
            lines.append(f"| {METHODS[m]} | {split.replace('_', '-')} | {fmt(*common)} | {u} | {fmt(*every)} |")
            verdicts[f"align:{m}:{split}"] = {"common": common, "all": every}
    if "barlow_cross" in by:
        for split in ("training", "held_out"):
            a = [block_median(r, split, "common") for r in by["decur"]]
            b = [
                statistics.median(sorted(r["alignment"][split])[: r_decur["common_dims"]])
                for r, r_decur in zip(by["barlow_cross"], by["decur"], strict=True)
            ]
            verdicts[f"align_diff:{split}"] = paired(b, a)  # positive: DeCUR's common dims better aligned
        lines += [
            "",
            "Paired difference of the median alignment loss, cross-modal Barlow Twins' best-aligned "
            f"{by['decur'][0]['common_dims']} dimensions minus DeCUR's common dimensions (positive: DeCUR's common "
            f"dimensions better aligned): training {fmt_pair(verdicts['align_diff:training'])}; held-out "
            f"{fmt_pair(verdicts['align_diff:held_out'])}.",
        ]
    lines.append("")
    return verdicts


def sweep_section(runs: list[dict[str, Any]], args: argparse.Namespace, lines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for share in args.shares:
        rs = [r for r in select(runs, method="decur", share=share) if r["seed"] in args.sweep_seeds]
        ratios = sorted({r["ratio"] for r in rs})
        if len(ratios) < 2:
            continue
        lines += [
            f"## Ratio sweep, private share {share} (the data's common share: {1 - share})",
            "",
            "| common_ratio | " + " | ".join(label for label, _ in METRICS.values()) + " |",
            "|---:|" + "---:|" * len(METRICS),
        ]
        curves: dict[str, dict[float, list[float]]] = {key: {} for key in METRICS}
        for ratio in ratios:
            at = [r for r in rs if math.isclose(r["ratio"], ratio)]
            cells = []
            for key, (_, f) in METRICS.items():
                curves[key][ratio] = [f(r) for r in at]
                cells.append(fmt(*mean_ci(curves[key][ratio])))
            lines.append(f"| {ratio:.3f} | " + " | ".join(cells) + " |")
        best: dict[str, Any] = {}
        for key in ("fusion", "fusion_few"):
            per_seed = []
            for seed in args.sweep_seeds:
                values = {r["ratio"]: METRICS[key][1](r) for r in rs if r["seed"] == seed}
                if values:
                    per_seed.append(max(values, key=values.__getitem__))
            mean_curve = {ratio: statistics.mean(v) for ratio, v in curves[key].items()}
            best[key] = {
                "per_seed": per_seed,
                "of_mean": max(mean_curve, key=mean_curve.__getitem__),
                "curve": mean_curve,
            }
        lines += [
            "",
            f"Best ratio (late fusion, all labels): of the mean curve {best['fusion']['of_mean']:.3f}, per seed "
            f"{[round(v, 3) for v in best['fusion']['per_seed']]}; few labels: of the mean curve "
            f"{best['fusion_few']['of_mean']:.3f}, per seed {[round(v, 3) for v in best['fusion_few']['per_seed']]}. "
            f"The data's answer: {1 - share}.",
            "",
        ]
        out[share] = {"curves": curves, "best": best}
    return out


def estimate_section(
    runs: list[dict[str, Any]], args: argparse.Namespace, sweep: dict[str, Any], lines: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lines += [
        "## Estimating the common ratio without the sweep",
        "",
        "`decur_lightning.analysis.estimate_common_ratio` on the encoder features (`predictability`) or the "
        "projector embeddings (`alignment`, threshold 0.5) of 2 x "
        f"{args.num_probe} held-out samples (`predictability_view`: divided by what another view of the same "
        "samples predicts, see the function), mean ± 95 % interval over the sweep's seeds (n per row). Error: "
        "estimate minus the data's common share, and minus the sweep's best ratio (of the mean curve, late "
        "fusion). Cost: the training runs the estimate needs, against the sweep's.",
        "",
        "| private share | source | method | n | estimate | error vs data | error vs sweep best | cost |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    sweep_runs = len(args.ratios) * len(args.sweep_seeds)
    timings: list[float] = []
    for share in args.shares:
        best = sweep.get(share, {}).get("best", {}).get("fusion", {}).get("of_mean")
        for method, source, cost in (
            ("random", "untrained encoders", "0 runs (one forward pass)"),
            ("barlow_cross", "one cross-modal BT run", f"1 run = 1/{len(args.ratios)} of the sweep per seed"),
            ("decur", f"one DeCUR run (ratio {args.ratio})", f"1 run = 1/{len(args.ratios)} of the sweep per seed"),
        ):
            rs = [
                r for r in select(runs, method=method, share=share, ratio=args.ratio) if r["seed"] in args.sweep_seeds
            ]
            if not rs:
                continue
            per_run = [estimates(r, args.cache) for r in rs]
            per_run = [e for e in per_run if e]
            timings.extend(e["seconds"] for e in per_run)
            if not per_run:
                continue
            for how in ("predictability", "predictability_view", "alignment"):
                if how == "alignment" and method != "barlow_cross":
                    continue
                values = [e[how] for e in per_run]
                mean, half = mean_ci(values)
                err_best = "–" if best is None else f"{mean - best:+.3f}"
                lines.append(
                    f"| {share} | {source} | {how} | {len(values)} | {fmt(mean, half)} | {mean - (1 - share):+.3f} | "
                    f"{err_best} | {cost} |"
                )
                out[f"{share}:{method}:{how}"] = {
                    "values": values,
                    "mean": mean,
                    "error": mean - (1 - share),
                    "best": best,
                }
    estimator_seconds = statistics.mean(s for s in timings) if timings else float("nan")
    sweep_seconds = {
        share: sum(
            r["train_seconds"] for r in select(runs, method="decur", share=share) if r["seed"] in args.sweep_seeds
        )
        for share in args.shares
    }
    lines += [
        "",
        f"The sweep itself: {sweep_runs} pretraining runs per private share "
        + ", ".join(f"{share}: {sec / 60:.0f} min of training" for share, sec in sweep_seconds.items())
        + f"; one estimate takes {estimator_seconds:.1f} s on the saved features (one thread).",
        "",
    ]
    return out


def figures(runs: list[dict[str, Any]], args: argparse.Namespace, sweep: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    seed = args.seeds[0]
    decur = select(runs, method="decur", share=args.share, ratio=args.ratio, seed=seed)
    cross = select(runs, method="barlow_cross", share=args.share, ratio=args.ratio, seed=seed)
    if decur and cross:
        for split, label in (("training", "training samples"), ("held_out", "held-out samples")):
            fig = alignment_histogram_figure(
                torch.tensor(decur[0]["alignment"][split]),
                decur[0]["common_dims"],
                comparison=torch.tensor(cross[0]["alignment"][split]),
                comparison_label="cross-modal Barlow Twins (all dims)",
                title=f"Alignment per dimension (eq. 7), {label}, seed {seed}",
            )
            written.append(save_figure(fig, out.with_name(f"{out.stem}_alignment_{split}.png")))
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, ("fusion", "fusion_few"), strict=True):
            for share, data in sweep.items():
                ratios = sorted(data["curves"][key])
                means = [mean_ci(data["curves"][key][r])[0] for r in ratios]
                halves = [mean_ci(data["curves"][key][r])[1] for r in ratios]
                line = ax.errorbar(
                    ratios,
                    means,
                    yerr=[0 if math.isnan(h) else h for h in halves],
                    marker="o",
                    capsize=3,
                    label=f"private share {share}",
                )
                ax.axvline(1 - share, color=line[0].get_color(), linestyle="--", alpha=0.6)
            ax.set_xlabel("common_ratio (K_c / K)")
            ax.set_ylabel("R^2, late-fusion probe, all factors")
            ax.set_title(METRICS[key][0] + " (dashed: the data's common share)", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out.with_name(f"{out.stem}_sweep.png")))
    return written


def report(runs: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    out = args.out
    train = sum(r["train_seconds"] for r in runs)
    lines = [
        "# Decoupling benchmark: results (generated)",
        "",
        f"Command: `python examples/decoupling_benchmark.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Data: two 4-band modalities, 4 factors each ({FACTORS} home bands), `rendering='structure'`; "
        f"{args.num_train} training samples at {args.size} px. Pretraining: resnet18 encoders, projector "
        f"{args.dim}-{args.dim}-{args.dim}, batch {args.batch_size}, {args.epochs} epochs, AdamW lr 1e-3, crop "
        f"and flip views. Probes: ridge (penalty chosen on a hold-out of the fitting split) fit on {args.num_probe} "
        f"held-out samples ({args.few_labels} for 'few labels'), scored on {args.num_probe} others; targets are the "
        "signed factor values. "
        f"{len(runs)} runs, {train / 60:.1f} min of training; this invocation {seconds / 60:.1f} min "
        "(cached runs cost nothing).",
        "",
    ]
    verdicts = compare_section(runs, args, lines)
    sweep = sweep_section(runs, args, lines)
    estimate_results = estimate_section(runs, args, sweep, lines) if "estimate" in args.parts else {}
    written = figures(runs, args, sweep, out)
    lines += ["Figures: " + ", ".join(f"`{p.name}`" for p in written), ""]
    text = "\n".join(lines)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {k: v if isinstance(v, (int, float, str, list)) else str(v) for k, v in vars(args).items()},
                "verdicts": verdicts,
                "sweep": {str(k): {"best": v["best"]} for k, v in sweep.items()},
                "estimates": estimate_results,
                "runs": [{k: v for k, v in r.items() if k != "alignment"} for r in runs],
            },
            indent=1,
            default=str,
        )
    )
    return text


QUICK = dict(
    methods=TABLE5,
    seeds=[0, 1],
    sweep_seeds=[0],
    shares=[0.5],
    ratios=[0.25, 1.0],
    num_probe=512,
    jobs=min(2, os.cpu_count() or 1),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version, < 10 min on 2 CPU cores")
    parser.add_argument(
        "--parts", nargs="+", default=["compare", "sweep", "estimate"], choices=["compare", "sweep", "estimate"]
    )
    parser.add_argument("--methods", nargs="+", default=COMPARE, choices=COMPARE, help="methods of the comparison")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds of the comparison")
    parser.add_argument("--sweep-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--share", type=float, default=0.5, help="private share of the comparison's data")
    parser.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5], help="private shares of the sweep")
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
        help="common ratios of the sweep",
    )
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="DeCUR's common_ratio in the comparison")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--num-probe", type=int, default=1024)
    parser.add_argument("--few-labels", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--cache", type=Path, default=None, help="run cache (default: runs/decoupling_cache)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the cached runs")
    parser.add_argument(
        "--out", type=Path, default=None, help="default docs/decoupling_results.md (quick: runs/decoupling_quick/)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.out is None:
        args.out = Path("runs/decoupling_quick/results.md") if args.quick else Path("docs/decoupling_results.md")
    args.cache = args.cache or Path("runs/decoupling_cache")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for share in (args.share, *args.shares):
        factor_counts(share)

    start = time.perf_counter()
    specs = plan(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs: list[dict[str, Any]] = []
    if args.report_only:
        for spec in specs:
            path = args.cache / f"{run_key(spec)}.json"
            if path.exists():
                runs.append(json.loads(path.read_text()))
        print(f"{len(runs)} of {len(specs)} runs cached.")
    elif args.jobs == 1:
        for i, spec in enumerate(specs):
            runs.append(one_run(spec, str(args.cache), threads))
            print(
                f"[{i + 1}/{len(specs)}] {spec['method']} share {spec['share']} ratio {spec['ratio']} seed {spec['seed']}: "
                f"fusion R^2 {runs[-1]['fusion']['all']:.3f} ({runs[-1]['train_seconds']:.0f} s)",
                flush=True,
            )
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(one_run, spec, str(args.cache), threads) for spec in specs]
            for i, future in enumerate(futures):
                runs.append(future.result())
                print(f"[{i + 1}/{len(specs)}] {runs[-1]['method']} seed {runs[-1]['seed']} done", flush=True)
    print(report(runs, args, time.perf_counter() - start))


if __name__ == "__main__":
    main()
