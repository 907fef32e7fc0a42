"""GradCAM / Integrated Gradients saliency of the common and unique outputs (Algorithm 2, Fig. 6)."""

from __future__ import annotations

import sys

import pytest
import torch

from decur_lightning.analysis import (
    COMMON,
    UNIQUE,
    CommonUniqueOutput,
    band_importance,
    band_importance_figure,
    default_target_layer,
    gradcam,
    integrated_gradients,
    overlap_histogram_figure,
    saliency_analysis,
    saliency_examples_figure,
    saliency_overlap,
    save_figure,
)

from helpers import tiny_batch, tiny_decur
from test_analysis_alignment import assert_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = tiny_decur()
    # Non-trivial batch-norm statistics, so the network is not positively homogeneous and
    # Integrated Gradients has a real integral to approximate.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    return model


def test_head_outputs_mean_of_common_and_unique_dims(model):
    x = tiny_batch(4)["image_sar"]
    model.eval()
    with torch.no_grad():
        z = model.embed(x, 1)
        out = CommonUniqueOutput.from_model(model, "sar")(x)
        reference = torch.randn(32, 64) * 2 + 1
        standardised = CommonUniqueOutput.from_model(model, 1, reference)(x)
    model.train()
    torch.testing.assert_close(out, torch.stack([z[:, :48].mean(1), z[:, 48:].mean(1)], 1))
    zs = (z - reference.mean(0)) / (reference.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(standardised, torch.stack([zs[:, :48].mean(1), zs[:, 48:].mean(1)], 1))


def test_head_needs_unique_dimensions():
    with pytest.raises(ValueError, match="no unique"):
        CommonUniqueOutput.from_model(tiny_decur(common_ratio=1.0), 1)
    with pytest.raises(ValueError, match="modality"):
        CommonUniqueOutput.from_model(tiny_decur(), "dem")


def test_default_layer_is_last_resnet_stage(model):
    assert default_target_layer(model.encoder1) is model.encoder1.layer4
    with pytest.raises(ValueError, match="layer="):
        default_target_layer(torch.nn.Linear(2, 2))


def test_gradcam_shape_and_relu(model):
    head = CommonUniqueOutput.from_model(model, 2)
    x = tiny_batch(3, size=64)["image_optical"]
    maps = gradcam(head, x, COMMON)  # layer4: 2 x 2 at 64 px, upsampled
    assert maps.shape == (3, 64, 64)
    assert (maps >= 0).all()
    coarse = gradcam(head, x, UNIQUE, layer="layer3", upsample=False)
    assert coarse.shape == (3, 4, 4) and (coarse >= 0).all()
    assert model.training, "gradcam must restore the model's mode"


def test_gradcam_warns_on_one_pixel_maps(model):
    head = CommonUniqueOutput.from_model(model, 1)
    with pytest.warns(UserWarning, match="1 x 1"):
        gradcam(head, tiny_batch(2)["image_sar"], COMMON)


def test_gradcam_works_inside_inference_mode(model):
    head = CommonUniqueOutput.from_model(model, 1)
    with torch.inference_mode():
        x = tiny_batch(2)["image_sar"]
        maps = gradcam(head, x, UNIQUE, layer="layer3")
    assert maps.shape == (2, 32, 32)


def test_overlap_score_identical_scaled_and_disjoint():
    maps = torch.rand(4, 16, 16)
    torch.testing.assert_close(saliency_overlap(maps, maps), torch.ones(4))
    torch.testing.assert_close(saliency_overlap(maps, 5 * maps), torch.ones(4))
    left, right = torch.zeros(4, 16, 16), torch.zeros(4, 16, 16)
    left[:, :, :8], right[:, :, 8:] = 1.0, 1.0
    torch.testing.assert_close(saliency_overlap(left, right), torch.zeros(4))
    half = saliency_overlap(left, torch.ones(4, 16, 16))
    torch.testing.assert_close(half, torch.full((4,), 0.5**0.5))
    # undefined where a map is zero everywhere (nothing for GradCAM's ReLU to keep)
    assert saliency_overlap(torch.zeros(2, 8, 8), torch.rand(2, 8, 8)).isnan().all()
    assert saliency_overlap(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)).isnan().all()
    # maps of different sizes are compared at the first map's size
    torch.testing.assert_close(saliency_overlap(torch.ones(2, 8, 8), torch.ones(2, 4, 4)), torch.ones(2))


