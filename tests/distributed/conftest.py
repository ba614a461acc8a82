"""The `ranks` fixture of the distributed tests: (torch.distributed backend, a pool of two
live ranks), for gloo and for nccl, each skipped with the reason where it cannot run."""

import pytest

from _harness import backend_skip_reason, rank_pool


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def ranks(request):
    reason = backend_skip_reason(request.param, 2)
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    return request.param, rank_pool(2, request.param)
