"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (OpenMP spinning on a busy 2-core box: 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
