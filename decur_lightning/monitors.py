"""Training monitors as Lightning callbacks (empty training, small batches, divergence), and the
restore of the data loaders' position for an exact mid-epoch resume.

The SSL and downstream modules add them by default through ``configure_callbacks``
(:func:`default_callbacks`); a callback of the same class in the Trainer's callbacks replaces the
default one, which is how a threshold is changed or a monitor turned off, e.g. in a config::

    trainer:
      callbacks:
        - class_path: decur_lightning.monitors.DivergenceMonitor
          init_args: {max_growth: null}   # off
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = [
    "CollapseMonitor",
    "DivergenceMonitor",
    "EmptyTrainingCheck",
    "LoaderStateRestore",
    "SmallBatchWarning",
    "default_callbacks",
    "train_loader_sizes",
]


def train_loader_sizes(trainer: Trainer) -> tuple[int | None, int | None, bool | None]:
    """``(dataset length, per-device batch size, drop_last)`` of the training loader, ``None`` where unknown."""
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values())) if len(loader) == 1 else None
    if loader is None:
        return None, None, None
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_size = getattr(loader, "batch_size", None) or getattr(batch_sampler, "batch_size", None)
    drop_last = getattr(loader, "drop_last", None)
    if drop_last is None:
        drop_last = getattr(batch_sampler, "drop_last", None)
    try:
        length = len(loader.dataset)
    except (AttributeError, TypeError):
        length = None
    return length, batch_size, drop_last


class EmptyTrainingCheck(Callback):
    """Fail a fit that trained on no batch instead of letting it end as a success.

    With ``drop_last=True`` (the SSL datamodules need whole batches for batch statistics) a
    training split smaller than the batch size gives zero batches; Lightning then logs
    "No training batches" and ``fit`` returns normally. Lightning skips ``on_train_start`` in
    that case, so the check runs at ``on_fit_end`` (nothing was trained, nothing is lost) and
    raises a ValueError that names the split size and the batch size. ``limit_train_batches=0``
    (no training asked for) is left alone.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.num_training_batches != 0 or trainer.limit_train_batches == 0:
            return
        length, batch_size, drop_last = train_loader_sizes(trainer)
        split = "of unknown length" if length is None else f"of {length} samples"
        per = f"a batch size of {batch_size}" if batch_size is not None else "its batch size"
        per_rank = f" per device ({trainer.world_size} devices)" if trainer.world_size > 1 else ""
        drop = " with drop_last=True" if drop_last else ""
        raise ValueError(
            f"No training batches: the training split {split} gives no batch at {per}{per_rank}{drop}, so "
            "fit trained nothing. Lower the batch size to at most the split size (per device), or use a "
            "larger training split (e.g. a larger fraction or more samples)."
        )


class SmallBatchWarning(Callback):
    """Warn at the start of training when the global batch is too small for batch statistics.

    DeCUR and its baselines estimate the batch-norm statistics and the cross-correlation matrices
    (paper eq. 1-3) from the batch: an entry of a correlation estimated from ``N`` samples has a
    standard error of about ``1/sqrt(N)`` (0.18 at 32, 0.71 at 2), and batch norm's error rises
    steeply below 16-32 samples per batch (Wu & He, Group Normalization, 2018, Fig. 1). LARS then
    scales each layer's step by its trust ratio, which amplifies that noise: at a global batch of
    2 with the paper's learning rates, batch-norm weights grow 10-100-fold within 4 steps
    (see :class:`DivergenceMonitor`). The paper trains with a batch of 256.

    Args:
        min_global_batch: warn when ``per-device batch x world size`` is below this (default 32,
            the size where the correlation noise falls under 0.2 and batch norm is reliable);
            ``None`` turns the warning off.
    """

    def __init__(self, min_global_batch: int | None = 32) -> None:
        super().__init__()
        if min_global_batch is not None and min_global_batch < 2:
            raise ValueError(f"min_global_batch must be at least 2 or None (off); got {min_global_batch}.")
        self.min_global_batch = min_global_batch
        self.warned = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.min_global_batch is None:
            return
        _, batch_size, _ = train_loader_sizes(trainer)
        if batch_size is None:
            return
        global_batch = batch_size * trainer.world_size
        if global_batch >= self.min_global_batch:
            return
        self.warned = True
        rank_zero_warn(
            f"The global batch is {global_batch} ({batch_size} per device x {trainer.world_size} devices), below "
            f"{self.min_global_batch}. Batch-norm statistics and the cross-correlation matrices are estimated "
            f"from the batch (standard error of a correlation about 1/sqrt(N) = {1 / math.sqrt(global_batch):.2f}), "
            "and LARS' trust ratio amplifies that noise: training can diverge within a few steps. Use a global "
            f"batch of at least {self.min_global_batch} (the paper uses 256; gradient accumulation does not help, "
            "batch statistics come from one forward pass), or lower the learning rate."
        )


