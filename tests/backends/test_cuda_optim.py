"""The `cuda` backend's optimizer kernels (adam_step, sgd_step, multi_tensor_norm) called
through their launchers on CUDA tensors, against torch.optim.Adam/AdamW/SGD run on the same
GPU, clip_grad_norm_, GradScaler-style unscaling, float64 sums, and the `cpu` backend (the
same element math: equal bits). bf16/fp16 params: masters against the fp32 run, without
masters against the written reference of tests/lowp_reference.py. Every test is marked
`gpu`: without a CUDA device they are skipped with the reason (tests/conftest.py). The
bindings' argument checks run without a device in test_cuda_bindings.py."""

from __future__ import annotations

import math

import pytest
import torch

import cpu_optim_helpers as helpers
from cpu_optim_helpers import (ADAM_VARIANTS, F32, LOW_PRECISION, SGD_VARIANTS, SHAPES,
                               assert_close_list, assert_same_bits, bits, torch_adam_kwargs,
                               torch_run, variant_id)
from fusedopt import backends
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(scope="module")
def optim():
    ok, reason = backends.status("cuda")
    if not ok:
        pytest.skip(f"backend 'cuda' cannot run here: {reason}")
    from fusedopt.backends.cuda import optim as module
    return module


def make_tensors(shapes, *, seed, dtype=F32, scale=1.0, device=DEV):
    return helpers.make_tensors(shapes, seed=seed, dtype=dtype, scale=scale, device=device)


def grad_steps(shapes, steps, *, seed=1, dtype=F32, scale=1.0, device=DEV):
    return helpers.grad_steps(shapes, steps, seed=seed, dtype=dtype, scale=scale, device=device)


def scalar(value):
    return torch.tensor(value, dtype=F32, device=DEV)


def AdamBucket(module, params, **kw):  # noqa: N802  (builds the shared helper's bucket)
    return helpers.AdamBucket(params, module=module, **kw)


def SgdBucket(module, params, **kw):  # noqa: N802
    return helpers.SgdBucket(params, module=module, **kw)


# ----------------------------------------------------------------------------- vs torch.optim

@pytest.mark.parametrize("variant", ADAM_VARIANTS, ids=variant_id)
def test_adam_matches_torch_over_steps(optim, variant):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 5)
    cls, kw = torch_adam_kwargs(variant)
    ref, ref_opt = torch_run(cls, params, grads, **kw)
    ours = AdamBucket(optim, params, amsgrad=kw["amsgrad"])
    for g in grads:
        ours.step(g, **{k: variant[k] for k in variant if k != "amsgrad"})
    assert_close_list(ours.params, ref, what="param")
    for i, r in enumerate(ref):
        st = ref_opt.state[r]
        assert_close_list([ours.exp_avgs[i], ours.exp_avg_sqs[i]],
                          [st["exp_avg"], st["exp_avg_sq"]])
        if kw["amsgrad"]:
            assert_close_list([ours.max_sqs[i]], [st["max_exp_avg_sq"]])
    assert [s.item() for s in ours.steps] == [5.0] * len(SHAPES)  # zero-size tensors too


@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=variant_id)
def test_sgd_matches_torch_over_steps(optim, variant):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 5)
    kw = {"lr": 1e-2, **variant}
    ref, ref_opt = torch_run(torch.optim.SGD, params, grads, **kw)
    ours = SgdBucket(optim, params, momentum=variant["momentum"])
    for g in grads:
        ours.step(g, **{k: v for k, v in kw.items() if k != "momentum"})
    assert_close_list(ours.params, ref, what="param")
    if variant["momentum"]:
        assert_close_list(ours.buffers, [ref_opt.state[r]["momentum_buffer"] for r in ref])
        assert all(f.item() == 1.0 for f in ours.flags)
    else:
        assert all(f.item() == 0.0 for f in ours.flags)  # neither read nor written


