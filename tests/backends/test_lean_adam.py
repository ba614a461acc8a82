"""The lean Adam entry point (``lean_adam_step``: fp32 / bf16 / 8-bit moments, stochastic
rounding of bf16/fp16 params) of every backend, against the NumPy statement of the math
in tests/lean_reference.py, bit for bit: params, masters, moments (bf16 bits, 8-bit codes and
absmax), step counters.  Equal bits to one reference means equal bits across backends.

The Triton kernels run under TRITON_INTERPRET=1 on CPU tensors; chunk sizes are lowered so
that the small tensors span several chunks, blocks and (cpu) launches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lean_helpers import (SHAPES, LeanBucket, ReferenceBucket, assert_unchanged, lean_module,
                          make_grads, snapshot)

# masked tail lanes divide 0 by 0 (eps = 0) or inf by inf in the Triton interpreter's NumPy;
# they are never stored
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")

STEPS = 2  # the second step decodes non-zero states

VARIANTS = {
    "adamw": dict(decoupled=True, weight_decay=0.1),
    "adam-l2-maximize": dict(decoupled=False, weight_decay=0.05, maximize=True,
                             beta1=0.8, beta2=0.95, eps=1e-6),
    "scaled-clipped": dict(decoupled=True, inv_scale=2.0 ** -10, clip_coef=0.37, lr=3e-3),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 512 elements (two 256-element blocks), Triton loops of 128 elements, cpu
    launches of at most 3 tensors and 4 chunks."""
    from fusedopt import backends
    ok, _ = backends.status("triton")
    if ok:
        from fusedopt.backends.triton import multi_tensor as mt
        monkeypatch.setattr(mt, "CHUNK_SIZE", 512)
        monkeypatch.setattr(mt, "BLOCK_SIZE", 128)
    if backends.status("cpu")[0]:
        from fusedopt.backends.cpu import optim
        monkeypatch.setattr(optim, "PLAN_LIMITS", (512, 3, 4))
        from fusedopt.backends.cpu import lean
        monkeypatch.setattr(lean, "PLAN_LIMITS", (512, 3, 4))


def _hyper(variant, device):
    kw = dict(VARIANTS[variant])
    for name in ("inv_scale", "clip_coef"):
        if name in kw:
            kw[name] = torch.tensor(kw[name], device=device)
    return kw


def _run(backend, state, dtype, *, variant="adamw", master=False, stochastic=False,
         shapes=SHAPES, steps=STEPS, memory_format=None):
    module, device = lean_module(backend)
    ours = LeanBucket(shapes, state=state, dtype=dtype, master=master, device=device,
                      memory_format=memory_format)
    theirs = ReferenceBucket(ours)
    kw = _hyper(variant, device)
    for grads in make_grads(shapes, steps, dtype=dtype, device=device, like=ours.params):
        ours.step(module, grads, stochastic_rounding=stochastic, **kw)
        theirs.step(grads, stochastic_rounding=stochastic, **kw)
        theirs.assert_equal(ours)
    return ours


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("state", ["fp32", "bf16", "q8"])
def test_fp32_params_match_the_reference(backend, state, variant):
    _run(backend, state, torch.float32, variant=variant)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("state", ["fp32", "bf16", "q8"])
def test_low_precision_params_match_the_reference(backend, state, dtype, stochastic):
    _run(backend, state, dtype, variant="adam-l2-maximize", stochastic=stochastic)


@pytest.mark.parametrize("state", ["bf16", "q8"])
def test_masters_win_over_stochastic_rounding(backend, state):
    """With fp32 masters the param is the nearest rounding of the master, whatever the
    stochastic flag (the reference rounds to nearest)."""
    _run(backend, state, torch.bfloat16, variant="scaled-clipped", master=True, stochastic=True)


def test_channels_last_params_walk_memory_order(backend):
    _run(backend, "q8", torch.float32, shapes=[(2, 3, 7, 5), (1, 256, 1, 3)], steps=2,
         memory_format=torch.channels_last)


