"""Shared pieces of the downstream LightningModules: named encoders, freezing, missing modalities.

Paper Section 5 evaluates pretrained encoders with frozen weights ("linear probing" /
"frozen encoder") and by fine-tuning, with all modalities or with some missing (Table 1,
middle: SAR only). The encoders are an :class:`~decur_lightning.encoder_set.EncoderSet` built
by :class:`~decur_lightning.encoder_set.NamedModalitiesMixin`, one per named modality, so a
downstream checkpoint (``encoders.<name>.*``) is itself a weight source.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning import Callback, LightningModule
from torch import Tensor, nn

from ..encoder_set import FrozenBatchNorm, NamedModalitiesMixin
from ..monitors import default_callbacks
from ..nonfinite import NonFiniteGuard, finite_flag

__all__ = ["FrozenBatchNorm", "MultimodalDownstreamModule", "RunningFeatureMeans", "total_training_steps"]

#: Weight of a new training batch in the running feature means once ``1 / momentum`` batches
#: have been seen (batch norm's momentum); before, the means are plain averages of the batches.
FEATURE_MEAN_MOMENTUM = 0.1


class RunningFeatureMeans(nn.Module):
    """Running mean of each modality's features over training batches (buffers, saved with the module).

    A modality missing from a validation, test or predict batch is replaced by these means
    (see :class:`MultimodalDownstreamModule`). Per modality ``m`` the buffer ``mean_<m>`` holds
    the mean feature vector and ``batches_<m>`` the training batches seen. The ``t``-th batch mean
    ``x_t`` updates ``mu <- mu + max(1 / t, momentum) * (x_t - mu)``: the plain average of the
    first ``1 / momentum`` batches, then an exponential moving average that follows fine-tuned
    encoders.

    Args:
        widths: feature width per modality.
        momentum: weight of a new batch after the first ``1 / momentum`` ones.
    """

    def __init__(self, widths: Mapping[str, int], momentum: float = FEATURE_MEAN_MOMENTUM) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1]; got {momentum}.")
        self.momentum = momentum
        self.names = tuple(widths)
        for name, width in widths.items():
            self.register_buffer(f"mean_{name}", torch.zeros(int(width)))
            self.register_buffer(f"batches_{name}", torch.zeros((), dtype=torch.long))

    def mean(self, name: str) -> Tensor:
        """The running mean of modality ``name`` ``(width,)``."""
        return getattr(self, f"mean_{name}")

    def batches(self, name: str) -> int:
        """Training batches that have updated the mean of ``name``."""
        return int(getattr(self, f"batches_{name}"))

    @torch.no_grad()
    def update(self, name: str, batch_mean: Tensor) -> None:
        """Fold one training batch's mean features ``(width,)`` into the running mean."""
        mean, count = self.mean(name), getattr(self, f"batches_{name}")
        count += 1
        weight = (1.0 / count).clamp_min(self.momentum)  # a tensor: no host synchronisation
        mean += weight * (batch_mean.detach().to(mean.dtype) - mean)