class DivergenceMonitor(Callback):
    """Warn once when a parameter tensor's norm has grown far beyond its value at the start.

    Every ``every_n_steps`` optimiser steps (default: the Trainer's ``log_every_n_steps``) it
    computes the norm of every trainable tensor (one host synchronisation) and its growth since
    the start of training: ``norm / norm_at_start``, or, for a tensor that started at zero
    (biases, zero-initialised batch-norm weights), its root-mean-square value (growth relative to
    the unit scale of a batch-norm weight). It logs the largest growth as
    ``train/max_param_growth`` and warns once, naming the worst tensors, when it exceeds
    ``max_growth``. Norms at the start are saved with the callback's state, so a resumed run
    compares against the same start.

    A healthy run moves its weights little: with LARS the per-step change is about ``lr x 0.001``
    of a layer's norm, and batch-norm weights stay around 1; in 4 steps at batch 16 with AdamW the
    largest growth is 1.00001. At a global batch of 2 with LARS at the paper's learning rates the
    batch-norm weights grow 10-100-fold within 4 steps (the exact figure is chaotic), long before
    the loss turns NaN or the embeddings collapse (the collapse monitor stays quiet there).

    Args:
        max_growth: warn when a tensor's norm exceeds this multiple of its start value
            (default 10); ``None`` turns the monitor off.
        every_n_steps: check interval in optimiser steps (``None``: ``log_every_n_steps``).
        top_k: number of tensors named in the warning.
    """

    def __init__(self, max_growth: float | None = 10.0, every_n_steps: int | None = None, top_k: int = 5) -> None:
        super().__init__()
        if max_growth is not None and not max_growth > 1.0:
            raise ValueError(f"max_growth must be a growth factor above 1, or None (off); got {max_growth}.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps or None; got {every_n_steps}.")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {top_k}.")
        self.max_growth = max_growth
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.start_norms: dict[str, float] = {}
        self.warned = False
        self.last_max_growth: float | None = None
        self._last_checked_step = -1

    @staticmethod
    def _parameters(pl_module: LightningModule) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.max_growth is None:
            return
        params = self._parameters(pl_module)
        missing = [(name, p) for name, p in params if name not in self.start_norms]
        if missing:
            norms = torch.stack([p.detach().float().norm() for _, p in missing]).tolist()
            self.start_norms.update({name: norm for (name, _), norm in zip(missing, norms)})

    def growth(self, pl_module: LightningModule) -> dict[str, float]:
        """Growth of every trainable tensor since the start (one host synchronisation)."""
        params = [(name, p) for name, p in self._parameters(pl_module) if name in self.start_norms]
        if not params:
            return {}
        norms = torch.stack([p.detach().float().norm() for _, p in params]).tolist()
        result = {}
        for (name, p), norm in zip(params, norms):
            start = self.start_norms[name]
            result[name] = norm / start if start > 0 else norm / math.sqrt(p.numel())
        return result

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.max_growth is None or not self.start_norms:
            return
        step = trainer.global_step
        interval = self.every_n_steps or max(1, trainer.log_every_n_steps)
        if step == self._last_checked_step or step % interval != 0:
            return  # also skips the extra batches of gradient accumulation
        self._last_checked_step = step
        growth = self.growth(pl_module)
        if not growth:
            return
        self.last_max_growth = max(growth.values())
        pl_module.log("train/max_param_growth", self.last_max_growth, on_step=True, on_epoch=False, batch_size=1)
        if self.warned or not self.last_max_growth > self.max_growth:
            return
        self.warned = True
        worst = sorted(growth.items(), key=lambda item: -item[1])[: self.top_k]
        detail = ", ".join(f"{name} x{value:.3g}" for name, value in worst)
        _, batch_size, _ = train_loader_sizes(trainer)
        batch = "" if batch_size is None else f" (global batch {batch_size * trainer.world_size})"
        rank_zero_warn(
            f"Parameters are diverging at step {step}: norm growth since the start of training {detail} "
            f"(threshold x{self.max_growth:g}). Encoders trained like this give useless features (downstream "
            f"losses of 1e13 and more). Likely causes: a batch too small for batch statistics{batch} or a "
            "learning rate too high for it; use a global batch of 32 or more (the paper: 256), lower lr/lr_bias, "
            "or add warm-up (warmup_epochs)."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"start_norms": dict(self.start_norms), "warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_norms = dict(state_dict.get("start_norms", {}))
        self.warned = bool(state_dict.get("warned", False))


class CollapseMonitor(Callback):
    """Warn once when a modality's embeddings collapse (SSL modules).

    Every ``log_every_n_steps`` training steps it reads the module's ``embedding_stds`` (the
    last step's :func:`~decur_lightning.ssl.base.embedding_std` per modality: about 1 when the
    embeddings are spread, 0 when they collapse to a point) and warns the first time one falls
    below ``threshold``. Reading them costs one host synchronisation per check.

    Args:
        threshold: the warning level (0.1); ``None`` turns the monitor off.
    """

    def __init__(self, threshold: float | None = 0.1) -> None:
        self.threshold = threshold
        self.warned = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stds = getattr(pl_module, "embedding_stds", None)
        if self.threshold is None or self.warned or not stds:
            return
        step = int(getattr(pl_module, "embedding_stds_step", trainer.global_step))
        if step % max(1, trainer.log_every_n_steps) != 0:
            return
        values = dict(zip(stds, torch.stack([s.detach().float() for s in stds.values()]).tolist()))
        low = {name: v for name, v in values.items() if v < self.threshold}
        if low:
            self.warned = True
            detail = ", ".join(f"'{name}': {v:.3f}" for name, v in low.items())
            rank_zero_warn(
                f"Embedding collapse at step {step}: embedding std {detail} is below "
                f"{self.threshold} (about 1 when healthy). Likely causes: a learning rate too high for the batch "
                "size, too few unique or common dimensions, or views that are too easy (check the augmentations)."
            )


class LoaderStateRestore(Callback):
    """Restore the training loaders' position from the checkpoint (exact mid-epoch resume).

    Lightning saves the state of every stateful training loader (torchdata's
    ``StatefulDataLoader``, used by this package's datamodules) in checkpoints, but does not load
    it when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (our learning-rate
    schedules do): the loader is then built and iterated before the checkpoint is restored
    (Lightning issue #20550, open in Lightning 2.6). The resumed run would start the epoch again
    from its first batch. At ``on_train_start`` this callback loads the pending states, with each
    sampler set to the resumed epoch first (the loader fast-forwards its sampler when the state is
    loaded), and re-creates the batch iterator: what Lightning does when the bug does not hit.
    It does nothing when there is no pending state (a fresh run, or a Lightning that loaded it),
    and drops the state of a checkpoint saved after an epoch's last batch (the next epoch starts
    from a fresh iterator).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit_loop = trainer.fit_loop
        combined = getattr(fit_loop, "_combined_loader", None)
        if (
            not getattr(fit_loop, "_combined_loader_states_to_load", None)
            or not fit_loop.restarting
            or combined is None
        ):
            return
        if fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches:
            # Saved after the epoch's last batch: the next batch is the first of the next epoch,
            # which the loader's fresh iterator gives (a restored, exhausted one would end that epoch too).
            fit_loop._combined_loader_states_to_load = []
            return
        for loader in combined.flattened:
            _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
        fit_loop._load_combined_loader_states()
        iter(fit_loop._data_fetcher)


def default_callbacks(trainer: Trainer | None, ssl: bool = True) -> list[Callback]:
    """The callbacks a module adds to a fit (``configure_callbacks``).

    All modules get :class:`EmptyTrainingCheck` and :class:`LoaderStateRestore`; SSL modules also
    :class:`SmallBatchWarning`, :class:`DivergenceMonitor` and :class:`CollapseMonitor`. A callback whose class is already
    among the Trainer's callbacks is left out, so the user's instance (with its thresholds, or
    turned off) is kept.
    """
    callbacks: list[Callback] = [EmptyTrainingCheck(), LoaderStateRestore()]
    if ssl:
        callbacks += [SmallBatchWarning(), DivergenceMonitor(), CollapseMonitor()]
    present = trainer.callbacks if trainer is not None else []
    return [callback for callback in callbacks if not any(isinstance(c, type(callback)) for c in present)]
