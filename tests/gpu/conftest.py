"""Fixtures shared by the GPU tier (tests marked `gpu`, run by scripts/gpu_check.sh on a CUDA machine)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch", reason="torch is needed to run kernels on the region's memory")
    if not torch.cuda.is_available():
        pytest.skip("torch in this environment has no CUDA support (a CPU build): install a CUDA torch to run this")
    torch.cuda.init()
    return torch
