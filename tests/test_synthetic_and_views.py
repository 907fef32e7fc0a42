"""Synthetic data with known factors, per-modality views, alignment statistics and PNGs."""

from __future__ import annotations

import math

import pytest
import torch

from decur_lightning.analysis import alignment_loss_per_dimension, plot_alignment_histogram
from decur_lightning.augmentations import VIEW_KINDS, make_view_augmentation, make_view_pair
from decur_lightning.datamodules import SyntheticMultimodalDataModule, SyntheticMultimodalDataset
from decur_lightning.datamodules.synthetic import private_band_weights


def test_synthetic_sample_layout_and_ranges():
    ds = SyntheticMultimodalDataset(
        num_samples=8, modalities={"sar": 2, "optical": 4}, size=32, num_shared=3, num_private=2
    )
    sample = ds[0]
    assert list(sample) == ["image_sar", "image_optical", "shared", "private_sar", "private_optical"]
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


def _checksums(tensors: list[torch.Tensor]) -> tuple[float, float]:
    """Sum and position-weighted sum (catches permutations) of stacked samples, in float64."""
    t = torch.stack(tensors).double().flatten()
    weights = torch.arange(1, t.numel() + 1, dtype=torch.float64) / t.numel()
    return float(t.sum()), float((t * weights).sum())


# Checksums computed with the code of version 0.1 (before modalities became a mapping, commit
# 25d8920, modalities=("sar", "optical"), channels=(2, 4)). The quickstart's results depend on
# these tensors: the default two-modality data must stay the same for the same seeds. (Checked
# bit for bit against tensors saved from that code; the sums allow for float rounding of other
# CPUs.)
UNCHANGED_DATASET_16 = {
    "image_sar": (16051.366266469005, 8340.789210793791),
    "image_optical": (33685.582129329734, 17106.018654657986),
    "shared": (5.003015995025635, 2.4655150547623634),
    "private_sar": (-2.971626043319702, -0.964463621377945),
    "private_optical": (2.7493555545806885, 0.9365171976387501),
}
UNCHANGED_QUICKSTART_TRAIN = {
    "image_sar": (1044098.2801117902, 525098.0450229889),
    "image_optical": (2100585.864656436, 1049164.0573585834),
    "shared": (-39.2271386384964, -36.24441545479931),
    "private_sar": (15.751619458198547, -2.201513847510796),
    "private_optical": (10.755813241004944, 5.2833209543605335),
}


def test_default_two_modality_data_is_unchanged():
    ds = SyntheticMultimodalDataset(num_samples=16)
    assert list(ds[0]) == list(UNCHANGED_DATASET_16)
    for key, expected in UNCHANGED_DATASET_16.items():
        assert _checksums([ds[i][key] for i in range(16)]) == pytest.approx(expected, rel=1e-9, abs=1e-9), key
    assert float(ds[3]["image_sar"][1, 5, 7]) == pytest.approx(0.4706838130950928, abs=1e-7)
    assert float(ds[11]["image_optical"][2, 30, 1]) == pytest.approx(0.9316784739494324, abs=1e-7)
    # The training split of examples/configs/quickstart.yaml's datamodule.
    dm = SyntheticMultimodalDataModule(
        modality_specs={"sar": 2, "optical": 4}, size=32, num_train=1024, num_val=256, batch_size=64
    )
    dm.setup("fit")
    train = dm.datasets["train"]
    for key, expected in UNCHANGED_QUICKSTART_TRAIN.items():
        assert _checksums([train[i][key] for i in range(len(train))]) == pytest.approx(expected, rel=1e-9), key


THREE = {"sar": 2, "optical": 4, "elevation": {"bands": 1, "view": "dem"}}


def test_three_modality_batches_shapes_and_keys():
    dm = SyntheticMultimodalDataModule(
        modality_specs=THREE,
        subset_shared={"sar_elevation": ["sar", "elevation"]},
        num_shared=3,
        num_private=2,
        num_subset_shared=1,
        size=16,
        num_train=16,
        num_val=8,
        num_test=8,
        batch_size=8,
    )
    assert dm.modalities == ("sar", "optical", "elevation")
    batch = next(iter(dm.train_dataloader()))
    assert list(batch) == [
        "image_sar",
        "image_optical",
        "image_elevation",
        "shared",
        "private_sar",
        "private_optical",
        "private_elevation",
        "shared_sar_elevation",
    ]
    assert batch["image_sar"].shape == (8, 2, 16, 16)
    assert batch["image_optical"].shape == (8, 4, 16, 16)
    assert batch["image_elevation"].shape == (8, 1, 16, 16)
    assert batch["shared"].shape == (8, 3) and batch["private_elevation"].shape == (8, 2)
    assert batch["shared_sar_elevation"].shape == (8, 1)
    for name, spec in dm.modality_specs.items():
        assert batch[f"image_{name}"].shape[1] == spec.bands
        assert 0.0 <= float(batch[f"image_{name}"].min()) and float(batch[f"image_{name}"].max()) <= 1.0
    val = next(iter(dm.val_dataloader()))
    assert set(val) == set(batch) and not torch.equal(val["shared"], batch["shared"])


