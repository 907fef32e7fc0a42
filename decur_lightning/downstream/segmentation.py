"""Multimodal semantic segmentation: the paper's FCN (Section 5.2) and CMX (Section 5.3)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..modalities import ModalitiesArg
from ..models.encoders import encoder_feature_channels, encoder_feature_maps, encoder_feature_strides
from ..models.mit import MiTEncoder
from ..nonfinite import NanPolicy
from ..optim import OptimizerName, ScheduleName, build_optimizer, warmup_schedule
from .base import FrozenBatchNorm, MultimodalDownstreamModule, total_training_steps
from .cmx import CMXFusion
from .heads import FCNHead

__all__ = ["MultimodalSegmentationModule"]

SegmentationHead = Literal["fcn", "cmx"]

#: The FCN uses the last three feature levels of each encoder (ResNet layer2/3/4).
FCN_LEVELS = 3


class MultimodalSegmentationModule(MultimodalDownstreamModule):
    """Semantic segmentation from pretrained encoders, one per modality (paper Sections 5.2-5.3, B.2).

    Heads:

    - ``head="fcn"`` (RGB-DEM on GeoNRW, RGB on SUN-RGBD / NYUDv2), any number of modalities:
      the last three feature maps of each encoder (ResNet layer2/3/4, strides 8/16/32) are
      concatenated per level across the modalities (in modality order), each level is mapped
      to class scores by a 1x1 convolution, upsampled to the input size and the three maps are
      summed (:class:`FCNHead`). One modality (e.g. ``modalities=["rgb"]``) is the
      single-modal FCN.
    - ``head="cmx"`` (RGB-depth on SUN-RGBD / NYUDv2, Table 3): CMX is RGB-X, exactly two
      modalities, RGB first (e.g. ``{"rgb": ..., "hha": ...}``), each on an MiT branch
      (``encoder: mit_b2`` or ``mit_b5``) fused by :class:`CMXFusion` (FRM + FFM per stage,
      SegFormer MLP decoder with ``decoder_channels`` = 512), each branch initialised from a
      DeCUR-pretrained MiT of its modality.

    ``freeze_encoders=True``: the encoders are frozen (weights fixed, no gradient), only the
    head trains; with ``frozen_batch_norm="eval"`` (default) they stay in eval mode during
    training, so their batch-norm statistics are fixed too (Lightning's warning about modules in
    eval mode at the start of training is expected); ``"train"`` lets the batch-norm running
    statistics adapt to the downstream data, as the authors' released frozen-FCN script
    (``net.train()``). ``freeze_encoders=False`` (default): fine-tuning, everything trains.

    A modality missing from a validation, test or predict batch (no ``image_<name>``): with the
    FCN, each of its feature levels is replaced by a constant map of its running per-channel
    means over the training batches (see
    :class:`~decur_lightning.downstream.MultimodalDownstreamModule`); since the head is a 1x1
    convolution per level, the logits are the expected ones over that modality's training
    features. CMX fuses the two branches stage by stage and needs both. Training batches must
    hold every modality.

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
    With AdamW, weight decay applies to weights, not to biases and normalisation parameters (as CMX).

    Batches: dicts with ``image_<modality>`` ``(N, C, H, W)`` and ``mask`` ``(N, H, W)`` int64.

    Args:
        modalities, encoder, encoder_kwargs: the modalities and their encoders, as in
            :class:`~decur_lightning.downstream.MultimodalClassificationModule` (``None``: every
            modality of the datamodule).
        num_classes: classes (GeoNRW 10, SUN-RGBD 37, NYUDv2 40).
        ignore_index: label of pixels to ignore (255), or ``None``.
        head: ``"fcn"`` or ``"cmx"``.
        freeze_encoders: frozen encoders (``True``) or fine-tuning (``False``).
        decoder_channels: CMX's MLP decoder width (512 for MiT-B2+, 256 for B0/B1).
        optimizer: ``"adamw"``, ``"sgd"`` (momentum ``momentum``) or ``"lars"``
            (:func:`~decur_lightning.optim.build_optimizer`).
        lr, weight_decay, momentum: optimiser settings.
        lr_schedule: ``"constant"``, ``"poly"`` (``(1 - progress) ** poly_power``) or ``"cosine"``
            (:func:`~decur_lightning.optim.warmup_schedule`).
        poly_power: exponent of the poly schedule (0.9).
        warmup_epochs: linear warm-up length (CMX: 10 epochs), before the schedule.
        size_divisor: inputs are padded to a multiple of this (the encoders' output stride).
        test_scales: scales of the test (and predict) inputs whose class probabilities are
            averaged at the input size; ``(1.0,)`` (default): single scale. CMX's multi-scale
            evaluation, behind its "MS & Flip" numbers (the CMX rows of the paper's Table 3):
            ``(0.75, 1.0, 1.25)`` with ``test_flip=True``. Validation stays single-scale.
        test_flip: also average the predictions of the left-right mirrored inputs (mirrored back).
        frozen_batch_norm: batch norm of frozen encoders in training steps: ``"eval"`` (default:
            running statistics fixed, the standard protocol) or ``"train"`` (statistics adapt to
            the downstream data; the authors' released code, used by the configs that reproduce
            Table 2). No effect with ``freeze_encoders=False``.
        nan_policy: ``"raise"``, ``"skip"`` or ``"off"``, as in
            :class:`~decur_lightning.downstream.MultimodalClassificationModule` (inputs, logits
            and loss are checked).

    Example:
        >>> model = MultimodalSegmentationModule({"rgb": {"bands": 3}, "dem": {"bands": 1}}, encoder="resnet18")
        >>> batch = {"image_rgb": torch.rand(2, 3, 250, 250), "image_dem": torch.rand(2, 1, 250, 250)}
        >>> model(model.encoders.inputs(batch)).shape
        torch.Size([2, 10, 250, 250])
    """

    head: nn.Module

    def __init__(
        self,
        modalities: ModalitiesArg = None,
        encoder: str = "resnet50",
        encoder_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        ignore_index: int | None = 255,
        head: SegmentationHead = "fcn",
        freeze_encoders: bool = False,
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
    ) -> None:
        super().__init__()
        if head not in ("fcn", "cmx"):
            raise ValueError(f"head must be 'fcn' or 'cmx', got {head!r}.")
        if optimizer not in ("adamw", "sgd", "lars"):
            raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'lars', got {optimizer!r}.")
        if lr_schedule not in ("constant", "poly", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant', 'poly' or 'cosine', got {lr_schedule!r}.")
        if head == "cmx" and modalities is not None:
            _check_cmx_modalities(list(modalities))
        if num_classes < 2 or size_divisor < 1:
            raise ValueError(f"Need num_classes >= 2 and size_divisor >= 1; got {num_classes}, {size_divisor}.")
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"test_scales must be non-empty positive factors, e.g. [1.0]; got {test_scales}.")
        self.save_hyperparameters()
        # Summed, then divided by the labelled pixels (compute_loss): a batch without any is 0, not NaN.
        self.criterion = nn.CrossEntropyLoss(
            ignore_index=-100 if ignore_index is None else ignore_index, reduction="sum"
        )
        metrics = MetricCollection(
            {
                "miou": MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro"),
                "oa": MulticlassAccuracy(num_classes=num_classes, ignore_index=ignore_index, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.configure_downstream()

    def configure_heads(self) -> None:
        """The FCN head (with the running means of its features) or the CMX fusion."""
        super().configure_heads()
        hp = self.hparams
        for encoder in self.encoders.values():
            if isinstance(encoder, MiTEncoder):
                # The 2048-wide pretraining head serves the pooled forward only; segmentation uses
                # the stage maps, so the head takes no gradient (and DDP finds no unused parameter).
                encoder.head.requires_grad_(False)
        if hp.head == "cmx":
            rgb, other = _check_cmx_modalities(self.modalities)
            self.head = CMXFusion.for_branches(
                self.encoders[rgb], self.encoders[other], hp.num_classes, hp.decoder_channels
            )
            return
        self.level_channels = self._fcn_level_channels()
        self.head = FCNHead([sum(level) for level in zip(*self.level_channels.values())], hp.num_classes)
        self.track_feature_means({name: sum(channels) for name, channels in self.level_channels.items()})

    def _fcn_level_channels(self) -> dict[str, list[int]]:
        """Channels of the FCN's three levels, per modality."""
        strides = {name: encoder_feature_strides(e)[-FCN_LEVELS:] for name, e in self.encoders.items()}
        if len({tuple(s) for s in strides.values()}) > 1:
            raise ValueError(
                f"The FCN concatenates the modalities' maps per level, so the encoders need equal strides; got {strides}."
            )
        return {name: encoder_feature_channels(e)[-FCN_LEVELS:] for name, e in self.encoders.items()}

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits ``(N, num_classes, H, W)`` at the inputs' size, from the modality tensors ``{name: (N, C, H, W)}``.

        With the FCN, a modality left out gets its running mean features (see the class docstring).
        """
        return self._forward(inputs)[0]

    def _forward(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, list[Tensor]]]:
        """Logits, and the FCN's feature maps of the given modalities (empty for CMX)."""
        if not inputs:
            raise ValueError(f"No modality given; expected some of {list(self.modalities)}.")
        unknown = sorted(set(inputs) - set(self.modalities))
        if unknown:
            raise KeyError(f"Unknown modalities {unknown}; the modalities are {list(self.modalities)}.")
        height, width = next(iter(inputs.values())).shape[-2:]
        if any(tuple(x.shape[-2:]) != (height, width) for x in inputs.values()):
            shapes = {name: tuple(x.shape) for name, x in inputs.items()}
            raise ValueError(f"The modalities' images must have one size; got {shapes}.")
        divisor = self.hparams.size_divisor
        padded_size = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
        padded = {name: F.pad(x, (0, padded_size[1] - width, 0, padded_size[0] - height)) for name, x in inputs.items()}
        maps: dict[str, list[Tensor]] = {}
        if self.hparams.head == "cmx":
            missing = [name for name in self.modalities if name not in padded]
            if missing:
                raise ValueError(
                    f"CMX fuses RGB and X stage by stage and needs both; the batch has no "
                    f"{[self.encoders.key(name) for name in missing]}. Use head='fcn' to score with a missing modality."
                )
            rgb, other = self.modalities
            logits = self.head(padded[rgb], padded[other], self.encoders[rgb], self.encoders[other])
            logits = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=False)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders.frozen):
                maps = {name: encoder_feature_maps(self.encoders[name], x)[-FCN_LEVELS:] for name, x in padded.items()}
            logits = self.head(self._fcn_levels(maps), padded_size)
        return logits[..., :height, :width], maps

    def _fcn_levels(self, maps: Mapping[str, list[Tensor]]) -> list[Tensor]:
        """Per level, the modalities' maps concatenated; a missing modality's is its constant mean map."""
        present = next(iter(maps.values()))
        levels = []
        for level, like in enumerate(present):
            parts = []
            for name in self.modalities:
                if name in maps:
                    parts.append(maps[name][level])
                    continue
                channels = self.level_channels[name]
                mean = self.missing_feature_mean(name).split(channels)[level].to(like)
                parts.append(mean[None, :, None, None].expand(like.shape[0], -1, *like.shape[-2:]))
            levels.append(torch.cat(parts, dim=1))
        return levels

    def test_logits(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits for testing: :meth:`forward`, or over ``test_scales`` / ``test_flip`` (CMX's MS & flip).

        With several views, each view's softmax probabilities are resized (bilinear) to the
        input size and averaged; the log of the average is returned (its argmax is the
        prediction, and cross-entropy on it is the loss). CMX sums ``exp`` of the logits instead
        of softmax probabilities (``engine/evaluator.py``).
        """
        scales, flip = tuple(self.hparams.test_scales), self.hparams.test_flip
        if scales == (1.0,) and not flip:
            return self(inputs)
        size = tuple(next(iter(inputs.values())).shape[-2:])
        total: Tensor | None = None
        for scale in scales:
            scaled = {
                name: x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                for name, x in inputs.items()
            }
            for mirrored in (False, True) if flip else (False,):
                view = {name: x.flip(-1) for name, x in scaled.items()} if mirrored else scaled
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
        inputs = self.batch_inputs(batch, stage)
        target = self.get_target(batch)
        image = next(iter(inputs.values()))
        if tuple(target.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(f"mask {tuple(target.shape)} and images {tuple(image.shape)} differ in size.")
        if not self.inputs_are_finite(stage, batch_idx, batch, inputs, "mask"):
            return None
        maps: dict[str, list[Tensor]] = {}
        if stage == "test":
            logits = self.test_logits(inputs)
        else:
            logits, maps = self._forward(inputs)
        loss = self.compute_loss(logits, target)
        if not self.outputs_are_finite(stage, batch_idx, logits, loss):
            return None
        if stage == "train" and maps:
            self.update_feature_means(
                {name: torch.cat([m.mean(dim=(0, 2, 3)) for m in levels]) for name, levels in maps.items()}
            )
        batch_size = target.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, on_step=stage == "train", on_epoch=True, prog_bar=True)
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            metrics.update(logits.detach().argmax(dim=1), target)
            self.log_dict(metrics, batch_size=batch_size, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Predicted class per pixel ``(N, H, W)`` (over ``test_scales`` / ``test_flip``)."""
        return self.test_logits(self.batch_inputs(batch, "predict")).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW or SGD; constant, poly or cosine learning rate after an optional linear warm-up."""
        hp = self.hparams
        optimizer = build_optimizer(
            [self], name=hp.optimizer, lr=hp.lr, lr_bias=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        total_steps = total_training_steps(self.trainer)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup_steps = min(total_steps - 1, int(round(hp.warmup_epochs * total_steps / epochs)))
        schedule = warmup_schedule(total_steps, warmup_steps, decay=hp.lr_schedule, power=hp.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_cmx_modalities(names: Sequence[str]) -> tuple[str, str]:
    """CMX is RGB-X: exactly two modalities, RGB first."""
    if len(names) != 2:
        raise ValueError(
            f"head='cmx' fuses RGB with one other modality (RGB-X): give exactly two modalities, RGB first "
            f"(e.g. modalities={{'rgb': ..., 'hha': ...}}); got {len(names)}: {list(names)}. For one modality or "
            "more than two, use head='fcn'."
        )
    return names[0], names[1]
