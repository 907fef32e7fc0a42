"""Alignment per dimension (eq. 7): known answers, every pair of modalities, a comparison model, figures.

Also the data helpers of the analysis tests (one place to adapt when the datamodules change).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from decur_lightning.analysis import (
    alignment_for_model,
    alignment_histogram_figure,
    alignment_loss_per_dimension,
    alignment_per_pair,
    alignment_statistics,
    check_modality,
    collect_embeddings,
    figure_to_array,
    model_pairs,
    pair_label,
    plot_alignment_histogram,
    save_figure,
    summarize,
)
from decur_lightning.datamodules import SyntheticMultimodalDataModule

from helpers import tiny_batch, tiny_decur

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Band counts of the three-modality tests: SAR + optical + elevation.
THREE = {"sar": 2, "optical": 4, "dem": 1}
THREE_PAIRS = [("sar", "optical"), ("sar", "dem"), ("optical", "dem")]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- data helpers
def synthetic_data(**kwargs: Any) -> SyntheticMultimodalDataModule:
    """The two-modality synthetic datamodule ('sar' 2 bands, 'optical' 4) with the given sizes."""
    return SyntheticMultimodalDataModule(**kwargs)


class ModalityImages(Dataset):
    """Random images ``{"image_<name>": (C, H, W)}`` of any modalities, reproducible."""

    def __init__(self, bands: dict[str, int], num_samples: int = 16, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = {
            f"image_{name}": torch.rand(num_samples, c, size, size, generator=generator) for name, c in bands.items()
        }
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: images[index] for key, images in self.images.items()}


def modality_data(
    bands: dict[str, int] = THREE, num_samples: int = 16, size: int = 32, batch_size: int = 8
) -> L.LightningDataModule:
    """A datamodule of :class:`ModalityImages` (same samples in every split)."""
    dataset = ModalityImages(bands, num_samples, size)
    return L.LightningDataModule.from_datasets(
        train_dataset=dataset, val_dataset=dataset, test_dataset=dataset, batch_size=batch_size
    )


def three_batch(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    return {f"image_{name}": torch.rand(n, c, size, size) for name, c in THREE.items()}


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
    assert stats == pytest.approx(
        {"count": 5, "mean": 3.0, "std": 2**0.5, "min": 1.0, "q25": 2.0, "median": 3.0, "q75": 4.0, "max": 5.0}
    )
    assert summarize(torch.tensor([])) == {"count": 0}
    assert summarize(torch.tensor([1.0, float("nan"), 3.0]))["mean"] == 2.0  # NaNs are left out


def test_alignment_for_model_equals_eq7_on_collected_embeddings():
    model = tiny_decur()
    batches = [tiny_batch(8), tiny_batch(8)]
    alignment = alignment_for_model(model, batches, max_samples=12)
    embeddings = collect_embeddings(model, batches, max_samples=12)
    assert list(embeddings) == ["sar", "optical"] and embeddings["sar"].shape == (12, 64)
    assert list(alignment) == [("sar", "optical")]
    torch.testing.assert_close(
        alignment[("sar", "optical")], alignment_loss_per_dimension(embeddings["sar"], embeddings["optical"])
    )
    model.eval()
    with torch.no_grad():
        expected = model.embed(torch.cat([batches[0]["image_optical"], batches[1]["image_optical"]])[:12], "optical")
    torch.testing.assert_close(embeddings["optical"], expected)
    model.train()
    assert model.training, "the model's mode must be restored"


def test_every_pair_of_three_modalities():
    model = tiny_decur(modalities=THREE)
    batches = [three_batch(8), three_batch(8)]
    alignment = alignment_for_model(model, batches)
    assert list(alignment) == model_pairs(model) == model.encoders.pairs() == THREE_PAIRS
    embeddings = collect_embeddings(model, batches)
    assert set(embeddings) == set(THREE) and all(z.shape == (16, 64) for z in embeddings.values())
    for (m, n), values in alignment.items():
        assert values.shape == (64,)
        torch.testing.assert_close(values, alignment_loss_per_dimension(embeddings[m], embeddings[n]))
    assert [pair_label(pair) for pair in alignment] == ["sar_optical", "sar_dem", "optical_dem"]
    # the three pairs differ (each compares other embeddings) and a subset of pairs can be asked for
    assert not torch.allclose(alignment[("sar", "dem")], alignment[("optical", "dem")])
    only = alignment_per_pair(embeddings, [("optical", "dem")])
    assert list(only) == [("optical", "dem")]
    subset = collect_embeddings(model, batches, modalities=["dem", "sar"])
    assert list(subset) == ["dem", "sar"]
    torch.testing.assert_close(subset["dem"], embeddings["dem"])


def test_modalities_are_addressed_by_name_only():
    model = tiny_decur()
    with pytest.raises(TypeError, match=r"by name.*\['sar', 'optical'\]"):
        check_modality(model, 1)
    with pytest.raises(ValueError, match=r"No modality 'dem'.*\['sar', 'optical'\]"):
        collect_embeddings(model, [tiny_batch(4)], modalities=["dem"])
    with pytest.raises(KeyError, match="image_optical"):
        collect_embeddings(model, [{"image_sar": torch.rand(4, 2, 32, 32)}])
    with pytest.raises(ValueError, match="two modalities"):
        alignment_per_pair({"sar": torch.randn(8, 4)})
    with pytest.raises(TypeError, match="dict name -> embeddings"):
        alignment_loss_per_dimension(*collect_embeddings(model, [tiny_batch(4)]))  # the old z1, z2 unpacking


def test_comparison_model_end_to_end(tmp_path):
    batches = [tiny_batch(16)]
    decur = tiny_decur()
    barlow_like = tiny_decur(common_ratio=1.0)  # every dimension common, like cross-modal Barlow Twins
    decur_alignment = alignment_for_model(decur, batches)[("sar", "optical")]
    comparison = alignment_for_model(barlow_like, batches)[("sar", "optical")]
    assert comparison.shape == decur_alignment.shape == (64,)
    path = plot_alignment_histogram(
        decur_alignment,
        decur.common_dims,
        tmp_path / "sub" / "fig5a.png",
        comparison=comparison,
        comparison_label="cross-modal BT",
    )
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
