"""MultimodalClassificationModule: late fusion over named modalities, frozen vs fine-tuned, missing modalities."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MultilabelAveragePrecision

from decur_lightning.downstream import MultimodalClassificationModule, RunningFeatureMeans
from decur_lightning.encoder_set import EncoderSet
from decur_lightning.modalities import Modality

from helpers import tiny_decur

NUM_LABELS = 4
SAR_OPTICAL = {"sar": {"bands": 2}, "optical": {"bands": 4}}


# Tiny convolutions run several times faster on one thread when the cores are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


class EasyMultiLabel(Dataset):
    """Label ``j`` brightens optical band ``j`` (and SAR band ``j`` for ``j < 2``), plus noise; a 1-band DEM."""

    def __init__(self, num_samples: int, seed: int, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.label = (torch.rand(num_samples, NUM_LABELS, generator=generator) > 0.5).long()
        self.optical = 0.2 + 0.1 * torch.rand(num_samples, 4, size, size, generator=generator)
        self.optical += 0.6 * self.label[:, :, None, None]
        self.sar = 0.2 + 0.1 * torch.rand(num_samples, 2, size, size, generator=generator)
        self.sar += 0.6 * self.label[:, :2, None, None]
        self.dem = torch.rand(num_samples, 1, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "image_sar": self.sar[index],
            "image_optical": self.optical[index],
            "image_dem": self.dem[index],
            "label": self.label[index],
        }


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
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, drop_last=True, collate_fn=self._collate
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self._collate)


class DescribedDataModule(EasyDataModule):
    """The same data, describing its modalities as the package's datamodules do."""

    modality_specs = {
        "sar": Modality(bands=2, view="sar"),
        "optical": Modality(bands=4, view="optical"),
        "dem": Modality(bands=1, view="dem"),
    }


def make_module(**overrides) -> MultimodalClassificationModule:
    kwargs = dict(modalities=SAR_OPTICAL, encoder="resnet18", num_classes=NUM_LABELS)
    kwargs.update(overrides)
    return MultimodalClassificationModule(**kwargs)


def trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def evaluate(model, data) -> dict[str, float]:
    validator = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return validator.validate(model, data, verbose=False)[0]


def encoder_state(model: MultimodalClassificationModule) -> dict[str, Tensor]:
    return {f"{name}.{k}": v.clone() for name, e in model.encoders.items() for k, v in e.state_dict().items()}


def batch_of(data: EasyMultiLabel, *names: str, start: int = 0, size: int = 8) -> dict[str, Tensor]:
    batch = {f"image_{name}": getattr(data, name)[start : start + size] for name in names}
    return {**batch, "label": data.label[start : start + size]}


def test_linear_probe_learns_and_leaves_encoders_untouched(tmp_path):
    model = make_module(freeze_encoders=True)  # the paper's lr 0.5
    data = EasyDataModule()
    before = encoder_state(model)
    chance = evaluate(model, data)
    seen_modes = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen_modes.append((pl_module.classifier.training, [e.training for e in pl_module.encoders.values()]))

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
    assert not any(p.requires_grad for p in model.encoders.parameters())


def test_finetune_changes_encoders(tmp_path):
    model = make_module(freeze_encoders=False)
    before = encoder_state(model)
    trainer(tmp_path, 3).fit(model, EasyDataModule())
    after = encoder_state(model)
    for name in ("sar", "optical"):
        assert not torch.equal(after[f"{name}.conv1.weight"], before[f"{name}.conv1.weight"])
        assert not torch.equal(after[f"{name}.bn1.running_mean"], before[f"{name}.bn1.running_mean"])
    assert all(encoder.training for encoder in model.encoders.values())


