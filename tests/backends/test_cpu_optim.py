"""The cpu backend's optimizer kernels (adam_step, sgd_step, multi_tensor_norm) called
directly, against torch.optim.Adam/AdamW/SGD, clip_grad_norm_ and manual unscaling."""

from __future__ import annotations

import math

import pytest
import torch

from fusedopt import backends as _backends

_OK, _REASON = _backends.status("cpu")
if not _OK:
    pytest.skip(f"cpu backend cannot run here: {_REASON}", allow_module_level=True)

from cpu_optim_helpers import (ADAM_VARIANTS, F32, LOW_PRECISION, SGD_VARIANTS,  # noqa: E402
                               SHAPES, AdamBucket, SgdBucket, assert_close_list,
                               assert_same_bits, backends, bits, cpu, grad_steps,
                               low_precision_case, make_tensors, optim, scalar,
                               torch_adam_kwargs, torch_run, variant_id, with_threads, _cpu)
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp  # noqa: E402


@pytest.mark.parametrize("variant", ADAM_VARIANTS, ids=variant_id)
def test_adam_matches_torch_over_steps(variant):
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 5)
    cls, kw = torch_adam_kwargs(variant)
    ref, ref_opt = torch_run(cls, params, grads, **kw)
    ours = AdamBucket(params, amsgrad=kw["amsgrad"])
    step_kw = {k: variant[k] for k in variant if k != "amsgrad"}
    for g in grads:
        ours.step(g, **step_kw)
    assert_close_list(ours.params, ref, what="param")
    for i, r in enumerate(ref):
        st = ref_opt.state[r]
        assert_close_list([ours.exp_avgs[i], ours.exp_avg_sqs[i]],
                          [st["exp_avg"], st["exp_avg_sq"]])
        if kw["amsgrad"]:
            assert_close_list([ours.max_sqs[i]], [st["max_exp_avg_sq"]])
        assert ours.steps[i].item() == 5.0  # zero-size tensors count their steps too


@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=variant_id)
def test_sgd_matches_torch_over_steps(variant):
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 5)
    kw = {"lr": 1e-2, **variant}
    ref, ref_opt = torch_run(torch.optim.SGD, params, grads, **kw)
    ours = SgdBucket(params, momentum=variant["momentum"])
    for g in grads:
        ours.step(g, **{k: v for k, v in kw.items() if k != "momentum"})
    assert_close_list(ours.params, ref, what="param")
    if variant["momentum"]:
        assert_close_list(ours.buffers, [ref_opt.state[r]["momentum_buffer"] for r in ref])
        assert all(f.item() == 1.0 for f in ours.flags)
    else:
        assert all(f.item() == 0.0 for f in ours.flags)  # neither read nor written


def test_tensor_lr_and_betas_are_read_when_the_kernel_runs():
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 4)
    lrs = [1e-2, 5e-3, 2e-2, 1e-3]
    lr, b1, b2 = scalar(lrs[0]), scalar(0.9), scalar(0.99)
    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=lrs[0], betas=(0.9, 0.99), foreach=False)
    ours = AdamBucket(params)
    for k, g in enumerate(grads):
        lr.fill_(lrs[k])  # changed in place, as a scheduler does
        ours.step(g, lr=lr, betas=(b1, b2), decoupled=True, weight_decay=0.01)
        for r, gi in zip(ref, g):
            r.grad = gi.clone()
        ref_opt.param_groups[0]["lr"] = lrs[k]
        ref_opt.step()
    # a tensor hyper-parameter is fp32: torch's float lr differs from it by one rounding
    assert_close_list(ours.params, ref, rtol=1e-5, atol=1e-6, what="param")

    sgd_ref, _ = torch_run(torch.optim.SGD, params, grads[:1], lr=0.25, momentum=0.9)
    sgd = SgdBucket(params, momentum=0.9)
    sgd.step(grads[0], lr=scalar(0.25))
    assert_close_list(sgd.params, sgd_ref, what="param")


