"""The non-finite policy shared by the LightningModules: raise on, skip, or ignore NaN/Inf.

A training run that meets a NaN (bad pixels in the data, or a diverging model) should stop with
an error that says where, or skip the batch on every rank, never log ``loss=nan`` and exit 0.
:class:`NonFiniteGuard` is that check, written once:

- the caller hands it named scalar flags (``torch.isfinite(x).all()`` of each thing to check:
  the inputs before the forward pass, so that a bad batch never reaches the batch-norm
  statistics; the outputs and the loss after it);
- one host synchronisation per call (the flags are stacked, then read once);
- ``policy="raise"``: a :class:`FloatingPointError` naming the stage, the step, the batch and
  every non-finite item, and how to fix it;
- ``policy="skip"``: in training only, the step returns ``None`` (Lightning then runs no
  backward and no optimiser update); all ranks skip together (under DDP a lone rank without a
  backward pass would stall the gradient all-reduce); skipped batches are counted and logged
  as ``train/skipped_batches``. Validation and test batches always raise: a non-finite metric
  is never silently dropped;
- ``policy="off"``: no check, no synchronisation.

Example:
    >>> guard = NonFiniteGuard("raise")
    >>> x = torch.tensor([1.0, float("nan")])
    >>> guard.check(None, "train", 0, [("the input image_s1", finite_flag(x))])
    Traceback (most recent call last):
    ...
    FloatingPointError: Non-finite values (NaN or Inf) at train step 0 (batch 0) in the input image_s1. ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["NAN_POLICIES", "NanPolicy", "NonFiniteGuard", "finite_flag"]

NanPolicy = Literal["raise", "skip", "off"]
#: The accepted values of ``nan_policy``.
NAN_POLICIES: tuple[str, ...] = ("raise", "skip", "off")


def finite_flag(x: Tensor) -> Tensor:
    """A scalar boolean tensor: whether every element of ``x`` is finite (no host sync)."""
    return torch.isfinite(x.detach()).all()


class NonFiniteGuard:
    """Checks named finiteness flags under a ``nan_policy`` (see the module docstring).

    Args:
        policy: ``"raise"`` (default), ``"skip"`` (training batches only) or ``"off"``.

    Attributes:
        skipped_batches: training batches skipped so far (saved with :meth:`state_dict`).
    """

    def __init__(self, policy: NanPolicy = "raise") -> None:
        if policy not in NAN_POLICIES:
            raise ValueError(
                f"nan_policy must be one of {list(NAN_POLICIES)}; got {policy!r}. 'raise' stops at the first "
                "NaN/Inf, 'skip' skips such training batches, 'off' does not check."
            )
        self.policy: NanPolicy = policy
        self.skipped_batches = 0

    @property
    def enabled(self) -> bool:
        """Whether checks run (``policy != "off"``); callers can skip computing flags otherwise."""
        return self.policy != "off"

    def check(self, module: Any, stage: str, batch_idx: int, flags: Sequence[tuple[str, Tensor]]) -> bool:
        """``True`` when every flag holds; otherwise raise, or (training, ``"skip"``) return ``False``.

        Args:
            module: the LightningModule (its trainer gives the step, the cross-rank reduction and
                the logger); ``None`` or a module without a trainer works too (step 0, one rank).
            stage: ``"train"``, ``"val"``, ``"test"`` or ``"predict"``.
            batch_idx: the batch index, named in the error.
            flags: ``(description, scalar bool tensor)`` pairs, e.g.
                ``("the input image_s1", finite_flag(x))``; descriptions name the item in the
                error (``"... in the input image_s1"``).
        """
        if not self.enabled or not flags:
            return True
        ok = torch.stack([flag.reshape(()) for _, flag in flags])
        trainer = getattr(module, "_trainer", None)
        skipping = stage == "train" and self.policy == "skip"
        if skipping and trainer is not None:
            # Every rank must skip together (a lone rank without backward would stall DDP).
            ok = trainer.strategy.reduce(ok.float(), reduce_op="min") > 0
        ok_list = ok.tolist()  # the one host synchronisation
        if all(ok_list):
            return True
        if skipping:
            self.skipped_batches += 1
            if trainer is not None:
                module.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
            return False
        bad = [name for (name, _), good in zip(flags, ok_list) if not good]
        step = module.global_step if trainer is not None else 0
        raise FloatingPointError(self.message(stage, step, batch_idx, bad))

    def message(self, stage: str, step: int, batch_idx: int, bad: Sequence[str]) -> str:
        """The error text: where, what, and how to fix it."""
        if bad:
            where = ", ".join(bad) if len(bad) < 3 else f"{', '.join(bad[:-1])} and {bad[-1]}"
        else:
            where = "the checked values (on another rank)"
        skip = (
            "Set nan_policy='skip' to skip such batches."
            if stage == "train"
            else "Set nan_policy='skip' to skip such batches in training (validation and test batches always "
            "raise: their metrics would be wrong)."
        )
        return (
            f"Non-finite values (NaN or Inf) at {stage} step {step} (batch {batch_idx}) in {where}. "
            "Inputs or labels: check the data's no-data values and normalisation. Embeddings, logits or "
            "loss: the training diverged; lower the learning rate or use bf16 instead of fp16. " + skip
        )

    def state_dict(self) -> dict[str, int]:
        """The skip count, for checkpoints."""
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the skip count saved by :meth:`state_dict`."""
        self.skipped_batches = int(state.get("skipped_batches", 0))
