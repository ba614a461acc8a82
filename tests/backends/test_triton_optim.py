"""The Triton optimizer entry points (adam_step, sgd_step), called directly, against
torch.optim.Adam / AdamW / SGD over several steps (clip_grad_norm_ and an explicit unscale
for clipping and loss scaling).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before python
starts).  Most tests lower CHUNK_SIZE / BLOCK_SIZE so that small tensors span several
chunks and use both the unmasked full-block path and the masked tail.
"""

import pytest
import torch

from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)

import lowp_reference  # noqa: E402
from fusedopt.backends.triton import multi_tensor as mt  # noqa: E402
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp  # noqa: E402
from triton_optim_helpers import (DEVICE, SHAPES, AdamRun, SgdRun,  # noqa: E402
                                  assert_bits_equal, assert_params_close, make_grads, snapshot)

STEPS = 5


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 elements, blocks of 8: a (40,) tensor has 3 chunks, 2 full blocks each."""
    monkeypatch.setattr(mt, "CHUNK_SIZE", 16)
    monkeypatch.setattr(mt, "BLOCK_SIZE", 8)


def run_steps(run, steps=STEPS, seed=1, dtype=None, **step_kw):
    """Feed the same gradients to both sides; compare the params after every step."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = make_grads([tuple(p.shape) for p in run.params], gen)
        run.torch_step(grads)
        run.ours([g.to(dtype or run.params[0].dtype) for g in grads], **step_kw)
        assert_params_close(run)
    run.check_states()


# ------------------------------------------------------------------------------------- Adam

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_torch(decoupled, amsgrad, maximize, weight_decay):
    run = AdamRun(SHAPES, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                  weight_decay=weight_decay)
    run_steps(run)


def test_adam_default_chunking_and_odd_hyperparameters(monkeypatch):
    monkeypatch.setattr(mt, "CHUNK_SIZE", 65536)
    monkeypatch.setattr(mt, "BLOCK_SIZE", 1024)
    run = AdamRun(SHAPES + [(1030,)], decoupled=True, weight_decay=0.3, lr=3e-3,
                  betas=(0.8, 0.95), eps=1e-6)
    run_steps(run, steps=3)


def test_adam_unscale_and_clip():
    """Our in-kernel unscale + clip vs GradScaler-style unscale + clip_grad_norm_ + step."""
    run = AdamRun(SHAPES, decoupled=True, weight_decay=0.01)
    scale = 2.0 ** 12
    inv_scale = torch.tensor(1.0 / scale, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        scaled = make_grads(SHAPES, gen, scale=scale)
        for r, g in zip(run.ref, scaled):
            r.grad = g * inv_scale
        total = torch.nn.utils.clip_grad_norm_(run.ref, max_norm=0.5)
        clip_coef = torch.clamp(0.5 / (total + 1e-6), max=1.0)
        assert float(clip_coef) < 1.0  # clipping is active
        run.opt.step()
        run.ours(scaled, inv_scale=inv_scale, clip_coef=clip_coef)
        assert_params_close(run)
    run.check_states()


def test_adam_tensor_hyperparameters():
    """lr and betas as 0-dim device tensors (read on the device) equal the same fp32 values
    given to torch as floats."""
    lr, b1, b2 = (torch.tensor(v, device=DEVICE) for v in (2e-2, 0.85, 0.99))
    run = AdamRun(SHAPES, decoupled=False, weight_decay=0.05, lr=float(lr),
                  betas=(float(b1), float(b2)))
    run_steps(run, lr=lr, beta1=b1, beta2=b2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_low_precision_with_masters(dtype):
    """The fp32 masters follow torch's fp32 AdamW; the params are the masters rounded once."""
    run = AdamRun(SHAPES, dtype, decoupled=True, weight_decay=0.1, masters=True)
    gen = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        grads = [g.to(dtype) for g in make_grads(SHAPES, gen)]
        run.torch_step([g.float() for g in grads])
        run.ours(grads)
        for p, m, r in zip(run.params, run.masters, run.ref):
            torch.testing.assert_close(m, r.detach())
            assert torch.equal(p, m.to(dtype))
    run.check_states()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_adam_low_precision_params(dtype, decoupled):
    """Without masters: fp32 math, fp32 states, one rounding per step -- within one ulp of
    the reference written in tests/lowp_reference.py, which the run without weight decay
    is not."""
    shapes = [(64,), (8, 9)]
    hyper = dict(lr=1e-2, eps=1e-4, weight_decay=0.5, amsgrad=not decoupled)
    run = AdamRun(shapes, dtype, decoupled=decoupled, **hyper)
    start = [p.clone() for p in run.params]
    gen = torch.Generator().manual_seed(6)
    grads = [[g.to(dtype) for g in make_grads(shapes, gen)] for _ in range(STEPS)]
    for g in grads:
        run.ours(g)
    assert_within_one_ulp(run.params, lowp_reference.adam(start, grads, decoupled=decoupled,
                                                          **hyper))
    assert_decay_is_visible(run.params, lowp_reference.adam(
        start, grads, decoupled=decoupled, **dict(hyper, weight_decay=0.0)))


# -------------------------------------------------------------------------------------- SGD

SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.5, nesterov=True, maximize=True),
    dict(momentum=0.9, dampening=0.5, maximize=True),
]


