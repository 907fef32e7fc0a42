"""Samplers whose order depends only on a seed and the epoch, so that resumed runs see the same data."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler

__all__ = ["EpochSeededRandomSampler"]


class EpochSeededRandomSampler(RandomSampler):
    """A random permutation per epoch drawn from ``seed + epoch`` (not from the global RNG).

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed from an
    epoch-end checkpoint visits the data in exactly the order of an uninterrupted run. Under a
    distributed strategy Lightning replaces it by its ``DistributedSampler`` (which is seeded
    per epoch in the same way).

    Epoch-indexed data sets: if ``data_source.epoch_indexed`` is true, the sampler yields
    ``epoch * len(data_source) + i`` instead of ``i``, so that the data set can draw per-sample
    randomness (e.g. SSL4EO-S12 seasons) as a pure function of (seed, epoch, index), also in
    DataLoader worker processes, which never see :meth:`set_epoch`. Such a data set decodes the
    index with ``divmod(index, len(self))``.
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
        length = len(self.data_source)
        offset = self.epoch * length if getattr(self.data_source, "epoch_indexed", False) else 0
        for index in torch.randperm(length, generator=generator).tolist():
            yield offset + index