@pytest.mark.parametrize("which", ["adam", "sgd"])
def test_unscale_and_clip_inside_the_step_match_torch(which):
    """Gradients scaled by S: inv_scale + the norm pass + clip_coef equal GradScaler-style
    unscaling, clip_grad_norm_ and the torch step."""
    S, max_norm = 1024.0, 0.5
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 3)
    scaled = [[g * S for g in gs] for gs in grads]

    def unscale_and_clip(ref_params):
        for r in ref_params:
            r.grad.mul_(1.0 / S)
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm)

    if which == "adam":
        ref, _ = torch_run(torch.optim.AdamW, params, scaled, before_step=unscale_and_clip,
                           lr=1e-2, weight_decay=0.1)
        ours = AdamBucket(params)
    else:
        ref, _ = torch_run(torch.optim.SGD, params, scaled, before_step=unscale_and_clip,
                           lr=0.1, momentum=0.9, weight_decay=0.1)
        ours = SgdBucket(params, momentum=0.9)
    inv = scalar(1.0 / S)
    norm_cache: dict = {}
    for g in scaled:
        sumsq, nonfinite = optim.multi_tensor_norm(g, inv, norm_cache)
        assert nonfinite.item() == 0.0
        clip = (max_norm / (sumsq.sqrt() + 1e-6)).clamp(max=1.0)
        assert clip.item() < 1.0  # the clipping is active
        kw = dict(decoupled=True, weight_decay=0.1) if which == "adam" else \
            dict(lr=0.1, weight_decay=0.1)
        ours.step(g, inv_scale=inv, clip_coef=clip, skip=scalar(0.0), **kw)
    assert_close_list(ours.params, ref, rtol=1e-5, atol=1e-6, what="param")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_norm_matches_clip_grad_norm(dtype):
    shapes = SHAPES + [(257, 3)]
    grads = make_tensors(shapes, seed=3, dtype=dtype, scale=3.0)
    sumsq, nonfinite = optim.multi_tensor_norm(grads, None, {})
    exact = sum(g.double().square().sum() for g in grads).item()
    assert nonfinite.item() == 0.0
    assert sumsq.dtype == F32 and sumsq.shape == ()
    assert math.isclose(sumsq.item(), exact, rel_tol=1e-6)
    params = [g.float().clone().requires_grad_() for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.float().clone()  # clip_grad_norm_ scales it in place
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(sumsq.sqrt(), total, rtol=1e-5, atol=0)
    # with an inverse scale: the sum of (g * inv)^2
    inv = scalar(1.0 / 256)
    scaled_sumsq = optim.multi_tensor_norm(grads, inv, {})[0]
    assert math.isclose(scaled_sumsq.item(), exact / 256 ** 2, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_norm_flags_nonfinite(bad):
    grads = make_tensors(SHAPES, seed=3)
    grads[-1][123_456] = bad
    sumsq, nonfinite = optim.multi_tensor_norm(grads, scalar(0.5), {})
    assert nonfinite.item() == 1.0 and not math.isfinite(sumsq.item())
    # the largest finite fp32 values square without overflow: no false alarm
    huge = [torch.full((1000,), torch.finfo(F32).max)]
    assert optim.multi_tensor_norm(huge, None, {})[1].item() == 0.0
    assert optim.multi_tensor_norm([torch.zeros(0)], None, {}).tolist() == [0.0, 0.0]


def test_skipped_step_is_bit_identical_with_inf_grads():
    params = make_tensors(SHAPES, seed=0, dtype=torch.bfloat16)
    grads = grad_steps(SHAPES, 2, dtype=torch.bfloat16)
    adam = AdamBucket(params, amsgrad=True, master=True)
    sgd = SgdBucket(params, momentum=0.9, master=True)
    for g in grads[:1]:  # one real step first, so the states hold values
        adam.step(g, decoupled=True, weight_decay=0.1)
        sgd.step(g, weight_decay=0.1)
    bad = [g.clone() for g in grads[1]]
    bad[0][0, 0], bad[2][3] = math.inf, math.nan
    before_adam, before_sgd = bits(adam.tensors()), bits(sgd.tensors())
    skip = optim.multi_tensor_norm(bad, None, {})[1]
    assert skip.item() == 1.0
    adam.step(bad, decoupled=True, weight_decay=0.1, skip=skip, clip_coef=scalar(0.5))
    sgd.step(bad, weight_decay=0.1, skip=skip, inv_scale=scalar(0.5))
    assert_same_bits(before_adam, adam.tensors())
    assert_same_bits(before_sgd, sgd.tensors())
    assert adam.steps[0].item() == 1.0
    # a zero flag lets the step through
    adam.step(grads[1], decoupled=True, skip=scalar(0.0))
    assert adam.steps[0].item() == 2.0


def test_first_sgd_step_after_a_skip_is_a_true_first_step():
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 2)
    ours = SgdBucket(params, momentum=0.9)
    ours.step(grads[0], dampening=0.5, skip=scalar(1.0))
    assert all(f.item() == 0.0 for f in ours.flags)
    ours.step(grads[1], dampening=0.5)
    ref, _ = torch_run(torch.optim.SGD, params, grads[1:], lr=1e-2, momentum=0.9, dampening=0.5)
    assert_close_list(ours.params, ref, what="param")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("which", LOW_PRECISION)
def test_low_precision_params_with_masters_follow_the_fp32_run(dtype, which):
    """The masters equal torch's fp32 run; each param is its master rounded once."""
    shapes = SHAPES[:5] + [(3001,)]
    params = make_tensors(shapes, seed=0, dtype=dtype)
    grads = grad_steps(shapes, 6, dtype=dtype)
    ours, step_kw, cls, kw, _, _ = low_precision_case(which, params, master=True)
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
def test_low_precision_params_without_masters_match_the_written_reference(dtype, which):
    """fp32 math on the param read as fp32, fp32 states, one rounding per step: within one
    ulp of tests/lowp_reference.py, which the same run without weight decay is not."""
    shapes = SHAPES[:5] + [(3001,)]
    params = make_tensors(shapes, seed=0, dtype=dtype)
    grads = grad_steps(shapes, 6, dtype=dtype)
    ours, step_kw, _, _, reference, ref_kw = low_precision_case(which, params, master=False)
    for g in grads:
        ours.step(g, **step_kw)
    assert_within_one_ulp(ours.params, reference(params, grads, **ref_kw))
    assert_decay_is_visible(ours.params, reference(params, grads, **dict(ref_kw, weight_decay=0.0)))


def test_many_tensors_and_small_plan_limits(monkeypatch):
    """More tensors than one launch holds and tensors spanning chunks and launches give the
    same bits as the default plan, and match torch."""
    shapes = [(70_001,)] + [(i % 7,) for i in range(300)] + [(5000,)]
    params = make_tensors(shapes, seed=0)
    grads = grad_steps(shapes, 2)
    ref, _ = torch_run(torch.optim.Adam, params, grads, lr=1e-2, amsgrad=True, weight_decay=0.1)
    results = []
    for limits in [optim.PLAN_LIMITS, (1000, 3, 5), (7, 1, 1)]:
        monkeypatch.setattr(optim, "PLAN_LIMITS", limits)
        ours = AdamBucket(params, amsgrad=True)
        for g in grads:
            ours.step(g, weight_decay=0.1)
        results.append(ours.params)
        assert_close_list(ours.params, ref, what="param")
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_results_do_not_depend_on_the_thread_count():
    shapes = [(300_000,), (65_537,), (3,), (200_000,)]
    grads = make_tensors(shapes, seed=5, scale=10.0)
    for g in grads:  # magnitudes over many decades: a changed summation order shows
        g.mul_(torch.logspace(-8, 8, g.numel()))
    params = make_tensors(shapes, seed=0)

    def run():
        norm = optim.multi_tensor_norm(grads, scalar(0.5), {})
        bucket = AdamBucket(params)
        bucket.step(grads, decoupled=True, weight_decay=0.1)
        return [norm] + bucket.params + bucket.exp_avg_sqs

    one, two = with_threads(1, run), with_threads(2, run)
    assert _cpu.get_num_threads() >= 1
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_pointer_table_is_cached_and_rebuilt_when_a_storage_changes():
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 3)
    ours = AdamBucket(params)
    ours.step(grads[0])
    table = ours.cache["cpu_adam"][1]
    ours.step(grads[1])
    assert ours.cache["cpu_adam"][1] is table  # new gradient tensors: same table
    old = ours.exp_avgs[0]
    ours.exp_avgs[0] = old.clone()  # a state moved to new memory
    kept = old.clone()
    ours.step(grads[2])
    assert ours.cache["cpu_adam"][1] is not table
    assert torch.equal(old, kept)  # the old memory is no longer written
    assert not torch.equal(ours.exp_avgs[0], kept)


def test_bad_input_is_refused():
    params = make_tensors(SHAPES, seed=0)
    grads = grad_steps(SHAPES, 1)[0]
    ours = AdamBucket(params)
    ours.exp_avgs = ours.exp_avgs[:-1]
    with pytest.raises(ValueError, match="exp_avgs has 5 tensors, expected 6"):
        ours.step(grads)
    ours = AdamBucket(params)
    ours.amsgrad = True  # amsgrad without max_exp_avg_sqs
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sqs"):
        ours.step(grads)
    with pytest.raises(TypeError, match="float64, expected torch.float32, torch.bfloat16 or"):
        optim.multi_tensor_norm([torch.zeros(3, dtype=torch.float64)], None, {})
    with pytest.raises(ValueError, match="n must be >= 1"):
        _cpu.set_num_threads(0)


def test_backend_registry_lists_the_optimizer_ops():
    assert {"adam", "sgd"} <= cpu.OPS
    assert cpu.supports("adam", torch.device("cpu")) == (True, "")
    assert backends.select("sgd", "cpu", "cpu") is cpu
    assert set(optim.__all__) == {"multi_tensor_norm", "adam_step", "sgd_step"}
