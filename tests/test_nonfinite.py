"""NonFiniteGuard: the nan_policy shared by the LightningModules."""

from __future__ import annotations

import pytest
import torch

from decur_lightning.nonfinite import NonFiniteGuard, finite_flag

NAN = torch.tensor([1.0, float("nan")])
OK = torch.ones(3)


class FakeStrategy:
    """Stands in for a DDP strategy: ``reduce(min)`` over this rank and another rank's flags."""

    def __init__(self, other_rank: torch.Tensor) -> None:
        self.other_rank = other_rank
        self.calls: list[str] = []

    def reduce(self, tensor, reduce_op):
        self.calls.append(reduce_op)
        return torch.minimum(tensor, self.other_rank.float())


class FakeModule:
    def __init__(self, strategy: FakeStrategy, global_step: int = 7) -> None:
        self._trainer = type("T", (), {"strategy": strategy})()
        self.trainer = self._trainer
        self.global_step = global_step
        self.logged: list[tuple[str, float]] = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


def test_raise_names_stage_step_batch_and_every_bad_item():
    guard = NonFiniteGuard()
    assert guard.check(None, "train", 0, [("the input image_a", finite_flag(OK))])
    flags = [
        ("the input image_a", finite_flag(NAN)),
        ("the input image_b", finite_flag(OK)),
        ("the loss", finite_flag(NAN)),
    ]
    with pytest.raises(FloatingPointError) as info:
        guard.check(None, "train", 5, flags)
    message = str(info.value)
    assert message.startswith(
        "Non-finite values (NaN or Inf) at train step 0 (batch 5) in the input image_a, the loss."
    )
    assert "image_b" not in message and "nan_policy='skip'" in message and "lower the learning rate" in message
    module = FakeModule(FakeStrategy(torch.ones(2)), global_step=7)
    with pytest.raises(FloatingPointError, match=r"at val step 7 \(batch 2\) in the logits\..*always raise"):
        guard.check(module, "val", 2, [("the logits", finite_flag(torch.tensor(float("inf"))))])


def test_skip_counts_and_logs_in_training_and_raises_elsewhere():
    strategy = FakeStrategy(torch.ones(1))
    module = FakeModule(strategy)
    guard = NonFiniteGuard("skip")
    assert guard.check(module, "train", 0, [("the loss", finite_flag(OK))])
    assert not guard.check(module, "train", 1, [("the loss", finite_flag(NAN))])
    assert not guard.check(module, "train", 2, [("the loss", finite_flag(NAN))])
    assert guard.skipped_batches == 2
    assert module.logged == [("train/skipped_batches", 1.0), ("train/skipped_batches", 2.0)]
    assert strategy.calls == ["min"] * 3
    with pytest.raises(FloatingPointError, match="test step"):
        guard.check(module, "test", 0, [("the loss", finite_flag(NAN))])
    assert guard.state_dict() == {"skipped_batches": 2}


def test_skip_follows_the_other_ranks():
    """A rank whose batch is finite skips too when another rank's is not (DDP must not stall)."""
    guard = NonFiniteGuard("skip")
    module = FakeModule(FakeStrategy(torch.tensor([1.0, 0.0])))
    flags = [("the input image_a", finite_flag(OK)), ("the loss", finite_flag(OK))]
    assert not guard.check(module, "train", 0, flags)
    assert guard.skipped_batches == 1


def test_off_checks_nothing_and_bad_policies_are_refused():
    guard = NonFiniteGuard("off")
    assert not guard.enabled and guard.check(None, "train", 0, [("the loss", finite_flag(NAN))])
    with pytest.raises(ValueError, match=r"nan_policy must be one of \['raise', 'skip', 'off'\]; got 'ignore'"):
        NonFiniteGuard("ignore")
