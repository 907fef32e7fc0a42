"""Fig. 5b: first principal component of RDA feature maps with the deformable points."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_analysis_alignment import THREE, assert_png, synthetic_data

from decur_lightning.analysis import (
    first_principal_component,
    rda_feature_points,
    rda_feature_points_figure,
    rda_feature_points_for_module,
    rda_figure_for_checkpoint,
)
from decur_lightning.analysis.cli import run
from decur_lightning.models import create_encoder

from helpers import tiny_decur

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_principal_component_is_the_top_pca_direction():
    torch.manual_seed(0)
    channels, height, width = 6, 5, 7
    strong, weak = torch.linalg.qr(torch.randn(channels, 2))[0].T  # orthonormal channel directions
    pattern = torch.randn(height * width)
    pattern -= pattern.mean()
    other = torch.randn(height * width)
    other -= other.mean()
    other -= torch.dot(other, pattern) / torch.dot(pattern, pattern) * pattern  # spatially orthogonal too
    offset = torch.randn(channels, 1)  # a per-channel mean: removed by the centring
    samples = 3 * strong[:, None] * pattern / pattern.norm() + 1 * weak[:, None] * other / other.norm() + offset
    feature_map = samples.reshape(1, channels, height, width)

    pc = first_principal_component(feature_map)
    assert pc.shape == (1, height, width)
    # Centred, the map is the SVD 3 u p^T + 1 w o^T: the top component is 3 p.
    expected = 3 * pattern / pattern.norm()
    assert torch.allclose(pc.flatten(), expected, atol=1e-4) or torch.allclose(pc.flatten(), -expected, atol=1e-4)
    # The same as torch.pca_lowrank's first component, up to the sign.
    _, _, directions = torch.pca_lowrank(samples.T, q=2, center=True)
    scores = (samples.T - samples.T.mean(0)) @ directions[:, 0]
    torch.testing.assert_close(pc.flatten().abs(), scores.abs(), atol=1e-4, rtol=1e-4)
    # Sign: positively correlated with the channel-mean activation.
    activation = feature_map.mean(1).flatten()
    assert torch.dot(pc.flatten() - pc.mean(), activation - activation.mean()) >= 0


@pytest.mark.parametrize(("layer", "map_side", "groups"), [("l3", 4, 4), ("l4", 2, 8)])
def test_rda_feature_points_shapes_values_and_mode(layer, map_side, groups):
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_rda", in_channels=2).train()
    images = torch.rand(3, 2, 64, 64)
    result = rda_feature_points(encoder, images, layer)
    assert encoder.training  # the mode is restored
    assert result.layer == layer and result.images.shape == (3, 2, 64, 64)
    assert result.principal_component.shape == (3, map_side, map_side)
    key_side = map_side // 2 if layer == "l3" else map_side  # offset stride 2 after layer3, 1 after layer4
    assert result.points.shape == (3, groups, key_side, key_side, 2)
    assert result.points.abs().max() <= 1.0

    block = getattr(encoder, f"da_{layer}")
    outputs = []
    handle = block.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        encoder.eval().forward_feature_maps(images)
    handle.remove()
    torch.testing.assert_close(result.principal_component, first_principal_component(outputs[0]))


def test_only_the_rda_modalities_of_three(tmp_path):
    """The RDA encoder of one modality among three: its result only, by name."""
    modalities = {**THREE, "dem": {"bands": 1, "encoder": "resnet18_rda"}}
    model = tiny_decur(modalities=modalities, crop_size=64).eval()
    batch = {f"image_{name}": torch.rand(2, bands, 64, 64) for name, bands in THREE.items()}
    results = rda_feature_points_for_module(model, batch)
    assert list(results) == ["dem"] and results["dem"].images.shape == (2, 1, 64, 64)
    torch.testing.assert_close(results["dem"].images, batch["image_dem"])
    assert rda_feature_points_figure(results).axes[0].get_title() == "dem input + points (l3)"


def test_rda_feature_points_rejects_other_encoders_and_layers():
    with pytest.raises(TypeError, match="resnet50_rda"):
        rda_feature_points(create_encoder("resnet18", 2), torch.rand(1, 2, 64, 64))
    with pytest.raises(ValueError, match="'l3'.*'l4'"):
        rda_feature_points(create_encoder("resnet18_rda", 2), torch.rand(1, 2, 64, 64), "l2")


def test_figure_for_a_two_encoder_module_is_written(tmp_path):
    torch.manual_seed(0)
    model = tiny_decur(encoder="resnet18_rda", crop_size=64).eval()
    batch = {"image_sar": torch.rand(2, 2, 64, 64), "image_optical": torch.rand(2, 4, 64, 64)}
    results = rda_feature_points_for_module(model, batch, "l3")
    assert list(results) == ["sar", "optical"]
    fig = rda_feature_points_figure(results, max_images=2)
    assert len(fig.axes) == 2 * 4  # 2 images x (input, PC) per modality
    assert fig.axes[0].get_title() == "sar input + points (l3)"
    assert len(fig.axes[0].collections[0].get_offsets()) == 4 * 2 * 2  # groups x H_G x W_G points
    path = tmp_path / "fig5b.png"
    fig.savefig(path)
    assert_png(path)

    assert list(rda_feature_points_for_module(model, batch, "l3", modalities=["optical"])) == ["optical"]
    plain = tiny_decur().eval()
    assert rda_feature_points_for_module(plain, batch) == {}
    with pytest.raises(TypeError, match="no residual deformable attention"):
        rda_feature_points_for_module(plain, batch, modalities=["sar"])
    with pytest.raises(ValueError, match=r"No modality 'dem'"):
        rda_feature_points_for_module(model, batch, modalities=["dem"])
    with pytest.raises(ValueError, match="none of the encoders is an RDA encoder"):
        rda_feature_points_figure({})


def save_checkpoint(model, path: Path) -> Path:
    """A Lightning-loadable checkpoint without a training run (state dict + hyper-parameters)."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def test_decur_analyze_writes_the_rda_figure_only_for_rda_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    rda_sar = {"sar": {"bands": 2, "encoder": "resnet18_rda"}, "optical": 4}
    rda = save_checkpoint(tiny_decur(modalities=rda_sar, crop_size=64), tmp_path / "rda.ckpt")
    args = [
        "--data",
        "SyntheticMultimodalDataModule",
        "--data.size=64",
        "--data.num_train=8",
        "--data.num_val=8",
        "--data.batch_size=4",
        "--max_samples=8",
        "--saliency_samples=0",
        "--tsne=false",
        "--rda_samples=3",
    ]
    stats = run(["--checkpoint", str(rda), "--out", str(tmp_path / "rda"), *args])
    figure = Path(stats["figures"]["rda_feature_points"])
    assert figure == tmp_path / "rda" / "rda_feature_points.png"
    assert_png(figure)

    plain = save_checkpoint(tiny_decur(), tmp_path / "plain.ckpt")
    stats = run(["--checkpoint", str(plain), "--out", str(tmp_path / "plain"), *args])
    assert "rda_feature_points" not in stats["figures"]
    assert not (tmp_path / "plain" / "rda_feature_points.png").exists()
    assert "rda_feature_points.png is skipped" in capsys.readouterr().out
    data = synthetic_data(num_train=8, num_val=8, batch_size=4)
    assert rda_figure_for_checkpoint(plain, data, tmp_path / "none") is None
