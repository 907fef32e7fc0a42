"""t-SNE of embedding dimensions (Fig. 1, Algorithm 2 ``tsne_vis``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decur_lightning.analysis import dimension_tsne, dimension_tsne_figure, save_figure

from test_analysis_alignment import assert_png, constructed_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")


def test_points_and_labels():
    z1, z2 = constructed_embeddings(n=128, common=24, unique=8)
    result = dimension_tsne(z1, z2, common_dims=24, perplexity=10, num_threads=1, max_iter=500)
    assert result.coordinates.shape == (64, 2)  # K points per modality
    assert np.isfinite(result.coordinates).all()
    assert (result.modality == np.array([1] * 32 + [2] * 32)).all()
    expected_common = np.array([True] * 24 + [False] * 8)
    assert (result.common[:32] == expected_common).all() and (result.common[32:] == expected_common).all()


def test_common_dimensions_of_both_modalities_coincide():
    """Common dims are identical (after standardisation) across modalities: their points pair up;
    the unique dims are independent and do not."""
    z1, z2 = constructed_embeddings(n=128, common=24, unique=8)
    result = dimension_tsne(z1, z2, common_dims=24, perplexity=10, num_threads=1, max_iter=500)
    xy = result.coordinates
    pair_distance = np.linalg.norm(xy[:32] - xy[32:], axis=1)
    spread = np.linalg.norm(xy - xy.mean(0), axis=1).mean()
    assert pair_distance[:24].max() < 0.2 * spread
    assert pair_distance[24:].mean() > pair_distance[:24].mean() * 5


def test_figure_written(tmp_path):
    z1, z2 = constructed_embeddings(n=64, common=12, unique=4)
    result = dimension_tsne(z1, z2, common_dims=12, num_threads=1, max_iter=250)
    fig = dimension_tsne_figure(result, ("sar", "optical"))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["sar common", "optical common", "sar unique", "optical unique"]
    assert_png(save_figure(fig, tmp_path / "tsne.png"))


def test_without_decoupling_and_small_embeddings():
    z = torch.randn(32, 3)
    result = dimension_tsne(z, torch.randn(32, 3), common_dims=None, num_threads=1, max_iter=250)
    assert result.coordinates.shape == (6, 2) and result.common.all()  # perplexity capped below 2K
    assert [t.get_text() for t in dimension_tsne_figure(result).axes[0].get_legend().get_texts()] == [
        "modality 1", "modality 2"]


def test_rejects_bad_common_dims():
    with pytest.raises(ValueError, match="common_dims"):
        dimension_tsne(torch.randn(16, 8), torch.randn(16, 8), common_dims=9)
