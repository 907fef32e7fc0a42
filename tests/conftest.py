"""Shared test settings: small threads, deterministic seeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from threads import single_thread

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with single_thread():
        yield
