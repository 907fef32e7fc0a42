"""Multimodal scene classification with late fusion (paper Section 5.1, Appendix B.2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

from ..modalities import ModalitiesArg
from ..nonfinite import NanPolicy
from ..optim import OptimizerName, build_optimizer, warmup_schedule
from .base import FrozenBatchNorm, MultimodalDownstreamModule, total_training_steps

__all__ = ["MultimodalClassificationModule"]

ClassificationTask = Literal["multilabel", "multiclass"]

#: Paper B.2: SGD learning rate of linear classification (frozen encoders) and of fine-tuning.
LINEAR_PROBE_LR = 0.5
FINETUNE_LR = 0.05


class MultimodalClassificationModule(MultimodalDownstreamModule):
    """Late-fusion classifier over one encoder per modality (paper Section 5.1, B.2).

    Each modality's image goes through its own encoder (pooled features, e.g. 2048 for
    ResNet-50); the features are concatenated in modality order and one linear layer gives the
    class logits ("simple late fusion ... concatenating the encoded features from both
    modalities, followed by one classification layer"). Any number of modalities: one (e.g.
    SAR only, the modality-missing setting of Table 1, middle), two (the paper's S1 + S2) or more.

    - ``freeze_encoders=True`` (linear probing, default): the encoders are frozen (no gradient,
      weights never change); only the linear layer trains. With ``frozen_batch_norm="eval"``
      (default) they stay in eval mode during training, so their batch-norm statistics never
      change either; ``"train"`` lets the batch-norm running statistics adapt to the downstream
      data, as the authors' released linear-probe script does (``net.train()`` on a frozen network).
    - ``freeze_encoders=False``: fine-tuning, everything trains.

    (With frozen encoders Lightning warns that modules are in eval mode at the start of
    training: that is intended.)

    A modality missing from a validation, test or predict batch (no ``image_<name>``) gets its
    running mean features over the training batches (see
    :class:`~decur_lightning.downstream.MultimodalDownstreamModule`): the logits are then the
    expected logits over that modality's training features, and a model trained with S1 + S2
    can be scored on S1 alone. Training batches must hold every modality.

    Loss ``MultiLabelSoftMarginLoss`` (multi-label, BigEarthNet's 19 classes) or cross-entropy
    (``task="multiclass"``, labels ``(N,)``). Optimiser as the paper: SGD, momentum 0.9, weight
    decay 0, lr 0.5 (frozen) / 0.05 (fine-tuned), divided by 10 at 60 % and 80 % of training
    (epochs 60 and 80 of 100). The paper's batch size is 256.

    Metrics (torchmetrics, on validation and test): multi-label ``map_micro`` (the paper's mAP,
    ``MultilabelAveragePrecision(average="micro")``), ``map_macro``, ``f1_micro``, ``f1_macro``
    (threshold 0.5 on the sigmoid); multi-class ``accuracy``, ``map_macro``, ``f1_macro``.
    Logged as ``val/<name>`` and ``test/<name>``, with ``train/loss`` and ``val/loss``.

    Batches: dicts with ``image_<modality>`` ``(N, C, H, W)`` and ``label`` (multi-hot
    ``(N, num_classes)`` or class indices ``(N,)``), as ``BigEarthNetMMDataModule`` gives.

    Args:
        modalities: the modalities and their encoders (:data:`~decur_lightning.modalities.ModalitiesArg`):
            ``None`` (default: every modality of the datamodule), a list of names (e.g.
            ``["s1"]`` for SAR only), or a mapping name -> description, e.g.
            ``{"s1": {"weights": "pretrain.ckpt"}, "s2": {"weights": "pretrain.ckpt"}}``. A
            description's ``weights`` are loaded strictly (a DeCUR checkpoint, an export, a
            torchgeo weight name, an authors' checkpoint with ``weights_modality``: 1 = SAR,
            2 = optical; see :func:`decur_lightning.weights.load_encoder_state_dict`); ``bands``
            are read from the datamodule when left out.
        encoder: encoder of every modality whose description names none
            (:func:`decur_lightning.models.create_encoder`).
        encoder_kwargs: extra keyword arguments for every encoder, e.g. ``{"rda_residual": false}``
            to load encoders pretrained with the "DA" ablation (Tables 4 and 7).
        num_classes: number of classes (19 for BigEarthNet).
        task: ``"multilabel"`` or ``"multiclass"``.
        freeze_encoders: linear probing (``True``) or fine-tuning (``False``).
        optimizer: ``"sgd"`` (the paper), ``"adamw"`` or ``"lars"`` (:func:`~decur_lightning.optim.build_optimizer`;
            LARS gives biases the same ``lr``).
        lr: learning rate; ``None``: 0.5 with frozen encoders, 0.05 fine-tuned (paper B.2).
        momentum, weight_decay: optimiser settings (paper: 0.9 and 0).
        lr_milestones: fractions of the total training steps at which the learning rate is
            multiplied by ``lr_gamma`` (paper: epochs 60 and 80 of 100).
        lr_gamma: the factor (0.1).
        frozen_batch_norm: batch norm of frozen encoders in training steps: ``"eval"``
            (default: running statistics fixed, the standard protocol) or ``"train"``
            (statistics adapt to the downstream data; the authors' released code, used by the
            configs that reproduce Table 1). No effect with ``freeze_encoders=False``.
        nan_policy: non-finite inputs, labels, logits or loss: ``"raise"`` (default, a
            ``FloatingPointError`` naming the stage, step, batch and item), ``"skip"`` (training
            batches only: no optimiser step, on every rank; counted in ``skipped_batches`` and
            logged as ``train/skipped_batches``; validation and test still raise) or ``"off"``
            (see :mod:`decur_lightning.nonfinite`).

    Reloading a trained module with ``load_from_checkpoint`` re-reads the modalities'
    ``weights`` before the checkpoint's own weights replace them.

    Example:
        >>> model = MultimodalClassificationModule({"s1": {"bands": 2}, "s2": {"bands": 13}}, encoder="resnet18")
        >>> batch = {"image_s1": torch.rand(2, 2, 64, 64), "image_s2": torch.rand(2, 13, 64, 64)}
        >>> model(model.encoders.inputs(batch)).shape
        torch.Size([2, 19])
    """

    classifier: nn.Linear

    def __init__(
        self,
        modalities: ModalitiesArg = None,
        encoder: str = "resnet50",
        encoder_kwargs: dict[str, Any] | None = None,
        num_classes: int = 19,
        task: ClassificationTask = "multilabel",
        freeze_encoders: bool = True,
        optimizer: OptimizerName = "sgd",
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (0.6, 0.8),
        lr_gamma: float = 0.1,
        frozen_batch_norm: FrozenBatchNorm = "eval",
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}.")
        if optimizer not in ("sgd", "adamw", "lars"):
            raise ValueError(f"optimizer must be 'sgd' (the paper), 'adamw' or 'lars'; got {optimizer!r}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if not all(0.0 < float(m) < 1.0 for m in lr_milestones):
            raise ValueError(f"lr_milestones are fractions of training in (0, 1); got {list(lr_milestones)}.")
        self.save_hyperparameters()
        self.criterion: nn.Module = nn.MultiLabelSoftMarginLoss() if task == "multilabel" else nn.CrossEntropyLoss()
        metrics = self._make_metrics(task, num_classes)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.configure_downstream()

    def configure_heads(self) -> None:
        """The linear classifier on the concatenated features, and their running means."""
        super().configure_heads()
        widths = self.encoders.num_features
        self.classifier = nn.Linear(sum(widths.values()), self.hparams.num_classes)
        self.track_feature_means(widths)

    @staticmethod
    def _make_metrics(task: ClassificationTask, num_classes: int) -> MetricCollection:
        if task == "multilabel":
            return MetricCollection(
                {
                    "map_micro": MultilabelAveragePrecision(num_labels=num_classes, average="micro"),
                    "map_macro": MultilabelAveragePrecision(num_labels=num_classes, average="macro"),
                    "f1_micro": MultilabelF1Score(num_labels=num_classes, average="micro"),
                    "f1_macro": MultilabelF1Score(num_labels=num_classes, average="macro"),
                }
            )
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro"),
                "map_macro": MulticlassAveragePrecision(num_classes=num_classes, average="macro"),
                "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro"),
            }
        )

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Class logits ``(N, num_classes)`` from the modality tensors ``{name: (N, C, H, W)}``.

        A modality left out gets its running mean features (see the class docstring).
        """
        return self.classify(self.encoders(inputs))

    def classify(self, features: Mapping[str, Tensor]) -> Tensor:
        """Class logits from pooled features ``{name: (N, num_features)}``, missing ones filled in."""
        if not features:
            raise ValueError(f"No modality given; expected some of {list(self.modalities)}.")
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise KeyError(f"Unknown modalities {unknown}; the modalities are {list(self.modalities)}.")
        like = next(iter(features.values()))
        parts = [
            features[name] if name in features else self.missing_feature_mean(name).to(like).expand(len(like), -1)
            for name in self.modalities
        ]
        return self.classifier(torch.cat(parts, dim=1))

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
        inputs = self.batch_inputs(batch, stage)
        target = self.get_target(batch)
        if not self.inputs_are_finite(stage, batch_idx, batch, inputs, "label"):
            return None
        features = self.encoders(inputs)
        logits = self.classify(features)
        loss = self.criterion(logits, target.float() if self.hparams.task == "multilabel" else target)
        if not self.outputs_are_finite(stage, batch_idx, logits, loss):
            return None
        if stage == "train":
            self.update_feature_means({name: f.mean(dim=0) for name, f in features.items()})
        batch_size = target.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, on_step=stage == "train", on_epoch=True, prog_bar=True)
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(self.predict_proba(logits.detach()), target)
            self.log_dict(metrics, batch_size=batch_size, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Class probabilities of a batch."""
        return self.predict_proba(self(self.batch_inputs(batch, "predict")))

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with step decay at the ``lr_milestones`` fractions of training (paper B.2)."""
        hp = self.hparams
        lr = (LINEAR_PROBE_LR if hp.freeze_encoders else FINETUNE_LR) if hp.lr is None else hp.lr
        optimizer = build_optimizer(
            [self], name=hp.optimizer, lr=lr, lr_bias=lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        schedule = warmup_schedule(
            total_training_steps(self.trainer), decay="step", milestones=hp.lr_milestones, gamma=hp.lr_gamma
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
