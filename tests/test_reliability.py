"""Exact resume, mixed precision, bad input and collapse warnings (issue 8)."""

from __future__ import annotations

import math
import re
import warnings

import lightning as L
import pytest
import torch

from decur_lightning import DeCURModule
from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.optim import split_decay_parameters

from helpers import quiet_trainer, tiny_batch, tiny_decur


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(tmp_path, max_epochs: int, recorder: _LossRecorder, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        deterministic=True,
        callbacks=[recorder],
        **kwargs,
    )


def _data() -> SyntheticMultimodalDataModule:
    return SyntheticMultimodalDataModule(num_train=48, batch_size=16, size=32)


def test_resume_continues_with_the_same_losses(tmp_path):
    """Stopped after epoch 1 and resumed, a run repeats the uninterrupted run's losses step by step."""
    settings = dict(projector_dims=(32, 32), warmup_epochs=1)
    L.seed_everything(0)
    full = _LossRecorder()
    _trainer(tmp_path / "full", 3, full, enable_checkpointing=False).fit(tiny_decur(**settings), _data())

    L.seed_everything(0)
    first = _LossRecorder()
    trainer = _trainer(tmp_path / "part", 1, first, enable_checkpointing=False)
    trainer.fit(tiny_decur(**settings), _data())
    checkpoint = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(checkpoint)

    L.seed_everything(123)  # a different global RNG state must not matter
    second = _LossRecorder()
    _trainer(tmp_path / "part", 3, second, enable_checkpointing=False).fit(
        tiny_decur(**settings), _data(), ckpt_path=checkpoint
    )
    assert len(full.losses) == 9 and len(first.losses) == 3 and len(second.losses) == 6
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-5
    )