@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_same_bits_as_the_cpu_backend(optim, which):
    """Both backends run math_optim.h with IEEE sqrt/division and the same explicit fmas,
    and form the per-tensor coefficients in double rounded once to fp32: equal bits."""
    ok, reason = backends.status("cpu")
    if not ok:
        pytest.skip(f"backend 'cpu' cannot run here: {reason}")
    from fusedopt.backends.cpu import optim as cpu_optim
    runs = []
    for module, device in [(optim, DEV), (cpu_optim, "cpu")]:
        params = make_tensors(SHAPES, seed=0, device=device)
        grads = grad_steps(SHAPES, 4, device=device)
        if which == "adam":
            b = AdamBucket(module, params, amsgrad=True)
            for g in grads:
                b.step(g, decoupled=True, weight_decay=0.1, betas=(0.8, 0.95))
        else:
            b = SgdBucket(module, params, momentum=0.9)
            for g in grads:
                b.step(g, dampening=0.1, weight_decay=0.1, nesterov=False)
        runs.append(bits(b.tensors()))
    for i, (a, c) in enumerate(zip(*runs)):
        assert torch.equal(a, c), f"tensor {i} differs from the cpu backend"


def test_tensor_lr_and_betas_are_read_when_the_kernel_runs(optim):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 4)
    lrs = [1e-2, 5e-3, 2e-2, 1e-3]
    lr, b1, b2 = scalar(lrs[0]), scalar(0.9), scalar(0.99)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=lrs[0], betas=(0.9, 0.99), foreach=False)
    ours = AdamBucket(optim, params)
    for k, g in enumerate(grads):
        lr.fill_(lrs[k])  # changed in place on the device, as a scheduler does
        ours.step(g, lr=lr, betas=(b1, b2), decoupled=True, weight_decay=0.01)
        for r, gi in zip(ref, g):
            r.grad = gi.clone()
        ref_opt.param_groups[0]["lr"] = lrs[k]
        ref_opt.step()
    # a tensor hyper-parameter is fp32: torch's float lr differs from it by one rounding
    assert_close_list(ours.params, ref, rtol=1e-5, atol=1e-6, what="param")

    sgd_ref, _ = torch_run(torch.optim.SGD, params, grads[:1], lr=0.25, momentum=0.9)
    sgd = SgdBucket(optim, params, momentum=0.9)
    sgd.step(grads[0], lr=scalar(0.25))
    assert_close_list(sgd.params, sgd_ref, what="param")


@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_unscale_and_clip_inside_the_step_match_torch(optim, which):
    """Gradients scaled by S: inv_scale + the norm pass + clip_coef equal GradScaler-style
    unscaling (grad * (1/S)), clip_grad_norm_ and the torch step."""
    S, max_norm = 1024.0, 0.5
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 3)
    scaled = [[g * S for g in gs] for gs in grads]

    def unscale_and_clip(ref_params):
        for r in ref_params:
            r.grad.mul_(1.0 / S)
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm)

    if which == "adam":
        ref, _ = torch_run(torch.optim.AdamW, params, scaled, before_step=unscale_and_clip,
                           lr=1e-2, weight_decay=0.1)
        ours, kw = AdamBucket(optim, params), dict(decoupled=True, weight_decay=0.1)
    else:
        ref, _ = torch_run(torch.optim.SGD, params, scaled, before_step=unscale_and_clip,
                           lr=0.1, momentum=0.9, weight_decay=0.1)
        ours, kw = SgdBucket(optim, params, momentum=0.9), dict(lr=0.1, weight_decay=0.1)
    inv, cache = scalar(1.0 / S), {}
    for g in scaled:
        sumsq, nonfinite = optim.multi_tensor_norm(g, inv, cache)
        clip = (max_norm / (sumsq.sqrt() + 1e-6)).clamp(max=1.0)
        assert nonfinite.item() == 0.0 and clip.item() < 1.0  # the clipping is active
        ours.step(g, inv_scale=inv, clip_coef=clip, skip=nonfinite, **kw)
    assert_close_list(ours.params, ref, rtol=1e-5, atol=1e-6, what="param")


