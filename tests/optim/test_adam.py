"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW over several steps, on every backend."""

import pytest
import torch

import fusedopt as fo
import lowp_reference
from conftest import require_op
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp
from optim_helpers import (SHAPES, assert_params_close, clone_params, make_grads, make_params,
                           set_grads, train)

VARIANTS = [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, amsgrad=True),
    dict(maximize=True, weight_decay=0.05),
    dict(amsgrad=True, maximize=True, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.0, weight_decay=0.1),
]


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_matches_torch(backend, decoupled, kwargs):
    device = require_op(backend, "adam")
    kwargs = {"lr": 1e-2, **kwargs}
    fused_cls, ref_cls = (fo.optim.FusedAdamW, torch.optim.AdamW) if decoupled else (fo.optim.FusedAdam, torch.optim.Adam)
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fused_cls(ours, backend=backend, **kwargs)
    ref_opt = ref_cls(ref, foreach=False, **kwargs)
    grads = make_grads(steps=6)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    for p, q in zip(ours, ref):
        st, rst = opt.state[p], ref_opt.state[q]
        assert set(st) == set(rst)
        assert st["step"].device == p.device and st["step"].dtype == torch.float32 and st["step"].dim() == 0
        assert float(st["step"]) == float(rst["step"]) == 6.0
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if kwargs.get("amsgrad") else ()):
            torch.testing.assert_close(st[key].cpu(), rst[key].cpu(), rtol=1e-5, atol=1e-7)


def test_default_weight_decay_of_adamw_is_1e_2():
    p = make_params()
    assert fo.optim.FusedAdamW(p).defaults["weight_decay"] == 1e-2
    assert fo.optim.FusedAdam(p).defaults["weight_decay"] == 0.0


