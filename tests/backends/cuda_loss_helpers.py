"""Shared helpers of the `cuda` loss-kernel tests (test_cuda_losses.py, test_cuda_focal.py):
the `cuda` fixture (the backend module, or a skip with its reason) and the device scales.
References and tolerance rules are the cpu tests' (cpu_loss_helpers.py)."""

import pytest
import torch

from fusedopt import backends

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEV = "cuda"


@pytest.fixture(scope="module")
def cuda():
    ok, reason = backends.status("cuda")
    if not ok:
        pytest.skip(f"backend 'cuda' cannot run here: {reason}")
    from fusedopt.backends import cuda as module
    return module


def device_scales(first=1.0, second=1.0, device=DEV):
    """The (2,) fp32 `scales` tensor of the loss entry points, on the device."""
    return torch.tensor([first, second], dtype=F32, device=device)