# ----------------------------------------------------------------------------- the norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_norm_matches_clip_grad_norm_and_is_deterministic(optim, dtype):
    grads = make_tensors(SHAPES + [(257, 3), (300_001,)], seed=3, dtype=dtype, scale=3.0)
    sumsq, nonfinite = optim.multi_tensor_norm(grads, None, {})
    exact = sum(g.double().square().sum() for g in grads).item()
    assert nonfinite.item() == 0.0 and sumsq.dtype == F32 and sumsq.shape == ()
    assert math.isclose(sumsq.item(), exact, rel_tol=1e-6)
    params = [g.float().clone().requires_grad_() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.float().clone()  # clip_grad_norm_ scales it in place
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(sumsq.sqrt(), total, rtol=1e-5, atol=0)
    inv = scalar(1.0 / 256)
    out = optim.multi_tensor_norm(grads, inv, {})
    assert math.isclose(out[0].item(), exact / 256 ** 2, rel_tol=1e-6)
    for _ in range(3):  # no atomics: the same bits every time, cached table or not
        assert torch.equal(bits([out])[0], bits([optim.multi_tensor_norm(grads, inv, {})])[0])


def test_norm_order_does_not_depend_on_alignment_or_launch_split(optim, monkeypatch):
    """Groups of 4 elements per thread in the same order whether loaded as vectors or
    element by element: a misaligned copy gives the same bits; the plan-wide chunk order
    makes the sum independent of how chunks are split into launches."""
    grads = make_tensors([(300_000,), (65_537,), (3,), (200_000,)], seed=5, scale=10.0)
    for g in grads:  # magnitudes over many decades: a changed summation order shows
        g.mul_(torch.logspace(-8, 8, g.numel(), device=DEV))
    inv = scalar(0.5)
    aligned = optim.multi_tensor_norm(grads, inv, {})
    shifted = []
    for g in grads:
        storage = torch.empty(g.numel() + 1, dtype=g.dtype, device=DEV)
        view = storage[1:]  # 4 bytes past an aligned address: the element path
        view.copy_(g)
        shifted.append(view)
    assert torch.equal(aligned, optim.multi_tensor_norm(shifted, inv, {}))
    monkeypatch.setattr(optim, "PLAN_LIMITS", (optim.PLAN_LIMITS[0], 1, 2))
    assert torch.equal(aligned, optim.multi_tensor_norm(grads, inv, {}))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_norm_flags_nonfinite(optim, bad):
    grads = make_tensors(SHAPES, seed=3)
    grads[-1][123_456] = bad
    sumsq, nonfinite = optim.multi_tensor_norm(grads, scalar(0.5), {})
    assert nonfinite.item() == 1.0 and not math.isfinite(sumsq.item())
    # the largest finite fp32 values square without overflow in double: no false alarm
    huge = [torch.full((1000,), torch.finfo(F32).max, device=DEV)]
    assert optim.multi_tensor_norm(huge, None, {})[1].item() == 0.0
    empty = optim.multi_tensor_norm([torch.zeros(0, device=DEV)], None, {})
    assert empty.tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- skip, dtypes

def test_skipped_step_is_bit_identical_with_inf_grads(optim):
    params = make_tensors(SHAPES, seed=0, dtype=torch.bfloat16)
    grads = grad_steps(SHAPES, 2, dtype=torch.bfloat16)
    adam = AdamBucket(optim, params, amsgrad=True, master=True)
    sgd = SgdBucket(optim, params, momentum=0.9, master=True)
    adam.step(grads[0], decoupled=True, weight_decay=0.1)  # the states hold values
    sgd.step(grads[0], weight_decay=0.1)
    bad = [g.clone() for g in grads[1]]
    bad[0][0, 0], bad[2][3] = math.inf, math.nan
    before_adam, before_sgd = bits(adam.tensors()), bits(sgd.tensors())
    skip = optim.multi_tensor_norm(bad, None, {})[1]
    adam.step(bad, decoupled=True, weight_decay=0.1, skip=skip, clip_coef=scalar(0.5))
    sgd.step(bad, weight_decay=0.1, skip=skip, inv_scale=scalar(0.5))
    assert skip.item() == 1.0
    assert_same_bits(before_adam, adam.tensors())
    assert_same_bits(before_sgd, sgd.tensors())
    assert adam.steps[0].item() == 1.0
    adam.step(grads[1], decoupled=True, skip=scalar(0.0))  # a zero flag lets it through
    assert adam.steps[0].item() == 2.0


def test_first_sgd_step_after_a_skip_is_a_true_first_step(optim):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 2)
    ours = SgdBucket(optim, params, momentum=0.9)
    ours.step(grads[0], dampening=0.5, skip=scalar(1.0))
    assert all(f.item() == 0.0 for f in ours.flags)
    ours.step(grads[1], dampening=0.5)
    ref, _ = torch_run(torch.optim.SGD, params, grads[1:], lr=1e-2, momentum=0.9, dampening=0.5)
    assert_close_list(ours.params, ref, what="param")


