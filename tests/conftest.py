import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _restore_rng_and_backend():
    """Each test sees the same global RNG and backend state it would see alone."""
    import dsig_ext

    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if CUDA else None
    backend = dsig_ext.get_backend()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_rng_state(cpu_state)
    if CUDA:
        torch.cuda.set_rng_state_all(cuda_state)
    dsig_ext.set_backend(backend)
    torch.use_deterministic_algorithms(deterministic)
