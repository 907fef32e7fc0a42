"""decur export: every format loads with that library's own loading code, tensors equal the pretrained ones."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file

from decur_lightning.export import EXPORT_FORMATS, export_pretrained, timm_mean_std
from decur_lightning.models import create_encoder

S1_NORMALIZATION = {
    "method": "mean_2std",
    "mean": [-12.59, -20.26],
    "std": [5.26, 5.91],
    "outlier_fraction": 0.02,
    "input": "float32 backscatter in dB",
}


def _perturbed(name: str, bands: int) -> torch.nn.Module:
    encoder = create_encoder(name, bands)
    with torch.no_grad():
        for tensor in [*encoder.parameters(), *encoder.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return encoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict[str, torch.nn.Module], dict]:
    """A two-modality resnet18 checkpoint in this package's layout, exported in every format."""
    tmp = tmp_path_factory.mktemp("export")
    encoders = {"s1": _perturbed("resnet18", 2), "s2": _perturbed("resnet18", 4)}
    state_dict = {f"encoders.{n}.{k}": v for n, e in encoders.items() for k, v in e.state_dict().items()}
    state_dict["projectors.s1.0.weight"] = torch.randn(8, 512)
    checkpoint = {
        "state_dict": state_dict,
        "hyper_parameters": {
            "encoder": "resnet18",
            "crop_size": 32,
            "modalities": {
                "s1": {
                    "bands": 2,
                    "encoder": "resnet18",
                    "view": "sar",
                    "band_names": ["VV", "VH"],
                    "normalization": S1_NORMALIZATION,
                },
                "s2": {
                    "bands": 4,
                    "encoder": "resnet18",
                    "view": "optical",
                    "band_names": ["B02", "B03", "B04", "B08"],
                },
            },
        },
        "datamodule_hyper_parameters": {"batch_size": 8},
        "epoch": 4,
        "global_step": 40,
        "decur_lightning": {"method": "DeCURModule"},
    }
    torch.save(checkpoint, tmp / "run.ckpt")
    (tmp / "metrics.csv").write_text("epoch,step,train_loss\n0,9,5.0\n3,39,2.5\n")
    export_pretrained(tmp / "run.ckpt", tmp / "out", metrics={"linear_probe_top1": 0.5})
    return tmp / "out", encoders, checkpoint


def _assert_same(loaded: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_files_and_manifest(exported):
    out, _, _ = exported
    manifest = json.loads((out / "encoders.json").read_text())
    assert list(manifest) == ["s1", "s2"]
    s1 = manifest["s1"]
    assert s1["files"] == {
        "pt": "encoder_s1.pt",
        "safetensors": "encoder_s1.safetensors",
        "torchgeo": "encoder_s1_torchgeo.ckpt",
        "hub": "hub_s1",
    }
    assert (s1["file"], s1["encoder"], s1["bands"], s1["band_names"], s1["position"]) == (
        "encoder_s1.pt",
        "resnet18",
        2,
        ["VV", "VH"],
        1,
    )
    assert s1["normalization"] == S1_NORMALIZATION
    assert s1["patch_size"] == 32
    # mean - 2 std and 4 std: (x - mean') / std' == (x - (m - 2s)) / (4s)
    assert s1["pretrained_cfg"]["mean"] == pytest.approx([-12.59 - 2 * 5.26, -20.26 - 2 * 5.91])
    assert s1["pretrained_cfg"]["std"] == pytest.approx([4 * 5.26, 4 * 5.91])
    run = s1["pretraining"]
    assert (run["method"], run["epoch"], run["global_step"]) == ("DeCURModule", 4, 40)
    assert run["metrics"] == {"epoch": 3.0, "train_loss": 2.5, "linear_probe_top1": 0.5}
    assert run["datamodule_hyper_parameters"] == {"batch_size": 8}
    assert manifest["s2"]["pretrained_cfg"]["note"].startswith("the normalisation is not recorded")


def test_timm_loads_pt_and_safetensors_with_pretrained_cfg_overlay(exported):
    out, encoders, _ = exported
    for suffix in ("pt", "safetensors"):
        model = timm.create_model(
            "resnet18",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(out / f"encoder_s1.{suffix}")),
            in_chans=2,
            num_classes=0,
        )
        _assert_same(model.state_dict(), encoders["s1"])
    _assert_same(load_file(str(out / "encoder_s2.safetensors")), encoders["s2"])


def test_smp_encoder_loads_strictly(exported):
    out, encoders, _ = exported
    unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=3)
    unet.encoder.load_state_dict(torch.load(out / "encoder_s2.pt", weights_only=True), strict=True)
    _assert_same(unet.encoder.state_dict(), encoders["s2"])
    unet.encoder.load_state_dict(load_file(str(out / "encoder_s2.safetensors")), strict=True)


