"""Training-step cost of DeCURModule against two baselines measured in the same run.

Row "overhead": a full ``DeCURModule`` step under ``lightning.Trainer`` (views, four encoder +
projector passes, loss, checks, logging, backward, LARS step) against the bare encoders +
projectors forward/backward on pre-made views of the same shape (the floor no implementation
can beat). Target ratio <= 1.15.

Row "vs Algorithm 1": the same step against a straightforward transcription of the paper's
Algorithm 1 with the same encoders, views and optimiser (``BatchNorm1d`` standardisation, the
dense K x K matrices, four separate passes). Target ratio <= 1.0.

    python benchmarks/step.py                 # resnet18, 96 px, K=2048, N=32, CPU
    python benchmarks/step.py --paper --device cuda --precision bf16-mixed   # resnet50, 224 px, K=8192, N=256
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightly.utils.lars import LARS
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from decur_lightning import DeCURModule


class _Batches(Dataset):
    """The same pre-generated batch-sized dataset, in memory."""

    def __init__(self, n: int, channels: tuple[int, int], size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x1 = torch.rand(n, channels[0], size, size, generator=generator)
        self.x2 = torch.rand(n, channels[1], size, size, generator=generator)

    def __len__(self) -> int:
        return self.x1.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image_s1": self.x1[i], "image_s2": self.x2[i]}


class _StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)


def make_module(cfg: dict[str, Any], **switches: Any) -> DeCURModule:
    torch.manual_seed(0)
    return DeCURModule(
        modalities={"s1": {"bands": 2, "view": "sar"}, "s2": {"bands": 13, "view": "optical"}},
        encoder=cfg["encoder"],
        projector_dims=(cfg["dim"],) * 3,
        crop_size=cfg["size"],
        **switches,
    )


def time_module_step(cfg: dict[str, Any], steps: int, warmup: int, **switches: Any) -> list[float]:
    """Per-step seconds of ``Trainer.fit`` (between batch start and end hooks; data loading excluded)."""
    module = make_module(cfg, **switches)
    timer = _StepTimer()
    data = DataLoader(_Batches(cfg["batch"] * (steps + warmup), (2, 13), cfg["input_size"]), batch_size=cfg["batch"])
    trainer = L.Trainer(
        max_steps=steps + warmup,
        accelerator=cfg["device"],
        devices=1,
        precision=cfg["precision"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, data)
    return timer.times[warmup:]


def _views(module: DeCURModule, cfg: dict[str, Any]) -> list[Tensor]:
    data = _Batches(cfg["batch"], (2, 13), cfg["input_size"])
    batch = {"image_s1": data.x1.to(cfg["device"]), "image_s2": data.x2.to(cfg["device"])}
    views = module.make_views(batch, seed=0)
    return [*views["s1"], *views["s2"]]


def _autocast(cfg: dict[str, Any]):
    enabled = cfg["precision"] == "bf16-mixed"
    return torch.autocast(cfg["device"], dtype=torch.bfloat16, enabled=enabled)


def time_bare(cfg: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """Encoders + projectors forward and backward on pre-made views: the floor."""
    module = make_module(cfg).to(cfg["device"]).train()
    views = _views(module, cfg)
    times = []
    for step in range(steps + warmup):
        _sync(cfg)
        start = time.perf_counter()
        with _autocast(cfg):
            out = [module.embed(v, m) for v, m in zip(views, ("s1", "s1", "s2", "s2"))]
        sum(z.float().mean() for z in out).backward()
        _sync(cfg)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        module.zero_grad(set_to_none=True)
    return times


def _algorithm1_loss(z1_1, z1_2, z2_1, z2_2, k_c, lmb=0.0051):
    n, k = z1_1.shape
    bn = nn.BatchNorm1d(k, affine=False).to(z1_1.device)

    def off_diagonal(c):
        m = c.shape[0]
        return c.flatten()[:-1].view(m - 1, m + 1)[:, 1:].flatten()

    def loss_c(c):
        return (torch.diagonal(c) - 1).pow(2).sum() + lmb * off_diagonal(c).pow(2).sum()

    def loss_u(c):
        return torch.diagonal(c).pow(2).sum() + lmb * off_diagonal(c).pow(2).sum()

    z1_1, z1_2, z2_1, z2_2 = (bn(z.float()) for z in (z1_1, z1_2, z2_1, z2_2))
    c1, c2, cm = z1_1.T @ z1_2 / n, z2_1.T @ z2_2 / n, z1_1.T @ z2_1 / n
    return loss_c(c1) + loss_c(c2) + loss_c(cm[:k_c, :k_c]) + loss_u(cm[k_c:, k_c:])


def time_algorithm1(cfg: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """Algorithm 1 transcribed: same views and encoders, dense loss, separate passes, LARS step."""
    module = make_module(cfg).to(cfg["device"]).train()
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    optimizer = LARS(
        [{"params": decay, "weight_decay": 1e-6}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.0048}],
        lr=0.2,
        momentum=0.9,
    )
    data = _Batches(cfg["batch"], (2, 13), cfg["input_size"])
    batch = {"image_s1": data.x1.to(cfg["device"]), "image_s2": data.x2.to(cfg["device"])}
    times = []
    for step in range(steps + warmup):
        _sync(cfg)
        start = time.perf_counter()
        with torch.no_grad():
            views = module.make_views(batch)
            x1_1, x1_2, x2_1, x2_2 = *views["s1"], *views["s2"]
        with _autocast(cfg):
            z = [module.embed(v, m) for v, m in zip((x1_1, x1_2, x2_1, x2_2), ("s1", "s1", "s2", "s2"))]
        loss = _algorithm1_loss(*z, module.common_dims)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(cfg)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _sync(cfg: dict[str, Any]) -> None:
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()


def config(paper: bool = False, device: str = "cpu", precision: str = "32-true") -> dict[str, Any]:
    if paper:
        return dict(
            encoder="resnet50", size=224, input_size=264, dim=8192, batch=256, device=device, precision=precision
        )
    return dict(encoder="resnet18", size=96, input_size=112, dim=2048, batch=32, device=device, precision=precision)


def run(cfg: dict[str, Any], steps: int = 2, warmup: int = 1, rounds: int = 3) -> list[dict[str, Any]]:
    """Rows: DeCURModule step vs bare passes, and vs Algorithm 1, with medians and ratios.

    The three measurements alternate in ``rounds`` rounds, so that a change of load on a
    shared machine affects all of them alike.
    """
    times: dict[str, list[float]] = {"module": [], "bare": [], "algorithm1": []}
    for _ in range(rounds):
        times["module"] += time_module_step(cfg, steps, warmup)
        times["bare"] += time_bare(cfg, steps, warmup)
        times["algorithm1"] += time_algorithm1(cfg, steps, warmup)
    module, bare, algorithm1 = (statistics.median(times[k]) for k in ("module", "bare", "algorithm1"))
    setting = (
        f"{cfg['encoder']}, {cfg['size']} px, K={cfg['dim']}, N={cfg['batch']}, {cfg['device']} {cfg['precision']}"
    )
    return [
        {
            "row": "DeCURModule step vs bare encoder+projector fwd/bwd",
            "setting": setting,
            "measured_s": module,
            "baseline_s": bare,
            "ratio": module / bare,
            "target": "<= 1.15",
        },
        {
            "row": "DeCURModule step vs Algorithm 1 transcription",
            "setting": setting,
            "measured_s": module,
            "baseline_s": algorithm1,
            "ratio": module / algorithm1,
            "target": "<= 1.0",
        },
    ]


def run_switches(cfg: dict[str, Any], steps: int = 3, rounds: int = 2) -> list[dict[str, Any]]:
    """Rows: the module step with ``channels_last`` and with ``compile_encoders`` vs without.

    Compilation happens in the warm-up steps (not timed); it is reported separately.
    """
    rows = []
    setting = (
        f"{cfg['encoder']}, {cfg['size']} px, K={cfg['dim']}, N={cfg['batch']}, {cfg['device']} {cfg['precision']}"
    )
    for switch, warmup in (("channels_last", 1), ("compile_encoders", 2)):
        default: list[float] = []
        switched: list[float] = []
        for _ in range(rounds):
            default += time_module_step(cfg, steps, 1)
            switched += time_module_step(cfg, steps, warmup, **{switch: True})
        rows.append(
            {
                "row": f"DeCURModule step with {switch}=True vs without",
                "setting": setting,
                "measured_s": statistics.median(switched),
                "baseline_s": statistics.median(default),
                "ratio": statistics.median(switched) / statistics.median(default),
                "target": "reported",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="resnet50, 224 px, K=8192, N=256")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switches", action="store_true", help="also measure channels_last and torch.compile")
    args = parser.parse_args()
    cfg = config(args.paper, args.device, args.precision)
    rows = run(cfg, args.steps, rounds=args.rounds) + (run_switches(cfg) if args.switches else [])
    for row in rows:
        print(
            f"{row['row']} ({row['setting']}): {row['measured_s']:.3f} s vs {row['baseline_s']:.3f} s = {row['ratio']:.2f}x (target {row['target']})"
        )


if __name__ == "__main__":
    main()