def test_synthetic_modality_specs():
    specs = SyntheticMultimodalDataModule().modality_specs
    assert list(specs) == ["sar", "optical"]
    assert (specs["sar"].bands, specs["sar"].view) == (2, "sar")
    assert (specs["optical"].bands, specs["optical"].view) == (4, "optical")
    assert all(spec.encoder is None and spec.weights is None and spec.band_names is None for spec in specs.values())
    dm = SyntheticMultimodalDataModule(modality_specs={**THREE, "thermal": {"bands": 2, "band_names": ["T1", "T2"]}})
    specs = dm.modality_specs
    assert list(specs) == ["sar", "optical", "elevation", "thermal"]
    assert [spec.bands for spec in specs.values()] == [2, 4, 1, 2]
    assert [spec.view for spec in specs.values()] == ["sar", "optical", "dem", "generic"]
    assert specs["thermal"].band_names == ["T1", "T2"]
    specs["sar"].bands = 99  # a copy: the datamodule keeps its description
    assert dm.modality_specs["sar"].bands == 2
    default = SyntheticMultimodalDataModule()
    default.hparams.modality_specs["sar"] = 7  # the hyper-parameters hold a copy of the shared default
    assert SyntheticMultimodalDataModule().modality_specs["sar"].bands == 2


def test_factor_sharing_across_three_modalities():
    """Shared factors are in every modality, a subset's in its members only, a private one in its own only."""
    ds = SyntheticMultimodalDataset(
        num_samples=1200, modalities=THREE, size=16, noise=0.02, subset_shared={"sar_elevation": ["sar", "elevation"]}
    )
    groups = {
        "shared": (ds.shared, {"sar", "optical", "elevation"}),
        "shared_sar_elevation": (ds.subset_shared["sar_elevation"], {"sar", "elevation"}),
    }
    groups.update({f"private_{name}": (ds.private[name], {name}) for name in ds.modalities})
    for name, images in ds.images.items():
        # Band means and the band-averaged amplitude spectrum: crop- and phase-invariant statistics
        # from which a factor's magnitude is recoverable when the modality renders it.
        spectrum = torch.fft.rfft2(images - images.mean((-2, -1), keepdim=True)).abs().mean(1).flatten(1)
        features = torch.cat([images.mean((-2, -1)), spectrum], 1)
        for group, (factors, members) in groups.items():
            r2 = _ridge_r2(features, factors.abs(), 1000)
            if name in members:  # random loadings may render one factor faintly, not the group
                assert float(r2.max()) > 0.8 and float(r2.mean()) > 0.3, (name, group, r2)
            else:
                assert float(r2.max()) < 0.05, (name, group, r2)


def test_synthetic_yaml_three_modalities():
    """The YAML of a three-modality run parses (LightningCLI's jsonargparse) into the datamodule."""
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    config = """
data:
  class_path: decur_lightning.datamodules.SyntheticMultimodalDataModule
  init_args:
    modality_specs:
      sar: 2
      optical: 4
      elevation: {bands: 1, view: dem}
    subset_shared:
      sar_elevation: [sar, elevation]
"""
    parser = ArgumentParser()
    parser.add_argument("--data", type=LightningDataModule)
    dm = parser.instantiate_classes(parser.parse_string(config)).data
    assert isinstance(dm, SyntheticMultimodalDataModule)
    assert {name: (spec.bands, spec.view) for name, spec in dm.modality_specs.items()} == {
        "sar": (2, "sar"),
        "optical": (4, "optical"),
        "elevation": (1, "dem"),
    }
    dm.setup()
    assert set(dm.datasets["train"][0]) >= {"image_elevation", "private_elevation", "shared_sar_elevation"}


