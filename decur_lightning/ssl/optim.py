"""Optimisers and learning-rate schedules of the paper's pretraining (Appendix B.1)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from lightly.utils.lars import LARS
from torch import nn

__all__ = ["build_optimizer", "cosine_with_warmup", "split_decay_parameters"]

OptimizerName = Literal["lars", "adamw"]


def split_decay_parameters(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into weights (``ndim > 1``) and biases/normalisation ones.

    Barlow Twins and DeCUR exclude biases and batch-norm parameters from LARS adaptation and
    weight decay and give them their own learning rate (Appendix B.1).
    """
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                (weights if param.ndim > 1 else others).append(param)
    return weights, others


def build_optimizer(
    modules: Iterable[nn.Module],
    name: OptimizerName = "lars",
    lr: float = 0.2,
    lr_bias: float = 0.0048,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The paper's optimiser over ``modules``.

    ``"lars"`` (lightly's LARS; ResNet pretraining, Appendix B.1): weights at ``lr`` with
    ``weight_decay`` and layer-wise adaptation; biases and norm parameters at ``lr_bias`` with
    neither (lightly excludes parameter groups with zero weight decay from adaptation).
    ``"adamw"`` (MiT/ViT pretraining, lr 1e-4): weights with ``weight_decay``, biases and norm
    parameters without, both at ``lr`` (``lr_bias`` is a LARS setting and is not used).
    """
    weights, others = split_decay_parameters(modules)
    if name == "lars":
        groups = [
            {"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": others, "lr": lr_bias, "weight_decay": 0.0},
        ]
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        groups = [
            {"params": weights, "weight_decay": weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'lars' or 'adamw', got {name!r}.")


def cosine_with_warmup(total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0):
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine decay.

    Returns a function for ``torch.optim.lr_scheduler.LambdaLR``. The paper uses cosine decay
    without warm-up (Appendix B.1); ``final_factor`` is the fraction of the base rate reached
    at ``total_steps``.
    """
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