def test_loss_and_statistics_stay_float32_under_bf16_autocast():
    model = tiny_decur(projector_dims=(32, 32))
    batch = tiny_batch(n=8)
    views = model.make_views(batch, seed=3)
    with torch.no_grad():
        reference = model.compute_loss({n: [model.embed(v, n) for v in vs] for n, vs in views.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = {n: [model.embed(v, n) for v in vs] for n, vs in views.items()}
            mixed = model.compute_loss(embeddings)
    assert embeddings["sar"][0].dtype == torch.bfloat16
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
    # Only the bf16 encoder passes differ; the statistics on top are float32.
    torch.testing.assert_close(mixed["loss"], reference["loss"], rtol=5e-2, atol=0)
    exact = model.compute_loss({n: [z.float() for z in zs] for n, zs in embeddings.items()})
    torch.testing.assert_close(mixed["loss"], exact["loss"], rtol=1e-6, atol=1e-5)


def test_bf16_mixed_training_step_logs_float32_loss(tmp_path):
    """(16-mixed needs a GPU: Lightning maps it to bf16 on CPU.)"""
    recorder = _LossRecorder()
    model = tiny_decur(projector_dims=(32, 32))
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(model, _data())
    assert len(recorder.losses) == 1 and math.isfinite(recorder.losses[0])
    assert trainer.callback_metrics["train/loss"].dtype == torch.float32


def test_nan_in_a_batch_names_step_and_modality():
    model = tiny_decur()
    batch = tiny_batch(n=4)
    batch["image_optical"][1, 2, 3, 4] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"train step 0 \(batch 0\) in the input image_optical.*nan_policy='skip'"
    ):
        model.training_step(batch, 0)
    batch = tiny_batch(n=4)
    batch["image_sar"][0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="the input image_sar"):
        model.training_step(batch, 0)


def test_nan_skip_policy_skips_and_counts(tmp_path):
    model = tiny_decur(nan_policy="skip")
    batch = tiny_batch(n=4)
    batch["image_sar"][0, 0, 0, 0] = float("nan")
    assert model.training_step(batch, 0) is None
    assert model.skipped_batches == 1
    assert model.training_step(tiny_batch(n=4), 1) is not None
    assert model.skipped_batches == 1


def test_nan_skip_policy_leaves_weights_untouched_in_fit(tmp_path):
    class NaNData(SyntheticMultimodalDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.datasets["train"].images["sar"][:] = float("nan")

    model = tiny_decur(nan_policy="skip", projector_dims=(32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, 2)
    trainer.fit(model, NaNData(num_train=32, batch_size=16))
    assert model.skipped_batches == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


def test_nan_loss_from_embeddings_is_reported():
    model = tiny_decur()
    with torch.no_grad():
        model.projectors["optical"].layers[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="the embeddings of 'optical'"):
        model.training_step(tiny_batch(n=4), 0)


def test_nan_policy_off_skips_the_check():
    model = tiny_decur(nan_policy="off")
    batch = tiny_batch(n=4)
    batch["image_sar"][0] = float("nan")
    assert torch.isnan(model.training_step(batch, 0))
    with pytest.raises(ValueError, match="nan_policy must be"):
        tiny_decur(nan_policy="ignore")


def test_too_small_views_for_the_encoder_give_a_clear_error():
    model = tiny_decur(
        modalities={"sar": {"bands": 2, "encoder": "vit_small_patch16_224"}, "optical": 4},
        crop_size=8,
        projector_dims=(16,),
    )
    with pytest.raises(
        ValueError,
        match=r"(?s)encoder of modality 'sar' \(vit_small_patch16_224\) failed on input of shape \(4, 2, 8, 8\).*raise the crop",
    ):
        model.training_step(tiny_batch(n=4, size=32), 0)


def test_checkpoint_of_other_encoders_is_rejected(tmp_path):
    model = tiny_decur(projector_dims=(32, 32))
    trainer = quiet_trainer(tmp_path, 1)
    trainer.fit(model, _data())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    other = tiny_decur(modalities={"sar": 2, "optical": {"bands": 4, "encoder": "resnet34"}}, projector_dims=(32, 32))
    trainer = quiet_trainer(tmp_path, 2)
    with pytest.raises(
        ValueError,
        match=r"modalities: checkpoint .*'optical': \['resnet18', 4\].*this module .*'optical': \['resnet34', 4\]",
    ):
        trainer.fit(other, _data(), ckpt_path=path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["decur_lightning"]["method"] = "BarlowTwinsModule"
    torch.save(checkpoint, path)
    with pytest.raises(
        ValueError, match=r"(?s)method: checkpoint 'BarlowTwinsModule'.*BarlowTwinsModule.load_from_checkpoint"
    ):
        DeCURModule.load_from_checkpoint(path)


def test_collapse_warns_once_with_the_step(tmp_path):
    """A projector that outputs a constant has collapsed: warned once, with the step."""
    model = tiny_decur(projector_dims=(32, 32), lr=0.0, lr_bias=0.0)
    with torch.no_grad():
        model.projectors["sar"].layers[-1].weight.zero_()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    with pytest.warns(
        UserWarning, match=r"Embedding collapse at step 0: embedding std 'sar': 0.000 is below 0.1"
    ) as record:
        trainer.fit(model, _data())
    assert sum("Embedding collapse" in str(w.message) for w in record) == 1


def test_common_ratio_outside_range_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match=r"common_ratio must lie in \(0, 1\]; got 0"):
        tiny_decur(common_ratio=0.0)
    from torchgeo.datasets import DatasetNotFoundError

    from decur_lightning.datamodules import SSL4EOS12MMDataModule

    dm = SSL4EOS12MMDataModule(root=str(tmp_path / "nowhere"), batch_size=2)
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")


def test_position_tables_are_not_weight_decayed():
    from decur_lightning.models import create_encoder

    encoder = create_encoder("resnet18_rda", 3)
    weights, others = split_decay_parameters([encoder])
    ids = {id(p) for p in others}
    tables = [p for n, p in encoder.named_parameters() if n.endswith("rpe_table")]
    assert tables and all(id(p) in ids for p in tables)
    assert all(p.ndim > 1 for p in weights)


def test_pretraining_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    from decur_lightning.datamodules import SSL4EOS12MMDataModule

    from data_factories import make_ssl4eo_s12

    root = make_ssl4eo_s12(tmp_path / "ssl4eo", locations=range(10))

    def order(seed: int, epoch: int) -> list[int]:
        L.seed_everything(seed)
        dm = SSL4EOS12MMDataModule(root=str(root), batch_size=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.drop_last
        torch.manual_seed(999)  # the global RNG after set-up must not matter
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert sorted(order(0, 2)) == list(range(10))
    assert order(0, 1) != order(1, 1)


# ---------------------------------------------------------------- monitors (issue 16 items 1 and 3)
def _monitored_fit(tmp_path, batch_size: int, callbacks=(), steps: int = 4, **model_kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        callbacks=list(callbacks),
    )
    data = SyntheticMultimodalDataModule(num_train=4 * batch_size, num_val=4, batch_size=batch_size, size=32)
    trainer.fit(tiny_decur(**model_kwargs), data)
    return trainer


def test_a_split_smaller_than_the_batch_fails_the_fit_with_both_sizes(tmp_path):
    """drop_last with 6 samples and a batch of 8 trains nothing: an error, not a silent success."""
    from decur_lightning.cli import main

    with pytest.raises(
        ValueError, match=r"training split of 6 samples gives no batch at a batch size of 8 with drop_last"
    ):
        main(
            [
                "fit",
                "--model=DeCURModule",
                "--data=SyntheticMultimodalDataModule",
                "--model.encoder=resnet18",
                "--model.projector_dims=[32,32]",
                "--data.num_train=6",
                "--data.num_val=4",
                "--data.batch_size=8",
                "--trainer.max_epochs=1",
                "--trainer.accelerator=cpu",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_limit_train_batches_zero_is_not_an_error(tmp_path):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_decur(projector_dims=(32, 32)), SyntheticMultimodalDataModule(num_train=6, batch_size=8))
    assert trainer.global_step == 0


def test_downstream_modules_add_the_empty_training_check():
    from decur_lightning.downstream.base import MultimodalDownstreamModule
    from decur_lightning.monitors import EmptyTrainingCheck, LoaderStateRestore

    module = MultimodalDownstreamModule()
    assert [type(c) for c in module.configure_callbacks()] == [EmptyTrainingCheck, LoaderStateRestore]


def test_batch_of_two_with_lars_warns_of_small_batch_and_divergence(tmp_path):
    """The reported case: batch 2, LARS at the paper's learning rates; batch-norm weights explode."""
    with pytest.warns(UserWarning) as record:
        trainer = _monitored_fit(
            tmp_path, batch_size=2, steps=16, projector_dims=(32, 32), optimizer="lars", lr=0.2, lr_bias=0.0048
        )
    messages = [str(w.message) for w in record]
    small = [m for m in messages if m.startswith("The global batch is 2")]
    assert len(small) == 1 and "below 32" in small[0] and "1/sqrt(N) = 0.71" in small[0]
    diverging = [m for m in messages if m.startswith("Parameters are diverging")]
    assert len(diverging) == 1 and "(global batch 2)" in diverging[0]
    named = re.findall(r"(\S+) x([\d.e+]+)", diverging[0].split("start of training ")[1].split(" (threshold")[0])
    growths = [float(growth) for _, growth in named]
    assert len(named) == 5 and all("bn" in name for name, _ in named)  # the batch-norm weights, worst first
    assert growths == sorted(growths, reverse=True) and growths[0] > 10
    from decur_lightning.monitors import DivergenceMonitor

    monitor = next(c for c in trainer.callbacks if isinstance(c, DivergenceMonitor))
    logged = float(trainer.callback_metrics["train/max_param_growth"])
    assert logged > 10 and logged == pytest.approx(
        monitor.last_max_growth
    )  # about 20 at step 8 (chaotic: 6-27 at step 4)
    # the embedding-std collapse monitor stays quiet: it cannot see this
    assert not any("Embedding collapse" in m for m in messages)


def test_healthy_run_raises_no_monitor_warning(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _monitored_fit(tmp_path, batch_size=16, projector_dims=(32, 32), optimizer="adamw", lr=1e-4)
    messages = [str(w.message) for w in record]
    assert not any(m.startswith("Parameters are diverging") for m in messages), messages
    # 16 is below the small-batch threshold of 32: that warning still fires, once
    assert sum(m.startswith("The global batch is 16 (16 per device x 1 devices), below 32") for m in messages) == 1
    assert 0.99 < float(trainer.callback_metrics["train/max_param_growth"]) < 1.01


def test_a_trainer_monitor_replaces_the_default_one(tmp_path):
    """DivergenceMonitor(max_growth=None) in the Trainer turns it off; no second default is added."""
    from decur_lightning.monitors import DivergenceMonitor, SmallBatchWarning

    mine = [DivergenceMonitor(max_growth=None), SmallBatchWarning(min_global_batch=None)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _monitored_fit(tmp_path, batch_size=2, callbacks=mine, projector_dims=(32, 32))
    assert not any(str(w.message).startswith(("Parameters are diverging", "The global batch")) for w in record)
    assert [c for c in trainer.callbacks if isinstance(c, (DivergenceMonitor, SmallBatchWarning))] == mine
    assert "train/max_param_growth" not in trainer.callback_metrics


def test_monitor_arguments_are_checked():
    from decur_lightning.monitors import DivergenceMonitor, SmallBatchWarning

    with pytest.raises(ValueError, match="max_growth must be a growth factor above 1"):
        DivergenceMonitor(max_growth=0.5)
    with pytest.raises(ValueError, match="every_n_steps must be a positive"):
        DivergenceMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="min_global_batch must be at least 2"):
        SmallBatchWarning(min_global_batch=1)
