"""Shared helpers of the trust cases (trust_state_cases.py, trust_input_cases.py, run by
trust_cases.py): small optimizers stepped once, and the check that an action is refused
before any kernel runs, with nothing changed."""

from __future__ import annotations

import copy
import re

import torch

import fusedopt as fo
from optim_helpers import assert_bit_identical, snapshot

F32, BF16 = torch.float32, torch.bfloat16
BIG = 3000  # elements of the param whose state is swapped for a 3-element one
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def params_on(device, dtype=F32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(BIG,), (5, 7), (13,)]
    ps = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    seeded_grads(ps)
    return ps


def seeded_grads(ps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def stepped_adam(backend, dtype=F32, **kw):
    ps = params_on(device_of(backend), dtype)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend=backend, max_grad_norm=1.0, **kw)
    opt.step()
    seeded_grads(ps, seed=2)
    return ps, opt


def stepped_sgd(backend):
    ps = params_on(device_of(backend))
    opt = fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend=backend, max_grad_norm=1.0)
    opt.step()
    seeded_grads(ps, seed=2)
    return ps, opt


def device_of(backend):
    return torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available()
                        else "cpu")


def raises(action, exc, pattern):
    """``action()`` raises ``exc`` with a message matching ``pattern``."""
    try:
        action()
    except exc as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"message {str(e)!r} does not match {pattern!r}") from None
    else:
        raise AssertionError(f"no {exc.__name__} raised")


def refused(opt, ps, action, exc, pattern):
    """``action()`` raises ``exc`` matching ``pattern`` and changes nothing."""
    before = snapshot(opt, ps) + [opt.skipped_steps.clone(), opt.last_grad_norm.clone()]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    raises(action, exc, pattern)
    assert_bit_identical(before, snapshot(opt, ps) + [opt.skipped_steps, opt.last_grad_norm])
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def load_refused(backend, make, edit, exc, pattern):
    ps, opt = make(backend)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    refused(opt, ps, lambda: opt.load_state_dict(sd), exc, pattern)
    opt.step()  # the untouched optimizer still steps


def step_refused(backend, make, edit, exc, pattern, fix=None):
    ps, opt = make(backend)
    edit(opt, ps)
    refused(opt, ps, opt.step, exc, pattern)
    if fix is not None:
        fix(opt, ps)
        opt.step()


class Sub(torch.Tensor):
    """A __torch_dispatch__ subclass (like DTensor's wrapper) around a plain tensor."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Sub) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
