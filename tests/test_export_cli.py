"""`decur export` / `decur analyze` subcommands, metadata from the datamodule, downstream modules on exports."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from decur_lightning.cli import TOOLS, main
from decur_lightning.datamodules import SSL4EOS12MMDataModule, SyntheticMultimodalDataModule
from decur_lightning.downstream import MultimodalClassificationModule
from decur_lightning.modalities import Modality

from helpers import tiny_decur


class _SSL4EOLikeSynthetic(SyntheticMultimodalDataModule):
    """Synthetic data described as SSL4EO-S12 describes its modalities (bands, names, normalisation)."""

    @property
    def modality_specs(self) -> dict[str, Modality]:
        return SSL4EOS12MMDataModule(root="unused").modality_specs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    model = tiny_decur(modalities=None)
    data = _SSL4EOLikeSynthetic(modality_specs={"s1": 2, "s2": 13}, num_train=16, num_val=8, batch_size=8)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp,
    )
    trainer.fit(model, data)
    path = tmp / "decur.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_decur_export_records_the_datamodule_normalisation(fitted, tmp_path, capsys):
    path, model = fitted
    main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out"), "--format", "pt,hub"])
    assert "encoders.json describes them" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "encoders.json").read_text())
    specs = SSL4EOS12MMDataModule(root="unused").modality_specs
    for name in ("s1", "s2"):
        assert manifest[name]["normalization"] == specs[name].normalization  # from the datamodule, not guessed
        assert manifest[name]["band_names"] == specs[name].band_names
        assert set(manifest[name]["files"]) == {"pt", "hub"}
    assert manifest["s2"]["normalization"]["input"].startswith("uint16 Sentinel-2 L1C")
    assert manifest["s1"]["pretraining"]["hyper_parameters"]["projector_dims"] == [64, 64]
    config = json.loads((tmp_path / "out" / "hub_s2" / "config.json").read_text())
    s2 = specs["s2"].normalization
    assert config["pretrained_cfg"]["mean"] == pytest.approx([m - 2 * s for m, s in zip(s2["mean"], s2["std"])])
    # the export is a weight source of the downstream modules: the Hub folder as `weights`
    module = MultimodalClassificationModule(
        modalities={
            "s1": {"bands": 2, "encoder": "resnet18", "weights": str(tmp_path / "out" / "hub_s1")},
            "s2": {"bands": 13, "encoder": "resnet18", "weights": str(tmp_path / "out" / "encoder_s2.pt")},
        },
        num_classes=5,
    )
    for name in ("s1", "s2"):
        expected = model.encoders[name].state_dict()
        for key, value in module.encoders[name].state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_subcommand_table_and_bad_format(tmp_path, fitted):
    assert set(TOOLS) >= {"export", "analyze"}
    with pytest.raises(ValueError, match="Unknown export format"):
        main(["export", "--ckpt", str(fitted[0]), "--out", str(tmp_path), "--format", "onnx"])
    with pytest.raises(SystemExit) as excinfo:
        main(["export", "--out", str(tmp_path)])  # --ckpt missing
    assert excinfo.value.code != 0


def test_decur_analyze_dispatches_to_the_analysis_cli(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["analyze", "--help"])
    assert excinfo.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_decur_help_lists_the_tools(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "decur export" in out and "decur analyze" in out and "fit" in out
