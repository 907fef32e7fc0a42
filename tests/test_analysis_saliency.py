"""GradCAM / Integrated Gradients saliency of the common and unique outputs (Algorithm 2, Fig. 6)."""

from __future__ import annotations

import sys

import pytest
import torch
from test_analysis_alignment import THREE, THREE_PAIRS, assert_png, three_batch

from decur_lightning.analysis import (
    COMMON,
    UNIQUE,
    CommonUniqueOutput,
    band_importance,
    band_importance_figure,
    band_truth_score,
    default_target_layer,
    degenerate_maps,
    gradcam,
    integrated_gradients,
    modality_common_dims,
    overlap_histogram_figure,
    saliency_analysis,
    saliency_examples_figure,
    saliency_overlap,
    save_figure,
    select_target_layer,
    stage_layers,
)

from helpers import tiny_batch, tiny_decur

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
        z = model.embed(x, "sar")
        out = CommonUniqueOutput.from_model(model, "sar")(x)
        reference = torch.randn(32, 64) * 2 + 1
        standardised = CommonUniqueOutput.from_model(model, "sar", reference)(x)
        narrower = CommonUniqueOutput.from_model(model, "sar", common_dims=16)(x)
    model.train()
    torch.testing.assert_close(out, torch.stack([z[:, :48].mean(1), z[:, 48:].mean(1)], 1))
    zs = (z - reference.mean(0)) / (reference.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(standardised, torch.stack([zs[:, :48].mean(1), zs[:, 48:].mean(1)], 1))
    torch.testing.assert_close(narrower, torch.stack([z[:, :16].mean(1), z[:, 16:].mean(1)], 1))


def test_head_needs_unique_dimensions_and_a_modality_name():
    with pytest.raises(ValueError, match="no unique"):
        CommonUniqueOutput.from_model(tiny_decur(common_ratio=1.0), "sar")
    with pytest.raises(ValueError, match=r"No modality 'dem'.*\['sar', 'optical'\]"):
        CommonUniqueOutput.from_model(tiny_decur(), "dem")
    with pytest.raises(TypeError, match="by name"):
        CommonUniqueOutput.from_model(tiny_decur(), 1)  # numbered modalities are gone


def test_common_dims_of_a_modality_with_per_pair_counts():
    model = tiny_decur(modalities=THREE, common_dims={"sar-optical": 48, "sar-dem": 32, "optical-dem": 48})
    assert modality_common_dims(model, "optical") == 48
    with pytest.raises(ValueError, match=r"different common-dimension counts.*common_dims="):
        modality_common_dims(model, "sar")
    assert CommonUniqueOutput.from_model(model, "sar", common_dims=32).common_dims == 32


def test_default_layer_is_last_resnet_stage(model):
    assert default_target_layer(model.encoders["sar"]) is model.encoders["sar"].layer4
    with pytest.raises(ValueError, match="layer="):
        default_target_layer(torch.nn.Linear(2, 2))


def test_gradcam_shape_and_relu(model):
    head = CommonUniqueOutput.from_model(model, "optical")
    x = tiny_batch(3, size=64)["image_optical"]
    maps = gradcam(head, x, COMMON)  # layer4: 2 x 2 at 64 px, upsampled
    assert maps.shape == (3, 64, 64)
    assert (maps >= 0).all()
    coarse = gradcam(head, x, UNIQUE, layer="layer3", upsample=False)
    assert coarse.shape == (3, 4, 4) and (coarse >= 0).all()
    assert model.training, "gradcam must restore the model's mode"


def test_gradcam_warns_on_one_pixel_maps(model):
    head = CommonUniqueOutput.from_model(model, "sar")
    with pytest.warns(UserWarning, match="1 x 1"):
        gradcam(head, tiny_batch(2)["image_sar"], COMMON, layer="layer4")


def test_layer_choice_gives_maps_of_at_least_4x4(model):
    """At 32 px a ResNet's layer4 is 1 x 1 and layer3 2 x 2: the default moves to layer2 (4 x 4);
    at 128 px the last stage is 4 x 4 and is kept (issue 18)."""
    encoder = model.encoders["sar"]
    assert [name for name, _ in stage_layers(encoder)] == ["layer4", "layer3", "layer2", "layer1"]
    small = select_target_layer(encoder, tiny_batch(2, size=32)["image_sar"])
    assert (small.name, small.map_size, small.module) == ("layer2", (4, 4), encoder.layer2)
    assert not small.degenerate
    large = select_target_layer(encoder, tiny_batch(1, size=128)["image_sar"])
    assert (large.name, large.map_size) == ("layer4", (4, 4))
    given = select_target_layer(encoder, tiny_batch(1)["image_sar"], "layer4")
    assert (given.name, given.map_size, given.degenerate) == ("layer4", (1, 1), True)
    # tiny inputs: no stage reaches 4 x 4; the largest maps are taken and flagged when 1 x 1
    tiny = select_target_layer(encoder, torch.rand(1, 2, 8, 8))
    assert (tiny.name, tiny.map_size, tiny.degenerate) == ("layer1", (2, 2), False)
    assert encoder.training, "the probe must restore the encoder's mode"
    maps = gradcam(CommonUniqueOutput.from_model(model, "sar"), tiny_batch(3)["image_sar"], COMMON, upsample=False)
    assert maps.shape == (3, 4, 4)


def test_degenerate_maps_are_zero_or_constant():
    maps = torch.rand(4, 8, 8)
    maps[1] = 0.0
    maps[2] = 0.7  # an upsampled 1 x 1 map
    assert degenerate_maps(maps).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        degenerate_maps(torch.rand(8, 8))


def test_band_truth_score_rewards_importance_on_the_right_bands():
    truth = {"sar": {"shared": torch.tensor([1.0, 0.0]), "private": torch.tensor([0.0, 1.0])}}
    right = {"sar": {"common": torch.tensor([[0.9, 0.1], [0.7, 0.3]]), "unique": torch.tensor([[0.2, 0.8]])}}
    score = band_truth_score(right, truth)
    common = score["per_modality"]["sar"]["common"]
    assert common["on_truth"] == pytest.approx(0.8) and common["chance"] == pytest.approx(0.5)
    assert common["skill"] == pytest.approx(0.6) and common["ranking"] == 1.0
    assert score["per_modality"]["sar"]["unique"]["skill"] == pytest.approx(0.6)
    assert score["skill"] == pytest.approx(0.6) and score["ranking"] == 1.0
    wrong = {"sar": {"common": torch.tensor([[0.1, 0.9]]), "unique": torch.tensor([[0.5, 0.5]])}}
    score = band_truth_score(wrong, truth)
    assert score["per_modality"]["sar"]["common"]["skill"] == pytest.approx(-0.8)
    assert score["per_modality"]["sar"]["unique"]["ranking"] == 0.5
    # no private bands (private_share=0): nothing to find for the unique output
    none = {"sar": {"shared": torch.ones(2), "private": torch.zeros(2)}}
    assert band_truth_score(right, none)["per_modality"]["sar"]["unique"]["skill"] is None
    with pytest.raises(ValueError, match="bands"):
        band_truth_score({"sar": {"common": torch.rand(2, 3)}}, truth)


def test_gradcam_works_inside_inference_mode(model):
    head = CommonUniqueOutput.from_model(model, "sar")
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
        reference = model.embed(tiny_batch(16)["image_optical"], "optical")
    model.train()
    head = CommonUniqueOutput.from_model(model, "optical", reference)
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
    head = CommonUniqueOutput.from_model(model, "sar")
    x = tiny_batch(2)["image_sar"]
    with pytest.raises(ImportError, match=r"pip install decur-lightning\[analysis\]"):
        gradcam(head, x, COMMON)
    with pytest.raises(ImportError, match=r"pip install decur-lightning\[analysis\]"):
        integrated_gradients(head, x, COMMON)


def test_saliency_analysis_and_figures(model, tmp_path):
    batches = [tiny_batch(3, size=64), tiny_batch(3, size=64)]
    result = saliency_analysis(model, batches, max_samples=5, layers={"sar": "layer3"}, ig_steps=8, num_examples=2)
    assert result.num_samples == 5 and result.pairs == [("sar", "optical")]
    # the given layer for sar; for optical the deepest stage with maps of at least 4 x 4 at 64 px
    assert {m: (layer.name, layer.map_size) for m, layer in result.layers.items()} == {
        "sar": ("layer3", (4, 4)),
        "optical": ("layer3", (4, 4)),
    }
    for name in ("common", "unique"):
        overlap = result.overlap[("sar", "optical")][name]
        flat = result.degenerate[("sar", "optical")][name]
        assert flat.dtype == torch.bool and flat[overlap.isnan()].all()
    for name in ("common", "unique"):
        overlap = result.overlap[("sar", "optical")][name]
        defined = overlap[~overlap.isnan()]
        assert overlap.shape == (5,) and ((defined >= 0) & (defined <= 1 + 1e-6)).all()
        assert result.band_importance["sar"][name].shape == (5, 2)
        assert result.band_importance["optical"][name].shape == (5, 4)
        torch.testing.assert_close(result.band_importance["optical"][name].sum(1), torch.ones(5))
        assert result.relative_delta["sar"][name].shape == (5,)
    assert result.examples["images"]["sar"].shape == (2, 2, 64, 64)
    assert result.examples["maps"]["optical"]["unique"].shape == (2, 64, 64)
    assert_png(save_figure(overlap_histogram_figure(result.overlap[("sar", "optical")]), tmp_path / "overlap.png"))
    with pytest.raises(ValueError, match="one pair"):
        overlap_histogram_figure(result.overlap)
    partly_undefined = {"common": torch.tensor([0.2, float("nan")]), "unique": torch.tensor([float("nan")] * 2)}
    legend = overlap_histogram_figure(partly_undefined).axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend] == ["common (mean 0.20, n=1), 1 undefined", "unique, 2 undefined"]
    bands = band_importance_figure(result.band_importance, {"optical": ["B2", "B3", "B4", "B8"]})
    assert [t.get_text() for t in bands.axes[1].get_xticklabels()] == ["B2", "B3", "B4", "B8"]
    assert_png(save_figure(bands, tmp_path / "bands.png"))
    assert_png(save_figure(saliency_examples_figure(result), tmp_path / "examples.png"))
    without_examples = saliency_analysis(model, batches[:1], max_samples=2, ig_steps=2, num_examples=0, layers="layer3")
    assert without_examples.examples == {} and without_examples.num_samples == 2
    with pytest.raises(ValueError, match="num_examples"):
        saliency_examples_figure(without_examples)
    with pytest.raises(ValueError, match="band_names"):
        band_importance_figure(result.band_importance, {"sar": ["VV"]})


