"""Two gloo processes under DDP give the single-process loss and gradient on the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from decur_lightning.losses import DeCURLoss

GLOBAL_BATCH, IN_DIM, K, COMMON = 16, 6, 32, 24


class _TwoEncoders(nn.Module):
    """Two modality encoders embedding two views each (what DeCURModule does per step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.enc1 = nn.Sequential(nn.Linear(IN_DIM, 24), nn.Tanh(), nn.Linear(24, K))
        self.enc2 = nn.Sequential(nn.Linear(IN_DIM, 24), nn.Tanh(), nn.Linear(24, K))

    def forward(self, x1a, x1b, x2a, x2b):
        return self.enc1(x1a), self.enc1(x1b), self.enc2(x2a), self.enc2(x2b)


def _views(z1a, z1b, z2a, z2b) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"s1": (z1a, z1b), "s2": (z2a, z2b)}


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator) for _ in range(4)]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(_TwoEncoders())
        shard = GLOBAL_BATCH // world_size
        inputs = [x[rank * shard : (rank + 1) * shard] for x in _data()]
        loss = DeCURLoss(COMMON)(_views(*model(*inputs))).total
        loss.backward()  # DDP averages the parameter gradients across ranks here
        torch.save(
            {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.module.parameters()]},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_loss_and_ddp_gradient_equal_single_process(tmp_path):
    model = _TwoEncoders()
    loss = DeCURLoss(COMMON)(_views(*model(*_data()))).total
    loss.backward()
    expected_grads = [p.grad for p in model.parameters()]

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        for got, expected in zip(result["grads"], expected_grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_without_gathering_the_loss_differs(tmp_path):
    """Guard against a vacuous test: per-rank standardisation gives another loss."""
    model = _TwoEncoders()
    data = _data()
    full = DeCURLoss(COMMON)(_views(*model(*data))).total
    half = DeCURLoss(COMMON)(_views(*model(*[x[: GLOBAL_BATCH // 2] for x in data]))).total
    assert not torch.isclose(full, half, rtol=1e-3)
