"""The `decur` CLI on the quickstart config, checkpoints, and encoder export into timm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from decur_lightning import DeCURModule
from decur_lightning.cli import main
from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.weights import export_encoders

from helpers import tiny_decur

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"


def test_cli_fit_quickstart_fast_dev_run(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.num_train=64",
            "--data.init_args.num_val=32",
            "--data.init_args.batch_size=16",
        ]
    )
    # fast_dev_run disables loggers' folders, the histogram lands in the root folder
    histograms = list(tmp_path.rglob("alignment_histogram.png"))
    assert histograms, "the AlignmentHistogram callback did not write its PNG"
    assert histograms[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_accepts_short_class_names(tmp_path):
    main(
        [
            "fit",
            "--model=DeCURModule",
            "--data=SyntheticMultimodalDataModule",
            "--model.encoder=resnet18",
            "--model.projector_dims=[32,32]",
            "--data.num_train=32",
            "--data.num_val=16",
            "--data.batch_size=8",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        ]
    )
    # the short names resolved to the package's classes, which trained one step
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["decur_lightning"]["method"] == "DeCURModule"
    assert checkpoint["hyper_parameters"]["projector_dims"] == [32, 32]
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 8
    # the modalities came from the datamodule and are recorded, resolved, for load_from_checkpoint
    assert list(checkpoint["hyper_parameters"]["modalities"]) == ["sar", "optical"]
    assert checkpoint["hyper_parameters"]["modalities"]["optical"]["bands"] == 4
    assert checkpoint["global_step"] == 1


def test_console_script_help_exits_zero():
    """The `decur` script of this interpreter's environment (found without an activated venv, not
    via PATH); where it is not installed there, the same entry point as `python -m decur_lightning.cli`."""
    script = Path(sys.executable).parent / ("decur.exe" if os.name == "nt" else "decur")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "decur_lightning.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "validate" in result.stdout


def test_cli_rejects_unknown_argument():
    with pytest.raises(SystemExit) as excinfo:
        main(["fit", "--config", str(QUICKSTART), "--model.init_args.not_an_option=3"])
    assert excinfo.value.code != 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    model = tiny_decur()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp,
    )
    trainer.fit(model, SyntheticMultimodalDataModule(num_train=32, batch_size=16))
    path = tmp / "decur.ckpt"
    trainer.save_checkpoint(path)
    return path


def _three_modality_checkpoint() -> tuple[dict, dict[str, torch.nn.Module]]:
    """A checkpoint in this package's module layout (encoders.<name>.*, projectors.<name>.*,
    hyper_parameters.modalities), three modalities, with trained-looking (perturbed) encoders."""
    from decur_lightning.models import create_encoder

    specs = {"sar": ("resnet18", 2, "sar"), "optical": ("resnet18", 4, "optical"), "dem": ("resnet18", 1, "generic")}
    encoders, state_dict = {}, {}
    for name, (encoder_name, bands, _) in specs.items():
        encoder = create_encoder(encoder_name, bands)
        with torch.no_grad():
            for tensor in [*encoder.parameters(), *encoder.buffers()]:
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor) * 0.1)
        encoders[name] = encoder
        state_dict.update({f"encoders.{name}.{k}": v for k, v in encoder.state_dict().items()})
        state_dict[f"projectors.{name}.0.weight"] = torch.randn(16, 512)
    modalities = {name: {"bands": bands, "encoder": enc, "view": view} for name, (enc, bands, view) in specs.items()}
    return {"state_dict": state_dict, "hyper_parameters": {"modalities": modalities}}, encoders


def test_exported_encoders_load_into_timm_strictly(tmp_path):
    checkpoint, encoders = _three_modality_checkpoint()
    torch.save(checkpoint, tmp_path / "decur.ckpt")
    paths = export_encoders(tmp_path / "decur.ckpt", tmp_path / "exported")
    assert list(paths) == ["sar", "optical", "dem"]
    manifest = json.loads((tmp_path / "exported" / "encoders.json").read_text())
    assert manifest["sar"] == {
        "file": "encoder_sar.pt",
        "encoder": "resnet18",
        "bands": 2,
        "view": "sar",
        "position": 1,
    }
    assert [entry["position"] for entry in manifest.values()] == [1, 2, 3]
    for name, channels in (("sar", 2), ("optical", 4), ("dem", 1)):
        encoder = timm.create_model("resnet18", in_chans=channels, num_classes=0)
        encoder.load_state_dict(torch.load(paths[name]), strict=True)
        x = torch.rand(2, channels, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(encoder.eval()(x), encoders[name].eval()(x))


def test_load_from_checkpoint_restores_weights(checkpoint):
    restored = DeCURModule.load_from_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert restored.common_dims == 48


def test_export_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        export_encoders(tmp_path / "missing.ckpt", tmp_path)
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"model": {}}, bogus)
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        export_encoders(bogus, tmp_path)
