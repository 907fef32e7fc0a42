"""t-SNE of embedding dimensions (Fig. 1, Algorithm 2 ``tsne_vis``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_analysis_alignment import assert_png, constructed_embeddings

from decur_lightning.analysis import dimension_tsne, dimension_tsne_figure, save_figure, tsne_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_points_and_labels():
    z1, z2 = constructed_embeddings(n=128, common=24, unique=8)
    result = dimension_tsne({"sar": z1, "optical": z2}, common_dims=24, perplexity=10, num_threads=1, max_iter=500)
    assert result.coordinates.shape == (64, 2)  # K points per modality
    assert np.isfinite(result.coordinates).all()
    assert result.modalities == ("sar", "optical")
    assert (result.modality == np.array(["sar"] * 32 + ["optical"] * 32)).all()
    expected_common = np.array([True] * 24 + [False] * 8)
    assert (result.common[:32] == expected_common).all() and (result.common[32:] == expected_common).all()


def test_common_dimensions_of_both_modalities_coincide():
    """Common dims are identical (after standardisation) across modalities: their points pair up;
    the unique dims are independent and do not."""
    z1, z2 = constructed_embeddings(n=128, common=24, unique=8)
    result = dimension_tsne({"sar": z1, "optical": z2}, common_dims=24, perplexity=10, num_threads=1, max_iter=500)
    xy = result.coordinates
    pair_distance = np.linalg.norm(xy[:32] - xy[32:], axis=1)
    spread = np.linalg.norm(xy - xy.mean(0), axis=1).mean()
    assert pair_distance[:24].max() < 0.2 * spread
    assert pair_distance[24:].mean() > pair_distance[:24].mean() * 5


def test_figure_written(tmp_path):
    z1, z2 = constructed_embeddings(n=64, common=12, unique=4)
    result = dimension_tsne({"sar": z1, "optical": z2}, common_dims=12, num_threads=1, max_iter=250)
    fig = dimension_tsne_figure(result)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["sar common", "optical common", "sar unique", "optical unique"]
    assert_png(save_figure(fig, tmp_path / "tsne.png"))


def test_three_modalities_in_one_map(tmp_path):
    """Three modalities share their common block: every modality's common dimension i lands on
    the same spot; each modality's unique dimensions are its own; markers and shades per modality."""
    n, common, unique = 128, 16, 8
    shared = torch.randn(n, common)
    embeddings = {
        name: torch.cat([scale * shared + 1, torch.randn(n, unique)], 1)
        for name, scale in (("sar", 1.0), ("optical", 2.0), ("dem", 0.5))
    }
    result = dimension_tsne(embeddings, common_dims=common, perplexity=10, num_threads=1, max_iter=500)
    k = common + unique
    assert result.coordinates.shape == (3 * k, 2) and result.modalities == ("sar", "optical", "dem")
    assert (result.modality[2 * k :] == "dem").all() and result.common.sum() == 3 * common
    xy = result.coordinates
    spread = np.linalg.norm(xy - xy.mean(0), axis=1).mean()
    for other in (1, 2):
        assert np.linalg.norm(xy[:common] - xy[other * k : other * k + common], axis=1).max() < 0.2 * spread
    fig = dimension_tsne_figure(result)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "sar common",
        "optical common",
        "dem common",
        "sar unique",
        "optical unique",
        "dem unique",
    ]
    collections = fig.axes[0].collections
    assert len({tuple(c.get_facecolor()[0]) for c in collections}) == 6  # a shade per modality and kind
    assert_png(save_figure(fig, tmp_path / "tsne3.png"))


def test_without_decoupling_and_small_embeddings():
    z = torch.randn(32, 3)
    result = dimension_tsne({"rgb": z, "dem": torch.randn(32, 3)}, common_dims=None, num_threads=1, max_iter=250)
    assert result.coordinates.shape == (6, 2) and result.common.all()  # perplexity capped below 2K
    assert [t.get_text() for t in dimension_tsne_figure(result).axes[0].get_legend().get_texts()] == ["rgb", "dem"]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="common_dims"):
        dimension_tsne({"a": torch.randn(16, 8), "b": torch.randn(16, 8)}, common_dims=9)
    with pytest.raises(TypeError, match="mapping modality name"):
        dimension_tsne(torch.randn(16, 8), torch.randn(16, 8))  # the numbered z1, z2 call of 0.1
    with pytest.raises(ValueError, match="two or more modalities"):
        dimension_tsne({"a": torch.randn(16, 8)}, common_dims=None)
    with pytest.raises(ValueError, match="same shape"):
        dimension_tsne({"a": torch.randn(16, 8), "b": torch.randn(16, 4)}, common_dims=None)


def test_one_map_unless_the_pairs_differ_in_common_dims():
    names = ("sar", "optical", "dem")
    same = {("sar", "optical"): 48, ("sar", "dem"): 48, ("optical", "dem"): 48}
    assert tsne_groups(names, same) == {"": (names, 48)}
    assert tsne_groups(names[:2], {("sar", "optical"): None}) == {"": (names[:2], None)}
    differ = {**same, ("sar", "dem"): 32}
    assert tsne_groups(names, differ) == {
        "_sar_optical": (("sar", "optical"), 48),
        "_sar_dem": (("sar", "dem"), 32),
        "_optical_dem": (("optical", "dem"), 48),
    }
