"""Synthetic data with known factors, per-modality views, alignment statistics and PNGs."""

from __future__ import annotations

import pytest
import torch

from decur_lightning.analysis import alignment_loss_per_dimension, plot_alignment_histogram
from decur_lightning.augmentations import VIEW_KINDS, make_view_augmentation, make_view_pair
from decur_lightning.datamodules import SyntheticMultimodalDataModule, SyntheticMultimodalDataset


def test_synthetic_sample_layout_and_ranges():
    ds = SyntheticMultimodalDataset(num_samples=8, modalities=("sar", "optical"), channels=(2, 4), size=32,
                                    num_shared=3, num_private=2)
    sample = ds[0]
    assert set(sample) == {"image_sar", "image_optical", "shared", "private_sar", "private_optical"}
    assert sample["image_sar"].shape == (2, 32, 32) and sample["image_optical"].shape == (4, 32, 32)
    assert sample["image_sar"].dtype == torch.float32
    assert sample["shared"].shape == (3,) and sample["private_optical"].shape == (2,)
    for key in ("image_sar", "image_optical"):
        assert 0.0 <= float(sample[key].min()) and float(sample[key].max()) <= 1.0
    assert len(ds) == 8


def test_synthetic_is_reproducible_and_splits_differ():
    a = SyntheticMultimodalDataset(num_samples=4, seed=3)
    b = SyntheticMultimodalDataset(num_samples=4, seed=3)
    c = SyntheticMultimodalDataset(num_samples=4, seed=4)
    assert torch.equal(a[1]["image_optical"], b[1]["image_optical"])
    assert not torch.equal(a[1]["shared"], c[1]["shared"])
    dm = SyntheticMultimodalDataModule(num_train=16, num_val=8, num_test=8, batch_size=8)
    dm.setup()
    assert not torch.equal(dm.datasets["train"].shared[:8], dm.datasets["val"].shared)


def _ridge_r2(features: torch.Tensor, targets: torch.Tensor, train: int) -> torch.Tensor:
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    y = targets.double()
    w = torch.linalg.solve(x[:train].T @ x[:train] + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), x[:train].T @ y[:train])
    residual = ((x[train:] @ w - y[train:]) ** 2).sum(0)
    return 1 - residual / ((y[train:] - y[train:].mean(0)) ** 2).sum(0)


def _texture_features(images: torch.Tensor) -> torch.Tensor:
    """Band means and per-band power spectrum (crop- and phase-invariant statistics)."""
    spectrum = torch.fft.rfft2(images - images.mean((-2, -1), keepdim=True)).abs().flatten(-2)
    return torch.cat([images.mean((-2, -1)), spectrum.flatten(1)], 1)


def test_factors_are_in_the_images_and_private_ones_only_in_their_modality():
    ds = SyntheticMultimodalDataset(num_samples=600, channels=(2, 4), size=16, noise=0.02)
    f_sar, f_opt = _texture_features(ds.images[0]), _texture_features(ds.images[1])
    # The shared factors' magnitudes are recoverable from either modality, private ones from their own only.
    r2_shared = _ridge_r2(f_sar, ds.shared.abs(), 500)
    r2_private_own = _ridge_r2(f_opt, ds.private[1].abs(), 500)
    r2_private_other = _ridge_r2(f_sar, ds.private[1].abs(), 500)
    assert r2_shared.mean() > 0.5
    assert r2_private_own.mean() > 0.5
    assert r2_private_other.mean() < 0.1


def test_synthetic_validation():
    with pytest.raises(ValueError, match="must differ"):
        SyntheticMultimodalDataset(modalities=("a", "a"))
    with pytest.raises(ValueError, match="exactly two"):
        SyntheticMultimodalDataset(modalities=("a", "b", "c"))


CASES = [(kind, c) for kind in VIEW_KINDS for c in (1, 2, 3, 13) if "rgb" not in kind or c == 3]


@pytest.mark.parametrize(("kind", "channels"), CASES)
def test_view_pipelines_keep_bands_and_range(kind, channels):
    x = torch.rand(6, channels, 40, 40)
    xa, xb = make_view_pair(kind, size=24)(x)
    assert xa.shape == xb.shape == (6, channels, 24, 24)
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert not torch.equal(xa, xb)


def test_dem_views_are_geometric_only():
    # a geometric-only pipeline with full-area crop and no resize only permutes pixels
    aug = make_view_augmentation("dem", size=16, scale=(1.0, 1.0))
    x = torch.rand(4, 1, 16, 16)
    y = aug(x)
    torch.testing.assert_close(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values, atol=1e-5, rtol=0)


def test_unknown_view_kind():
    with pytest.raises(ValueError, match="Unknown view augmentation kind 'thermal'"):
        make_view_augmentation("thermal", 32)  # type: ignore[arg-type]


def test_alignment_loss_known_answers(tmp_path):
    z = torch.randn(512, 32)
    aligned = alignment_loss_per_dimension(z, 2 * z + 1)
    assert float(aligned.max()) < 1e-6
    independent = alignment_loss_per_dimension(z, torch.randn(512, 32))
    assert abs(float(independent.mean()) - 1.0) < 0.05
    anti = alignment_loss_per_dimension(z, -z)
    torch.testing.assert_close(anti, torch.full((32,), 4.0), atol=1e-4, rtol=0)
    path = plot_alignment_histogram(torch.cat([aligned[:24], independent[24:]]), 24, tmp_path / "h.png",
                                    comparison=independent)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