def test_tensor_hyperparameters_are_read_when_the_step_runs(backend):
    module, device = lean_module(backend)
    ours = LeanBucket(SHAPES, state="q8", device=device)
    theirs = ReferenceBucket(ours)
    lr, b1, b2 = (torch.tensor(x, device=device) for x in (1e-2, 0.9, 0.99))
    for k, grads in enumerate(make_grads(SHAPES, 3, device=device)):
        ours.step(module, grads, lr=lr, beta1=b1, beta2=b2)
        theirs.step(grads, lr=lr.item(), beta1=b1.item(), beta2=b2.item())
        theirs.assert_equal(ours)
        lr.mul_(0.5)  # a scheduler changing it in place
        b1.fill_(0.85 - 0.05 * k)


@pytest.mark.parametrize("state", ["fp32", "bf16", "q8"])
def test_a_skipped_step_changes_no_byte(backend, state):
    module, device = lean_module(backend)
    ours = LeanBucket(SHAPES, state=state, dtype=torch.bfloat16, device=device)
    grads = make_grads(SHAPES, 2, dtype=torch.bfloat16, device=device)
    ours.step(module, grads[0], stochastic_rounding=True)
    before = snapshot(ours.tensors())
    bad = [g.clone().fill_(float("nan")) for g in grads[1]]
    ours.step(module, bad, stochastic_rounding=True, skip=torch.tensor(1.0, device=device))
    assert_unchanged(before, ours.tensors())
    ours.step(module, grads[1], stochastic_rounding=True, skip=torch.tensor(0.0, device=device))
    assert all(s.item() == 2.0 for s in ours.steps)


def test_nonfinite_gradients_poison_only_their_blocks(backend):
    """An inf/NaN that reaches the 8-bit encoder (no skip) makes its 256-element block
    decode to NaN (absmax NaN, codes 0); the other blocks stay finite."""
    module, device = lean_module(backend)
    shapes = [(600,)]
    ours = LeanBucket(shapes, state="q8", device=device)
    grads = make_grads(shapes, 1, device=device)[0]
    grads[0][300] = float("inf")
    grads[0][5] = float("nan")
    ours.step(module, grads)
    for absmax, codes in ((ours.m_absmax[0], ours.exp_avgs[0]),
                          (ours.v_absmax[0], ours.exp_avg_sqs[0])):
        assert torch.isnan(absmax[:2]).all() and torch.isfinite(absmax[2:]).all()
        assert (codes[:512] == 0).all()


def test_zero_and_tiny_blocks_store_zeros(backend):
    module, device = lean_module(backend)
    shapes = [(300,)]
    ours = LeanBucket(shapes, state="q8", device=device)
    g = torch.zeros(300, device=device)
    g[256:] = 1e-35  # v = (1-b2) g^2 underflows; m = (1-b1) g is below 2^-100
    ours.step(module, [g], lr=0.0)
    assert ours.m_absmax[0].tolist() == [0.0, 0.0] and ours.v_absmax[0].tolist() == [0.0, 0.0]
    assert (ours.exp_avgs[0] == 0).all() and (ours.exp_avg_sqs[0] == 0).all()


def test_empty_bucket_lists_are_a_no_op(backend):
    module, _ = lean_module(backend)
    module.lean_adam_step([], [], [], [], None, None, None, [], [], lr=1e-3, beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                          decoupled=True, stochastic_rounding=False, seed=0, inv_scale=None,
                          clip_coef=None, skip=None, cache={})


def test_state_replaced_between_steps_is_used(backend):
    """The entry point follows the tensors it is given (cached tables notice a new one)."""
    module, device = lean_module(backend)
    ours = LeanBucket(SHAPES, state="bf16", device=device)
    theirs = ReferenceBucket(ours)
    grads = make_grads(SHAPES, 2, device=device)
    ours.step(module, grads[0])
    theirs.step(grads[0])
    ours.exp_avgs = [m.clone() for m in ours.exp_avgs]
    ours.steps = [s.clone() for s in ours.steps]
    ours.step(module, grads[1])
    theirs.step(grads[1])
    theirs.assert_equal(ours)
    assert np.isfinite(theirs.p[0]).all()
