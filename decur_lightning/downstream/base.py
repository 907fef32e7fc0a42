"""Shared pieces of the downstream LightningModules: per-modality encoders, weights, freezing.

Paper Section 5 evaluates pretrained encoders with frozen weights ("linear probing" /
"frozen encoder") and by fine-tuning, with both modalities or with one (modality-missing).
"""

from __future__ import annotations

import math
from typing import Any

from lightning import Callback, LightningModule
from torch import Tensor, nn

from ..models.encoders import create_encoder
from ..monitors import default_callbacks
from ..weights import ModalitySelector, load_pretrained_encoder

__all__ = ["MultimodalDownstreamModule", "total_training_steps"]


class MultimodalDownstreamModule(LightningModule):
    """Base of the downstream modules: one encoder per modality, pretrained weights, freezing.

    Subclasses call ``save_hyperparameters()`` and then :meth:`configure_encoders`, which reads
    ``encoder1/2``, ``in_channels1/2``, ``modality1/2``, ``weights1/2`` and
    ``weights_modality1/2`` from ``self.hparams``. ``modality2=None`` is the modality-missing
    (single-modal) setting: one encoder, ``encoder2``/``in_channels2``/``weights2`` unused.

    Encoders live at ``encoder1`` / ``encoder2`` (as in DeCURModule), so a checkpoint of a
    downstream module is itself a weight source for
    :func:`decur_lightning.weights.load_encoder_state_dict`.

    Frozen encoders (``freeze_encoders=True``) have ``requires_grad=False`` and stay in eval
    mode during training too (:meth:`train` is overridden): their weights and their batch-norm
    running statistics never change.
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
        self.freeze_encoders = freeze_encoders
        self.encoder1 = self._make_encoder(1)
        self.encoder2 = self._make_encoder(2) if hp.modality2 is not None else None
        if freeze_encoders:
            for encoder in self.encoders:
                encoder.requires_grad_(False)
                encoder.eval()

    def _make_encoder(self, index: int) -> nn.Module:
        hp = self.hparams
        encoder = create_encoder(hp[f"encoder{index}"], hp[f"in_channels{index}"])
        weights = hp[f"weights{index}"]
        if weights is not None:
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
        """Set training mode, keeping frozen encoders in eval mode (batch norm statistics fixed)."""
        super().train(mode)
        if getattr(self, "freeze_encoders", False):
            for encoder in self.encoders:
                encoder.eval()
        return self

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
