"""Thread control for tests (torch only: conftest imports it before Lightning is imported,
so that Lightning's logger still propagates to pytest's log capture)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op torch thread (restored after): on a shared, busy CPU, spinning OpenMP
    threads made tiny-model tests up to 25 times slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
