"""Optimisers and learning-rate schedules of every module (pretraining: Appendix B.1; downstream: B.2-B.4)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from lightly.utils.lars import LARS
from torch import nn

__all__ = ["OptimizerName", "ScheduleName", "build_optimizer", "split_decay_parameters", "warmup_schedule"]

#: Optimiser names: ``"lars"`` (ResNet pretraining), ``"adamw"`` (MiT/ViT pretraining, CMX), ``"sgd"`` (downstream).
OptimizerName = Literal["lars", "adamw", "sgd"]
#: Learning-rate decay after the warm-up: ``"cosine"`` (pretraining), ``"poly"`` (CMX, DeepLab),
#: ``"step"`` (multiplied by ``gamma`` at each milestone; classification, B.2), ``"constant"``.
ScheduleName = Literal["cosine", "poly", "step", "constant"]


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
    """The optimiser over the trainable parameters of ``modules``.

    ``"lars"`` (lightly's LARS; ResNet pretraining, Appendix B.1): weights at ``lr`` with
    ``weight_decay`` and layer-wise adaptation; biases and norm parameters at ``lr_bias`` with
    neither (lightly excludes parameter groups with zero weight decay from adaptation).
    ``"adamw"`` (MiT/ViT pretraining, lr 1e-4; CMX fine-tuning): weights with ``weight_decay``,
    biases and norm parameters without, both at ``lr`` (``lr_bias`` is a LARS setting and is
    not used). ``"sgd"`` (downstream classification and FCN, B.2/B.3): every parameter at
    ``lr`` with ``momentum`` and ``weight_decay``.
    """
    if name == "sgd":
        parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
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
    raise ValueError(f"optimizer must be 'lars', 'adamw' or 'sgd', got {name!r}.")


def warmup_schedule(
    total_steps: int,
    warmup_steps: int = 0,
    decay: ScheduleName = "cosine",
    *,
    power: float = 0.9,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    final_factor: float = 0.0,
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: linear warm-up, then ``decay``.

    Returns a function for ``torch.optim.lr_scheduler.LambdaLR``. The warm-up rises linearly
    to 1 over ``warmup_steps`` (the paper's pretraining has none, Appendix B.1); after it:

    - ``"cosine"``: ``final_factor + (1 - final_factor) * (1 + cos(pi * progress)) / 2``;
    - ``"poly"``: ``(1 - progress) ** power``;
    - ``"step"``: ``gamma ** (number of milestones passed)``, milestones as fractions of
      ``total_steps`` (classification: 0.6 and 0.8 of training, as epochs 60 and 80 of 100);
    - ``"constant"``: 1;

    with ``progress`` the fraction of the steps after the warm-up that have passed.

    Example:
        >>> f = warmup_schedule(100, 10, "poly", power=1.0)
        >>> [round(f(s), 2) for s in (0, 9, 10, 55, 100)]
        [0.1, 1.0, 1.0, 0.5, 0.0]
    """
    if decay not in ("cosine", "poly", "step", "constant"):
        raise ValueError(f"decay must be 'cosine', 'poly', 'step' or 'constant'; got {decay!r}.")
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    steps = sorted({max(1, round(float(m) * total_steps)) for m in milestones})

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "step":
            return gamma ** sum(step >= m for m in steps)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if decay == "poly":
            return (1.0 - progress) ** power
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