class MultimodalDownstreamModule(NamedModalitiesMixin, LightningModule):
    """Base of the downstream modules: named encoders, freezing, the non-finite policy.

    Subclasses call ``save_hyperparameters()`` (with ``modalities``, ``encoder``,
    ``encoder_kwargs``, ``freeze_encoders``, ``frozen_batch_norm`` and ``nan_policy`` among
    them) and then :meth:`configure_downstream`; they build their heads in
    :meth:`configure_heads`, starting with ``super().configure_heads()`` (which freezes the
    encoders). The encoders are built at once when every band count is known, else at the
    start of ``fit`` / ``validate`` / ``test`` / ``predict`` from the datamodule's
    ``modality_specs`` (:class:`~decur_lightning.encoder_set.NamedModalitiesMixin`).

    Freezing (``freeze_encoders=True``): no gradient, the weights never change; in training
    steps the encoders' batch norm follows ``frozen_batch_norm``: ``"eval"`` (default, the
    standard linear-probing protocol: running statistics fixed) or ``"train"`` (the authors'
    released linear-probe and frozen-FCN scripts, which freeze the weights but call
    ``net.train()``: the batch-norm running statistics adapt to the downstream data). See
    :meth:`~decur_lightning.encoder_set.EncoderSet.freeze`.

    A modality missing from a validation, test or predict batch (its key ``image_<name>``
    absent) is replaced by its running mean features over the training batches
    (:class:`RunningFeatureMeans`, saved with the checkpoint), with a warning naming it once.
    The heads on the features are affine (a linear layer, 1x1 convolutions), so this gives the
    expected logits over the missing modality's training features, given the present ones'.
    Training batches must hold every modality.

    ``hparams.nan_policy`` (``"raise"``, ``"skip"``, ``"off"``) is checked by a
    :class:`~decur_lightning.nonfinite.NonFiniteGuard`: inputs and labels before the forward
    pass, logits and loss after it (see :meth:`inputs_are_finite`, :meth:`outputs_are_finite`).
    """

    feature_means: RunningFeatureMeans

    def configure_downstream(self) -> None:
        """Check the shared hyper-parameters, set up the non-finite guard, build the encoders if possible."""
        hp = self.hparams
        if hp.frozen_batch_norm not in ("eval", "train"):
            raise ValueError(
                "frozen_batch_norm must be 'eval' (running statistics fixed, the standard protocol) or 'train' "
                "(statistics adapt to the downstream data, as the authors' released scripts); "
                f"got {hp.frozen_batch_norm!r}."
            )
        if not isinstance(hp.freeze_encoders, bool):
            raise TypeError(f"freeze_encoders must be true or false; got {hp.freeze_encoders!r}.")
        self.nonfinite = NonFiniteGuard(hp.nan_policy)
        self._warned_missing: set[str] = set()
        self.build_modalities()

    def configure_heads(self) -> None:
        """Freeze the encoders if asked; subclasses then build their heads (call this first)."""
        if self.hparams.freeze_encoders:
            self.encoders.freeze(self.hparams.frozen_batch_norm)

    def configure_model(self) -> None:
        """Build the encoders (and heads) from the datamodule's modalities if not built yet."""
        super().configure_model()
        self.train(self.training)  # modules built just now follow the module's mode

    # ------------------------------------------------------------------ missing modalities
    def track_feature_means(self, widths: Mapping[str, int]) -> None:
        """Keep running means of these features per modality (for missing modalities); from configure_heads."""
        self.feature_means = RunningFeatureMeans(widths)

    def update_feature_means(self, batch_means: Mapping[str, Tensor]) -> None:
        """Fold one training batch's mean features per modality into the running means (all ranks agree)."""
        trainer = self._trainer
        for name, value in batch_means.items():
            value = value.detach().float()
            if trainer is not None and trainer.world_size > 1:
                value = trainer.strategy.reduce(value, reduce_op="mean")
            self.feature_means.update(name, value)

    def missing_feature_mean(self, name: str) -> Tensor:
        """The running mean features of a missing modality, with a warning naming it (once)."""
        if self.feature_means.batches(name) == 0:
            raise ValueError(
                f"The batch has no image_{name}, and modality {name!r} has no running mean features to stand in "
                "for it: they are collected in training steps (on batches with every modality). Train first, "
                "load a trained checkpoint, or give every modality."
            )
        if name not in self._warned_missing:
            self._warned_missing.add(name)
            warnings.warn(
                f"Modality {name!r} is missing from the batch (no image_{name}): its features are replaced by their "
                f"running mean over {self.feature_means.batches(name)} training batches.",
                UserWarning,
                stacklevel=2,
            )
        return self.feature_means.mean(name)

    def batch_inputs(self, batch: Mapping[str, Any], stage: str) -> dict[str, Tensor]:
        """The checked modality tensors of a batch; outside training a modality may be missing."""
        return self.encoders.inputs(batch, allow_missing=stage != "train")

    # ------------------------------------------------------------------ non-finite checks
    @property
    def skipped_batches(self) -> int:
        """Training batches skipped under ``nan_policy="skip"``."""
        return self.nonfinite.skipped_batches

    def _shared_step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> Tensor | None:
        """Loss, checks, logging and metrics of one batch (``None``: skipped under ``nan_policy="skip"``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _shared_step.")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "test", batch_idx)

    def inputs_are_finite(
        self, stage: str, batch_idx: int, batch: Mapping[str, Any], inputs: Mapping[str, Tensor], target_key: str
    ) -> bool:
        """Check the modality inputs and a floating-point target before the forward pass.

        ``False`` means: skip this training batch (``nan_policy="skip"``); otherwise a
        non-finite value raises :class:`FloatingPointError` naming it.
        """
        if not self.nonfinite.enabled:
            return True
        flags = [(f"the input {self.encoders.key(name)}", finite_flag(x)) for name, x in inputs.items()]
        target = batch.get(target_key)
        if isinstance(target, Tensor) and target.is_floating_point():
            flags.append((f"the {target_key}", finite_flag(target)))
        return self.nonfinite.check(self, stage, batch_idx, flags)

    def outputs_are_finite(self, stage: str, batch_idx: int, logits: Tensor, loss: Tensor) -> bool:
        """Check the logits and the loss after the forward pass (as :meth:`inputs_are_finite`)."""
        if not self.nonfinite.enabled:
            return True
        flags = [("the logits", finite_flag(logits)), ("the loss", finite_flag(loss))]
        return self.nonfinite.check(self, stage, batch_idx, flags)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["nonfinite_guard"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_guard", {}))

    def configure_callbacks(self) -> list[Callback]:
        """Default callbacks: an empty training split fails the fit; exact mid-epoch resume.

        See :func:`decur_lightning.monitors.default_callbacks`; a Trainer callback of the same class wins.
        """
        return default_callbacks(self._trainer, ssl=False)


def total_training_steps(trainer: Any) -> int:
    """The optimiser steps of the whole run (for learning-rate schedules), at least 1."""
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps):
        raise ValueError("The learning-rate schedule needs a finite training length: set max_epochs or max_steps.")
    return max(1, int(steps))
