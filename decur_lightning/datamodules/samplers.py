"""Samplers whose order depends only on a seed and the epoch, so that resumed runs see the same data."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler, RandomSampler

__all__ = ["EpochIndex", "EpochSeededDistributedSampler", "EpochSeededRandomSampler"]


class EpochIndex(int):
    """A sample index that also carries the epoch it is drawn in (``EpochIndex(5, epoch=2) == 5``).

    It behaves as the plain ``int`` everywhere (comparison, hashing, list indexing), so code that
    only wants the index is unaffected; an *epoch-indexed* data set reads ``index.epoch`` to draw
    per-sample randomness as a pure function of (seed, epoch, index). It survives the DataLoader's
    trip to worker processes (pickling keeps the epoch).
    """

    epoch: int

    def __new__(cls, value: int, epoch: int = 0) -> EpochIndex:
        index = super().__new__(cls, value)
        index.epoch = epoch
        return index

    def __reduce__(self) -> tuple[type[EpochIndex], tuple[int, int]]:
        return type(self), (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


class EpochSeededRandomSampler(RandomSampler):
    """A random permutation per epoch drawn from ``seed + epoch`` (not from the global RNG).

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed from an
    epoch-end checkpoint visits the data in exactly the order of an uninterrupted run. Under a
    distributed strategy the pretraining datamodules use :class:`EpochSeededDistributedSampler`
    instead (Lightning would replace this one by a plain ``DistributedSampler``, which yields
    plain indices and so loses the epoch of epoch-indexed data sets).

    Epoch-indexed data sets: if ``data_source.epoch_indexed`` is true, the sampler yields
    :class:`EpochIndex` values (``int`` subclass, equal to the plain index) carrying the epoch, so
    that the data set can draw per-sample randomness (e.g. SSL4EO-S12 seasons) as a pure function
    of (seed, epoch, index), also in DataLoader worker processes, which never see
    :meth:`set_epoch`.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if getattr(self.data_source, "epoch_indexed", False):
            yield from (EpochIndex(index, self.epoch) for index in order)
        else:
            yield from order


class EpochSeededDistributedSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (shuffled from ``seed + epoch``, one shard per rank) that
    yields :class:`EpochIndex` values for epoch-indexed data sets, as
    :class:`EpochSeededRandomSampler` does in one process. Lightning keeps a
    ``DistributedSampler`` it finds in a loader, so the epoch reaches the data set under DDP too.
    """

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()
        if getattr(self.dataset, "epoch_indexed", False):
            yield from (EpochIndex(index, self.epoch) for index in indices)
        else:
            yield from indices
