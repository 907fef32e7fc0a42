"""Multimodal scene classification with late fusion (paper Section 5.1, Appendix B.2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAveragePrecision,
    MulticlassF1Score,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from ..nonfinite import NanPolicy
from .base import FrozenBatchNorm, MultimodalDownstreamModule, total_training_steps

__all__ = ["MultimodalClassificationModule"]

ClassificationTask = Literal["multilabel", "multiclass"]
ClassificationMode = Literal["linear", "finetune"]

#: Paper B.2: SGD learning rate for linear classification and for fine-tuning.
DEFAULT_LR: dict[str, float] = {"linear": 0.5, "finetune": 0.05}


class MultimodalClassificationModule(MultimodalDownstreamModule):
    """Late-fusion classifier over one encoder per modality (paper Section 5.1, B.2).

    Each modality's image goes through its own encoder (pooled features, e.g. 2048 for
    ResNet-50); the features are concatenated and one linear layer gives the class logits
    ("simple late fusion ... concatenating the encoded features from both modalities, followed
    by one classification layer"). With ``modality2=None`` it is the modality-missing setting of
    Table 1 (middle): one encoder, e.g. SAR only.

    - ``mode="linear"``: the encoders are frozen (no gradient, weights never change); only the
      linear layer trains. With ``frozen_batch_norm="eval"`` (default) they stay in eval mode
      during training, so their batch-norm statistics never change either; ``"train"`` lets
      the batch-norm running statistics adapt to the downstream data, as the authors' released
      linear-probe script does (``net.train()`` on a frozen network).
    - ``mode="finetune"``: everything trains.

    (With frozen encoders Lightning warns that modules are in eval mode at the start of
    training: that is intended.)

    Loss ``MultiLabelSoftMarginLoss`` (multi-label, BigEarthNet's 19 classes) or cross-entropy
    (``task="multiclass"``, labels ``(N,)``). Optimiser as the paper: SGD, momentum 0.9, weight
    decay 0, lr 0.5 (linear) / 0.05 (fine-tune), divided by 10 at 60 % and 80 % of training
    (epochs 60 and 80 of 100). The paper's batch size is 256.

    Metrics (torchmetrics, on validation and test): multi-label ``map_micro`` (the paper's mAP,
    ``MultilabelAveragePrecision(average="micro")``), ``map_macro``, ``f1_micro``, ``f1_macro``
    (threshold 0.5 on the sigmoid); multi-class ``accuracy``, ``map_macro``, ``f1_macro``.
    Logged as ``val/<name>`` and ``test/<name>``, with ``train/loss`` and ``val/loss``.

    Batches: dicts with ``image_<modality>`` ``(N, C, H, W)`` and ``label`` (multi-hot
    ``(N, num_classes)`` or class indices ``(N,)``), as ``BigEarthNetMMDataModule`` gives.

    Args:
        encoder1, encoder2: encoder names (:func:`decur_lightning.models.create_encoder`).
        in_channels1, in_channels2: band counts (BigEarthNet: 2 for S1, 13 for S2 with the
            inserted empty B10).
        modality1, modality2: modality names (batch keys ``image_<name>``); ``modality2=None``
            for a single-modal run.
        weights1, weights2: pretrained weights of each encoder: a DeCUR checkpoint, an export
            folder or file, a torchgeo weight name, or an authors' checkpoint (see
            :func:`decur_lightning.weights.load_encoder_state_dict`); loaded strictly.
        weights_modality1, weights_modality2: which encoder of a two-encoder source to take
            (1, 2 or a modality name); default: the modality's own name. The authors' joint
            checkpoints record no names: give 1 or 2.
        num_classes: number of classes (19 for BigEarthNet).
        task: ``"multilabel"`` or ``"multiclass"``.
        mode: ``"linear"`` (frozen encoders) or ``"finetune"``.
        lr: SGD learning rate; ``None``: 0.5 for linear, 0.05 for fine-tune (paper B.2).
        momentum, weight_decay: SGD settings (paper: 0.9 and 0).
        lr_milestones: fractions of the total training steps at which the learning rate is
            multiplied by ``lr_gamma`` (paper: epochs 60 and 80 of 100).
        lr_gamma: the factor (0.1).
        frozen_batch_norm: batch norm of frozen encoders (``mode="linear"``) in training steps:
            ``"eval"`` (default: running statistics fixed, the standard protocol) or ``"train"``
            (statistics adapt to the downstream data; the authors' released code, used by the
            configs that reproduce Table 1). No effect with ``mode="finetune"``.
        nan_policy: non-finite inputs, labels, logits or loss: ``"raise"`` (default, a
            ``FloatingPointError`` naming the stage, step, batch and item), ``"skip"`` (training
            batches only: no optimiser step, on every rank; counted in ``skipped_batches`` and
            logged as ``train/skipped_batches``; validation and test still raise) or ``"off"``
            (see :mod:`decur_lightning.nonfinite`).
        encoder_kwargs: extra keyword arguments for both encoders
            (:func:`~decur_lightning.models.create_encoder`), e.g. ``{"rda_residual": false}`` to load
            encoders pretrained with the "DA" ablation (Tables 4 and 7).

    Reloading a trained module with ``load_from_checkpoint`` re-reads ``weights1/2`` before the
    checkpoint's own weights replace them; pass ``weights1=None, weights2=None`` if those files
    are not at hand.

    Example:
        >>> model = MultimodalClassificationModule("resnet18", "resnet18", in_channels1=2, in_channels2=13,
        ...                                        mode="linear")
        >>> batch = {"image_s1": torch.rand(2, 2, 64, 64), "image_s2": torch.rand(2, 13, 64, 64)}
        >>> model(model.get_inputs(batch)).shape
        torch.Size([2, 19])
    """

    def __init__(
        self,
        encoder1: str = "resnet50",
        encoder2: str = "resnet50",
        in_channels1: int = 2,
        in_channels2: int = 13,
        modality1: str = "s1",
        modality2: str | None = "s2",
        weights1: str | None = None,
        weights2: str | None = None,
        weights_modality1: int | str | None = None,
        weights_modality2: int | str | None = None,
        num_classes: int = 19,
        task: ClassificationTask = "multilabel",
        mode: ClassificationMode = "linear",
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (0.6, 0.8),
        lr_gamma: float = 0.1,
        frozen_batch_norm: FrozenBatchNorm = "eval",
        nan_policy: NanPolicy = "raise",
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}.")
        if mode not in ("linear", "finetune"):
            raise ValueError(f"mode must be 'linear' (frozen encoders) or 'finetune', got {mode!r}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if not all(0.0 < float(m) < 1.0 for m in lr_milestones):
            raise ValueError(f"lr_milestones are fractions of training in (0, 1); got {list(lr_milestones)}.")
        self.save_hyperparameters()
        self.configure_encoders(freeze_encoders=mode == "linear")
        self.classifier = nn.Linear(sum(int(e.num_features) for e in self.encoders), num_classes)
        self.criterion: nn.Module = nn.MultiLabelSoftMarginLoss() if task == "multilabel" else nn.CrossEntropyLoss()
        metrics = self._make_metrics(task, num_classes)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @staticmethod
    def _make_metrics(task: ClassificationTask, num_classes: int) -> MetricCollection:
        if task == "multilabel":
            return MetricCollection({
                "map_micro": MultilabelAveragePrecision(num_labels=num_classes, average="micro"),
                "map_macro": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
                "f1_micro": MultilabelF1Score(num_labels=num_classes, average="micro"),
                "f1_macro": MultilabelF1Score(num_labels=num_classes, average="macro"),
            })
        return MetricCollection({
            "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "map_macro": MulticlassAveragePrecision(num_classes=num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro"),
        })

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Class logits ``(N, num_classes)`` from the modality tensors (in modality order)."""
        if len(inputs) != len(self.encoders):
            raise ValueError(f"Expected {len(self.encoders)} inputs ({self.modalities}), got {len(inputs)}.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            features = [encoder(x) for encoder, x in zip(self.encoders, inputs)]
        return self.classifier(torch.cat(features, dim=1))

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Probabilities: sigmoid per label (multi-label) or softmax over classes."""
        return logits.sigmoid() if self.hparams.task == "multilabel" else logits.softmax(dim=1)

    def get_target(self, batch: dict[str, Any]) -> Tensor:
        """The batch's ``label``, checked: multi-hot ``(N, C)`` or class indices ``(N,)``."""
        if "label" not in batch:
            raise KeyError(f"The batch has no 'label'; it has keys {sorted(batch)}.")
        target = batch["label"].long()
        num_classes = self.hparams.num_classes
        if self.hparams.task == "multilabel" and (target.ndim != 2 or target.shape[1] != num_classes):
            raise ValueError(
                f"task='multilabel' expects a multi-hot label (N, {num_classes}); got {tuple(target.shape)}. "
                "Set num_classes, or task='multiclass' for class indices."
            )
        if self.hparams.task == "multiclass" and target.ndim != 1:
            raise ValueError(f"task='multiclass' expects class indices (N,); got {tuple(target.shape)}.")
        return target

    def _shared_step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> Tensor | None:
        inputs = self.get_inputs(batch)
        target = self.get_target(batch)
        if not self.inputs_are_finite(stage, batch_idx, batch, inputs, "label"):
            return None
        logits = self(inputs)
        loss = self.criterion(logits, target.float() if self.hparams.task == "multilabel" else target)
        if not self.outputs_are_finite(stage, batch_idx, logits, loss):
            return None
        batch_size = target.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, on_step=stage == "train", on_epoch=True, prog_bar=True)
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(self.predict_proba(logits.detach()), target)
            self.log_dict(metrics, batch_size=batch_size, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Class probabilities of a batch."""
        return self.predict_proba(self(self.get_inputs(batch)))

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with step decay at the ``lr_milestones`` fractions of training (paper B.2)."""
        hp = self.hparams
        lr = DEFAULT_LR[hp.mode] if hp.lr is None else hp.lr
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total_steps = total_training_steps(self.trainer)
        milestones = sorted({max(1, round(float(m) * total_steps)) for m in hp.lr_milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
