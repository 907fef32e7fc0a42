"""Baselines' losses against plain references, DeCUR's ablation switches, and every method from YAML."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from decur_lightning.cli import main
from decur_lightning.losses import decur_loss
from decur_lightning.ssl import (
    CLIPModule,
    CrossModalBarlowTwinsModule,
    SimCLRCrossModule,
    SingleModalBarlowTwinsModule,
    VICRegCrossModule,
)
from decur_lightning.ssl.baselines import clip_loss

from helpers import quiet_trainer, tiny_batch, tiny_decur

SHARED = dict(modalities={"sar": 2, "optical": 4}, encoder="resnet18", projector_dims=(16,), crop_size=32)


def _named(za, zb):
    """One view per modality, as the cross-modal baselines' compute_loss takes them."""
    return {"sar": [za], "optical": [zb]}


def _barlow_twins_reference(za, zb, lambd=0.0051):
    za = (za - za.mean(0)) / torch.sqrt(za.var(0, unbiased=False) + 1e-5)
    zb = (zb - zb.mean(0)) / torch.sqrt(zb.var(0, unbiased=False) + 1e-5)
    c = za.T @ zb / za.shape[0]
    off = c - torch.diag(torch.diagonal(c))
    return ((1 - torch.diagonal(c)) ** 2).sum() + lambd * (off**2).sum()


def _nt_xent_reference(z1, z2, temperature):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        losses.append(-sim[i, positive] + torch.logsumexp(sim[i, others], 0))
    return torch.stack(losses).mean()


def _clip_reference(z1, z2, scale):
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = math.exp(scale) * z1 @ z2.T
    n = z1.shape[0]
    a = torch.stack([-logits[i, i] + torch.logsumexp(logits[i], 0) for i in range(n)]).mean()
    b = torch.stack([-logits[i, i] + torch.logsumexp(logits[:, i], 0) for i in range(n)]).mean()
    return (a + b) / 2


def _vicreg_reference(za, zb, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    n, d = za.shape
    invariance = ((za - zb) ** 2).mean()
    variance = sum(F.relu(1 - torch.sqrt(z.var(0) + eps)).mean() for z in (za, zb)) / 2
    covariance = 0.0
    for z in (za, zb):
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        covariance = covariance + ((cov - torch.diag(torch.diagonal(cov))) ** 2).sum() / d
    return lam * invariance + mu * variance + nu * covariance


@pytest.fixture
def embeddings():
    base = torch.randn(12, 16)
    return base + 0.3 * torch.randn(12, 16), base + 0.3 * torch.randn(12, 16)


def test_cross_modal_barlow_twins_loss(embeddings):
    model = CrossModalBarlowTwinsModule(**SHARED)
    torch.testing.assert_close(
        model.compute_loss(_named(*embeddings))["loss"], _barlow_twins_reference(*embeddings), rtol=1e-5, atol=1e-4
    )
    assert model.views_per_modality == 1


def test_single_modal_barlow_twins_uses_one_encoder(embeddings):
    model = SingleModalBarlowTwinsModule(**SHARED)
    assert model.modalities == ("sar",) and list(model.encoders) == ["sar"]
    loss = model.compute_loss({"sar": list(embeddings)})["loss"]
    torch.testing.assert_close(loss, _barlow_twins_reference(*embeddings), rtol=1e-5, atol=1e-4)
    loss = model.training_step({"image_sar": torch.rand(4, 2, 32, 32)}, 0)
    assert torch.isfinite(loss)


def test_simclr_cross_loss(embeddings):
    model = SimCLRCrossModule(temperature=0.2, **SHARED)
    torch.testing.assert_close(
        model.compute_loss(_named(*embeddings))["loss"], _nt_xent_reference(*embeddings, 0.2), rtol=1e-5, atol=1e-5
    )


def test_clip_loss_and_learnable_temperature(embeddings):
    model = CLIPModule(init_temperature=0.07, **SHARED)
    out = model.compute_loss(_named(*embeddings))
    torch.testing.assert_close(out["loss"], _clip_reference(*embeddings, math.log(1 / 0.07)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["temperature"], torch.tensor(0.07), rtol=1e-5, atol=0)
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
    assert clip_loss(embeddings[0], embeddings[0], torch.tensor(math.log(100.0))) < 0.1


def test_clip_temperature_is_optimised(tmp_path):

    from decur_lightning.datamodules import SyntheticMultimodalDataModule

    model = CLIPModule(init_temperature=0.07, optimizer="adamw", lr=0.05, **SHARED)
    before = model.logit_scale.detach().clone()
    quiet_trainer(tmp_path, 2).fit(model, SyntheticMultimodalDataModule(num_train=32, batch_size=16))
    assert not torch.equal(model.logit_scale.detach(), before)


def test_vicreg_cross_loss(embeddings):
    model = VICRegCrossModule(**SHARED)
    torch.testing.assert_close(
        model.compute_loss(_named(*embeddings))["loss"], _vicreg_reference(*embeddings), rtol=1e-5, atol=1e-5
    )


def _four():
    base = torch.randn(16, 32)
    return [base + 0.5 * torch.randn(16, 32) for _ in range(4)]


def test_ablation_without_intra_drops_exactly_the_intra_terms():
    z = _four()
    full = decur_loss(*z, common_dims=24)
    no_intra = decur_loss(z[0], None, z[2], None, common_dims=24, intra=False)
    assert no_intra.intra1 == 0 and no_intra.intra2 == 0
    torch.testing.assert_close(no_intra.common, full.common)
    torch.testing.assert_close(no_intra.unique, full.unique)
    torch.testing.assert_close(no_intra.total, full.common + full.unique)
    model = tiny_decur(projector_dims=(32,), intra=False)
    assert model.views_per_modality == 1
    assert [len(v) for v in model.make_views(tiny_batch()).values()] == [1, 1]
    out = model.compute_loss(_named(z[0], z[2]))
    assert not any(k.startswith("intra") for k in out)
    torch.testing.assert_close(out["loss"], full.common + full.unique)


def test_ablation_without_decoupling_makes_every_dimension_common():
    z = _four()
    model = tiny_decur(projector_dims=(32,), common_ratio=0.75, decouple=False)
    assert model.common_dims == 32
    out = model.compute_loss({"sar": z[:2], "optical": z[2:]})
    full = decur_loss(*z, common_dims=24)
    all_common = decur_loss(*z, common_dims=32)
    assert not any(k.startswith("unique") for k in out)
    torch.testing.assert_close(out["common_sar_optical"], all_common.common)
    torch.testing.assert_close(out["intra_sar"], full.intra1)
    torch.testing.assert_close(out["intra_optical"], full.intra2)
    both = tiny_decur(projector_dims=(32,), intra=False, decouple=False).compute_loss(_named(z[0], z[2]))
    torch.testing.assert_close(both["loss"], all_common.common)
    torch.testing.assert_close(
        both["loss"], CrossModalBarlowTwinsModule(**SHARED).compute_loss(_named(z[0], z[2]))["loss"]
    )


def test_authors_weighting_reweights_the_same_terms():
    z = _four()
    paper = decur_loss(*z, common_dims=24)
    authors = decur_loss(*z, common_dims=24, weighting="authors")
    for name in ("intra1", "intra2", "common", "unique"):
        torch.testing.assert_close(getattr(authors, name), getattr(paper, name))
    torch.testing.assert_close(authors.total, (paper.intra1 + paper.intra2 + (paper.common + paper.unique) / 2) / 3)
    with pytest.raises(ValueError, match="weighting must be"):
        decur_loss(*z, common_dims=24, weighting="mean")
    module = tiny_decur(projector_dims=(32,), common_dims=24, loss_weighting="authors")
    torch.testing.assert_close(module.compute_loss({"sar": z[:2], "optical": z[2:]})["loss"], authors.total)
    three = tiny_decur(modalities={"sar": 2, "optical": 4, "dem": 1}, projector_dims=(32,), loss_weighting="authors")
    with pytest.raises(ValueError, match="weighting='authors' reproduces the released two-modality code; got 3"):
        three.compute_loss({"sar": z[:2], "optical": z[2:], "dem": z[:2]})


METHODS = [
    "decur_lightning.DeCURModule",
    "decur_lightning.ssl.CrossModalBarlowTwinsModule",
    "decur_lightning.ssl.SingleModalBarlowTwinsModule",
    "decur_lightning.ssl.SimCLRCrossModule",
    "decur_lightning.ssl.CLIPModule",
    "decur_lightning.ssl.VICRegCrossModule",
]
COMPARE_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "compare_methods.yaml"


def test_compare_config_lists_exactly_the_methods_and_they_are_ssl_modules():
    """The header of compare_methods.yaml names the alternatives of its one method line: every
    name is an importable MultimodalSSLModule and together they are METHODS (DeCUR is the default)."""
    import importlib

    from decur_lightning.ssl import MultimodalSSLModule

    text = COMPARE_CONFIG.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    listed = re.findall(r"^#\s+(decur_lightning\.[\w.]+)\s", header, flags=re.M)
    assert listed == METHODS
    for name in listed:
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), MultimodalSSLModule), name
    assert yaml.safe_load(text)["model"]["class_path"] == METHODS[0]


