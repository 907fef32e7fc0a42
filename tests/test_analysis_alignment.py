"""Alignment per dimension (eq. 7): known answers, model path with a comparison model, figures."""

from __future__ import annotations


import matplotlib.image
import numpy as np
import pytest
import torch

from decur_lightning.analysis import (
    alignment_for_model,
    alignment_histogram_figure,
    alignment_loss_per_dimension,
    alignment_statistics,
    collect_embeddings,
    figure_to_array,
    plot_alignment_histogram,
    save_figure,
    summarize,
)

from helpers import tiny_batch, tiny_decur

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def constructed_embeddings(n: int = 2048, common: int = 24, unique: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Common dims: modality 2 is an affine copy of modality 1; unique dims: independent noise."""
    shared = torch.randn(n, common)
    z1 = torch.cat([shared, torch.randn(n, unique)], 1)
    z2 = torch.cat([3 * shared - 1, torch.randn(n, unique)], 1)
    return z1, z2


def test_statistics_of_constructed_embeddings():
    z1, z2 = constructed_embeddings()
    alignment = alignment_loss_per_dimension(z1, z2)
    stats = alignment_statistics(alignment, common_dims=24)
    assert stats["common"]["count"] == 24 and stats["unique"]["count"] == 8 and stats["all"]["count"] == 32
    assert stats["common"]["max"] < 1e-5  # perfectly aligned: (1 - 1)^2
    assert stats["unique"]["mean"] == pytest.approx(1.0, abs=0.08)  # uncorrelated: (1 - 0)^2
    assert stats["common"]["min"] <= stats["common"]["median"] <= stats["common"]["max"]
    assert set(alignment_statistics(alignment, None)) == {"all"}


def test_summarize_values():
    stats = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert stats == pytest.approx({"count": 5, "mean": 3.0, "std": 2**0.5, "min": 1.0, "q25": 2.0,
                                   "median": 3.0, "q75": 4.0, "max": 5.0})
    assert summarize(torch.tensor([])) == {"count": 0}
    assert summarize(torch.tensor([1.0, float("nan"), 3.0]))["mean"] == 2.0  # NaNs are left out


def test_alignment_for_model_equals_eq7_on_collected_embeddings():
    model = tiny_decur()
    batches = [tiny_batch(8), tiny_batch(8)]
    alignment = alignment_for_model(model, batches, max_samples=12)
    z1, z2 = collect_embeddings(model, batches, max_samples=12)
    assert z1.shape == (12, 64)
    torch.testing.assert_close(alignment, alignment_loss_per_dimension(z1, z2))
    assert model.training, "the model's mode must be restored"


def test_comparison_model_end_to_end(tmp_path):
    batches = [tiny_batch(16)]
    decur = tiny_decur()
    barlow_like = tiny_decur(common_ratio=1.0)  # every dimension common, like cross-modal Barlow Twins
    decur_alignment = alignment_for_model(decur, batches)
    comparison = alignment_for_model(barlow_like, batches)
    assert comparison.shape == decur_alignment.shape == (64,)
    path = plot_alignment_histogram(decur_alignment, decur.common_dims, tmp_path / "sub" / "fig5a.png",
                                    comparison=comparison, comparison_label="cross-modal BT")
    assert path == tmp_path / "sub" / "fig5a.png"
    assert_png(path)


def test_histogram_figure_legend_and_array():
    alignment = torch.cat([torch.zeros(24), torch.ones(8)])
    fig = alignment_histogram_figure(alignment, 24, comparison=torch.rand(32), comparison_label="BT")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["common (24)", "unique (8)", "BT"]
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    single = alignment_histogram_figure(alignment, None)
    assert [t.get_text() for t in single.axes[0].get_legend().get_texts()] == ["all dimensions (32)"]


def test_save_figure_writes_png(tmp_path):
    path = save_figure(alignment_histogram_figure(torch.rand(16), 8), tmp_path / "a" / "b.png")
    assert_png(path)


def test_alignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        alignment_loss_per_dimension(torch.randn(8, 4), torch.randn(8, 5))