def _ridge_r2(features: torch.Tensor, targets: torch.Tensor, train: int) -> torch.Tensor:
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    y = targets.double()
    w = torch.linalg.solve(
        x[:train].T @ x[:train] + 1e-3 * torch.eye(x.shape[1], dtype=x.dtype), x[:train].T @ y[:train]
    )
    residual = ((x[train:] @ w - y[train:]) ** 2).sum(0)
    return 1 - residual / ((y[train:] - y[train:].mean(0)) ** 2).sum(0)


def _texture_features(images: torch.Tensor) -> torch.Tensor:
    """Band means and per-band power spectrum (crop- and phase-invariant statistics)."""
    spectrum = torch.fft.rfft2(images - images.mean((-2, -1), keepdim=True)).abs().flatten(-2)
    return torch.cat([images.mean((-2, -1)), spectrum.flatten(1)], 1)


def test_factors_are_in_the_images_and_private_ones_only_in_their_modality():
    ds = SyntheticMultimodalDataset(num_samples=600, modalities={"sar": 2, "optical": 4}, size=16, noise=0.02)
    f_sar, f_opt = _texture_features(ds.images["sar"]), _texture_features(ds.images["optical"])
    # The shared factors' magnitudes are recoverable from either modality, private ones from their own only.
    r2_shared = _ridge_r2(f_sar, ds.shared.abs(), 500)
    r2_private_own = _ridge_r2(f_opt, ds.private["optical"].abs(), 500)
    r2_private_other = _ridge_r2(f_sar, ds.private["optical"].abs(), 500)
    assert r2_shared.mean() > 0.5
    assert r2_private_own.mean() > 0.5
    assert r2_private_other.mean() < 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modalities": {"sar": 2}}, ValueError, "at least two modalities"),
        ({"modalities": ("sar", "optical")}, TypeError, r"is now \{'sar': 2, 'optical': 4\}"),
        ({"modalities": {"sar": 2, "image-optical": 4}}, ValueError, "identifiers"),
        ({"modalities": {"sar": 0, "optical": 4}}, ValueError, "positive int"),
        ({"modalities": {"sar": 2, "optical": {"view": "optical"}}}, ValueError, "band count"),
        ({"modalities": {"sar": 2, "optical": {"bands": 4, "encoder": "resnet18"}}}, ValueError, "not the data's"),
        ({"modalities": {"sar": 2, "optical": {"bands": 4, "view": "thermal"}}}, ValueError, "view='thermal'"),
        ({"modalities": {"sar": 2, "optical": "4"}}, TypeError, "band count or a dict"),
        ({"modalities": THREE, "subset_shared": {"s": ["sar", "sar"]}}, ValueError, "more than once"),
        ({"modalities": THREE, "subset_shared": {"s": ["sar", "lidar"]}}, ValueError, "not among the modalities"),
        ({"modalities": THREE, "subset_shared": {"s": ["sar"]}}, ValueError, "at least two"),
        ({"modalities": THREE, "subset_shared": {"s": ["sar", "optical", "elevation"]}}, ValueError, "not all 3"),
        (
            {"modalities": THREE, "subset_shared": {"a": ["sar", "optical"], "b": ["optical", "sar"]}},
            ValueError,
            "same modalities",
        ),
        ({"modalities": THREE, "subset_shared": {"a": "sar"}}, TypeError, "list of modality names"),
        ({"num_private": -1}, ValueError, "num_private must be a non-negative int"),
    ],
)
def test_synthetic_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyntheticMultimodalDataset(**kwargs)
    data_kwargs = {("modality_specs" if key == "modalities" else key): value for key, value in kwargs.items()}
    with pytest.raises(error, match=match):  # the datamodule fails when built, not at setup
        SyntheticMultimodalDataModule(**data_kwargs)


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
    path = plot_alignment_histogram(
        torch.cat([aligned[:24], independent[24:]]), 24, tmp_path / "h.png", comparison=independent
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _grating_power(images: torch.Tensor, frequency: float, angle: float) -> torch.Tensor:
    """Per image and band: the amplitude of the grating of one (frequency, orientation) channel."""
    size = images.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    coord = (xs * math.cos(angle) + ys * math.sin(angle)) / size
    cos, sin = torch.cos(2 * math.pi * frequency * coord), torch.sin(2 * math.pi * frequency * coord)
    centred = images - images.mean(dim=(-2, -1), keepdim=True)
    return ((centred * cos).mean(dim=(-2, -1)) ** 2 + (centred * sin).mean(dim=(-2, -1)) ** 2).sqrt()


def test_structure_rendering_puts_factors_in_known_bands():
    """rendering='structure' (issue 18): each factor sets the contrast of its own grating, so its
    sign survives (linear in the factor, not in |factor|), in the bands the truth names."""
    ds = SyntheticMultimodalDataset(num_samples=256, rendering="structure", private_share=0.5, seed=1)
    truth = ds.band_truth
    assert truth["sar"]["shared"].tolist() == [1.0, 0.0] and truth["sar"]["private"].tolist() == [0.0, 1.0]
    assert truth["optical"]["private"].tolist() == [0.0, 0.0, 1.0, 1.0]
    # shared factor 0: grating at 2.5 cycles, 0 degrees; private factor 0: 5.5 cycles, 0 degrees
    shared = _grating_power(ds.images["sar"], 2.5, 0.0)
    private = _grating_power(ds.images["sar"], 5.5, 0.0)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert corr(shared[:, 0], ds.shared[:, 0]) > 0.9  # the shared band carries the shared factor, sign included
    assert abs(corr(shared[:, 1], ds.shared[:, 0])) < 0.2  # the private band does not
    assert corr(private[:, 1], ds.private["sar"][:, 0]) > 0.9
    assert abs(corr(private[:, 0], ds.private["sar"][:, 0])) < 0.2
    optical = _grating_power(ds.images["optical"], 2.5, 0.0)
    assert corr(optical[:, 0], ds.shared[:, 0]) > 0.9  # the other sensor sees the same shared factor
    for images in ds.images.values():
        assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.08  # visible, not faint


def test_private_share_settings_and_errors():
    assert private_band_weights(4, 0.25).tolist() == [0, 0, 0, 1]
    assert private_band_weights(2, 0.25).tolist() == [0, 0.5]
    assert private_band_weights(4, 0.0).tolist() == [0, 0, 0, 0]
    for share in (0.0, 0.25, 0.5):
        ds = SyntheticMultimodalDataset(num_samples=2, rendering="structure", private_share=share)
        for truth in ds.band_truth.values():
            assert float(truth["private"].mean()) == pytest.approx(share)
            torch.testing.assert_close(
                truth["shared"] + truth["private"] + truth["subset_shared"], torch.ones_like(truth["shared"])
            )
    per_modality = SyntheticMultimodalDataset(num_samples=2, rendering="structure", private_share={"sar": 0.0})
    assert per_modality.band_truth["sar"]["private"].tolist() == [0, 0]
    assert per_modality.band_truth["optical"]["private"].tolist() == [0, 0, 1, 1]  # the default 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SyntheticMultimodalDataset(num_samples=2, rendering="structure", private_share=1.0)
    with pytest.raises(ValueError, match="rendering='structure'"):
        SyntheticMultimodalDataModule(private_share=0.25)
    with pytest.raises(ValueError, match="rendering must be one of"):
        SyntheticMultimodalDataModule(rendering="stripes")
    with pytest.raises(ValueError, match="not among the modalities"):
        SyntheticMultimodalDataModule(rendering="structure", private_share={"dem": 0.5})
    with pytest.raises(ValueError, match="num_private"):
        SyntheticMultimodalDataset(num_samples=2, rendering="structure", num_private=0)
    three = SyntheticMultimodalDataset(
        num_samples=4,
        modalities={"sar": 2, "optical": 4, "dem": 1},
        subset_shared={"sar_dem": ["sar", "dem"]},
        rendering="structure",
        private_share=0.0,
    )
    assert (
        float(three.band_truth["sar"]["subset_shared"].sum()) > 0
        and float(three.band_truth["optical"]["subset_shared"].sum()) == 0
    )


def test_datamodule_band_truth_texture_and_structure():
    texture = SyntheticMultimodalDataModule().band_truth  # the default rendering: every band mixes
    for truth in texture.values():
        torch.testing.assert_close(
            truth["shared"] + truth["private"] + truth["subset_shared"], torch.ones_like(truth["shared"])
        )
        assert (truth["shared"] > 0).all() and (truth["private"] > 0).all()
    dm = SyntheticMultimodalDataModule(rendering="structure", private_share=0.25, num_train=8, num_val=8, num_test=8)
    before = dm.band_truth
    dm.setup()
    assert dm.band_truth["optical"]["private"].tolist() == [0, 0, 0, 1] == before["optical"]["private"].tolist()
    assert dm.hparams.rendering == "structure" and dm.hparams.private_share == 0.25