def test_sar_only_uses_one_encoder_and_learns(tmp_path):
    model = make_module(modalities={"sar": {"bands": 2}})
    assert model.modalities == ("sar",) and list(model.encoders) == ["sar"]
    assert model.classifier.in_features == model.encoders["sar"].num_features
    data = EasyDataModule()
    trainer(tmp_path, 36).fit(model, data)
    model.eval()
    with torch.no_grad():
        scores = model({"sar": data.val.sar})
    per_label = MultilabelAveragePrecision(num_labels=NUM_LABELS, average=None)(scores.sigmoid(), data.val.label)
    # SAR sees labels 0 and 1 only: those are learnt, the other two stay near chance (about 0.5)
    assert per_label[:2].min() > 0.9 and per_label[2:].max() < 0.8, per_label
    with pytest.raises(ValueError, match="expects \\(N, 2, H, W\\)"):
        model.encoders.inputs({"image_sar": torch.rand(2, 4, 16, 16)})


def test_three_modalities_fuse_in_order_and_train(tmp_path):
    model = make_module(modalities={**SAR_OPTICAL, "dem": {"bands": 1}}, freeze_encoders=False)
    assert model.modalities == ("sar", "optical", "dem")
    assert model.classifier.in_features == 3 * 512
    data = EasyMultiLabel(4, 0)
    inputs = {"dem": data.dem, "sar": data.sar, "optical": data.optical}  # dict order does not matter
    model.eval()
    with torch.no_grad():
        features = [model.encoders[name](inputs[name]) for name in ("sar", "optical", "dem")]
        torch.testing.assert_close(model(inputs), model.classifier(torch.cat(features, dim=1)))
    before = encoder_state(model)
    model.train()
    trainer(tmp_path, 2).fit(model, EasyDataModule(num_train=32))
    assert not torch.equal(encoder_state(model)["dem.conv1.weight"], before["dem.conv1.weight"])


def test_multiclass_task(tmp_path):
    model = make_module(task="multiclass", modalities={"sar": {"bands": 2}})
    data = EasyDataModule(multiclass=True)
    chance = evaluate(model, data)
    trainer(tmp_path, 48).fit(model, data)
    metrics = evaluate(model, data)
    assert metrics["val/accuracy"] > 0.6 and metrics["val/loss"] < chance["val/loss"], (chance, metrics)


# ------------------------------------------------------------------ modalities from the datamodule
def test_modalities_none_takes_the_datamodules_modality_specs(tmp_path):
    model = make_module(modalities=None)
    assert not model.built
    modes = []

    class RecordModes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append([e.training for e in pl_module.encoders.values()])

    fit = trainer(tmp_path, 2)
    fit.callbacks.append(RecordModes())
    fit.fit(model, DescribedDataModule(num_train=32))
    assert model.modalities == ("sar", "optical", "dem")
    assert model.classifier.in_features == 3 * 512
    resolved = model.hparams.modalities
    assert [(name, spec["bands"], spec["view"], spec["encoder"]) for name, spec in resolved.items()] == [
        ("sar", 2, "sar", "resnet18"),
        ("optical", 4, "optical", "resnet18"),
        ("dem", 1, "dem", "resnet18"),
    ]
    assert modes == [[False, False, False]] * 2  # frozen encoders built at fit start are in eval mode
    assert model.feature_means.batches("dem") == 2
    # a list of names picks those of the datamodule, in that order
    picked = make_module(modalities=["optical", "sar"])
    trainer(tmp_path, 1).fit(picked, DescribedDataModule(num_train=16))
    assert picked.modalities == ("optical", "sar") and picked.classifier.in_features == 2 * 512


# ------------------------------------------------------------------ a modality missing at evaluation
def test_running_feature_means_average_then_follow_an_exponential_average():
    means = RunningFeatureMeans({"sar": 3}, momentum=0.25)
    values = [torch.tensor([float(i), 2.0 * i, -1.0]) for i in range(1, 7)]
    expected = torch.zeros(3)
    for t, value in enumerate(values, start=1):
        means.update("sar", value)
        expected = expected + max(1 / t, 0.25) * (value - expected)
        if t <= 4:  # 1 / momentum batches: the plain average
            torch.testing.assert_close(means.mean("sar"), torch.stack(values[:t]).mean(0))
    torch.testing.assert_close(means.mean("sar"), expected)
    assert means.batches("sar") == 6
    assert set(means.state_dict()) == {"mean_sar", "batches_sar"}


