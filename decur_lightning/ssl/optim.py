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


# Position embeddings and relative position bias tables are not decayed (timm's and DAT's rule).
NO_DECAY_NAMES = frozenset(
    {"rpe_table", "pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table"}
)


def split_decay_parameters(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into weights and biases/normalisation/position ones.

    Barlow Twins and DeCUR exclude biases and batch-norm parameters (``ndim <= 1``) from LARS
    adaptation and weight decay and give them their own learning rate (Appendix B.1). Position
    embeddings and attention bias tables (:data:`NO_DECAY_NAMES`) go with them.
    """
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                no_decay = param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
                (others if no_decay else weights).append(param)
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
