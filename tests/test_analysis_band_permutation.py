"""Band permutation importance (analysis/band_permutation.py): known answers on hand-built models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decur_lightning.analysis import (
    CommonUniqueOutput,
    band_permutation_importance,
    band_truth_score,
    integrated_gradients,
)

from helpers import tiny_batch, tiny_decur

pytestmark = pytest.mark.usefixtures("one_thread")


class BandMeans(nn.Module):
    """(N, C, H, W) -> (N, C): the mean of each band."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def fixed_projector(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    return layer


class KnownBands(nn.Module):
    """Two modalities whose common block (first 2 dims) reads only band 0, with opposite signs,
    and whose unique block (last 2 dims) reads only band 1; band 2 of 'a' is read by nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.modalities = ("a", "b")
        self.encoder = BandMeans()
        # dims: +band0, -band0 (common); band1, 0.5*band1 (unique)
        self.projectors = nn.ModuleDict(
            {
                "a": fixed_projector([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0]]),
                "b": fixed_projector([[1.0, 0], [-1.0, 0], [0, 1.0], [0, 0.5]]),
            }
        )

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.projectors[modality](self.encoder(x))


def known_batches(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"image_a": torch.rand(n, 3, 8, 8, generator=g), "image_b": torch.rand(n, 2, 8, 8, generator=g)}
        for _ in range(2)
    ]


def test_importance_sits_on_the_bands_each_block_reads():
    result = band_permutation_importance(KnownBands(), known_batches(), max_samples=24, repeats=3, common_dims=2)
    assert set(result) == {"a", "b"}
    assert result["a"]["common"].shape == (3, 3) and result["b"]["unique"].shape == (3, 2)
    torch.testing.assert_close(result["a"]["common"], torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3))
    torch.testing.assert_close(result["a"]["unique"], torch.tensor([[0.0, 1.0, 0.0]]).expand(3, 3))
    torch.testing.assert_close(result["b"]["common"], torch.tensor([[1.0, 0.0]]).expand(3, 2))
    torch.testing.assert_close(result["b"]["unique"], torch.tensor([[0.0, 1.0]]).expand(3, 2))
    truth = {
        "a": {"shared": torch.tensor([1.0, 0, 0]), "private": torch.tensor([0, 1.0, 0])},
        "b": {"shared": torch.tensor([1.0, 0]), "private": torch.tensor([0, 1.0])},
    }
    score = band_truth_score(result, truth)
    assert score["skill"] == pytest.approx(1.0) and score["ranking"] == pytest.approx(1.0)


def test_algorithm_2_mean_output_cancels_where_permutation_finds_the_band():
    """Why the permutation importance: dims of opposite sign cancel in Algorithm 2's block mean,
    so its Integrated Gradients see nothing of band 0; the block change does."""
    pytest.importorskip("captum")
    model = KnownBands()
    x = known_batches()[0]["image_a"]
    head = CommonUniqueOutput(model.encoder, model.projectors["a"], common_dims=2)
    attributions, _ = integrated_gradients(head, x, target=0, n_steps=4)
    assert attributions.abs().max() < 1e-6  # the common output is 0 for every input
    result = band_permutation_importance(model, [{"image_a": x, "image_b": x[:, :2]}], common_dims=2, repeats=1)
    assert result["a"]["common"][0, 0] == pytest.approx(1.0)


def test_seeded_rows_normalised_and_model_state_restored():
    torch.manual_seed(0)
    model = tiny_decur().train()
    batches = [tiny_batch(4)]
    state = torch.random.get_rng_state()
    first = band_permutation_importance(model, batches, repeats=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # local generator only
    assert model.training
    second = band_permutation_importance(model, batches, repeats=2, seed=3)
    for modality, bands in (("sar", 2), ("optical", 4)):
        for output in ("common", "unique"):
            rows = first[modality][output]
            assert rows.shape == (2, bands)
            torch.testing.assert_close(rows.sum(1), torch.ones(2))
            assert (rows >= 0).all()
            torch.testing.assert_close(rows, second[modality][output])


def test_reference_standardises_and_bad_input_is_explained():
    model = KnownBands()
    batches = known_batches()
    # a reference with a huge spread of the first dim: only the second common dim counts, still band 0
    reference = torch.randn(50, 4) * torch.tensor([1e3, 1.0, 1.0, 1.0])
    result = band_permutation_importance(model, batches, reference={"a": reference}, common_dims=2, repeats=1)
    assert result["a"]["common"][0, 0] == pytest.approx(1.0)
    # two samples: the permutation swaps them (never the identity), so every row has its importance
    two = band_permutation_importance(model, batches, max_samples=2, common_dims=2, repeats=4)
    torch.testing.assert_close(two["a"]["common"], torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        band_permutation_importance(model, batches, max_samples=1, common_dims=2)
    with pytest.raises(ValueError, match="repeats"):
        band_permutation_importance(model, batches, repeats=0, common_dims=2)
    with pytest.raises(ValueError, match=r"\(M, 4\)"):
        band_permutation_importance(model, batches, reference=torch.zeros(5, 3), common_dims=2)
    with pytest.raises(ValueError, match="unique block"):
        band_permutation_importance(model, batches, common_dims=4)
    with pytest.raises(KeyError, match="image_b"):
        band_permutation_importance(model, [{"image_a": batches[0]["image_a"]}], common_dims=2)
