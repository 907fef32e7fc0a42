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
    main([
        "fit", "--config", str(QUICKSTART),
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.num_train=64", "--data.init_args.num_val=32",
        "--data.init_args.batch_size=16",
    ])
    # fast_dev_run disables loggers' folders, the histogram lands in the root folder
    histograms = list(tmp_path.rglob("alignment_histogram.png"))
    assert histograms, "the AlignmentHistogram callback did not write its PNG"
    assert histograms[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_accepts_short_class_names(tmp_path):
    main([
        "fit", "--model=DeCURModule", "--data=SyntheticMultimodalDataModule",
        "--model.encoder1=resnet18", "--model.encoder2=resnet18", "--model.in_channels1=2",
        "--model.in_channels2=4", "--model.modality1=sar", "--model.modality2=optical",
        "--model.projector_dims=[32,32]", "--data.num_train=32", "--data.num_val=16", "--data.batch_size=8",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
    ])
    # the short names resolved to the package's classes, which trained one step
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["decur_lightning"]["method"] == "DeCURModule"
    assert checkpoint["hyper_parameters"]["projector_dims"] == [32, 32]
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 8
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
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp)
    trainer.fit(model, SyntheticMultimodalDataModule(num_train=32, batch_size=16))
    path = tmp / "decur.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_exported_encoders_load_into_timm_strictly(checkpoint, tmp_path):
    paths = export_encoders(checkpoint, tmp_path / "exported")
    assert set(paths) == {"sar", "optical"}
    manifest = json.loads((tmp_path / "exported" / "encoders.json").read_text())
    assert manifest["sar"] == {"file": "encoder_sar.pt", "encoder": "resnet18", "in_channels": 2, "modality_index": 1}
    trained = DeCURModule.load_from_checkpoint(checkpoint).eval()
    for modality, channels, index in (("sar", 2, 1), ("optical", 4, 2)):
        encoder = timm.create_model("resnet18", in_chans=channels, num_classes=0)
        encoder.load_state_dict(torch.load(paths[modality]), strict=True)
        x = torch.rand(2, channels, 32, 32)
        torch.testing.assert_close(encoder.eval()(x), trained(x, index))


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
