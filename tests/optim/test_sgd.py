"""FusedSGD against torch.optim.SGD over several steps, on every backend."""

import pytest
import torch

import fusedopt as fo
import lowp_reference
from conftest import require_op
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp
from optim_helpers import assert_params_close, clone_params, make_grads, make_params, set_grads, train

VARIANTS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.5, maximize=True),
    dict(weight_decay=0.1, maximize=True),
    dict(lr=0.0, momentum=0.9),
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_matches_torch(backend, kwargs):
    device = require_op(backend, "sgd")
    kwargs = {"lr": 5e-2, **kwargs}
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedSGD(ours, backend=backend, **kwargs)
    ref_opt = torch.optim.SGD(ref, foreach=False, **kwargs)
    grads = make_grads(steps=6)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    ours_sd, ref_sd = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert ours_sd[k].keys() == ref_sd[k].keys()
        torch.testing.assert_close(ours_sd[k]["momentum_buffer"].cpu(), ref_sd[k]["momentum_buffer"].cpu(),
                                   rtol=1e-5, atol=1e-6)


def test_tensor_lr_groups_and_grad_none(backend):
    device = require_op(backend, "sgd")
    ours = make_params(device=device)
    ref = clone_params(ours)
    lr = torch.tensor(0.1, device=device)
    ref_lr = torch.tensor(0.1, device=device)

    def groups(ps, lr_):
        return [{"params": ps[:2], "lr": lr_, "momentum": 0.9, "dampening": 0.1},
                {"params": [], "momentum": 0.5},
                {"params": ps[2:], "momentum": 0.0, "weight_decay": 0.1}]

    opt = fo.optim.FusedSGD(groups(ours, lr), lr=0.05, backend=backend)
    ref_opt = torch.optim.SGD(groups(ref, ref_lr), lr=0.05, foreach=False)
    for k, g in enumerate(make_grads(steps=6)):
        g = list(g)
        if k in (0, 3):
            g[1] = None
        for o, ps, lr_ in ((opt, ours, lr), (ref_opt, ref, ref_lr)):
            set_grads(ps, g)
            o.step()
            lr_.mul_(0.8)
    assert_params_close(ours, ref)
    assert set(id(p) for p in opt.state) == set(id(p) for p in ours[:2])  # momentum 0: no state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_match_the_written_reference(backend, dtype):
    """fp32 math, fp32 momentum buffers, one rounding per step: within one ulp of the
    reference written in tests/lowp_reference.py, which the run without weight decay is not."""
    device = require_op(backend, "sgd")
    base = clone_params(make_params(device=device), dtype)
    ours = clone_params(base)
    kwargs = dict(lr=5e-2, momentum=0.9, weight_decay=0.1)
    opt = fo.optim.FusedSGD(ours, backend=backend, **kwargs)
    grads = [[g.to(dtype) for g in gs] for gs in make_grads(steps=6)]
    train(opt, ours, grads)
    assert_within_one_ulp(ours, lowp_reference.sgd(base, grads, **kwargs))
    assert_decay_is_visible(ours, lowp_reference.sgd(base, grads, lr=5e-2, momentum=0.9))
    for p in ours:
        assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == torch.float32


def test_large_tensor_and_many_tensors(backend):
    device = require_op(backend, "sgd")
    shapes = [(70_000,)] + [(2 + i % 7,) for i in range(130)]
    ours = make_params(shapes, device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedSGD(ours, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    grads = make_grads(shapes, steps=2)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)


MASTER_VARIANTS = [dict(), dict(momentum=0.9, dampening=0.1, weight_decay=0.1),
                   dict(momentum=0.9, nesterov=True, maximize=True)]


@pytest.mark.parametrize("kwargs", MASTER_VARIANTS, ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_with_masters_follow_the_fp32_run(backend, dtype, kwargs):
    """master_weights=True: the fp32 masters equal torch's SGD run on fp32 copies of the
    params, each param is its master rounded, and the checkpoint has torch's keys plus
    master_param."""
    device = require_op(backend, "sgd")
    ours = clone_params(make_params(device=device), dtype)
    ref = clone_params(ours, torch.float32)  # the same starting values, in fp32
    kwargs = dict(lr=5e-2, **kwargs)
    opt = fo.optim.FusedSGD(ours, master_weights=True, backend=backend, **kwargs)
    ref_opt = torch.optim.SGD(ref, foreach=False, **kwargs)
    grads = [[g.to(dtype).float() for g in gs] for gs in make_grads(steps=6)]
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    for p, r in zip(ours, ref):
        master = opt.state[p]["master_param"]
        assert p.dtype == dtype and master.dtype == torch.float32
        torch.testing.assert_close(master, r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), master.to(dtype))
    ref_keys = {k: set(v) for k, v in ref_opt.state_dict()["state"].items()}
    keys = {k: set(v) for k, v in opt.state_dict()["state"].items()}
    assert keys == {i: {"master_param"} | ref_keys.get(i, set()) for i in range(len(ours))}


def test_master_weights_change_nothing_for_fp32_params(backend):
    device = require_op(backend, "sgd")
    a = make_params(device=device)
    b = clone_params(a)
    grads = make_grads(steps=3)
    for ps, masters in ((a, True), (b, False)):
        train(fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, master_weights=masters,
                                backend=backend), ps, grads)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_masters_of_a_skipped_first_step_are_not_shown_and_resume_bit_exactly(backend, momentum):
    """A first step skipped on a non-finite gradient shows no state (also without momentum,
    where the master is the only state); the next step is a true first step, and a
    checkpoint taken later resumes bit for bit."""
    device = require_op(backend, "sgd")
    ours = clone_params(make_params(device=device), torch.bfloat16)
    ref = clone_params(ours, torch.float32)
    kwargs = dict(lr=5e-2, momentum=momentum)
    opt = fo.optim.FusedSGD(ours, master_weights=True, skip_nonfinite=True, backend=backend,
                            **kwargs)
    ref_opt = torch.optim.SGD(ref, foreach=False, **kwargs)
    grads = [[g.to(torch.bfloat16).float() for g in gs] for gs in make_grads(steps=5)]
    bad = [g.clone() for g in grads[0]]
    bad[2][0] = float("inf")
    set_grads(ours, bad)
    opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    train(opt, ours, grads[:3])
    train(ref_opt, ref, grads[:3])
    saved = opt.state_dict()
    resumed = clone_params(ours)
    again = fo.optim.FusedSGD(resumed, master_weights=True, skip_nonfinite=True,
                              backend=backend, **kwargs)
    again.load_state_dict(saved)
    train(opt, ours, grads[3:])
    train(again, resumed, grads[3:])
    train(ref_opt, ref, grads[3:])
    for p, q, r in zip(ours, resumed, ref):
        assert torch.equal(opt.state[p]["master_param"], again.state[q]["master_param"])
        torch.testing.assert_close(opt.state[p]["master_param"], r.detach(), rtol=1e-5,
                                   atol=1e-6)