def test_integrated_gradients_completeness(model):
    """Attributions sum to head(x) - head(baseline) (completeness), up to captum's convergence
    delta, which shrinks as the path integral gets more steps."""
    x = tiny_batch(3)["image_optical"]
    model.eval()
    with torch.no_grad():
        reference = model.embed(tiny_batch(16)["image_optical"], 2)
    model.train()
    head = CommonUniqueOutput.from_model(model, 2, reference)
    for target in (COMMON, UNIQUE):
        attributions, delta = integrated_gradients(head, x, target, n_steps=128)
        coarse_delta = integrated_gradients(head, x, target, n_steps=8)[1]
        assert attributions.shape == x.shape
        head.eval()
        with torch.no_grad():
            change = head(x)[:, target] - head(torch.zeros_like(x))[:, target]
        head.train()
        scale = float(change.abs().max())
        assert scale > 1e-3
        assert (delta.abs() < 0.05 * scale).all(), (delta, change)
        assert delta.abs().mean() < coarse_delta.abs().mean()
        total = attributions.sum(dim=(1, 2, 3))
        torch.testing.assert_close(total, change, atol=0.05 * scale, rtol=0)
        torch.testing.assert_close(total - change, delta, atol=1e-4 * scale + 1e-6, rtol=0)


def test_band_importance_normalised_per_sample():
    attributions = torch.randn(5, 4, 8, 8)
    attributions[:, 2] *= 10
    scores = band_importance(attributions)
    assert scores.shape == (5, 4)
    assert (scores >= 0).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(5))
    expected = attributions.mean(dim=(2, 3)).abs()
    torch.testing.assert_close(scores, expected / expected.sum(1, keepdim=True))
    assert band_importance(torch.zeros(1, 3, 2, 2)).eq(0).all()


def test_missing_captum_names_the_install_command(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    head = CommonUniqueOutput.from_model(model, 1)
    x = tiny_batch(2)["image_sar"]
    with pytest.raises(ImportError, match=r"pip install decur-lightning\[analysis\]"):
        gradcam(head, x, COMMON)
    with pytest.raises(ImportError, match=r"pip install decur-lightning\[analysis\]"):
        integrated_gradients(head, x, COMMON)


def test_saliency_analysis_and_figures(model, tmp_path):
    batches = [tiny_batch(3, size=64), tiny_batch(3, size=64)]
    result = saliency_analysis(model, batches, max_samples=5, layers=("layer3", None), ig_steps=8, num_examples=2)
    assert result.num_samples == 5
    for name in ("common", "unique"):
        overlap = result.overlap[name]
        defined = overlap[~overlap.isnan()]
        assert overlap.shape == (5,) and ((defined >= 0) & (defined <= 1 + 1e-6)).all()
        assert result.band_importance["sar"][name].shape == (5, 2)
        assert result.band_importance["optical"][name].shape == (5, 4)
        torch.testing.assert_close(result.band_importance["optical"][name].sum(1), torch.ones(5))
        assert result.relative_delta["sar"][name].shape == (5,)
    assert result.examples["images"]["sar"].shape == (2, 2, 64, 64)
    assert result.examples["maps"]["optical"]["unique"].shape == (2, 64, 64)
    assert_png(save_figure(overlap_histogram_figure(result.overlap), tmp_path / "overlap.png"))
    partly_undefined = {"common": torch.tensor([0.2, float("nan")]), "unique": torch.tensor([float("nan")] * 2)}
    legend = overlap_histogram_figure(partly_undefined).axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend] == ["common (mean 0.20), 1 undefined", "unique, 2 undefined"]
    bands = band_importance_figure(result.band_importance, {"optical": ["B2", "B3", "B4", "B8"]})
    assert [t.get_text() for t in bands.axes[1].get_xticklabels()] == ["B2", "B3", "B4", "B8"]
    assert_png(save_figure(bands, tmp_path / "bands.png"))
    assert_png(save_figure(saliency_examples_figure(result), tmp_path / "examples.png"))
    without_examples = saliency_analysis(model, batches[:1], max_samples=2, ig_steps=2, num_examples=0,
                                         layers=("layer3", "layer3"))
    assert without_examples.examples == {} and without_examples.num_samples == 2
    with pytest.raises(ValueError, match="num_examples"):
        saliency_examples_figure(without_examples)
    with pytest.raises(ValueError, match="band_names"):
        band_importance_figure(result.band_importance, {"sar": ["VV"]})
