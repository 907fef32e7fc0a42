"""Shared pieces of the downstream LightningModules: per-modality encoders, weights, freezing.

Paper Section 5 evaluates pretrained encoders with frozen weights ("linear probing" /
"frozen encoder") and by fine-tuning, with both modalities or with one (modality-missing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from lightning import Callback, LightningModule
from torch import Tensor, nn

from ..models.encoders import create_encoder, is_imagenet_source
from ..monitors import default_callbacks
from ..nonfinite import NonFiniteGuard, finite_flag
from ..weights import ModalitySelector, load_pretrained_encoder

__all__ = ["FrozenBatchNorm", "MultimodalDownstreamModule", "total_training_steps"]

#: Batch-norm behaviour of frozen encoders during training: ``"eval"`` (running statistics
#: fixed, the standard protocol) or ``"train"`` (statistics adapt to the downstream data, as
#: the authors' linear-probe and frozen-FCN scripts do with ``net.train()``).
FrozenBatchNorm = Literal["eval", "train"]


class MultimodalDownstreamModule(LightningModule):
    """Base of the downstream modules: one encoder per modality, pretrained weights, freezing.

    Subclasses call ``save_hyperparameters()`` and then :meth:`configure_encoders`, which reads
    ``encoder1/2``, ``in_channels1/2``, ``modality1/2``, ``weights1/2`` and
    ``weights_modality1/2`` from ``self.hparams``. ``modality2=None`` is the modality-missing
    (single-modal) setting: one encoder, ``encoder2``/``in_channels2``/``weights2`` unused.

    Encoders live at ``encoder1`` / ``encoder2`` (as in DeCURModule), so a checkpoint of a
    downstream module is itself a weight source for
    :func:`decur_lightning.weights.load_encoder_state_dict`.

    Frozen encoders (``freeze_encoders=True``) have ``requires_grad=False`` and no gradient
    flows into them. ``hparams.frozen_batch_norm`` decides their mode during training
    (:meth:`train` is overridden):

    - ``"eval"`` (default, the standard linear-probing protocol): the whole encoder stays in
      eval mode, so its batch-norm running statistics never change;
    - ``"train"`` (the authors' released linear-probe and frozen-FCN scripts, which freeze the
      weights but call ``net.train()``): the encoders' batch-norm layers are in training mode
      in training steps, so they normalise with batch statistics and their running statistics
      adapt to the downstream data; every other layer (dropout, drop-path) stays in eval mode,
      which for ResNets is exactly the released behaviour. At validation and test everything is
      in eval mode. Has no effect on encoders that are not frozen.

    ``hparams.nan_policy`` (``"raise"``, ``"skip"``, ``"off"``) is checked by a
    :class:`~decur_lightning.nonfinite.NonFiniteGuard`: inputs and labels before the forward
    pass, logits and loss after it (see :meth:`inputs_are_finite`, :meth:`outputs_are_finite`).
    """

    encoder1: nn.Module
    encoder2: nn.Module | None

    def configure_encoders(self, freeze_encoders: bool) -> None:
        """Create the encoders from ``self.hparams``, load their weights, freeze if asked."""
        hp = self.hparams
        if hp.modality2 is not None and hp.modality2 == hp.modality1:
            raise ValueError(
                f"modality1 and modality2 must differ (they name batch keys image_<name>); got {hp.modality1!r} "
                "twice. For a single-modal run set modality2=None."
            )
        if hp.modality2 is None and (hp.weights2 is not None or hp.weights_modality2 is not None):
            raise ValueError(
                "weights2 / weights_modality2 are set, but modality2=None (single-modal run): remove them, "
                "or set modality2 to use a second encoder."
            )
        self.modalities: list[str] = [hp.modality1] + ([hp.modality2] if hp.modality2 is not None else [])
        self.in_channels: list[int] = [hp.in_channels1, hp.in_channels2][: len(self.modalities)]
        frozen_batch_norm = hp.get("frozen_batch_norm", "eval")
        if frozen_batch_norm not in ("eval", "train"):
            raise ValueError(
                "frozen_batch_norm must be 'eval' (running statistics fixed, the standard protocol) or 'train' "
                "(statistics adapt to the downstream data, as the authors' released scripts); "
                f"got {frozen_batch_norm!r}."
            )
        self.frozen_batch_norm: FrozenBatchNorm = frozen_batch_norm
        self.nonfinite = NonFiniteGuard(hp.get("nan_policy", "raise"))
        self.freeze_encoders = freeze_encoders
        self.encoder1 = self._make_encoder(1)
        self.encoder2 = self._make_encoder(2) if hp.modality2 is not None else None
        if freeze_encoders:
            for encoder in self.encoders:
                encoder.requires_grad_(False)
            # Lightning keeps the modes it finds at the start of fit (it does not call train()).
            self._set_frozen_modes(training=self.training)

    def _make_encoder(self, index: int) -> nn.Module:
        hp = self.hparams
        weights = hp[f"weights{index}"]
        # ImageNet weights are built in by create_encoder; other sources need the modality selector.
        imagenet = is_imagenet_source(weights)
        encoder = create_encoder(
            hp[f"encoder{index}"], hp[f"in_channels{index}"], weights if imagenet else None, **(hp.get("encoder_kwargs") or {})
        )
        if weights is not None and not imagenet:
            selector: ModalitySelector = hp[f"weights_modality{index}"]
            if selector is None:
                selector = hp[f"modality{index}"]
            load_pretrained_encoder(encoder, weights, selector)
        return encoder

    @property
    def encoders(self) -> list[nn.Module]:
        """The encoders in modality order (one or two)."""
        return [self.encoder1] if self.encoder2 is None else [self.encoder1, self.encoder2]

    def train(self, mode: bool = True) -> MultimodalDownstreamModule:
        """Set training mode; frozen encoders follow ``frozen_batch_norm`` (see the class docstring)."""
        super().train(mode)
        if getattr(self, "freeze_encoders", False):
            self._set_frozen_modes(training=mode)
        return self

    def _set_frozen_modes(self, training: bool) -> None:
        for encoder in self.encoders:
            encoder.eval()
            if training and self.frozen_batch_norm == "train":
                for layer in encoder.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.train()

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
        self, stage: str, batch_idx: int, batch: dict[str, Any], inputs: Sequence[Tensor], target_key: str
    ) -> bool:
        """Check the modality inputs and a floating-point target before the forward pass.

        ``False`` means: skip this training batch (``nan_policy="skip"``); otherwise a
        non-finite value raises :class:`FloatingPointError` naming it.
        """
        if not self.nonfinite.enabled:
            return True
        flags = [(f"the input {key}", finite_flag(x)) for key, x in zip(self._keys(), inputs)]
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
        checkpoint["nonfinite_guard"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_guard", {}))

    def get_inputs(self, batch: dict[str, Any]) -> list[Tensor]:
        """The modality tensors of a batch, in modality order, checked against the encoders."""
        if not isinstance(batch, dict):
            raise TypeError(f"Expected a batch dict with keys {self._keys()}; got {type(batch).__name__}.")
        missing = [key for key in self._keys() if key not in batch]
        if missing:
            raise KeyError(
                f"The batch has no {missing}; it has keys {sorted(batch)}. Set modality1/modality2 to the names "
                "in the batch keys image_<name>."
            )
        inputs = [batch[key] for key in self._keys()]
        for index, (key, x, channels) in enumerate(zip(self._keys(), inputs, self.in_channels), start=1):
            if x.ndim != 4 or x.shape[1] != channels:
                raise ValueError(
                    f"{key} has shape {tuple(x.shape)}, but its encoder expects (N, {channels}, H, W). Set "
                    f"in_channels{index} to the band count or select the bands in the datamodule."
                )
        return inputs

    def _keys(self) -> list[str]:
        return [f"image_{name}" for name in self.modalities]

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