def test_missing_modality_at_evaluation_gets_its_running_mean_features():
    model = make_module(freeze_encoders=True)  # frozen, batch norm in eval: features are a fixed function
    data = EasyMultiLabel(24, 0)
    batches = [batch_of(data, "sar", "optical", start=start) for start in (0, 8, 16)]
    with pytest.raises(ValueError, match="no running mean features"):
        model.eval()(model.encoders.inputs(batch_of(data, "sar"), allow_missing=True))
    model.train()
    for index, batch in enumerate(batches):
        model.training_step(batch, index)
    model.eval()
    with torch.no_grad():
        expected_mean = torch.stack([model.encoders["optical"](b["image_optical"]).mean(0) for b in batches]).mean(0)
        torch.testing.assert_close(model.feature_means.mean("optical"), expected_mean)
        assert model.feature_means.batches("optical") == 3

        val = batch_of(EasyMultiLabel(8, 1), "sar")  # no image_optical
        with pytest.warns(UserWarning, match="Modality 'optical' is missing.*running mean over 3 training batches"):
            loss = model.validation_step(val, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            logits = model(model.encoders.inputs(val, allow_missing=True))
        sar = model.encoders["sar"](val["image_sar"])
        reference = model.classifier(torch.cat([sar, expected_mean.expand(8, -1)], dim=1))
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(loss, model.criterion(reference, val["label"].float()))
    # the same rule in predict and test steps
    with torch.no_grad():
        torch.testing.assert_close(model.predict_step(val, 0), reference.sigmoid())
        assert torch.isfinite(model.test_step(val, 0))


def test_feature_means_agree_across_ranks():
    """Under DDP each rank's batch means are averaged over the ranks before the update (same buffers everywhere)."""
    reduced = []

    class Strategy:
        @staticmethod
        def reduce(value, reduce_op):
            reduced.append((value.clone(), reduce_op))
            return value + 1.0  # stands for the other rank's contribution

    model = make_module()
    model._trainer = SimpleNamespace(world_size=2, strategy=Strategy())
    model.update_feature_means({"sar": torch.full((512,), 2.0), "optical": torch.zeros(512)})
    assert [op for _, op in reduced] == ["mean", "mean"]
    torch.testing.assert_close(model.feature_means.mean("sar"), torch.full((512,), 3.0))
    torch.testing.assert_close(model.feature_means.mean("optical"), torch.ones(512))


def test_training_batches_need_every_modality():
    model = make_module()
    with pytest.raises(KeyError, match=r"The batch has no \['image_optical'\]"):
        model.training_step(batch_of(EasyMultiLabel(4, 0), "sar", size=4), 0)
    with pytest.raises(KeyError, match="has no"):  # at least one modality, even at evaluation
        model.validation_step({"label": torch.zeros(2, NUM_LABELS)}, 0)


def test_feature_means_are_saved_with_the_checkpoint(tmp_path):
    model = make_module()
    trainer(tmp_path, 2).fit(model, EasyDataModule(num_train=32))
    path = tmp_path / "model.ckpt"
    model.trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert "feature_means.mean_optical" in checkpoint["state_dict"]
    assert all(
        key.startswith(("encoders.sar.", "encoders.optical.", "classifier.", "feature_means."))
        for key in checkpoint["state_dict"]
    )
    restored = MultimodalClassificationModule.load_from_checkpoint(path)
    assert restored.modalities == ("sar", "optical") and restored.feature_means.batches("optical") == 2
    torch.testing.assert_close(restored.feature_means.mean("optical"), model.feature_means.mean("optical"))


# ------------------------------------------------------------------ optimiser and schedule
def test_optimizer_follows_the_paper(tmp_path):
    model = make_module(freeze_encoders=True)
    fit = trainer(tmp_path, 10)
    fit.fit(model, EasyDataModule(num_train=32))
    optimizer = fit.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 0.5 and group["momentum"] == 0.9 and group["weight_decay"] == 0.0
    assert [id(p) for p in group["params"]] == [id(p) for p in model.classifier.parameters()]
    assert group["lr"] == pytest.approx(0.5 * 0.01)  # both milestones (steps 6 and 8) passed
    assert make_module(freeze_encoders=False).hparams.lr is None


@pytest.mark.parametrize("freeze_encoders, lr", [(True, 0.5), (False, 0.05)])
@pytest.mark.parametrize("total", [7, 10, 137, 1000])
def test_step_schedule_equals_the_former_multistep_schedule(freeze_encoders, lr, total):
    """warmup_schedule(decay="step") gives the learning rates of the former MultiStepLR, step by step."""
    model = make_module(freeze_encoders=freeze_encoders)
    model._trainer = SimpleNamespace(estimated_stepping_batches=total)
    configured = model.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    # the former code: milestones at rounded fractions of the total steps, MultiStepLR(gamma=0.1)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    milestones = sorted({max(1, round(m * total)) for m in (0.6, 0.8)})
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, milestones=milestones, gamma=0.1)
    for _ in range(total + 2):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step(), scheduler.step(), reference_optimizer.step(), reference.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.01)