def test_tensor_lr_and_betas_changed_in_place(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    lr, ref_lr = torch.tensor(0.02, device=device), torch.tensor(0.02, device=device)
    betas = (torch.tensor(0.9, device=device), torch.tensor(0.99, device=device))
    opt = fo.optim.FusedAdamW(ours, lr=lr, betas=betas, weight_decay=0.1, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=ref_lr, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    assert opt.param_groups[0]["lr"] is lr

    def decay(k):
        lr.mul_(0.7)

    grads = make_grads(steps=5)
    train(opt, ours, grads, after_step=decay)
    for g in grads:  # the same sequence for the reference, lr shrinking after each step
        set_grads(ref, g)
        ref_opt.step()
        ref_lr.mul_(0.7)
    assert_params_close(ours, ref)


def test_groups_grad_none_empty_group_and_lr_zero(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)

    def groups(ps):
        return [{"params": ps[:2], "lr": 3e-2, "betas": (0.8, 0.9), "weight_decay": 0.2},
                {"params": [], "lr": 1.0},
                {"params": [ps[2]], "lr": 0.0, "amsgrad": True},
                {"params": [ps[3]], "eps": 1e-3, "maximize": True}]

    opt = fo.optim.FusedAdamW(groups(ours), lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, foreach=False)
    grads = make_grads(steps=5)
    for k, g in enumerate(grads):
        g = list(g)
        if k % 2 == 1:
            g[1] = None  # a param without a gradient is skipped, its state untouched
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        ref_opt.step()
    assert_params_close(ours, ref)
    assert torch.equal(ours[2].detach(), ref[2].detach())  # lr = 0
    assert float(opt.state[ours[1]]["step"]) == float(ref_opt.state[ref[1]]["step"]) == 3.0


def test_add_param_group_later(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdam(ours[:2], lr=1e-2, backend=backend)
    ref_opt = torch.optim.Adam(ref[:2], lr=1e-2, foreach=False)
    grads = make_grads(steps=4)
    for k, g in enumerate(grads):
        if k == 2:
            opt.add_param_group({"params": ours[2:], "lr": 5e-2})
            ref_opt.add_param_group({"params": ref[2:], "lr": 5e-2})
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        ref_opt.step()
    assert_params_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_with_masters_follow_the_fp32_run(backend, dtype):
    """The fp32 masters equal torch's fp32 AdamW run; each param is its master rounded."""
    device = require_op(backend, "adam")
    ours = clone_params(make_params(device=device), dtype)
    ref = clone_params(ours, torch.float32)  # the same starting values, in fp32
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    opt = fo.optim.FusedAdamW(ours, master_weights=True, backend=backend, **kwargs)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kwargs)
    grads = [[g.to(dtype).float() for g in gs] for gs in make_grads(steps=8)]
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    for p, r in zip(ours, ref):
        st = opt.state[p]
        assert p.dtype == dtype and all(v.dtype == torch.float32 for v in st.values())
        torch.testing.assert_close(st["master_param"], r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), st["master_param"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_low_precision_params_without_masters_match_the_written_reference(backend, dtype,
                                                                          decoupled):
    """fp32 math on the param read as fp32, fp32 states, one rounding per step: within one
    ulp of the reference written in tests/lowp_reference.py, which the same run without
    weight decay is not."""
    device = require_op(backend, "adam")
    base = clone_params(make_params(device=device), dtype)
    ours = clone_params(base)
    kwargs = dict(lr=1e-2, weight_decay=0.5)
    cls = fo.optim.FusedAdamW if decoupled else fo.optim.FusedAdam
    opt = cls(ours, backend=backend, **kwargs)
    grads = [[g.to(dtype) for g in gs] for gs in make_grads(steps=8)]
    train(opt, ours, grads)
    assert_within_one_ulp(ours, lowp_reference.adam(base, grads, decoupled=decoupled, **kwargs))
    assert_decay_is_visible(ours, lowp_reference.adam(base, grads, decoupled=decoupled,
                                                      lr=1e-2, weight_decay=0.0))
    for p in ours:
        st = opt.state[p]
        assert p.dtype == dtype and "master_param" not in st
        assert all(v.dtype == torch.float32 for v in st.values())


def test_master_weights_change_nothing_for_fp32(backend):
    device = require_op(backend, "adam")
    a = make_params(device=device)
    b = clone_params(a)
    grads = make_grads(steps=3)
    opt_a = fo.optim.FusedAdamW(a, lr=1e-2, master_weights=True, backend=backend)
    opt_b = fo.optim.FusedAdamW(b, lr=1e-2, backend=backend)
    train(opt_a, a, grads)
    train(opt_b, b, grads)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert "master_param" not in opt_a.state[p]


def test_mixed_dtypes_in_one_optimizer(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ours[1] = ours[1].detach().bfloat16().requires_grad_()
    ours[3] = ours[3].detach().half().requires_grad_()
    ref = clone_params(ours, torch.float32)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, master_weights=True, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    grads = [[g.to(p.dtype).float() for g, p in zip(gs, ours)] for gs in make_grads(steps=4)]
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    for p, r in zip(ours, ref):
        master = opt.state[p].get("master_param", p)
        torch.testing.assert_close(master.detach().float(), r.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.detach(), r.detach().to(p.dtype), rtol=0, atol=0)


def test_large_tensor_and_many_tensors(backend):
    """A tensor longer than a kernel chunk and more tensors than one launch table holds."""
    device = require_op(backend, "adam")
    shapes = [(70_000,)] + [(3 + i % 5,) for i in range(130)]
    ours = make_params(shapes, device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, amsgrad=True, max_grad_norm=5.0, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True, foreach=False)
    for g in make_grads(shapes, steps=2):
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 5.0)
        ref_opt.step()
    assert_params_close(ours, ref)
    assert len(opt.state) == len(shapes)


def test_closure_is_called_with_grad_enabled_and_its_loss_returned(backend):
    device = require_op(backend, "adam")
    w = make_params([(4,)], device=device)[0]
    ref = clone_params([w])[0]
    opt = fo.optim.FusedAdam([w], lr=0.1, backend=backend)
    ref_opt = torch.optim.Adam([ref], lr=0.1, foreach=False)

    def closure_for(p, o):
        def closure():
            o.zero_grad()
            loss = (p * p).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        loss = opt.step(closure_for(w, opt))
        ref_loss = ref_opt.step(closure_for(ref, ref_opt))
        torch.testing.assert_close(loss, ref_loss)
    assert_params_close([w], [ref])


@pytest.mark.parametrize("scheduler", ["step", "lambda"])
def test_lr_scheduler(backend, scheduler):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=0.05, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=0.05, foreach=False)

    def make(o):
        if scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3)
        return torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))

    sched, ref_sched = make(opt), make(ref_opt)
    for g in make_grads(steps=5):
        for o, ps, s in ((opt, ours, sched), (ref_opt, ref, ref_sched)):
            set_grads(ps, g)
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != 0.05
    assert_params_close(ours, ref)


def test_shapes_cover_several_ranks():
    assert {len(s) for s in SHAPES} == {1, 2, 3}


def test_grads_with_other_strides_than_their_param(backend):
    """A gradient laid out differently from its param (transposed, strided, contiguous for a
    channels_last param) is stepped through a copy in the param's layout, step after step;
    the .grad tensors are not changed."""
    device = require_op(backend, "adam")
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(2, 3, 4, 5, generator=gen).to(device, memory_format=torch.channels_last),
            torch.randn(6, 4, generator=gen).to(device)]
    ours = [p.requires_grad_() for p in ours]
    ref = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in ours]
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, max_grad_norm=1.0, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for k in range(4):
        g0 = torch.randn(2, 3, 4, 5, generator=gen).to(device)  # contiguous
        g1 = torch.randn(4, 6, generator=gen).to(device).t() if k % 2 == 0 else \
            torch.randn(6, 8, generator=gen).to(device)[:, ::2]  # transposed / strided
        ours[0].grad, ours[1].grad = g0, g1
        ref[0].grad, ref[1].grad = g0.clone(), g1.clone()
        kept = [(g.clone(), g.stride()) for g in (g0, g1)]
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        assert all(torch.equal(p.grad, g) and p.grad.stride() == s for p, (g, s) in zip(ours, kept))
    assert_params_close(ours, ref)
    assert opt.state[ours[0]]["exp_avg"].stride() == ours[0].stride()