LOW_PRECISION_SHAPES = SHAPES[:5] + [(3001,), (65_536 + 3,)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", LOW_PRECISION)
def test_low_precision_params_with_masters_follow_the_fp32_run(optim, dtype, which):
    """The masters equal torch's fp32 run on the GPU; each param is its master rounded."""
    params = make_tensors(LOW_PRECISION_SHAPES, seed=0, dtype=dtype)
    grads = grad_steps(LOW_PRECISION_SHAPES, 6, dtype=dtype)
    ours, step_kw, cls, kw, _, _ = helpers.low_precision_case(which, params, master=True,
                                                              module=optim)
    ref, _ = torch_run(cls, [p.float() for p in params], [[g.float() for g in gs] for gs in grads],
                       **kw)
    for g in grads:
        ours.step(g, **step_kw)
    for i, (p, r) in enumerate(zip(ours.params, ref)):
        assert p.dtype == dtype
        assert_close_list([ours.masters[i]], [r], what="master")
        assert torch.equal(p, ours.masters[i].to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", LOW_PRECISION)
def test_low_precision_params_without_masters_match_the_written_reference(optim, dtype, which):
    """fp32 math, fp32 states, one rounding per step: within one ulp of the reference of
    tests/lowp_reference.py (run on the GPU), which the run without weight decay is not."""
    params = make_tensors(LOW_PRECISION_SHAPES, seed=0, dtype=dtype)
    grads = grad_steps(LOW_PRECISION_SHAPES, 6, dtype=dtype)
    ours, step_kw, _, _, reference, ref_kw = helpers.low_precision_case(which, params,
                                                                        master=False, module=optim)
    for g in grads:
        ours.step(g, **step_kw)
    assert_within_one_ulp(ours.params, reference(params, grads, **ref_kw))
    assert_decay_is_visible(ours.params, reference(params, grads, **dict(ref_kw, weight_decay=0.0)))


# ----------------------------------------------------------------------------- plans, layout

def test_many_tensors_and_small_plan_limits(optim, monkeypatch):
    """More tensors than one launch holds (96) and tensors whose chunks span launches give
    the same bits as the default plan, and match torch: every block of a tensor used the
    same step t, and the counters were written once."""
    shapes = [(70_001,)] + [(i % 7,) for i in range(300)] + [(5000,)]
    params, grads = make_tensors(shapes, seed=0), grad_steps(shapes, 3)
    ref, _ = torch_run(torch.optim.Adam, params, grads, lr=1e-2, amsgrad=True, weight_decay=0.1)
    sgd_ref, _ = torch_run(torch.optim.SGD, params, grads, lr=1e-2, momentum=0.9, dampening=0.2)
    results = []
    for limits in [optim.PLAN_LIMITS, (1000, 3, 5), (7, 1, 1), (4096, 2, 3)]:
        monkeypatch.setattr(optim, "PLAN_LIMITS", limits)
        adam = AdamBucket(optim, params, amsgrad=True)
        sgd = SgdBucket(optim, params, momentum=0.9)
        for g in grads:
            adam.step(g, weight_decay=0.1)
            sgd.step(g, dampening=0.2)
        assert_close_list(adam.params, ref, what="adam param")
        assert_close_list(sgd.params, sgd_ref, what="sgd param")
        assert all(s.item() == 3.0 for s in adam.steps)
        assert all(f.item() == 1.0 for f in sgd.flags)
        results.append(bits(adam.tensors() + sgd.tensors()))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_tensors_take_the_element_path_with_the_same_bits(optim, dtype, offset):
    shapes = [(65_536 + 9,), (11,), (4, 5)]
    params, grads = make_tensors(shapes, seed=2, dtype=dtype), grad_steps(shapes, 2, dtype=dtype)

    def shifted(t, dt=None):
        storage = torch.zeros(t.numel() + offset, dtype=dt or t.dtype, device=DEV)
        view = storage[offset:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % (4 * view.element_size()) != 0  # no vector access
        return view

    runs = []
    for move in [lambda t, dt=None: t.clone() if dt is None else t.to(dt, copy=True), shifted]:
        adam = AdamBucket(optim, params, amsgrad=True)  # (the buckets clone: aligned)
        adam.params = [move(p) for p in params]
        adam.exp_avgs = [move(m) for m in adam.exp_avgs]
        adam.masters = [move(p, F32) for p in params]
        sgd = SgdBucket(optim, params, momentum=0.9)
        sgd.params = [move(p) for p in params]
        sgd.buffers = [move(b) for b in sgd.buffers]
        for g in grads:
            moved = [move(x) for x in g]
            adam.step(moved, decoupled=True, weight_decay=0.1)
            sgd.step(moved, nesterov=True, weight_decay=0.1)
        runs.append(bits(adam.tensors() + sgd.tensors()))
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"tensor {i}: the element path differs from the vector path"


def test_pointer_table_is_cached_and_rebuilt_when_a_storage_changes(optim):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 3)
    ours = AdamBucket(optim, params)
    ours.step(grads[0])
    table = ours.cache["cuda_adam"][1]
    ours.step(grads[1])
    assert ours.cache["cuda_adam"][1] is table  # new gradient tensors: same table
    old = ours.exp_avgs[0]
    ours.exp_avgs[0] = old.clone()  # a state moved to new memory
    kept = old.clone()
    ours.step(grads[2])
    assert ours.cache["cuda_adam"][1] is not table
    assert torch.equal(old, kept)  # the old memory is no longer written
    assert not torch.equal(ours.exp_avgs[0], kept)


def test_a_captured_step_replays_like_eager_steps(optim):
    """Nothing in a step reads the device from the host or allocates through the kernels:
    once its tables exist, the norm + clipped Adam step can be captured in a CUDA graph."""
    params, grads = make_tensors(SHAPES, seed=4), grad_steps(SHAPES, 4, seed=6)
    eager, graphed = AdamBucket(optim, params), AdamBucket(optim, params)
    static = [g.clone() for g in grads[0]]
    norm_cache: dict = {}

    def step(bucket, g, cache):
        sumsq, nonfinite = optim.multi_tensor_norm(g, None, cache)
        clip = (1.0 / (sumsq.sqrt() + 1e-6)).clamp(max=1.0)
        bucket.step(g, decoupled=True, weight_decay=0.1, clip_coef=clip, skip=nonfinite)

    for g in grads:
        step(eager, g, {})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graphed, static, norm_cache)  # warm-up: builds the tables, step 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, static, norm_cache)
    for g in grads[1:]:
        for s, x in zip(static, g):
            s.copy_(x)
        graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(bits(eager.tensors()), graphed.tensors())


def test_the_registry_routes_the_optimizers_to_cuda(optim):
    from fusedopt.backends import cuda
    assert {"adam", "sgd"} <= cuda.OPS
    assert cuda.supports("adam", torch.device(DEV)) == (True, "")
    assert cuda.supports("sgd", torch.device("cpu"))[0] is False