@pytest.mark.parametrize("case", SGD_CASES,
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_matches_torch(case):
    run = SgdRun(SHAPES, **case)
    run_steps(run)


def test_sgd_unscale_clip_and_tensor_lr():
    lr = torch.tensor(0.03, device=DEVICE)
    run = SgdRun(SHAPES, lr=float(lr), momentum=0.9, weight_decay=0.01)
    scale = 2.0 ** 10
    inv_scale = torch.tensor(1.0 / scale, device=DEVICE)
    gen = torch.Generator().manual_seed(4)
    for _ in range(STEPS):
        scaled = make_grads(SHAPES, gen, scale=scale)
        for r, g in zip(run.ref, scaled):
            r.grad = g * inv_scale
        total = torch.nn.utils.clip_grad_norm_(run.ref, max_norm=1.0)
        clip_coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        run.opt.step()
        run.ours(scaled, inv_scale=inv_scale, clip_coef=clip_coef, lr=lr)
        assert_params_close(run)
    run.check_states()


def test_sgd_low_precision_with_masters():
    run = SgdRun(SHAPES, torch.bfloat16, momentum=0.9, nesterov=True, masters=True)
    gen = torch.Generator().manual_seed(8)
    for _ in range(STEPS):
        grads = [g.to(torch.bfloat16) for g in make_grads(SHAPES, gen)]
        run.torch_step([g.float() for g in grads])
        run.ours(grads)
        for p, m, r in zip(run.params, run.masters, run.ref):
            torch.testing.assert_close(m, r.detach())
            assert torch.equal(p, m.to(torch.bfloat16))
    run.check_states()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_low_precision_params(dtype):
    """Without masters: within one ulp of tests/lowp_reference.py, which the run without
    weight decay is not."""
    shapes = [(64,), (5, 7)]
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1)
    run = SgdRun(shapes, dtype, **hyper)
    start = [p.clone() for p in run.params]
    gen = torch.Generator().manual_seed(9)
    grads = [[g.to(dtype) for g in make_grads(shapes, gen)] for _ in range(STEPS)]
    for g in grads:
        run.ours(g)
    assert_within_one_ulp(run.params, lowp_reference.sgd(start, grads, **hyper))
    assert_decay_is_visible(run.params, lowp_reference.sgd(start, grads,
                                                           **dict(hyper, weight_decay=0.0)))


# ------------------------------------------------------------------------------ skipped steps

def _inf_grads(shapes, dtype):
    grads = make_grads(shapes, torch.Generator().manual_seed(11))
    grads[3][17] = float("inf")
    grads[1][0, 0] = float("nan")
    return [g.to(dtype) for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_leaves_everything_bit_identical(dtype):
    skip = torch.tensor(1.0, device=DEVICE)
    adam = AdamRun(SHAPES, dtype, amsgrad=True, weight_decay=0.1, masters=dtype != torch.float32)
    sgd = SgdRun(SHAPES, dtype, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(12)
    for run in (adam, sgd):
        run.ours([g.to(dtype) for g in make_grads(SHAPES, gen)])  # a real step: non-zero state
        before = snapshot(run.all_tensors())
        run.ours(_inf_grads(SHAPES, dtype), skip=skip, inv_scale=torch.tensor(0.5, device=DEVICE),
                 clip_coef=torch.tensor(0.9, device=DEVICE))
        assert_bits_equal(before, run.all_tensors())


def test_skipped_first_step_then_a_true_first_step():
    """A skipped first step creates no state: the next step is torch's first step."""
    run = SgdRun(SHAPES, momentum=0.9, dampening=0.5)
    run.ours(_inf_grads(SHAPES, torch.float32), skip=torch.tensor(1.0, device=DEVICE))
    assert all(float(f) == 0.0 for f in run.initialized)
    run_steps(run, steps=2, skip=torch.tensor(0.0, device=DEVICE))
    adam = AdamRun(SHAPES)
    adam.ours(_inf_grads(SHAPES, torch.float32), skip=torch.tensor(1.0, device=DEVICE))
    assert all(float(s) == 0.0 for s in adam.steps)
    run_steps(adam, steps=2, skip=torch.tensor(0.0, device=DEVICE))


# ---------------------------------------------------------------------- shapes and launches

def test_only_empty_tensors():
    run = AdamRun([(0,), (0, 3)])
    run_steps(run, steps=2)
    assert [float(s) for s in run.steps] == [2.0, 2.0]
    sgd = SgdRun([(0,)], momentum=0.9)
    run_steps(sgd, steps=1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tensor_spanning_many_chunks_counts_once(monkeypatch, optimizer):
    """A (1000,) tensor in 16 chunks of 64: its step counter / initialized flag is written
    exactly once per step, and the arrival counters are back to zero afterwards."""
    monkeypatch.setattr(mt, "CHUNK_SIZE", 64)
    monkeypatch.setattr(mt, "BLOCK_SIZE", 32)
    shapes = [(1000,), (3,)]
    run = (AdamRun(shapes, amsgrad=True) if optimizer == "adam"
           else SgdRun(shapes, momentum=0.9, dampening=0.2))
    run_steps(run, steps=3)
    tables = run.cache[optimizer]
    assert tables.n_chunks_total == 16 + 1
    assert int(tables.counters.abs().sum()) == 0


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_more_tensors_than_one_table(monkeypatch, optimizer):
    """MAX_TENSORS = 3: eleven tensors take four launches, each covering its batch."""
    from fusedopt.backends.triton import optim as triton_optim

    monkeypatch.setattr(mt, "MAX_TENSORS", 3)
    launches = []
    name = "_adam_kernel" if optimizer == "adam" else "_sgd_kernel"
    kernel = getattr(triton_optim, name)

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_optim, name, CountingKernel())
    shapes = [(i % 4 * 11,) for i in range(11)]
    run = AdamRun(shapes, weight_decay=0.1) if optimizer == "adam" else SgdRun(shapes, momentum=0.9)
    run_steps(run, steps=2)
    tables = run.cache[optimizer]
    assert [(b.t0, b.t1) for b in tables.batches] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert len(launches) == 2 * 4
    assert sum(g[0] for g in launches[:4]) == tables.n_chunks_total
