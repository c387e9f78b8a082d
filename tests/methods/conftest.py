"""Fixtures local to the methods tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run the tiny models on one intra-op thread.

    The models take milliseconds, so threads buy nothing, and on a small machine shared with other
    processes two OpenMP threads can spin-wait each other into a 40x slowdown (measured on 2 cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