def test_one_pixel_layer_marks_every_sample_degenerate(model, tmp_path):
    """Issue 18: at 32 px layer4 gives 1 x 1 maps, whose overlap is 1.0 or undefined - a statistic
    of nothing. Every sample is flagged, the figure says so instead of drawing bars at 1.0."""
    with pytest.warns(UserWarning, match="no spatial"):
        result = saliency_analysis(model, [tiny_batch(3)], max_samples=3, layers="layer4", ig_steps=2, num_examples=0)
    assert result.layers["sar"].map_size == (1, 1) and result.layers["sar"].degenerate
    for name in ("common", "unique"):
        assert result.degenerate[("sar", "optical")][name].all()
    figure = overlap_histogram_figure(
        result.overlap[("sar", "optical")], degenerate=result.degenerate[("sar", "optical")], note="layer4 (1x1)"
    )
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert any("every map is degenerate" in text for text in texts)
    assert "layer4 (1x1)" in figure.axes[0].get_title()
    assert all(patch.get_height() == 0 for patch in figure.axes[0].patches)


def test_layers_and_references_by_name_only(model):
    batches = [tiny_batch(2)]
    with pytest.raises(ValueError, match=r"layers names \['dem'\].*\['sar', 'optical'\]"):
        saliency_analysis(model, batches, max_samples=2, ig_steps=2, layers={"dem": "layer3"})
    with pytest.raises(ValueError, match=r"reference names \[1\]"):
        saliency_analysis(model, batches, max_samples=2, ig_steps=2, reference={1: torch.randn(8, 64)})


