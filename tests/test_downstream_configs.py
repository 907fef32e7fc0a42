"""Every downstream config runs `decur fit` (fast_dev_run) on tiny fake datasets in the real layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from decur_lightning.cli import main

from data_factories import make_bigearthnet, make_geonrw, make_rgbd

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
DOWNSTREAM = sorted(CONFIGS.glob("downstream_*.yaml"))


# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("data")
    make_bigearthnet(tmp / "bigearthnet", {"train": 6, "val": 2, "test": 2})
    # real patch geometry: 250 px patches (4 per 500 px tile), 224 px training crops
    make_geonrw(tmp / "geonrw", size=500)
    make_rgbd(tmp / "sunrgbd", num_classes=37, train=3, test=2)
    make_rgbd(tmp / "nyudv2", num_classes=40, train=3, test=2)
    return {
        "bigearthnet": tmp / "bigearthnet",
        "geonrw": tmp / "geonrw",
        "sunrgbd": tmp / "sunrgbd",
        "nyudv2": tmp / "nyudv2",
    }


def test_every_paper_run_has_a_config():
    names = {path.stem for path in DOWNSTREAM}
    expected = {
        f"downstream_bigearthnet{s}_{m}_{p}"
        for s in ("", "_sar")
        for m in ("linear", "finetune")
        for p in ("1pct", "100pct")
    }
    expected |= {f"downstream_geonrw_fcn{s}_{m}" for s in ("", "_rgb") for m in ("frozen", "finetune")}
    expected |= {
        "downstream_sunrgbd_cmx_b2",
        "downstream_nyudv2_cmx_b5",
        "downstream_sunrgbd_fcn_rgb",
        "downstream_nyudv2_fcn_rgb",
    }
    assert names == expected


#: The modalities of each dataset's batches, in the paper's order.
MODALITIES = {
    "bigearthnet": ["s1", "s2"],
    "geonrw": ["rgb", "dem"],
    "sunrgbd": ["rgb", "hha"],
    "nyudv2": ["rgb", "hha"],
}


@pytest.mark.parametrize("config", DOWNSTREAM, ids=lambda p: p.stem)
def test_config_follows_the_paper(config):
    settings = yaml.safe_load(config.read_text())
    model, data = settings["model"]["init_args"], settings["data"]["init_args"]
    name = config.stem
    assert settings["trainer"]["logger"]["init_args"]["name"] == name
    single = "_sar_" in name or "_rgb" in name
    dataset = next(key for key in MODALITIES if key in name)
    modalities = model["modalities"]
    assert list(modalities) == MODALITIES[dataset][: 1 if single else 2]
    # every encoder starts from the DeCUR pretraining of its modality; band counts come from the datamodule
    assert all(
        set(spec) == {"weights"} and spec["weights"].startswith("runs/pretrain_") for spec in modalities.values()
    )
    frozen = "_linear_" in name or name.endswith("_frozen")
    assert model["freeze_encoders"] is frozen
    assert model.get("frozen_batch_norm", "eval") == ("train" if frozen else "eval")
    if "bigearthnet" in name:
        assert model["lr"] == (0.5 if model["freeze_encoders"] else 0.05)
        assert data["train_fraction"] == (0.01 if name.endswith("_1pct") else 1.0)
        assert data["batch_size"] == 256 and settings["trainer"]["max_epochs"] == 100
        assert model["lr_milestones"] == [0.6, 0.8] and model["weight_decay"] == 0.0
    elif "geonrw" in name:
        assert (model["optimizer"], model["lr"], model["weight_decay"]) == ("adamw", 1e-4, 0.01)
        assert data["patch_size"] == 250 and settings["trainer"]["max_epochs"] == 30
        if not single:
            assert data["dem_channels"] == 3  # the DEM repeated to 3 bands, as in pretraining
    elif "_cmx_" in name:
        assert model["head"] == "cmx" and model["encoder"] == f"mit_{name[-2:]}"
        assert (model["lr"], model["lr_schedule"], data["batch_size"]) == (6e-5, "poly", 8)
    else:
        assert (model["optimizer"], model["lr"], model["weight_decay"]) == ("sgd", 0.01, 1e-5)
        assert settings["trainer"]["max_steps"] == 40000 and data["batch_size"] == 8


def _shrunk_config(config: Path, tmp_path: Path) -> Path:
    """The config without pretrained weights (nothing to download) and with small encoders."""
    settings = yaml.safe_load(config.read_text())
    model = settings["model"]["init_args"]
    model["encoder"] = "mit_b0" if "_cmx_" in config.stem else "resnet18"
    for spec in model["modalities"].values():
        del spec["weights"]
    if "_cmx_" in config.stem:
        model["decoder_channels"] = 64
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(settings))
    return path


def _overrides(name: str, roots: dict[str, Path], tmp_path: Path) -> list[str]:
    dataset = next(key for key in roots if key in name)
    args = [
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.sync_batchnorm=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.root={roots[dataset]}",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0",
    ]
    if dataset in ("sunrgbd", "nyudv2"):
        args += ["--data.init_args.image_size=[64, 64]", "--data.init_args.crop_size=[64, 64]"]
    if dataset == "bigearthnet":
        args += ["--data.init_args.size=64"]
        if name.endswith("_1pct"):  # 1 % of 6 samples is one: batches of one, or no batch survives drop_last
            args += ["--data.init_args.batch_size=1"]
    if dataset == "geonrw":
        args += ["--data.init_args.tile_size=500"]
    return args


#: Band counts the datamodules deliver (GeoNRW's DEM repeated to 3 bands by the configs).
BANDS = {"s1": 2, "s2": 13, "rgb": 3, "dem": 3, "hha": 3}


@pytest.mark.parametrize("config", DOWNSTREAM, ids=lambda p: p.stem)
def test_config_runs_fit(config, roots, tmp_path, caplog, monkeypatch):
    from decur_lightning.downstream import MultimodalDownstreamModule

    built = []
    configure_model = MultimodalDownstreamModule.configure_model

    def record(module):
        configure_model(module)
        built.append({name: spec.bands for name, spec in module.encoders.specs.items()})

    monkeypatch.setattr(MultimodalDownstreamModule, "configure_model", record)
    caplog.set_level(logging.INFO)
    main(["fit", "--config", str(_shrunk_config(config, tmp_path)), *_overrides(config.stem, roots, tmp_path)])
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in caplog.text  # one training step ran
    names = list(yaml.safe_load(config.read_text())["model"]["init_args"]["modalities"])
    assert built == [{name: BANDS[name] for name in names}]  # encoders built from the datamodule's modality_specs
