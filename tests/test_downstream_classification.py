"""MultimodalClassificationModule: late fusion, linear probing vs fine-tuning, modality-missing."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MultilabelAveragePrecision

from decur_lightning.downstream import MultimodalClassificationModule
from decur_lightning.weights import encoder_state_dict_from_checkpoint

from helpers import tiny_decur

NUM_LABELS = 4


# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


class EasyMultiLabel(Dataset):
    """Label ``j`` brightens optical band ``j`` (and SAR band ``j`` for ``j < 2``), plus noise."""

    def __init__(self, num_samples: int, seed: int, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.label = (torch.rand(num_samples, NUM_LABELS, generator=generator) > 0.5).long()
        self.optical = 0.2 + 0.1 * torch.rand(num_samples, 4, size, size, generator=generator)
        self.optical += 0.6 * self.label[:, :, None, None]
        self.sar = 0.2 + 0.1 * torch.rand(num_samples, 2, size, size, generator=generator)
        self.sar += 0.6 * self.label[:, :2, None, None]

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image_sar": self.sar[index], "image_optical": self.optical[index], "label": self.label[index]}


class EasyDataModule(L.LightningDataModule):
    def __init__(self, num_train: int = 96, num_val: int = 64, batch_size: int = 16, multiclass: bool = False):
        super().__init__()
        self.train, self.val = EasyMultiLabel(num_train, 0), EasyMultiLabel(num_val, 1)
        self.batch_size, self.multiclass = batch_size, multiclass

    def _collate(self, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = torch.utils.data.default_collate(samples)
        if self.multiclass:  # class = label 0 + 2 * label 1, visible in both modalities
            batch["label"] = batch["label"][:, 0] + 2 * batch["label"][:, 1]
        return batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self._collate)


def make_module(**overrides) -> MultimodalClassificationModule:
    kwargs = dict(encoder1="resnet18", encoder2="resnet18", in_channels1=2, in_channels2=4, modality1="sar",
                  modality2="optical", num_classes=NUM_LABELS)
    kwargs.update(overrides)
    return MultimodalClassificationModule(**kwargs)


def trainer(tmp_path, max_steps: int) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=tmp_path)


def evaluate(model, data) -> dict[str, float]:
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return validator.validate(model, data, verbose=False)[0]


def encoder_state(model: MultimodalClassificationModule) -> dict[str, Tensor]:
    return {f"{i}.{k}": v.clone() for i, e in enumerate(model.encoders) for k, v in e.state_dict().items()}


def test_linear_probe_learns_and_leaves_encoders_untouched(tmp_path):
    model = make_module(mode="linear")  # the paper's lr 0.5
    data = EasyDataModule()
    before = encoder_state(model)
    chance = evaluate(model, data)
    seen_modes = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append((pl_module.classifier.training, [e.training for e in pl_module.encoders]))

    fit = trainer(tmp_path, 36)
    fit.callbacks.append(RecordModes())
    fit.fit(model, data)
    after = evaluate(model, data)

    assert after["val/map_micro"] > 0.9 > chance["val/map_micro"] + 0.15, (chance, after)
    assert after["val/loss"] < chance["val/loss"]
    assert {"val/map_macro", "val/f1_micro", "val/f1_macro"} <= set(after)
    # frozen: weights and BN running statistics unchanged, encoders in eval mode while training
    for key, value in encoder_state(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert seen_modes and all(head and not any(encoders) for head, encoders in seen_modes)
    assert not any(p.requires_grad for e in model.encoders for p in e.parameters())


def test_finetune_changes_encoders(tmp_path):
    model = make_module(mode="finetune")
    before = encoder_state(model)
    trainer(tmp_path, 3).fit(model, EasyDataModule())
    after = encoder_state(model)
    for index in (0, 1):
        assert not torch.equal(after[f"{index}.conv1.weight"], before[f"{index}.conv1.weight"])
        assert not torch.equal(after[f"{index}.bn1.running_mean"], before[f"{index}.bn1.running_mean"])
    assert model.encoder1.training and model.encoder2.training


def test_sar_only_uses_one_encoder_and_learns(tmp_path):
    model = make_module(modality2=None, mode="linear")
    assert model.encoder2 is None and model.modalities == ["sar"]
    assert model.classifier.in_features == model.encoder1.num_features
    data = EasyDataModule()
    trainer(tmp_path, 36).fit(model, data)
    model.eval()
    with torch.no_grad():
        scores = model([data.val.sar])
    per_label = MultilabelAveragePrecision(num_labels=NUM_LABELS, average=None)(scores.sigmoid(), data.val.label)
    # SAR sees labels 0 and 1 only: those are learnt, the other two stay near chance (about 0.5)
    assert per_label[:2].min() > 0.9 and per_label[2:].max() < 0.8, per_label
    with pytest.raises(ValueError, match="expects \\(N, 2, H, W\\)"):
        model.get_inputs({"image_sar": torch.rand(2, 4, 16, 16)})


def test_multiclass_task(tmp_path):
    model = make_module(task="multiclass", mode="linear", modality2=None)
    data = EasyDataModule(multiclass=True)
    chance = evaluate(model, data)
    trainer(tmp_path, 48).fit(model, data)
    metrics = evaluate(model, data)
    assert metrics["val/accuracy"] > 0.6 and metrics["val/loss"] < chance["val/loss"], (chance, metrics)


def test_optimizer_follows_the_paper(tmp_path):
    model = make_module(mode="linear")
    fit = trainer(tmp_path, 10)
    fit.fit(model, EasyDataModule(num_train=32))
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 0.5 and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(p) for p in model.classifier.parameters()]
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert dict(scheduler.milestones) == {6: 1, 8: 1} and scheduler.gamma == 0.1
    assert group["lr"] == pytest.approx(0.5 * 0.01)
    assert make_module(mode="finetune").hparams.lr is None


def test_pretrained_weights_from_a_decur_checkpoint(tmp_path):
    pretrained = tiny_decur()
    path = tmp_path / "decur.ckpt"
    torch.save({"state_dict": pretrained.state_dict(), "hyper_parameters": dict(pretrained.hparams)}, path)
    checkpoint = torch.load(path, weights_only=False)
    # modalities in swapped order: names decide, not positions
    model = make_module(modality1="optical", in_channels1=4, modality2="sar", in_channels2=2,
                        weights1=str(path), weights2=str(path))
    for encoder, index in ((model.encoder1, 2), (model.encoder2, 1)):
        for key, value in encoder_state_dict_from_checkpoint(checkpoint, index).items():
            torch.testing.assert_close(encoder.state_dict()[key], value, rtol=0, atol=0)
    single = make_module(modality1="sar", modality2=None, weights1=str(path), weights_modality1=1)
    torch.testing.assert_close(single.encoder1.conv1.weight, pretrained.encoder1.conv1.weight)


def test_second_modality_weights_without_a_second_modality_are_refused():
    with pytest.raises(ValueError, match="modality2=None"):
        make_module(modality2=None, weights2="encoder.pt")


def test_mit_encoders_keep_their_pooled_head_trainable():
    model = make_module(encoder1="mit_b0", in_channels1=2, modality2=None, mode="finetune")
    assert model.encoder1.head.weight.requires_grad
    assert model([torch.rand(2, 2, 32, 32)]).shape == (2, NUM_LABELS)