@pytest.mark.parametrize("method", METHODS)
def test_compare_config_fits_with_every_method(tmp_path, method):
    """compare_methods.yaml with only its method line changed (and sizes shrunk: resnet18, 32 px,
    synthetic data) instantiates that class and trains 2 steps: the checkpoint names the method,
    holds 2 optimiser steps with optimiser state, and finite weights."""
    config = yaml.safe_load(COMPARE_CONFIG.read_text())
    config["model"]["class_path"] = method
    config["model"]["init_args"].update(encoder="resnet18", projector_dims=[32, 32], crop_size=32)
    config["data"] = {
        "class_path": "decur_lightning.datamodules.SyntheticMultimodalDataModule",
        "init_args": {"modality_specs": {"s1": 2, "s2": 4}, "num_train": 16, "num_val": 4, "batch_size": 8},
    }
    config["trainer"] = {
        "accelerator": "cpu",
        "max_steps": 2,
        "limit_val_batches": 0,
        "logger": False,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path),
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1},
            }
        ],
    }
    path = tmp_path / "method.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (checkpoint_path,) = (tmp_path / "ckpt").glob("*.ckpt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["decur_lightning"]["method"] == method.rsplit(".", 1)[1]
    assert checkpoint["global_step"] == 2
    assert checkpoint["optimizer_states"][0]["state"], "no optimiser state: no step was taken"
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_single_modal_checkpoint_exports_its_one_encoder(tmp_path):
    import timm

    from decur_lightning.datamodules import SyntheticMultimodalDataModule
    from decur_lightning.weights import export_encoders

    model = SingleModalBarlowTwinsModule(**SHARED)
    trainer = quiet_trainer(tmp_path, 1)
    trainer.fit(model, SyntheticMultimodalDataModule(num_train=32, batch_size=16))
    trainer.save_checkpoint(tmp_path / "bt.ckpt")
    paths = export_encoders(tmp_path / "bt.ckpt", tmp_path / "out")
    assert list(paths) == ["sar"]
    timm.create_model("resnet18", in_chans=2, num_classes=0).load_state_dict(torch.load(paths["sar"]))
