"""The notebooks run top to bottom (nbclient, python3 kernel) and are stored without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail(
            "No 'python3' Jupyter kernelspec: install ipykernel into this environment "
            "(pip install -e '.[dev]'), which provides it."
        )
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    # One OpenMP thread per kernel: on a shared or busy CPU, spinning torch/scikit-learn threads
    # make the notebooks several times slower.
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list[str]:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


@pytest.mark.parametrize("name", ["quickstart.ipynb", "explainability.ipynb"])
def test_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs before committing"


def test_quickstart_runs(tmp_path):
    notebook = execute("quickstart.ipynb", tmp_path)
    text = "".join(outputs(notebook, "stream"))
    assert "exported encoder reproduces the pretrained one: True" in text
    assert len(outputs(notebook, "image/png")) == 1  # the alignment histogram
    run = tmp_path / "quickstart_run"
    assert (run / "exported" / "encoder_sar.pt").is_file() and (run / "exported" / "encoder_optical.pt").is_file()
    assert list(run.rglob("alignment_histogram.png"))


def test_explainability_runs(tmp_path):
    notebook = execute("explainability.ipynb", tmp_path)
    assert len(outputs(notebook, "image/png")) == 5  # alignment, t-SNE, overlap, examples, band importance
    analysis = tmp_path / "explainability_run" / "analysis"
    assert (analysis / "statistics.json").is_file() and (analysis / "band_importance.png").is_file()
