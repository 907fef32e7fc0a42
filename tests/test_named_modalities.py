"""Modalities by name, two or more: descriptions, lazy building from the datamodule, M = 3."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from decur_lightning import DeCURModule
from decur_lightning.encoder_set import EncoderSet
from decur_lightning.losses import barlow_twins_loss, multimodal_decur_loss
from decur_lightning.modalities import Modality, resolve_modalities
from decur_lightning.ssl import CrossModalBarlowTwinsModule, SingleModalBarlowTwinsModule

BANDS = {"sar": 2, "optical": 4, "dem": 1}


class ThreeModalities(LightningDataModule):
    """A minimal datamodule that describes its modalities (``modality_specs``)."""

    def __init__(self, n: int = 32, batch_size: int = 8, bands: dict[str, int] | None = None) -> None:
        super().__init__()
        self.bands = bands or BANDS
        g = torch.Generator().manual_seed(0)
        self.samples = [
            {f"image_{name}": torch.rand(c, 32, 32, generator=g) for name, c in self.bands.items()} for _ in range(n)
        ]
        self.batch_size = batch_size

    @property
    def modality_specs(self) -> dict[str, Modality]:
        views = {"sar": "sar", "optical": "optical", "dem": "dem"}
        return {name: Modality(bands=c, view=views.get(name)) for name, c in self.bands.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.samples, batch_size=self.batch_size, drop_last=True)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def test_resolve_merges_module_and_datamodule_descriptions():
    data = {"s1": Modality(bands=2, view="sar", band_names=["VV", "VH"]), "s2": Modality(bands=13, view="optical")}
    specs = resolve_modalities({"s2": {"encoder": "resnet18", "weights": "imagenet"}, "s1": None}, data, "resnet50")
    assert list(specs) == ["s2", "s1"]  # the module's order wins
    assert specs["s2"] == Modality(bands=13, encoder="resnet18", weights="imagenet", view="optical")
    assert specs["s1"].band_names == ["VV", "VH"] and specs["s1"].encoder == "resnet50"
    assert list(resolve_modalities(None, data)) == ["s1", "s2"]
    with pytest.raises(ValueError, match=r"'dem' is not in the datamodule, which has \['s1', 's2'\]"):
        resolve_modalities(["s1", "dem"], data)
    with pytest.raises(ValueError, match="expects 3 bands but the datamodule delivers 2"):
        resolve_modalities({"s1": 3}, data)
    with pytest.raises(ValueError, match="'x' has no band count"):
        resolve_modalities(["x"], None)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['channels'\]"):
        resolve_modalities({"x": {"channels": 3}}, None)


def test_module_without_band_counts_builds_its_encoders_from_the_datamodule(tmp_path):
    model = DeCURModule(encoder="resnet18", projector_dims=(32, 32), crop_size=32, optimizer="adamw", lr=1e-3)
    assert not model.built
    with pytest.raises(RuntimeError, match="builds its encoders at the start of the fit"):
        _ = model.modalities
    trainer = _trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(model, ThreeModalities())
    assert model.modalities == ("sar", "optical", "dem")
    assert model.hparams.modalities["dem"] == {"bands": 1, "encoder": "resnet18", "view": "dem"}
    assert model.encoders["optical"].conv1.in_channels == 4
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    reloaded = DeCURModule.load_from_checkpoint(path)
    assert reloaded.built and reloaded.modalities == model.modalities
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_module_bands_that_disagree_with_the_datamodule_are_an_error(tmp_path):
    model = DeCURModule(modalities={"sar": 3, "optical": 4, "dem": 1}, encoder="resnet18", projector_dims=(16,))
    with pytest.raises(ValueError, match="'sar': the module expects 3 bands but the datamodule delivers 2"):
        _trainer(tmp_path).fit(model, ThreeModalities())


def test_three_modality_loss_is_the_formula_over_every_pair():
    torch.manual_seed(0)
    model = DeCURModule(modalities=BANDS, encoder="resnet18", projector_dims=(32, 16), common_dims=12, crop_size=32)
    batch = {f"image_{name}": torch.rand(6, c, 32, 32) for name, c in BANDS.items()}
    views = model.make_views(batch, seed=3)
    embeddings = {name: [model.embed(v, name) for v in vs] for name, vs in views.items()}
    out = model.compute_loss(embeddings)
    expected = multimodal_decur_loss({n: tuple(z) for n, z in embeddings.items()}, 12, method="dense")
    torch.testing.assert_close(out["loss"], expected.total, rtol=1e-5, atol=1e-4)
    assert {k for k in out if k.startswith("common_") and "corr" not in k} == {
        "common_sar_optical",
        "common_sar_dem",
        "common_optical_dem",
    }
    assert model.encoders.pairs() == [("sar", "optical"), ("sar", "dem"), ("optical", "dem")]


def test_per_pair_common_dims():
    model = DeCURModule(
        modalities=BANDS,
        encoder="resnet18",
        projector_dims=(32,),
        common_dims={"sar-optical": 24, "dem-sar": 8, "optical-dem": 16},
    )
    assert model.common_dims_of("optical", "sar") == 24 and model.common_dims_of("sar", "dem") == 8
    with pytest.raises(ValueError, match="use common_dims_of"):
        _ = model.common_dims
    with pytest.raises(ValueError, match="no value for the pair sar-dem"):
        DeCURModule(modalities=BANDS, encoder="resnet18", projector_dims=(32,), common_ratio={"sar-optical": 0.5})


def test_baselines_sum_over_pairs_and_single_modal_picks_one():
    torch.manual_seed(0)
    z = {name: [torch.randn(8, 16)] for name in BANDS}
    model = CrossModalBarlowTwinsModule(modalities=BANDS, encoder="resnet18", projector_dims=(16,))
    out = model.compute_loss(z)
    expected = sum(barlow_twins_loss(z[m][0], z[n][0]) for m, n in model.encoders.pairs())
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "loss_sar_optical", "loss_sar_dem", "loss_optical_dem"}
    single = SingleModalBarlowTwinsModule(
        modalities=BANDS, modality="optical", encoder="resnet18", projector_dims=(16,)
    )
    assert single.modalities == ("optical",)
    assert set(single.hparams.modalities) == {"optical"}
    with pytest.raises(ValueError, match="modality='x' is not one of"):
        SingleModalBarlowTwinsModule(modalities=BANDS, modality="x", encoder="resnet18", projector_dims=(16,))


def test_encoder_set_checks_inputs_and_allows_a_missing_modality_when_asked():
    encoders = EncoderSet({name: Modality(bands=c, encoder="resnet18") for name, c in BANDS.items()})
    batch = {"image_sar": torch.rand(2, 2, 32, 32), "image_dem": torch.rand(2, 1, 32, 32)}
    with pytest.raises(KeyError, match=r"no \['image_optical'\]"):
        encoders.inputs(batch)
    assert list(encoders.inputs(batch, allow_missing=True)) == ["sar", "dem"]
    with pytest.raises(ValueError, match="different batch sizes"):
        encoders.inputs({**batch, "image_dem": torch.rand(3, 1, 32, 32)}, allow_missing=True)
    with pytest.raises(ValueError, match="'train' cannot name a modality"):
        EncoderSet({"train": Modality(bands=1, encoder="resnet18")})


def test_three_modality_config_fits_from_yaml(tmp_path):
    """examples/configs/three_modalities.yaml (shrunk): 2 steps, 3 encoders, every pair's terms logged."""
    from pathlib import Path

    import yaml

    from decur_lightning.cli import main

    config_path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "three_modalities.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"]["init_args"]["projector_dims"] = [32, 32]
    config["data"]["init_args"].update(num_train=32, num_val=16, batch_size=16)
    config["trainer"].update(
        max_epochs=None,
        max_steps=2,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
            }
        ],
    )
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the order of the modalities matters
    main(["fit", "--config", str(path)])
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert list(checkpoint["hyper_parameters"]["modalities"]) == ["sar", "optical", "elevation"]
    assert checkpoint["hyper_parameters"]["modalities"]["elevation"] == {
        "bands": 1,
        "encoder": "resnet18",
        "view": "dem",
    }
    assert {k.split(".")[1] for k in checkpoint["state_dict"] if k.startswith("encoders.")} == {
        "sar",
        "optical",
        "elevation",
    }
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0]
    for pair in ("sar_optical", "sar_elevation", "optical_elevation"):
        assert f"train/common_{pair}_step" in header and f"train/unique_{pair}_step" in header


def test_checkpoints_do_not_need_the_pretrained_weight_files_again(tmp_path):
    """The trained weights are in the checkpoint: load_from_checkpoint must not re-read the sources."""
    from decur_lightning.models import create_encoder

    source = tmp_path / "sar_encoder.pt"
    torch.save(create_encoder("resnet18", 2).state_dict(), source)
    model = DeCURModule(
        modalities={"sar": {"bands": 2, "weights": str(source)}, "optical": 4},
        encoder="resnet18",
        projector_dims=(16,),
        crop_size=32,
        optimizer="adamw",
        lr=1e-3,
    )
    trainer = _trainer(tmp_path)
    trainer.fit(model, ThreeModalities(bands={"sar": 2, "optical": 4}))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    source.unlink()
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["weight_sources"] == {"sar": str(source)}
    assert "weights" not in checkpoint["hyper_parameters"]["modalities"]["sar"]
    assert model.hparams.modalities["sar"]["weights"] == str(source)  # the module itself keeps its description
    reloaded = DeCURModule.load_from_checkpoint(path)
    torch.testing.assert_close(reloaded.encoders["sar"].conv1.weight, model.encoders["sar"].conv1.weight)
