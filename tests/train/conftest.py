"""Tiny models run fastest on one CPU thread: OpenMP across busy cores costs far more than it saves."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