def test_three_modalities_every_pair_gets_overlap_statistics(tmp_path):
    """An untrained 3-modality model: overlap scores for each of the three pairs, equal to the
    overlap of the two modalities' GradCAM maps; band importance per modality."""
    torch.manual_seed(0)
    model = tiny_decur(modalities=THREE)
    batch = three_batch(3, size=64)
    result = saliency_analysis(model, [batch], max_samples=3, layers="layer3", ig_steps=4, num_examples=3)
    assert result.modalities == ("sar", "optical", "dem") and result.pairs == THREE_PAIRS
    for name, bands in THREE.items():
        assert result.band_importance[name]["unique"].shape == (3, bands)
        torch.testing.assert_close(result.band_importance[name]["common"].sum(1), torch.ones(3))
    for target, output in enumerate(("common", "unique")):
        maps = {
            m: gradcam(CommonUniqueOutput.from_model(model, m), batch[f"image_{m}"], target, "layer3") for m in THREE
        }
        for m, n in THREE_PAIRS:
            torch.testing.assert_close(
                result.overlap[(m, n)][output], saliency_overlap(maps[m], maps[n]), equal_nan=True
            )
    figure = saliency_examples_figure(result, pair=("optical", "dem"))
    assert [figure.axes[i].get_title() for i in (0, 3)] == ["optical", "dem"]
    assert_png(save_figure(figure, tmp_path / "examples.png"))
    with pytest.raises(ValueError, match="No pair"):
        saliency_examples_figure(result, pair=("dem", "sar"))
