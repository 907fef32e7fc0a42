"""Decoupling probes on known answers, and the benchmark script end to end at tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from decur_lightning.analysis.decoupling import probe_factors, ridge_r2, select_alpha

ROOT = Path(__file__).resolve().parents[1]


def test_ridge_r2_known_answers():
    x = torch.randn(400, 6)
    y = torch.stack([2 * x[:, 0] - x[:, 3], torch.randn(400)], 1)
    r2 = ridge_r2(x[:300], y[:300], x[300:], y[300:], alpha=1e-4)
    assert r2[0] > 0.99  # a linear function of the features
    assert r2[1] < 0.05  # noise independent of the features
    dead = torch.cat([x, torch.zeros(400, 1)], 1)  # a dead unit must not break the probe
    assert ridge_r2(dead[:300], y[:300], dead[300:], y[300:], 1e-4)[0] > 0.99


def test_alpha_selection_prefers_strong_penalty_for_noise():
    x = torch.randn(200, 50)
    assert select_alpha(x, torch.randn(200, 1)) >= 1.0
    assert select_alpha(x, x[:, :1] * 3) <= 1e-1


def test_probe_factors_separates_shared_own_and_other_private():
    n = 600
    shared, p1, p2 = torch.randn(n, 3), torch.randn(n, 2), torch.randn(n, 2)
    data = {
        "features_a": torch.cat([shared.abs(), p1.abs(), torch.randn(n, 5)], 1),
        "features_b": torch.cat([shared.abs(), torch.randn(n, 5)], 1),  # b lost its private factors
        "shared": shared,
        "private_a": p1,
        "private_b": p2,
    }
    train = {k: v[:400] for k, v in data.items()}
    test = {k: v[400:] for k, v in data.items()}
    result = probe_factors(train, test)
    assert result["a"]["shared"] > 0.95 and result["a"]["private_own"] > 0.95
    assert result["a"]["private_other"] < 0.05
    assert result["b"]["shared"] > 0.95 and result["b"]["private_own"] < 0.05


def test_benchmark_script_runs_end_to_end_and_pairs_its_seeds(tmp_path):
    out, cache = tmp_path / "results.md", tmp_path / "cache"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "decoupling_benchmark.py"),
        *("--methods", "decur", "barlow_cross", "random"),
        *("--seeds", "0", "1", "--sweep-seeds", "0", "--shares", "0.5", "--ratios", "0.5", "1.0"),
        *("--epochs", "1", "--num-train", "64", "--num-probe", "64", "--few-labels", "32"),
        *("--dim", "32", "--batch-size", "32", "--cache", str(cache), "--out", str(out)),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    for heading in ("## Table 5", "Paired differences", "### Fig. 5a", "## Ratio sweep", "## Estimating"):
        assert heading in text, heading
    assert "| DeCUR |" in text and "| Untrained encoders |" in text
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["runs"]
    compare = [r for r in runs if r["ratio"] == 0.875]
    assert {r["method"] for r in compare} == {"decur", "barlow_cross", "random"}
    for seed in (0, 1):  # paired: every method of a seed starts from the same weights
        assert len({r["init_checksum"] for r in compare if r["seed"] == seed}) == 1
    assert len({r["init_checksum"] for r in compare}) == 2  # and seeds differ
    assert {r["ratio"] for r in runs if r["method"] == "decur"} == {0.5, 0.875, 1.0}
    assert set(runs[0]["probe"]) == {"sar", "optical"} and "private_optical" in runs[0]["fusion"]
    assert "decur:fusion" not in report["verdicts"] and "barlow_cross:fusion" in report["verdicts"]
    for name in ("alignment_training", "alignment_held_out", "sweep"):
        assert (tmp_path / f"results_{name}.png").read_bytes()[:4] == b"\x89PNG"
    # Every run is cached: the report is rebuilt without training.
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(runs)} of {len(runs)} runs cached." in again.stdout
    assert json.loads(out.with_suffix(".json").read_text())["verdicts"] == report["verdicts"]


def test_benchmark_statistics_on_known_numbers():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from decoupling_benchmark import mean_ci, paired
    finally:
        sys.path.remove(str(ROOT / "examples"))
    # t quantile 0.975 with 4 degrees of freedom is 2.7764 (tables); sd of 1..5 is sqrt(2.5).
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and abs(half - 2.7764451 * (2.5**0.5) / 5**0.5) < 1e-6
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.9, 2.6, 3.1, 4.4]
    d = paired(a, b)  # differences 0.5, 0.1, 0.4, 0.9, 0.6: mean 0.5, sd sqrt(0.085)
    t_stat = 0.5 / (0.085**0.5 / 5**0.5)
    assert abs(d["mean"] - 0.5) < 1e-12 and d["wins"] == 5 and d["n"] == 5
    assert abs(d["half"] - 2.7764451 * 0.085**0.5 / 5**0.5) < 1e-6
    assert abs(t_stat - 3.8348) < 1e-3 and abs(d["p"] - 0.018541) < 1e-5  # two-sided p of t = 3.83, 4 dof
