"""Multimodal semantic segmentation: the paper's FCN (Section 5.2) and CMX (Section 5.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..models.encoders import encoder_feature_channels, encoder_feature_maps, encoder_feature_strides
from ..models.mit import MiTEncoder
from ..nonfinite import NanPolicy
from ..optim import build_optimizer
from .base import FrozenBatchNorm, MultimodalDownstreamModule, total_training_steps
from .cmx import CMXFusion
from .heads import FCNHead

__all__ = ["MultimodalSegmentationModule"]

SegmentationHead = Literal["fcn", "cmx"]
SegmentationMode = Literal["frozen", "finetune"]
OptimizerName = Literal["adamw", "sgd"]
ScheduleName = Literal["constant", "poly"]

#: The FCN uses the last three feature levels of each encoder (ResNet layer2/3/4).
FCN_LEVELS = 3


class MultimodalSegmentationModule(MultimodalDownstreamModule):
    """Semantic segmentation from one or two pretrained encoders (paper Sections 5.2-5.3, B.2).

    Heads:

    - ``head="fcn"`` (RGB-DEM on GeoNRW, RGB on SUN-RGBD / NYUDv2): the last three feature
      maps of each encoder (ResNet layer2/3/4, strides 8/16/32) are concatenated per level
      across the modalities, each level is mapped to class scores by a 1x1 convolution,
      upsampled to the input size and the three maps are summed (:class:`FCNHead`). With
      ``modality2=None`` it is the single-modal (RGB-only) FCN.
    - ``head="cmx"`` (RGB-depth on SUN-RGBD / NYUDv2, Table 3): two MiT branches
      (``encoder1/2 = "mit_b2"`` or ``"mit_b5"``) fused by CMX (:class:`CMXFusion`: FRM + FFM per
      stage, SegFormer MLP decoder with ``decoder_channels`` = 512), each branch initialised
      from a DeCUR-pretrained MiT of its modality.

    ``mode="frozen"``: the encoders are frozen (weights fixed, no gradient), only the head
    trains; with ``frozen_batch_norm="eval"`` (default) they stay in eval mode during training,
    so their batch-norm statistics are fixed too (Lightning's warning about modules in eval mode
    at the start of training is expected); ``"train"`` lets the batch-norm running statistics
    adapt to the downstream data, as the authors' released frozen-FCN script (``net.train()``).
    ``mode="finetune"``: everything trains.

    Any input size: images are zero-padded on the bottom and right to a multiple of
    ``size_divisor`` (32, the encoders' output stride), and the logits are cropped back, so the
    output has exactly the input's size and every pixel is evaluated (GeoNRW's 250 px patches
    become 256 px inside the network).

    Loss: cross-entropy ignoring ``ignore_index`` (GeoNRW's background, SUN-RGBD/NYUDv2's
    unlabelled pixels: 255), averaged over the batch's labelled pixels; a batch without any
    labelled pixel has loss 0 (plain ``CrossEntropyLoss`` would give NaN: 0 / 0). Metrics
    (torchmetrics, validation and test, pixels with ``ignore_index`` excluded): ``miou``
    (``MulticlassJaccardIndex``, mean over classes that occur) and ``oa`` (overall pixel
    accuracy). Logged as ``val/miou`` etc.

    Optimisation: paper B.2 (GeoNRW FCN): AdamW, lr 1e-4, weight decay 0.01, constant rate;
    SUN-RGBD FCN: SGD lr 0.01, weight decay 1e-5, polynomial decay; CMX (its published
    settings): AdamW lr 6e-5, weight decay 0.01, poly decay (power 0.9) after a linear warm-up.
    Weight decay applies to weights, not to biases and normalisation parameters (as CMX).

    Batches: dicts with ``image_<modality>`` ``(N, C, H, W)`` and ``mask`` ``(N, H, W)`` int64.

    Args:
        encoder1, encoder2, in_channels1, in_channels2, modality1, modality2, weights1, weights2,
        weights_modality1, weights_modality2: as in
            :class:`~decur_lightning.downstream.MultimodalClassificationModule`
            (``modality2=None``: single-modal).
        num_classes: classes (GeoNRW 10, SUN-RGBD 37, NYUDv2 40).
        ignore_index: label of pixels to ignore (255), or ``None``.
        head: ``"fcn"`` or ``"cmx"``.
        mode: ``"frozen"`` or ``"finetune"``.
        decoder_channels: CMX's MLP decoder width (512 for MiT-B2+, 256 for B0/B1).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum ``momentum``).
        lr, weight_decay, momentum: optimiser settings.
        lr_schedule: ``"constant"`` or ``"poly"`` (``(1 - step / total) ** poly_power``).
        poly_power: exponent of the poly schedule (0.9).
        warmup_epochs: linear warm-up length (CMX: 10 epochs), before the schedule.
        size_divisor: inputs are padded to a multiple of this (the encoders' output stride).
        test_scales: scales of the test (and predict) inputs whose class probabilities are
            averaged at the input size; ``(1.0,)`` (default): single scale. CMX's multi-scale
            evaluation, behind its "MS & Flip" numbers (the CMX rows of the paper's Table 3):
            ``(0.75, 1.0, 1.25)`` with ``test_flip=True``. Validation stays single-scale.
        test_flip: also average the predictions of the left-right mirrored inputs (mirrored back).
        frozen_batch_norm: batch norm of frozen encoders (``mode="frozen"``) in training steps:
            ``"eval"`` (default: running statistics fixed, the standard protocol) or ``"train"``
            (statistics adapt to the downstream data; the authors' released code, used by the
            configs that reproduce Table 2). No effect with ``mode="finetune"``.
        nan_policy: ``"raise"``, ``"skip"`` or ``"off"``, as in
            :class:`~decur_lightning.downstream.MultimodalClassificationModule` (inputs, logits
            and loss are checked).
        encoder_kwargs: extra keyword arguments for both encoders
            (:func:`~decur_lightning.models.create_encoder`), e.g. ``{"rda_residual": false}`` to load
            encoders pretrained with the "DA" ablation (Tables 4 and 7).

    Example:
        >>> model = MultimodalSegmentationModule("resnet18", "resnet18", in_channels1=3, in_channels2=1,
        ...                                      modality1="rgb", modality2="dem", num_classes=10)
        >>> batch = {"image_rgb": torch.rand(2, 3, 250, 250), "image_dem": torch.rand(2, 1, 250, 250)}
        >>> model(model.get_inputs(batch)).shape
        torch.Size([2, 10, 250, 250])
    """

    def __init__(
        self,
        encoder1: str = "resnet50",
        encoder2: str = "resnet50",
        in_channels1: int = 3,
        in_channels2: int = 3,
        modality1: str = "rgb",
        modality2: str | None = "dem",
        weights1: str | None = None,
        weights2: str | None = None,
        weights_modality1: int | str | None = None,
        weights_modality2: int | str | None = None,
        num_classes: int = 10,
        ignore_index: int | None = 255,
        head: SegmentationHead = "fcn",
        mode: SegmentationMode = "finetune",
        decoder_channels: int = 512,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        lr_schedule: ScheduleName = "constant",
        poly_power: float = 0.9,
        warmup_epochs: float = 0.0,
        size_divisor: int = 32,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        frozen_batch_norm: FrozenBatchNorm = "eval",
        nan_policy: NanPolicy = "raise",
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head not in ("fcn", "cmx"):
            raise ValueError(f"head must be 'fcn' or 'cmx', got {head!r}.")
        if mode not in ("frozen", "finetune"):
            raise ValueError(f"mode must be 'frozen' or 'finetune', got {mode!r}.")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        if lr_schedule not in ("constant", "poly"):
            raise ValueError(f"lr_schedule must be 'constant' or 'poly', got {lr_schedule!r}.")
        if head == "cmx" and modality2 is None:
            raise ValueError("head='cmx' fuses two modalities: set modality2 (or use head='fcn' for one modality).")
        if num_classes < 2 or size_divisor < 1:
            raise ValueError(f"Need num_classes >= 2 and size_divisor >= 1; got {num_classes}, {size_divisor}.")
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"test_scales must be non-empty positive factors, e.g. [1.0]; got {test_scales}.")
        self.save_hyperparameters()
        self.configure_encoders(freeze_encoders=mode == "frozen")
        for encoder in self.encoders:
            if isinstance(encoder, MiTEncoder):
                # The 2048-wide pretraining head serves the pooled forward only; segmentation uses
                # the stage maps, so the head takes no gradient (and DDP finds no unused parameter).
                encoder.head.requires_grad_(False)
        if head == "fcn":
            self.head: nn.Module = FCNHead(self._fcn_level_channels(), num_classes)
        else:
            assert self.encoder2 is not None
            self.head = CMXFusion.for_branches(self.encoder1, self.encoder2, num_classes, decoder_channels)
        # Summed, then divided by the labelled pixels (compute_loss): a batch without any is 0, not NaN.
        self.criterion = nn.CrossEntropyLoss(
            ignore_index=-100 if ignore_index is None else ignore_index, reduction="sum"
        )
        metrics = MetricCollection({
            "miou": MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro"),
            "oa": MulticlassAccuracy(num_classes=num_classes, ignore_index=ignore_index, average="micro"),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _fcn_level_channels(self) -> list[int]:
        strides = [encoder_feature_strides(e)[-FCN_LEVELS:] for e in self.encoders]
        if any(s != strides[0] for s in strides):
            raise ValueError(
                f"The FCN concatenates the modalities' maps per level, so the encoders need equal strides; "
                f"got {strides} for {self.modalities}."
            )
        channels = [encoder_feature_channels(e)[-FCN_LEVELS:] for e in self.encoders]
        return [sum(level) for level in zip(*channels)]

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        """Logits ``(N, num_classes, H, W)`` at the inputs' size, from the modality tensors."""
        if len(inputs) != len(self.encoders):
            raise ValueError(f"Expected {len(self.encoders)} inputs ({self.modalities}), got {len(inputs)}.")
        height, width = inputs[0].shape[-2:]
        if any(tuple(x.shape[-2:]) != (height, width) for x in inputs):
            raise ValueError(f"The modalities' images must have one size; got {[tuple(x.shape) for x in inputs]}.")
        divisor = self.hparams.size_divisor
        padded_size = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
        padded = [F.pad(x, (0, padded_size[1] - width, 0, padded_size[0] - height)) for x in inputs]
        if self.hparams.head == "cmx":
            logits = self.head(padded[0], padded[1], self.encoder1, self.encoder2)
            logits = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=False)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
                maps = [encoder_feature_maps(e, x)[-FCN_LEVELS:] for e, x in zip(self.encoders, padded)]
            levels = [torch.cat(level, dim=1) for level in zip(*maps)]
            logits = self.head(levels, padded_size)
        return logits[..., :height, :width]

    def test_logits(self, inputs: Sequence[Tensor]) -> Tensor:
        """Logits for testing: :meth:`forward`, or over ``test_scales`` / ``test_flip`` (CMX's MS & flip).

        With several views, each view's softmax probabilities are resized (bilinear) to the
        input size and averaged; the log of the average is returned (its argmax is the
        prediction, and cross-entropy on it is the loss). CMX sums ``exp`` of the logits instead
        of softmax probabilities (``engine/evaluator.py``).
        """
        scales, flip = tuple(self.hparams.test_scales), self.hparams.test_flip
        if scales == (1.0,) and not flip:
            return self(inputs)
        size = tuple(inputs[0].shape[-2:])
        total: Tensor | None = None
        for scale in scales:
            scaled = [
                x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                for x in inputs
            ]
            for mirrored in (False, True) if flip else (False,):
                view = [x.flip(-1) for x in scaled] if mirrored else scaled
                logits = self(view)
                logits = logits.flip(-1) if mirrored else logits
                probabilities = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)
                total = probabilities if total is None else total + probabilities
        assert total is not None
        return (total / (len(scales) * (2 if flip else 1))).clamp_min(1e-12).log()

    def get_target(self, batch: dict[str, Any]) -> Tensor:
        """The batch's ``mask`` ``(N, H, W)`` as int64."""
        if "mask" not in batch:
            raise KeyError(f"The batch has no 'mask'; it has keys {sorted(batch)}.")
        mask = batch["mask"]
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (N, H, W); got {tuple(batch['mask'].shape)}.")
        return mask.long()

    def compute_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy averaged over the labelled pixels (0 when there are none)."""
        labelled = (target != self.criterion.ignore_index).sum()
        return self.criterion(logits, target) / labelled.clamp(min=1)

    def _shared_step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> Tensor | None:
        inputs = self.get_inputs(batch)
        target = self.get_target(batch)
        if tuple(target.shape[-2:]) != tuple(inputs[0].shape[-2:]):
            raise ValueError(
                f"mask {tuple(target.shape)} and images {tuple(inputs[0].shape)} differ in size."
            )
        if not self.inputs_are_finite(stage, batch_idx, batch, inputs, "mask"):
            return None
        logits = self.test_logits(inputs) if stage == "test" else self(inputs)
        loss = self.compute_loss(logits, target)
        if not self.outputs_are_finite(stage, batch_idx, logits, loss):
            return None
        batch_size = target.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, on_step=stage == "train", on_epoch=True, prog_bar=True)
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(logits.detach().argmax(dim=1), target)
            self.log_dict(metrics, batch_size=batch_size, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Predicted class per pixel ``(N, H, W)`` (over ``test_scales`` / ``test_flip``)."""
        return self.test_logits(self.get_inputs(batch)).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD; constant or poly learning rate after an optional linear warm-up."""
        hp = self.hparams
        if hp.optimizer == "adamw":
            optimizer = build_optimizer([self], name="adamw", lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            parameters = [p for p in self.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total_steps = total_training_steps(self.trainer)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup_steps = min(total_steps - 1, int(round(hp.warmup_epochs * total_steps / epochs)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_then(hp.lr_schedule, total_steps, warmup_steps, hp.poly_power)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_then(schedule: ScheduleName, total_steps: int, warmup_steps: int = 0, power: float = 0.9):
    """Learning-rate factor per step for ``LambdaLR``: linear warm-up, then constant or poly.

    Poly (CMX, DeepLab): ``(1 - progress) ** power`` with ``progress`` the fraction of the steps
    after the warm-up that have passed.
    """
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (1.0 - progress) ** power

    return factor

