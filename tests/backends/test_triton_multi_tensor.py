"""The Triton multi-tensor machinery: multi_tensor_norm against torch's
clip_grad_norm_, the inf/NaN flag, the cached tables (reuse, gradient refresh, rebuild on a
storage change), no host reads of device values in a step, and -- without a GPU -- that
every kernel variant lowers to PTX for sm_90 with 16-byte accesses on aligned data.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before python starts).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)

from fusedopt.backends import triton as tb  # noqa: E402
from fusedopt.backends.triton import multi_tensor as mt  # noqa: E402
from triton_optim_helpers import (DEVICE, SHAPES, AdamRun, SgdRun,  # noqa: E402
                                  assert_params_close, make_grads)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(mt, "CHUNK_SIZE", 16)
    monkeypatch.setattr(mt, "BLOCK_SIZE", 8)


def torch_total_norm(grads, inv_scale=1.0):
    """clip_grad_norm_'s total norm of the unscaled gradients (as GradScaler.unscale_ would
    leave them), in fp32."""
    params = [torch.zeros_like(g, dtype=torch.float32, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.float() * inv_scale
    return torch.nn.utils.clip_grad_norm_(params, max_norm=1e30)


def exact_sumsq(grads, inv_scale=1.0):
    return sum(float((g.double() * inv_scale).square().sum()) for g in grads)


# ------------------------------------------------------------------------------------- norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_matches_clip_grad_norm(dtype):
    grads = [g.to(dtype) for g in make_grads(SHAPES + [(300,)], torch.Generator().manual_seed(0))]
    out = tb.multi_tensor_norm(grads, None, {})
    assert out.shape == (2,) and out.dtype == torch.float32 and out.device == grads[0].device
    torch.testing.assert_close(out[0].sqrt(), torch_total_norm(grads), rtol=1e-5, atol=0)
    assert abs(float(out[0]) - exact_sumsq(grads)) <= 1e-5 * exact_sumsq(grads)
    assert float(out[1]) == 0.0


def test_norm_with_inverse_scale(monkeypatch):
    monkeypatch.setattr(mt, "MAX_TENSORS", 2)  # three batches feed one final reduction
    scale = 2.0 ** 14
    grads = make_grads(SHAPES, torch.Generator().manual_seed(1), scale=scale)
    inv_scale = torch.tensor(1.0 / scale, device=DEVICE)
    out = tb.multi_tensor_norm(grads, inv_scale, {})
    torch.testing.assert_close(out[0].sqrt(), torch_total_norm(grads, inv_scale), rtol=1e-5, atol=0)
    exact = exact_sumsq(grads, 1 / scale)
    assert abs(float(out[0]) - exact) <= 1e-5 * exact


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_flags_inf_and_nan(bad, dtype):
    grads = [g.to(dtype) for g in make_grads(SHAPES, torch.Generator().manual_seed(2))]
    cache = {}
    assert float(tb.multi_tensor_norm(grads, None, cache)[1]) == 0.0
    grads[3][37] = bad  # in the last chunk of the (40,) tensor
    out = tb.multi_tensor_norm(grads, None, cache)
    assert float(out[1]) == 1.0
    assert not torch.isfinite(out[0])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_norm_flag_is_about_elements_not_the_sum():
    """A finite gradient whose square overflows fp32 is not flagged (the sum is inf)."""
    grads = [torch.full((3,), 3e38, device=DEVICE), torch.ones(4, device=DEVICE)]
    out = tb.multi_tensor_norm(grads, None, {})
    assert float(out[1]) == 0.0 and float(out[0]) == float("inf")


def test_norm_empty_tensors_and_reproducibility():
    out = tb.multi_tensor_norm([torch.zeros(0, device=DEVICE)] * 2, None, {})
    assert out.tolist() == [0.0, 0.0]
    grads = make_grads([(1000,), (3,), (0,)], torch.Generator().manual_seed(3))
    first = tb.multi_tensor_norm(grads, None, {})
    again = tb.multi_tensor_norm(grads, None, {})
    assert torch.equal(first, again)


def test_norm_launches_per_batch(monkeypatch):
    monkeypatch.setattr(mt, "MAX_TENSORS", 3)
    launches = []
    for name in ("_norm_chunk_kernel", "_norm_finish_kernel"):
        kernel = getattr(mt, name)

        class Counting:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(mt, name, Counting())
    grads = make_grads([(7,)] * 8, torch.Generator().manual_seed(4))
    out = tb.multi_tensor_norm(grads, None, {})
    assert launches == ["_norm_chunk_kernel"] * 3 + ["_norm_finish_kernel"]
    torch.testing.assert_close(out[0].sqrt(), torch_total_norm(grads), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------- caches

def test_tables_are_reused_and_grads_refreshed():
    run = AdamRun(SHAPES, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    grads = make_grads(SHAPES, gen)
    run.torch_step(grads)
    run.ours(grads)
    tables = run.cache["adam"]
    grad_table = tables.grads.clone()
    for _ in range(2):  # new gradient storage each step: same tables, new gradient offsets
        grads = make_grads(SHAPES, gen)
        run.torch_step(grads)
        run.ours(grads)
        assert run.cache["adam"] is tables
        assert tables.grad_ptrs == tuple(g.data_ptr() for g in grads)
    assert not torch.equal(tables.grads, grad_table)
    assert_params_close(run)


@pytest.mark.parametrize("what", ["param", "state", "step"])
def test_tables_rebuilt_when_a_storage_changes(what):
    run = AdamRun(SHAPES, amsgrad=True)
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        if step == 2:
            old = run.cache["adam"]
            if what == "param":  # e.g. model weights loaded into fresh storage
                for p in run.params:
                    p.data = p.data.clone()
            elif what == "state":
                run.exp_avg_sqs[1] = run.exp_avg_sqs[1].clone()
            else:
                run.steps[0] = run.steps[0].clone()
        grads = make_grads(SHAPES, gen)
        run.torch_step(grads)
        run.ours(grads)
        if step == 2:
            assert run.cache["adam"] is not old
        assert_params_close(run)
    run.check_states()


def test_chunk_size_must_be_a_power_of_two(monkeypatch):
    monkeypatch.setattr(mt, "CHUNK_SIZE", 48)
    with pytest.raises(ValueError, match="CHUNK_SIZE must be a power of two, got 48"):
        tb.multi_tensor_norm([torch.ones(3, device=DEVICE)], None, {})


def test_unaligned_tensors_take_the_scalar_path():
    """Params that are views at odd offsets (not 16-byte aligned) still update correctly."""
    flat = torch.randn(200, device=DEVICE)
    views = [flat[1:41], flat[43:50], flat[51:52]]
    run = SgdRun([(40,), (7,), (1,)], momentum=0.9)
    for p, v in zip(run.ref, views):
        p.data.copy_(v)
    run.params = views
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = make_grads([(40,), (7,), (1,)], gen)
        run.torch_step(grads)
        run.ours(grads)
        assert not run.cache["sgd"].aligned
        assert_params_close(run)


# ---------------------------------------------------------------------- no host reads

def test_steps_read_no_device_value_on_the_host(monkeypatch):
    """After the first step has built the tables, a step (with new gradient storage) never
    turns a tensor into a Python value: no .item(), bool(), float(), int() or .tolist()."""
    adam = AdamRun(SHAPES, amsgrad=True)
    sgd = SgdRun(SHAPES, momentum=0.9)
    gen = torch.Generator().manual_seed(8)
    scalars = {name: torch.tensor(value, device=DEVICE)
               for name, value in (("inv_scale", 0.5), ("clip_coef", 0.7), ("skip", 0.0))}
    for run in (adam, sgd):
        run.ours(make_grads(SHAPES, gen), **scalars)
    norm_cache = {}
    tb.multi_tensor_norm(make_grads(SHAPES, gen), scalars["inv_scale"], norm_cache)

    def host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for run in (adam, sgd):
        run.ours(make_grads(SHAPES, gen), **scalars)
    tb.multi_tensor_norm(make_grads(SHAPES, gen), scalars["inv_scale"], norm_cache)
    monkeypatch.undo()
    assert [float(s) for s in adam.steps] == [2.0] * len(SHAPES)


# ---------------------------------------------------------------------- GPU lowering

def test_kernels_lower_to_ptx_for_sm90():
    """Compile every kernel variant for sm_90 (no GPU needed) in a process without
    TRITON_INTERPRET: fp64 scalar math, atomics, pointer tables and early exits all lower,
    and on aligned data the full blocks use 16-byte loads/stores."""
    pytest.importorskip("triton.backends.nvidia.compiler",
                        reason="triton has no NVIDIA backend here")
    script = Path(__file__).with_name("triton_optim_lowering.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"cannot compile for sm_90 here: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, counts in ops.items():
        vector_loads = counts.get("ld.global.v4.b32", 0)
        assert (vector_loads > 0) == name.endswith("-aligned"), (name, counts)
        if name.startswith(("adam", "sgd-momentum")):
            assert any(k.startswith("atom.global") for k in counts), (name, counts)
