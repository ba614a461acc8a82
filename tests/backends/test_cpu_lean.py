"""The cpu backend's lean Adam kernel beyond the cross-backend reference tests: results
independent of the thread count and of the plan limits, equal to the torch backend's on
sizes that run in parallel, and the LeanAdamTable binding's refusals."""

from __future__ import annotations

import pytest
import torch

from lean_helpers import LeanBucket, lean_module, make_grads, snapshot

cpu = pytest.importorskip("fusedopt.backends.cpu")
if "lean_adam" not in cpu.OPS:
    pytest.skip(f"the cpu backend cannot run here: {cpu.status()[1]}", allow_module_level=True)

from fusedopt import _cpu  # noqa: E402
from fusedopt.backends import torch_ref  # noqa: E402
from fusedopt.backends.cpu import lean  # noqa: E402

# more than one parallel region's worth of elements (131072), partial blocks and chunks
SHAPES = [(100_001,), (40_000,), (255,), (3, 1000)]


def _run(module, state, dtype, threads=None, **kw):
    bucket = LeanBucket(SHAPES, state=state, dtype=dtype)
    before = _cpu.get_num_threads()
    if threads is not None:
        _cpu.set_num_threads(threads)
    try:
        for grads in make_grads(SHAPES, 2, dtype=dtype):
            bucket.step(module, grads, stochastic_rounding=True, weight_decay=0.1, **kw)
    finally:
        _cpu.set_num_threads(before)
    return snapshot(bucket.tensors())


@pytest.mark.parametrize("state,dtype", [("bf16", torch.bfloat16), ("q8", torch.float32),
                                         ("q8", torch.float16)])
def test_same_bits_with_1_and_2_threads_and_as_the_torch_backend(state, dtype):
    one = _run(cpu, state, dtype, threads=1)
    two = _run(cpu, state, dtype, threads=2)
    reference = _run(torch_ref, state, dtype)
    for i, (a, b, c) in enumerate(zip(one, two, reference)):
        assert torch.equal(a, b), f"tensor {i}: 1 vs 2 threads"
        assert torch.equal(a, c), f"tensor {i}: cpu vs torch"


def test_plan_limits_do_not_change_the_bits(monkeypatch):
    default = _run(cpu, "q8", torch.bfloat16)
    monkeypatch.setattr(lean, "PLAN_LIMITS", (300, 2, 3))  # 8-bit chunks round up to 512
    assert all(torch.equal(a, b) for a, b in zip(default, _run(cpu, "q8", torch.bfloat16)))


def _table(state=2, n=1, absmax=True, chunk_size=512, streams=None):
    a = [0] * n
    return _cpu.LeanAdamTable([10] * n, 0, state, a, a, a, a if absmax else None,
                              a if absmax else None, None, a,
                              [0] * n if streams is None else streams, chunk_size, 4, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(state=5), "state code"),
    (dict(absmax=False), "absmaxes"),
    (dict(chunk_size=300), "multiple of 256"),
    (dict(streams=[0, 1]), "streams has 2 addresses"),
])
def test_the_table_refuses_inconsistent_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _table(**kwargs)


def test_a_step_with_the_wrong_number_of_gradients_is_refused_before_any_access():
    table = _table(n=2)
    status = table.step([0], 1e-3, 0, 0.9, 0, 0.999, 0, 1e-8, 0.0, False, True, False, 0, 0, 0, 0)
    assert _cpu.optim_status_string(status).startswith("inconsistent")


def test_lean_module_reports_the_cpu_backend():
    module, device = lean_module("cpu")
    assert module.NAME == "cpu" and device.type == "cpu"


@pytest.mark.skipif(not _cpu.lean_blocks_use_avx512(), reason="this CPU has no AVX-512: only "
                    "the portable loops run here")
@pytest.mark.parametrize("state,dtype", [("q8", torch.bfloat16), ("q8", torch.float32),
                                         ("bf16", torch.float32)])
def test_avx512_and_portable_loops_give_the_same_bits(state, dtype):
    for kw in (dict(), dict(maximize=True, decoupled=False)):  # with and without a transform
        fast = _run(cpu, state, dtype, **kw)
        _cpu.set_portable_lean_blocks(True)
        try:
            portable = _run(cpu, state, dtype, **kw)
        finally:
            _cpu.set_portable_lean_blocks(False)
        assert all(torch.equal(a, b) for a, b in zip(fast, portable))
