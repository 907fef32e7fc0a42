"""Downstream modules: batch norm of frozen encoders (eval / train) and the non-finite policy."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from decur_lightning.downstream import MultimodalClassificationModule, MultimodalSegmentationModule

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


class Pairs(Dataset):
    """SAR (2 bands) + optical (3 bands), a multi-hot label of 4 and a 3-class mask; optionally NaN."""

    def __init__(self, num_samples: int = 8, nan: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.sar = 3.0 + 2.0 * torch.rand(num_samples, 2, SIZE, SIZE, generator=generator)
        self.optical = torch.rand(num_samples, 3, SIZE, SIZE, generator=generator)
        if nan:
            self.optical[:, 1, 2, 3] = float("nan")
        self.label = (torch.rand(num_samples, 4, generator=generator) > 0.5).long()
        self.mask = torch.randint(0, 3, (num_samples, SIZE, SIZE), generator=generator)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image_sar": self.sar[i],
            "image_optical": self.optical[i],
            "label": self.label[i],
            "mask": self.mask[i],
        }


class Data(L.LightningDataModule):
    def __init__(self, nan: bool = False) -> None:
        super().__init__()
        self.train, self.val = Pairs(8, nan), Pairs(4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=4, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=4)


SAR_OPTICAL = {"sar": {"bands": 2}, "optical": {"bands": 3}}


def classifier(**overrides) -> MultimodalClassificationModule:
    kwargs = dict(modalities=SAR_OPTICAL, encoder="resnet18", num_classes=4, freeze_encoders=True)
    kwargs.update(overrides)
    return MultimodalClassificationModule(**kwargs)


def segmenter(**overrides) -> MultimodalSegmentationModule:
    kwargs = dict(modalities=SAR_OPTICAL, encoder="resnet18", num_classes=3, freeze_encoders=True, ignore_index=255)
    kwargs.update(overrides)
    return MultimodalSegmentationModule(**kwargs)


def run(model: L.LightningModule, data: L.LightningDataModule, tmp_path, steps: int = 2, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=steps,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(model, data)
    return trainer


def one_batch() -> dict[str, Tensor]:
    return next(iter(DataLoader(Pairs(4), batch_size=4)))


def buffers(model) -> dict[str, Tensor]:
    return {f"{name}.{k}": v.clone() for name, e in model.encoders.items() for k, v in e.named_buffers()}


def parameters(model) -> dict[str, Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, e in model.encoders.items() for k, v in e.named_parameters()}


class RecordModes(L.Callback):
    """Modes of the encoders' batch-norm and other layers at each train / validation batch."""

    def __init__(self) -> None:
        self.train: list[tuple[bool, bool]] = []
        self.val: list[tuple[bool, bool]] = []

    @staticmethod
    def _modes(module) -> tuple[bool, bool]:
        layers = [m for e in module.encoders.values() for m in e.modules()]
        bn = [m.training for m in layers if isinstance(m, nn.BatchNorm2d)]
        other = [m.training for m in layers if not isinstance(m, nn.BatchNorm2d)]
        assert len(set(bn)) == 1 and len(set(other)) == 1, "mixed modes"
        return bn[0], other[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(self._modes(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(self._modes(pl_module))


# ------------------------------------------------------------------ frozen batch norm
@pytest.mark.parametrize("make", [classifier, segmenter], ids=["classification", "segmentation"])
def test_frozen_batch_norm_train_adapts_running_stats_only(make, tmp_path):
    """The released scripts' net.train() on frozen encoders: statistics adapt, weights do not."""
    model = make(frozen_batch_norm="train")
    stats, weights, modes = buffers(model), parameters(model), RecordModes()
    run(model, Data(), tmp_path, callbacks=[modes])
    after = buffers(model)
    for name in ("sar.bn1.running_mean", "optical.bn1.running_var", "optical.layer4.1.bn2.running_mean"):
        assert not torch.equal(after[name], stats[name]), name
    assert after["sar.bn1.num_batches_tracked"] == 2
    for key, value in parameters(model).items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    assert all(p.grad is None and not p.requires_grad for p in model.encoders.parameters())
    # batch norm trains in training steps, nothing else does; everything is in eval mode at validation
    assert modes.train == [(True, False)] * 2 and modes.val == [(False, False)]


@pytest.mark.parametrize("make", [classifier, segmenter], ids=["classification", "segmentation"])
def test_frozen_batch_norm_eval_is_the_default_and_keeps_running_stats(make, tmp_path):
    model = make()
    assert model.hparams.frozen_batch_norm == "eval"
    stats, modes = buffers(model), RecordModes()
    run(model, Data(), tmp_path, callbacks=[modes])
    for key, value in buffers(model).items():
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0, msg=key)
    assert modes.train == [(False, False)] * 2


def test_frozen_batch_norm_is_checked_and_ignored_when_fine_tuning():
    with pytest.raises(ValueError, match="frozen_batch_norm must be 'eval'.*or 'train'"):
        classifier(frozen_batch_norm="training")
    model = classifier(freeze_encoders=False, frozen_batch_norm="train").train()
    assert all(m.training for m in model.encoders.modules())


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("make", [classifier, segmenter], ids=["classification", "segmentation"])
def test_nan_input_names_the_stage_step_batch_and_key(make):
    model = make()
    batch = one_batch()
    batch["image_optical"][0, 2, 5, 5] = float("inf")
    with pytest.raises(FloatingPointError, match=r"train step 0 \(batch 3\) in the input image_optical\. .*nan_policy"):
        model.training_step(batch, 3)
    # skip applies to training only: validation always raises
    skipping = make(nan_policy="skip")
    with pytest.raises(FloatingPointError, match=r"val step 0 \(batch 1\) in the input image_optical.*always raise"):
        skipping.validation_step(batch, 1)


def test_nan_label_is_named():
    batch = one_batch()
    batch["label"] = batch["label"].float()
    batch["label"][1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="in the label"):
        classifier().training_step(batch, 0)


@pytest.mark.parametrize("make", [classifier, segmenter], ids=["classification", "segmentation"])
def test_nan_produced_by_the_model_names_the_logits_and_the_loss(make):
    model = make()
    model.encoders["optical"].layer1.register_forward_hook(lambda module, args, output: output * float("nan"))
    batch = one_batch()
    with pytest.raises(FloatingPointError, match=r"train step 0 \(batch 0\) in the logits, the loss\. .*diverged"):
        model.training_step(batch, 0)
    with pytest.raises(FloatingPointError, match="test step 0 .*the loss"):
        model.test_step(batch, 0)


@pytest.mark.parametrize("make", [classifier, segmenter], ids=["classification", "segmentation"])
def test_nan_skip_policy_skips_the_optimiser_step_and_counts(make, tmp_path):
    model = make(nan_policy="skip", frozen_batch_norm="train")
    head = {k: v.clone() for k, v in model.named_parameters() if not k.startswith("encoders.")}
    stats = buffers(model)
    trainer = run(model, Data(nan=True), tmp_path)  # both training batches hold a NaN
    assert model.skipped_batches == 2
    assert trainer.callback_metrics["train/skipped_batches"] == 2
    assert "train/loss" not in trainer.callback_metrics
    for key, value in model.named_parameters():
        if key in head:
            torch.testing.assert_close(value, head[key], rtol=0, atol=0, msg=key)
    # inputs are checked before the forward pass: the bad batches never reach the batch-norm statistics
    for key, value in buffers(model).items():
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0, msg=key)
    # nor the running feature means that stand in for a missing modality
    assert model.feature_means.batches("sar") == 0 and not model.feature_means.mean("sar").any()
    # validation (clean data) still ran and is finite
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_skipped_batches_survive_a_checkpoint():
    model = classifier(nan_policy="skip")
    model.nonfinite.skipped_batches = 3
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    restored = classifier(nan_policy="skip")
    restored.on_load_checkpoint(checkpoint)
    assert restored.skipped_batches == 3


def test_nan_policy_off_and_bad_values():
    batch = one_batch()
    batch["image_sar"][0] = float("nan")
    loss = classifier(nan_policy="off").training_step(batch, 0)
    assert loss is not None and torch.isnan(loss)
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        segmenter(nan_policy="ignore")


def test_segmentation_batch_without_labelled_pixels_has_loss_zero_not_nan():
    """A crop of unlabelled pixels only: plain CrossEntropyLoss gives 0/0 = NaN (then a false alarm)."""
    model = segmenter(freeze_encoders=False)
    batch = one_batch()
    labelled_loss = model.validation_step(batch, 0)
    logits = model(model.encoders.inputs(batch))
    expected = torch.nn.functional.cross_entropy(logits, batch["mask"], ignore_index=255)
    torch.testing.assert_close(labelled_loss, expected)
    batch["mask"][:] = 255
    loss = model.training_step(batch, 0)
    assert loss == 0
    loss.backward()  # a graph, zero gradients
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
