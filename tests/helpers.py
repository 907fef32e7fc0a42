"""Small builders shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from decur_lightning import DeCURModule


def tiny_decur(**overrides: Any) -> DeCURModule:
    """A resnet18 DeCURModule with a 64-wide projector on 2-band 'sar' + 4-band 'optical'."""
    kwargs: dict[str, Any] = dict(
        modalities={"sar": 2, "optical": 4},
        encoder="resnet18",
        projector_dims=(64, 64),
        common_ratio=0.75,
        crop_size=32,
    )
    kwargs.update(overrides)
    return DeCURModule(**kwargs)


def tiny_batch(n: int = 4, size: int = 32, channels: tuple[int, int] = (2, 4)) -> dict[str, torch.Tensor]:
    return {
        "image_sar": torch.rand(n, channels[0], size, size),
        "image_optical": torch.rand(n, channels[1], size, size),
    }


def quiet_trainer(root: str | Path, max_steps: int, **overrides: Any) -> L.Trainer:
    """A CPU trainer for ``max_steps`` steps, no logger, checkpoints, progress bar or validation, under ``root``."""
    settings: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    return L.Trainer(**(settings | overrides))
