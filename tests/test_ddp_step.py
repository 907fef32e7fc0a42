"""A whole DeCUR training step under Lightning DDP (2 CPU processes, gloo) equals one process.

Same global batch, same loss, same updated weights. On GPUs, SyncBatchNorm makes the batch
norms global; torch's SyncBatchNorm is CUDA-only, so this CPU test swaps in a batch norm that
standardises over the gathered global batch (what SyncBatchNorm computes).
"""

from __future__ import annotations

import kornia.augmentation as K
import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from decur_lightning.augmentations import ViewPair
from decur_lightning.datamodules import SyntheticMultimodalDataModule
from decur_lightning.losses import gather_with_grad

from helpers import tiny_decur


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over the batch gathered from all ranks (SyncBatchNorm's result, on CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        full = gather_with_grad(x)
        dims = [0, *range(2, x.ndim)]
        mean, var = full.mean(dims), full.var(dims, unbiased=False)
        count = full.numel() // full.shape[1]
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = [1, -1] + [1] * (x.ndim - 2)
        normed = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return normed * self.weight.view(shape) + self.bias.view(shape)


def _globalise(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            _globalise(child)
    return module


MODALITIES = {2: {"sar": 2, "optical": 4}, 3: {"sar": 2, "optical": 4, "dem": 1}}


def _model(count: int) -> nn.Module:
    torch.manual_seed(0)
    views = ViewPair(nn.Identity(), K.RandomHorizontalFlip(p=1.0))  # deterministic views
    bands = MODALITIES[count]
    model = tiny_decur(
        modalities=bands, projector_dims=(32, 32), views=dict.fromkeys(bands, views), lr=0.5, lr_bias=0.1
    )
    return _globalise(model)


class _Record(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"loss": outputs["loss"].detach(), "state": state}, f"{self.out}/rank{trainer.global_rank}.pt")


class _FixedOrderData(SyntheticMultimodalDataModule):
    """No shuffling: one process and two processes see the same global batch."""

    def train_dataloader(self):
        return self._loader("train", shuffle=False, drop_last=True)


def _fit(devices: int, out: str, count: int) -> None:
    dm = _FixedOrderData(modality_specs=MODALITIES[count], num_train=16, batch_size=16 // devices, size=32)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[_Record(out)],
    )
    trainer.fit(_model(count), dm)


@pytest.mark.parametrize("count", [2, 3], ids=["two_modalities", "three_modalities"])
def test_two_process_ddp_step_equals_single_process(tmp_path, count):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    _fit(1, str(single), count)
    _fit(2, str(double), count)
    reference = torch.load(single / "rank0.pt")
    start = _model(count).state_dict()
    changed = [k for k, v in reference["state"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert len(changed) > 100, "the step should update the weights"
    for rank in range(2):
        result = torch.load(double / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
        for key, value in reference["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
