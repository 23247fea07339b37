"""One intra-op thread for the training tests: their tensors are tiny, and on a shared 2-core machine a
second OpenMP thread turns every op into a wait for a descheduled core (about 7 ms per op, 1000x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