def test_torchgeo_classification_task(exported):
    from torchgeo.trainers import ClassificationTask

    out, encoders, _ = exported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = ClassificationTask(
            model="resnet18", weights=str(out / "encoder_s1_torchgeo.ckpt"), in_channels=2, num_classes=5
        )
    loaded = {k: v for k, v in task.model.state_dict().items() if not k.startswith("fc.")}
    _assert_same(loaded, encoders["s1"])
    assert task.model.fc.out_features == 5


def test_torchgeo_segmentation_task(exported):
    from torchgeo.trainers import SemanticSegmentationTask

    out, encoders, _ = exported
    task = SemanticSegmentationTask(
        model="unet", backbone="resnet18", weights=str(out / "encoder_s2_torchgeo.ckpt"), in_channels=4, num_classes=3
    )
    _assert_same(task.model.encoder.state_dict(), encoders["s2"])


def test_torchgeo_file_is_weights_only_and_carries_metadata(exported):
    out, _, _ = exported
    checkpoint = torch.load(out / "encoder_s1_torchgeo.ckpt", weights_only=True)  # no unpickling of objects
    assert checkpoint["hyper_parameters"]["backbone"] == "resnet18"
    assert "model" not in checkpoint["hyper_parameters"]  # torchgeo would take its 'model' branch
    assert checkpoint["hyper_parameters"]["decur"]["normalization"] == S1_NORMALIZATION


def test_hub_folder_loads_offline_with_timm(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, encoders, _ = exported
    folder = out / "hub_s1"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    _assert_same(model.state_dict(), encoders["s1"])
    assert model.num_classes == 0 and model.conv1.in_channels == 2
    data_config = timm.data.resolve_data_config({}, model=model)
    mean, std, _ = timm_mean_std(S1_NORMALIZATION, 2)
    assert data_config["mean"] == pytest.approx(tuple(mean)) and data_config["std"] == pytest.approx(tuple(std))
    assert data_config["input_size"] == (2, 32, 32)
    config = json.loads((folder / "config.json").read_text())
    assert config["decur"]["band_names"] == ["VV", "VH"] and config["decur"]["modality"] == "s1"
    card = (folder / "README.md").read_text()
    for text in (
        "library_name: timm",
        "`VV`, `VH`",
        "| VV | -12.59 | 5.26 | -23.11 | 21.04 |",
        "mean_2std",
        "linear_probe_top1",
        "local-dir:",
    ):
        assert text in card


def test_timm_mean_std_matches_the_datamodule_normalisation():
    from decur_lightning.datamodules._common import scale_mean_std

    norm = {"method": "mean_2std", "mean": [1000.0, 20.0], "std": [500.0, 5.0]}
    mean, std, _ = timm_mean_std(norm, 2)
    x = torch.tensor([[[1200.0]], [[18.0]]])
    expected = scale_mean_std(x, norm["mean"], norm["std"])
    affine = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(affine, expected)
    imagenet = {"method": "mean_std", "divisor": 255.0, "mean": [0.5], "std": [0.25]}
    assert timm_mean_std(imagenet, 1)[:2] == ([127.5], [63.75])
    with pytest.raises(ValueError, match="Unknown normalization method"):
        timm_mean_std({"method": "zscore"}, 1)


def test_formats_argument_and_non_timm_encoders(tmp_path):
    encoder = _perturbed("resnet18_rda", 2)
    state_dict = {f"encoders.sar.{k}": v for k, v in encoder.state_dict().items()}
    checkpoint = {
        "state_dict": state_dict,
        "hyper_parameters": {"modalities": {"sar": {"bands": 2, "encoder": "resnet18_rda"}}},
    }
    with pytest.warns(UserWarning, match="need a timm model name"):
        written = export_pretrained(checkpoint, tmp_path, "all")
    assert set(written["sar"]) == {"pt", "safetensors"}
    with pytest.raises(ValueError, match="Unknown export format"):
        export_pretrained(checkpoint, tmp_path, ["onnx"])
    assert EXPORT_FORMATS == ("pt", "safetensors", "torchgeo", "hub")


@pytest.mark.parametrize("file", ["encoder_s2.pt", "encoder_s2.safetensors", "encoder_s2_torchgeo.ckpt", "hub_s2", "."])
def test_every_export_is_a_weight_source_again(exported, file):
    from decur_lightning.weights import load_encoder_state_dict

    out, encoders, _ = exported
    _assert_same(load_encoder_state_dict(out / file, "s2"), encoders["s2"])
    if file != ".":
        with pytest.raises(ValueError, match="modality 's1' was asked for|no modality"):
            load_encoder_state_dict(out / file, "s1")
