"""Suite-wide settings."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Iterator[None]:
    """Run the tiny test models on one intra-op thread: on a small, busy machine extra
    threads only contend (a 64-unit MLP step goes from ~0.5 ms to tens of ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
