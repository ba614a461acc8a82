"""``optimizer.state`` is the truth, as in torch: what the user writes, replaces, resets or
deletes there is what the next step uses -- compared with torch.optim doing the same."""

import copy
import pickle
from collections import defaultdict

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import (assert_params_close, clone_params, make_grads, make_params, set_grads,
                           train)


def _pair(backend, kind, ps, ref):
    if kind == "adamw":
        return (fo.optim.FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend),
                torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False))
    return (fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, dampening=0.25, backend=backend),
            torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=0.25, foreach=False))


def _setup(backend, kind):
    device = require_op(backend, "sgd" if kind == "sgd" else "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt, ref_opt = _pair(backend, kind, ours, ref)
    return ours, ref, opt, ref_opt


def _both(opt, ours, ref_opt, ref, grads, edit=None):
    """Train both over ``grads``; ``edit(optimizer, params)`` runs on both before each step."""
    for g in grads:
        for o, ps in ((opt, ours), (ref_opt, ref)):
            set_grads(ps, g)
            if edit is not None:
                edit(o, ps)
            o.step()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_replaced_state_tensor_is_what_the_next_step_uses(backend, kind):
    ours, ref, opt, ref_opt = _setup(backend, kind)
    grads = make_grads(steps=6)
    _both(opt, ours, ref_opt, ref, grads[:2])
    key = "exp_avg" if kind == "adamw" else "momentum_buffer"

    def replace(o, ps):  # a new tensor in place of the moment / buffer of params 0 and 2
        for i in (0, 2):
            o.state[ps[i]][key] = torch.full_like(ps[i], 0.5, dtype=torch.float32)

    _both(opt, ours, ref_opt, ref, grads[2:3], edit=replace)
    _both(opt, ours, ref_opt, ref, grads[3:])
    assert_params_close(ours, ref)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p][key].cpu(), ref_opt.state[q][key].cpu(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_reset_and_deleted_entries_restart_like_torch(backend, kind):
    ours, ref, opt, ref_opt = _setup(backend, kind)
    grads = make_grads(steps=7)
    _both(opt, ours, ref_opt, ref, grads[:2])
    for o in (opt, ref_opt):
        o.state = defaultdict(dict)  # a reset: every param starts again
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    _both(opt, ours, ref_opt, ref, grads[2:4])
    assert sorted(opt.state_dict()["state"]) == sorted(ref_opt.state_dict()["state"]) == [0, 1, 2, 3]
    for o, ps in ((opt, ours), (ref_opt, ref)):
        del o.state[ps[1]]  # one param starts again
    assert ours[1] not in opt.state
    _both(opt, ours, ref_opt, ref, grads[4:])
    assert_params_close(ours, ref)
    if kind == "adamw":
        assert float(opt.state[ours[1]]["step"]) == float(ref_opt.state[ref[1]]["step"]) == 3.0
        assert float(opt.state[ours[0]]["step"]) == 5.0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_writes_before_the_first_step_are_used(backend, kind):
    ours, ref, opt, ref_opt = _setup(backend, kind)
    for o, ps in ((opt, ours), (ref_opt, ref)):
        st = o.state[ps[3]]
        if kind == "adamw":  # torch needs every key once the entry is not empty
            st["step"] = torch.tensor(7.0, device=ps[3].device)
            st["exp_avg"] = torch.full_like(ps[3], 0.25)
            st["exp_avg_sq"] = torch.full_like(ps[3], 0.5)
        else:
            st["momentum_buffer"] = torch.full_like(ps[3], 2.0)
    assert ours[3] in opt.state  # user-written entries show at once, as in torch
    _both(opt, ours, ref_opt, ref, make_grads(steps=3))
    assert_params_close(ours, ref)
    if kind == "adamw":
        assert float(opt.state[ours[3]]["step"]) == 10.0


def test_a_step_written_as_a_number_or_any_one_element_tensor_is_used(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref = clone_params(ours)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    values = [5, 5.0, torch.tensor([[5]]), torch.tensor([5.0], dtype=torch.float64)]
    for p, q, value in zip(ours, ref, values):
        opt.state[p].update(step=value, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        ref_opt.state[q].update(step=torch.tensor(5.0), exp_avg=torch.zeros_like(q),
                                exp_avg_sq=torch.zeros_like(q))
    grads = make_grads(steps=2)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    for p in ours:
        step = opt.state[p]["step"]
        assert step.shape == () and step.dtype == torch.float32 and float(step) == 7.0


def test_a_replaced_master_is_what_the_next_step_uses(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device, dtype=torch.bfloat16)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, master_weights=True, backend=backend)
    grads = [[g.bfloat16().float() for g in gs] for gs in make_grads(steps=3)]
    train(opt, ours, grads[:2])
    masters = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device)
               for i, p in enumerate(ours)]
    ref = [m.clone().requires_grad_() for m in masters]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    ref_opt.load_state_dict({"state": {i: {k: v.clone() for k, v in opt.state[p].items()
                                           if k != "master_param"}
                                       for i, p in enumerate(ours)},
                             "param_groups": opt.state_dict()["param_groups"]})
    for p, m in zip(ours, masters):
        opt.state[p]["master_param"] = m
    train(opt, ours, grads[2:])
    train(ref_opt, ref, grads[2:])
    for p, m, r in zip(ours, masters, ref):
        assert opt.state[p]["master_param"] is m
        torch.testing.assert_close(m, r.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), m.to(torch.bfloat16))


