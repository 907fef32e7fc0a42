"""Mid-epoch resume (issue 16 item 5): a run resumed from a checkpoint taken at any step repeats
the uninterrupted run step for step: the same batches, the same batch indices (hence the same
views), the same losses and the same final weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from decur_lightning.datamodules import SyntheticMultimodalDataModule

from helpers import tiny_decur


class _StepRecorder(L.Callback):
    """Per step: (epoch, batch_idx, loss, fingerprint of the batch's first image tensor)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        first = next(value for key, value in batch.items() if key.startswith("image_"))
        weights = torch.arange(1, first[:, 0].numel() + 1, dtype=torch.float64).view(first[:, 0].shape)
        self.steps.append(
            (trainer.current_epoch, batch_idx, float(outputs["loss"]), float((first[:, 0].double() * weights).sum()))
        )


def _trainer(root: Path, recorder: _StepRecorder, callbacks=(), max_epochs: int = 2) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        deterministic=True,
        enable_checkpointing=bool(callbacks),
        callbacks=[recorder, *callbacks],
    )


def _assert_resume_is_exact(
    tmp_path: Path, make_model, make_data, batches_per_epoch: int, resume_steps: list[int]
) -> None:
    """One uninterrupted 2-epoch run saving a checkpoint after every step; resumes from ``resume_steps``."""
    L.seed_everything(0)
    full = _StepRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    model = make_model()
    _trainer(tmp_path / "full", full, [saver]).fit(model, make_data())
    final = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(full.steps) == 2 * batches_per_epoch
    assert [s[1] for s in full.steps] == list(range(batches_per_epoch)) * 2

    for resume_step in resume_steps:
        L.seed_everything(123 + resume_step)  # a different global RNG state must not matter
        resumed = _StepRecorder()
        model = make_model()
        checkpoint = tmp_path / "ckpt" / f"step={resume_step}.ckpt"
        _trainer(tmp_path / f"resumed{resume_step}", resumed).fit(model, make_data(), ckpt_path=checkpoint)
        later = full.steps[resume_step:]
        where = f"resumed after step {resume_step}"
        assert [s[:2] for s in resumed.steps] == [s[:2] for s in later], where  # epochs and true batch indices
        assert [s[3] for s in resumed.steps] == [s[3] for s in later], where  # the same batches
        torch.testing.assert_close(
            torch.tensor([s[2] for s in resumed.steps]),
            torch.tensor([s[2] for s in later]),
            rtol=1e-6,
            atol=1e-6,
            msg=where,
        )
        state = model.state_dict()
        for key, value in final.items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=f"{key} {where}")


def test_synthetic_resume_inside_an_epoch_repeats_every_step(tmp_path):
    """3 batches per epoch; resumed after step 2 (inside epoch 0), 3 (its last batch) and 4 (inside epoch 1)."""
    _assert_resume_is_exact(
        tmp_path,
        lambda: tiny_decur(projector_dims=(32, 32), optimizer="adamw", lr=1e-3),
        lambda: SyntheticMultimodalDataModule(num_train=24, num_val=4, batch_size=8, size=32),
        batches_per_epoch=3,
        resume_steps=[2, 3, 4],
    )


def test_geonrw_pretraining_resume_inside_an_epoch_repeats_every_step(tmp_path):
    """A torchgeo-based PretrainDataModule (GeoNRW RGB + DEM on fake tiles): 12 patches, 3 batches of 4."""
    from decur_lightning.datamodules import GeoNRWMMPretrainDataModule

    from data_factories import make_geonrw

    root = tmp_path / "geonrw"
    make_geonrw(root, train_cities=("aachen", "bergisch", "bielefeld"), test_cities=("duesseldorf",), size=32)
    _assert_resume_is_exact(
        tmp_path,
        lambda: tiny_decur(
            modalities={"rgb": 3, "dem": 1},
            projector_dims=(32, 32),
            optimizer="adamw",
            lr=1e-3,
            crop_size=16,
        ),
        lambda: GeoNRWMMPretrainDataModule(root=root, batch_size=4, patch_size=16, tile_size=32),
        batches_per_epoch=3,
        resume_steps=[1, 5],
    )
