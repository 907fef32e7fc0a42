"""Training-health check of the paper's pretraining configs, shrunk to run on a CPU in seconds.

Each ``examples/configs/pretrain_*.yaml`` is read, its model made small (encoder family kept:
ResNet-50 -> ResNet-18, ``*_rda`` -> ``resnet18_rda``, ViT-S/16 -> ViT-Ti/16, MiT-B2/B5 ->
MiT-B0; a 3-layer projector of width 128; 64 px views) and trained on synthetic data with the
config's modality names, band counts and view kinds, with the config's own optimiser,
weight decay, momentum and schedule (a cosine over ``schedule_steps``, of which the first
``steps`` run, so the learning rate stays near its start as in a long run). The config's
learning rates are for its batch size; they are scaled linearly to the shrunk batch, as Barlow
Twins and the README prescribe (``lr * batch_size / config_batch_size``).
Pretrained weights are left out (nothing is downloaded). Used by
``tests/test_config_health.py`` and printed by ``benchmarks/health.py``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch.utils.data import default_collate

from decur_lightning import DeCURModule
from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.modalities import Modality, datamodule_modalities

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SMALL_ENCODERS = {
    "resnet50": "resnet18",
    "resnet50_rda": "resnet18_rda",
    "vit_small_patch16_224": "vit_tiny_patch16_224",
    "mit_b2": "mit_b0",
    "mit_b5": "mit_b0",
}
#: Model arguments that a shrunk run keeps from the config.
KEPT = (
    "common_ratio",
    "common_dims",
    "lambd",
    "intra",
    "decouple",
    "loss_weighting",
    "crop_scale",
    "optimizer",
    "lr",
    "lr_bias",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "encoder_kwargs",
    "view_asymmetry",
)


@dataclass
class HealthReport:
    """What a shrunk run did: losses, embedding stds and parameter-norm growth per tensor."""

    config: str
    #: The loss of one fixed batch with fixed views (train-mode batch statistics, no update),
    #: before and after the steps: the training losses themselves vary more from batch to
    #: batch than 20 LARS steps change them.
    probe_before: float = math.nan
    probe_after: float = math.nan
    losses: list[float] = field(default_factory=list)
    embedding_stds: list[float] = field(default_factory=list)
    #: ``||p_end|| / max(||p_start||, 1)`` per parameter tensor (1 = no growth; zero-initialised
    #: tensors, e.g. biases, are measured against 1).
    norm_growth: dict[str, float] = field(default_factory=dict)

    @property
    def worst_growth(self) -> tuple[str, float]:
        name = max(self.norm_growth, key=self.norm_growth.__getitem__)
        return name, self.norm_growth[name]


def probe_loss(module: DeCURModule, batch: dict[str, torch.Tensor], seed: int = 12345) -> float:
    """The loss of ``batch`` with views drawn from ``seed``, in training mode, without an update."""
    was_training = module.training
    module.train()
    with torch.no_grad():
        views = module.make_views(batch, seed=seed)
        embeddings = {name: [module.embed(view, name) for view in vs] for name, vs in views.items()}
        loss = float(module.compute_loss(embeddings)["loss"])
    module.train(was_training)
    return loss


class _Recorder(L.Callback):
    def __init__(
        self, report: HealthReport, steps: int, modalities: tuple[str, ...], probe: dict[str, torch.Tensor]
    ) -> None:
        self.report, self.steps, self.modalities, self.probe = report, steps, modalities, probe
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = {name: p.detach().norm().clone() for name, p in module.named_parameters()}
        self.report.probe_before = probe_loss(module, self.probe)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.report.losses.append(float(outputs["loss"]))
        metrics = trainer.callback_metrics
        stds = [float(metrics[f"train/embedding_std_{name}_step"]) for name in self.modalities]
        self.report.embedding_stds.append(min(stds))
        if trainer.global_step >= self.steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.report.probe_after = probe_loss(module, self.probe)
        for name, p in module.named_parameters():
            self.report.norm_growth[name] = float(p.detach().norm() / self.start[name].clamp(min=1.0))


def pretrain_configs() -> list[Path]:
    """Every pretraining config of the paper's runs."""
    return sorted(CONFIGS.glob("pretrain_*.yaml"))


def shrunk_module(config: Path, size: int = 64, projector_width: int = 128, batch_size: int = 16) -> DeCURModule:
    """The config's DeCURModule, made small (see the module docstring)."""
    full = yaml.safe_load(config.read_text())
    init = full["model"]["init_args"]
    kwargs = {key: init[key] for key in KEPT if key in init}
    scale = batch_size / int(full["data"]["init_args"]["batch_size"])
    for key in ("lr", "lr_bias"):
        if key in kwargs:
            kwargs[key] = float(kwargs[key]) * scale
    kwargs.update(
        encoder=SMALL_ENCODERS.get(init["encoder"], init["encoder"]),
        projector_dims=[projector_width] * len(init["projector_dims"]),
        crop_size=size,
    )
    # The modalities as the config's datamodule describes them (built, not set up: no files read).
    kwargs["modalities"] = {name: {"bands": m.bands, "view": m.view} for name, m in config_modalities(full).items()}
    return DeCURModule(**kwargs)


def config_modalities(full: dict[str, Any]) -> dict[str, Modality]:
    """The ``modality_specs`` of a config's datamodule."""
    module_name, class_name = full["data"]["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return datamodule_modalities(cls(**full["data"].get("init_args", {})))


def run_health_check(
    config: Path, steps: int = 20, schedule_steps: int = 200, batch_size: int = 16, seed: int = 0
) -> HealthReport:
    """Train the shrunk config for ``steps`` optimiser steps and report its health."""
    L.seed_everything(seed, verbose=False)
    module = shrunk_module(config, batch_size=batch_size)
    hp = module.hparams
    modalities = module.modalities
    data = SyntheticMultimodalDataModule(
        modality_specs={name: {"bands": spec["bands"], "view": spec["view"]} for name, spec in hp.modalities.items()},
        size=hp.crop_size,
        num_train=batch_size * steps,
        num_val=2,
        num_test=2,
        batch_size=batch_size,
    )
    data.setup("fit")
    probe = default_collate([data.datasets["train"][index] for index in range(batch_size)])
    report = HealthReport(config.name)
    trainer = L.Trainer(
        max_epochs=max(1, schedule_steps // steps),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[_Recorder(report, steps, modalities, probe)],
    )
    trainer.fit(module, data)
    return report