# ------------------------------------------------------------------ pretrained weights
def test_pretrained_weights_from_state_dicts_and_authors_checkpoints(tmp_path):
    sar, optical = (
        EncoderSet({name: Modality(bands=bands, encoder="resnet18")})[name]
        for name, bands in (("sar", 2), ("optical", 4))
    )
    torch.save(sar.state_dict(), tmp_path / "sar.pt")
    # the authors' joint checkpoint: backbone_1 (SAR) and backbone_2 (optical), no modality names
    joint = {f"module.backbone_{i}.{k}": v for i, e in ((1, sar), (2, optical)) for k, v in e.state_dict().items()}
    torch.save({"epoch": 99, "model": joint, "optimizer": {}}, tmp_path / "joint.pth")
    model = make_module(
        modalities={
            "optical": {"bands": 4, "weights": str(tmp_path / "joint.pth"), "weights_modality": 2},
            "sar": {"bands": 2, "weights": str(tmp_path / "sar.pt")},
        }
    )
    for name, source in (("sar", sar), ("optical", optical)):
        for key, value in source.state_dict().items():
            torch.testing.assert_close(model.encoders[name].state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert model.hparams.modalities["optical"]["weights_modality"] == 2


def test_pretrained_weights_by_name_from_checkpoints_of_this_package(tmp_path):
    """Layout ``encoders.<name>.*``: the modality's name picks the encoder, not its position."""
    pretrained = tiny_decur()  # sar (2 bands), optical (4 bands)
    path = tmp_path / "decur.ckpt"
    torch.save({"state_dict": pretrained.state_dict(), "hyper_parameters": dict(pretrained.hparams)}, path)
    # modalities in swapped order: names decide
    model = make_module(
        modalities={"optical": {"bands": 4, "weights": str(path)}, "sar": {"bands": 2, "weights": str(path)}}
    )
    for name in ("sar", "optical"):
        for key, value in pretrained.encoders[name].state_dict().items():
            torch.testing.assert_close(model.encoders[name].state_dict()[key], value, rtol=0, atol=0, msg=key)
    # a downstream checkpoint is itself a weight source (e.g. S1 + S2 fine-tuned, then S1 only)
    downstream = tmp_path / "downstream.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, downstream)
    single = make_module(modalities={"sar": {"bands": 2, "weights": str(downstream)}})
    torch.testing.assert_close(single.encoders["sar"].conv1.weight, pretrained.encoders["sar"].conv1.weight)


def test_mit_encoders_keep_their_pooled_head_trainable():
    model = make_module(encoder="mit_b0", modalities={"sar": {"bands": 2}}, freeze_encoders=False)
    assert model.encoders["sar"].head.weight.requires_grad
    assert model({"sar": torch.rand(2, 2, 32, 32)}).shape == (2, NUM_LABELS)


def test_bad_arguments_say_what_to_do():
    with pytest.raises(TypeError, match="freeze_encoders must be true or false"):
        make_module(freeze_encoders="linear")
    with pytest.raises(ValueError, match="optimizer must be 'sgd'"):
        make_module(optimizer="adam")
    with pytest.raises(KeyError, match="No modality 'dem'; the modalities are \\['sar', 'optical'\\]"):
        make_module()({"dem": torch.rand(2, 1, 16, 16)})
