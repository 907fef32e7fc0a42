"""ruff (configured in pyproject.toml) finds nothing to lint or to reformat."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("ruff")
    command = [executable] if executable else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_is_clean():
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_public_name_numbers_a_modality():
    """Issue 13's check: modalities are named, never numbered 1/2, in code, examples, notebooks, README."""
    import re

    pattern = re.compile(r"(encoder|in_channels|modality|weights|augmentation)[12]\b")
    paths = [*(ROOT / "decur_lightning").rglob("*.py"), *(ROOT / "examples").rglob("*"),
             *(ROOT / "notebooks").glob("*.ipynb"), ROOT / "README.md"]  # fmt: skip
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in paths
        if path.is_file()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