def test_lazy_state_stays_hidden_until_a_step_completes():
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, skip_nonfinite=True, backend="torch")
    grads = make_grads(steps=2)
    grads[0][0][0, 0] = float("inf")
    set_grads(ps, grads[0])
    opt.step()  # skipped: the state exists inside, hidden
    assert len(opt.state) == 0 and ps[0] not in opt.state and opt.state.get(ps[0]) is None
    assert list(opt.state.items()) == [] and opt.state_dict()["state"] == {}
    assert float(opt.state[ps[0]]["step"]) == 0.0  # item access reaches the live entry
    set_grads(ps, grads[1])
    opt.step()
    assert len(opt.state) == 4 and ps[0] in opt.state
    assert sorted(opt.state_dict()["state"]) == [0, 1, 2, 3]


def test_state_view_behaves_like_torchs_defaultdict():
    ps = make_params()
    opt = fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend="torch")
    train(opt, ps, make_grads(steps=1))
    view = opt.state
    assert set(view) == set(ps) and len(view) == 4
    extra = torch.zeros(2, requires_grad=True)
    assert view[extra] == {} and extra in view and len(view) == 5  # created on access
    view[extra] = {"note": 1}
    assert opt.state[extra] == {"note": 1}
    del view[extra]
    assert extra not in opt.state
    with pytest.raises(KeyError):
        del view[extra]
    opt.state = dict(opt.state)  # assigning a plain dict (of the same entries) keeps training
    train(opt, ps, make_grads(steps=1, seed=3))
    assert len(opt.state_dict()["state"]) == 4


def test_pickle_deepcopy_scheduler_and_zero_grad_keep_working(backend):
    device = require_op(backend, "sgd")
    ours = make_params(device=device)
    opt = fo.optim.FusedSGD(ours, lr=0.1, momentum=0.9, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    grads = make_grads(steps=4)
    train(opt, ours, grads[:2], after_step=lambda k: sched.step())
    copies = [(copy.deepcopy((ours, opt)))]
    copies.append(pickle.loads(pickle.dumps((ours, opt))))
    opt.zero_grad()
    assert all(p.grad is None for p in ours)
    train(opt, ours, grads[2:])
    for ps, o in copies:
        assert o.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.025
        train(o, ps, grads[2:])
        for a, b in zip(ps, ours):
            assert torch.equal(a, b)
        assert all(torch.equal(o.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])
                   for a, b in zip(ps, ours))


def test_a_state_entry_that_is_not_a_dict_is_refused():
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend="torch")
    train(opt, ps, make_grads(steps=1))
    opt.state[ps[2]] = 5
    set_grads(ps, make_grads(steps=1, seed=4)[0])
    with pytest.raises(TypeError, match=r"optimizer.state\[param 2 of param group 0\] must be a dict"):
        opt.step()
    opt.state[ps[2]] = {}
    opt.step()
    assert float(opt.state[ps[2]]["step"]) == 1.0 and float(opt.state[ps[0]]["step"]) == 2.0
