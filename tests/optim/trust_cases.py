"""Inputs that used to crash the process (out-of-bounds kernel accesses) or silently step
with wrong tensors: odd checkpoints, edited state, swapped gradients and params, tensor
subclasses, bad lists handed straight to a backend.  Run as a script in a subprocess
(tests/optim/test_trust.py), so that a crash is a test failure, not a dead pytest:

    python tests/optim/trust_cases.py BACKEND

Each case prints ``PASS name`` or ``FAIL name: why``; the exit status is 0 when all
passed.  A refused input must raise the expected error before any kernel runs, with params
and optimizer state bit-identical and a later good step working."""

from __future__ import annotations

import copy
import re
import sys
import traceback

import torch

import fusedopt as fo
from fusedopt import backends
from optim_helpers import assert_bit_identical, snapshot

F32, BF16 = torch.float32, torch.bfloat16
BIG = 3000  # elements of the param whose state is swapped for a 3-element one
CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def _params(device, dtype=F32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(BIG,), (5, 7), (13,)]
    ps = [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]
    _grads(ps)
    return ps


def _grads(ps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _adam(backend, dtype=F32, **kw):
    ps = _params(_device(backend), dtype)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend=backend, max_grad_norm=1.0, **kw)
    opt.step()
    _grads(ps, seed=2)
    return ps, opt


def _sgd(backend):
    ps = _params(_device(backend))
    opt = fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend=backend, max_grad_norm=1.0)
    opt.step()
    _grads(ps, seed=2)
    return ps, opt


def _device(backend):
    return torch.device("cuda" if backend in ("cuda", "triton") and torch.cuda.is_available()
                        else "cpu")


def _refused(opt, ps, action, exc, pattern):
    """``action()`` raises ``exc`` matching ``pattern`` and changes nothing."""
    before = snapshot(opt, ps) + [opt.skipped_steps.clone(), opt.last_grad_norm.clone()]
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    try:
        action()
    except exc as e:
        if not re.search(pattern, str(e)):
            raise AssertionError(f"message {str(e)!r} does not match {pattern!r}") from None
    else:
        raise AssertionError(f"no {exc.__name__} raised")
    assert_bit_identical(before, snapshot(opt, ps) + [opt.skipped_steps, opt.last_grad_norm])
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _load_refused(backend, make, edit, exc, pattern):
    ps, opt = make(backend)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    _refused(opt, ps, lambda: opt.load_state_dict(sd), exc, pattern)
    opt.step()  # the untouched optimizer still steps


def _step_refused(backend, make, edit, exc, pattern, fix=None):
    ps, opt = make(backend)
    edit(opt, ps)
    _refused(opt, ps, opt.step, exc, pattern)
    if fix is not None:
        fix(opt, ps)
        opt.step()


class _Sub(torch.Tensor):
    """A __torch_dispatch__ subclass (like DTensor's wrapper) around a plain tensor."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _Sub) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


# ------------------------------------------------------------------ checkpoints


@case
def load_small_exp_avg(b):
    _load_refused(b, _adam, lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)), ValueError,
                  rf"param 0, key 'exp_avg', has shape \(3,\), expected \({BIG},\)")


@case
def load_wrong_size_momentum_buffer(b):
    _load_refused(b, _sgd, lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(7, 5)),
                  ValueError, r"param 1, key 'momentum_buffer', has shape \(7, 5\)")


@case
def load_wrong_size_master(b):
    _load_refused(b, lambda b: _adam(b, BF16, master_weights=True),
                  lambda sd: sd["state"][2].update(master_param=torch.zeros(12)), ValueError,
                  r"param 2, key 'master_param', has shape \(12,\)")


@case
def load_subclass_or_meta_or_complex_state(b):
    for value, exc, pattern in [(_Sub(torch.zeros(5, 7)), TypeError, "is a _Sub"),
                                (torch.zeros(5, 7, device="meta"), ValueError, "meta tensor"),
                                (torch.zeros(5, 7, dtype=torch.complex64), TypeError, "complex64"),
                                (torch.zeros(3, 3).to_sparse(), TypeError, "layout"),
                                ([0.0] * 35, TypeError, "must be a tensor, got list")]:
        _load_refused(b, _adam, lambda sd: sd["state"][1].update(exp_avg_sq=value), exc,
                      r"param 1, key 'exp_avg_sq'.*" + pattern)


@case
def load_bad_step(b):
    for value, exc in [(torch.zeros(3), ValueError), ("3", TypeError),
                       (torch.zeros((), dtype=torch.complex64), TypeError)]:
        _load_refused(b, _adam, lambda sd: sd["state"][2].update(step=value), exc,
                      r"param 2, key 'step'")


@case
def load_uint8_exp_avg_sq_is_cast_like_torch(b):
    ps, opt = _adam(b)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq"] = torch.randint(0, 4, (BIG,), dtype=torch.uint8)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    ref_opt.load_state_dict(copy.deepcopy(sd))
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["exp_avg_sq"].dtype == F32
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    opt.step()
    ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ edited state


def _set(key, value_fn, index=0):
    def edit(opt, ps):
        opt.state[ps[index]][key] = value_fn(ps[index])
    return edit


@case
def state_small_exp_avg(b):
    _step_refused(b, _adam, _set("exp_avg", lambda p: torch.zeros(3, device=p.device)),
                  ValueError, r"state\[param 0 of param group 0\]\['exp_avg'\] has shape \(3,\)",
                  fix=_set("exp_avg", lambda p: torch.zeros_like(p)))


@case
def state_uint8_exp_avg_sq(b):
    _step_refused(b, _adam, _set("exp_avg_sq", lambda p: torch.zeros_like(p, dtype=torch.uint8)),
                  TypeError, r"\['exp_avg_sq'\] has dtype torch.uint8, expected torch.float32")


@case
def state_wrong_size_momentum_buffer(b):
    _step_refused(b, _sgd, _set("momentum_buffer", lambda p: torch.zeros(2, device=p.device), 1),
                  ValueError, r"\['momentum_buffer'\] has shape \(2,\)")


@case
def state_wrong_size_master(b):
    def make(b):
        return _adam(b, BF16, master_weights=True)
    _step_refused(b, make, _set("master_param", lambda p: torch.zeros(4, device=p.device)),
                  ValueError, r"\['master_param'\] has shape \(4,\)")


@case
def state_transposed_or_meta_or_subclass(b):
    for value_fn, exc, pattern in [
            (lambda p: torch.zeros(7, 5, device=p.device).t(), ValueError, "strides"),
            (lambda p: torch.zeros(5, 7, device="meta"), ValueError, "on meta"),
            (lambda p: _Sub(torch.zeros_like(p)), TypeError, "is a _Sub"),
            (lambda p: 0.0, TypeError, "must be a tensor")]:
        _step_refused(b, _adam, _set("exp_avg", value_fn, 1), exc, pattern)


@case
def state_resized_or_data_swapped_in_place(b):
    def resize(opt, ps):
        opt.state[ps[0]]["exp_avg"].resize_(3)

    def swap(opt, ps):
        opt.state[ps[0]]["exp_avg_sq"].data = torch.zeros(3, device=ps[0].device)

    def step_swap(opt, ps):
        opt.state[ps[1]]["step"].data = torch.zeros(4, device=ps[1].device)

    _step_refused(b, _adam, resize, ValueError, r"\['exp_avg'\] has shape \(3,\)")
    _step_refused(b, _adam, swap, ValueError, r"\['exp_avg_sq'\] has shape \(3,\)")
    _step_refused(b, _adam, step_swap, ValueError, r"\['step'\] must hold one number")


# ------------------------------------------------------------------ gradients and params


def _grad_data(value_fn, index=0):
    def edit(opt, ps):
        ps[index].grad.data = value_fn(ps[index])
    return edit


@case
def grad_swapped_dtype_or_shape(b):
    for make in (_adam, _sgd):
        for value_fn, exc, pattern in [
                (lambda p: torch.zeros(p.shape, dtype=BF16, device=p.device), TypeError,
                 "gradient of param 0 of param group 0 has dtype torch.bfloat16"),
                (lambda p: torch.zeros(p.numel() // 2, device=p.device), ValueError,
                 rf"gradient of param 0 .* has shape \({BIG // 2},\)"),
                (lambda p: torch.zeros(p.shape, dtype=torch.float64, device=p.device), TypeError,
                 "float64")]:
            _step_refused(b, make, _grad_data(value_fn), exc, pattern,
                          fix=lambda opt, ps: _grads(ps))


@case
def grad_resized_sparse_or_subclass(b):
    def resize(opt, ps):
        ps[0].grad.resize_(3)

    def sparse(opt, ps):
        ps[1].grad = ps[1].grad.to_sparse()

    def sub(opt, ps):
        ps[2].grad = _Sub(ps[2].grad.clone())

    _step_refused(b, _adam, resize, ValueError, r"shape \(3,\)")
    _step_refused(b, _adam, sparse, TypeError, "sparse gradients")
    _step_refused(b, _adam, sub, TypeError, "gradient of param 2 .* is a _Sub")


@case
def param_swapped_or_freed(b):
    def to_float64(opt, ps):
        ps[1].data = ps[1].data.double()

    def reshaped(opt, ps):
        ps[1].data = ps[1].data.reshape(7, 5)
        ps[1].grad = torch.zeros(7, 5, device=ps[1].device)

    _step_refused(b, _adam, to_float64, TypeError, "param 1 of param group 0 has dtype torch.float64")
    _step_refused(b, _adam, reshaped, ValueError, r"\['exp_avg'\] has shape \(5, 7\), expected \(7, 5\)")
    # a param whose storage was freed (as FSDP does between uses); torch itself crashes on
    # reading it, so only the other params are compared
    ps, opt = _adam(b)
    before = [p.detach().clone() for p in ps[:2]]
    ps[2].untyped_storage().resize_(0)
    try:
        opt.step()
    except ValueError as e:
        assert re.search("param 2 of param group 0 .*no data", str(e)), e
    else:
        raise AssertionError("freed storage not refused")
    assert all(torch.equal(a, p) for a, p in zip(before, ps[:2]))


def _subclass_params():
    """A wrapper subclass, a FakeTensor and (where torch.distributed runs) a DTensor param."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    out = [("TwoTensor", torch.nn.Parameter(TwoTensor(torch.zeros(3), torch.zeros(3))))]
    with FakeTensorMode():
        out.append(("FakeTensor", torch.nn.Parameter(torch.zeros(3))))
    import torch.distributed as dist
    if dist.is_available():
        from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        out.append(("DTensor", torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh,
                                                                    [Replicate()]))))
    return out


@case
def subclass_params_refused_at_construction(b):
    for name, p in _subclass_params():
        for make in (fo.optim.FusedAdamW, fo.optim.FusedSGD):
            try:
                make([p], backend=b)
            except TypeError as e:
                assert f"is a {name}" in str(e), e
            else:
                raise AssertionError(f"{name} param: no TypeError")
    ps, opt = _adam(b)
    try:
        opt.add_param_group({"params": [_subclass_params()[0][1]]})
    except TypeError:
        assert len(opt.param_groups) == 1
    else:
        raise AssertionError("add_param_group took a subclass param")


@case
def sharded_grad_scaler_flags_of_shape_1(b):
    """FSDP's ShardedGradScaler hands found_inf (and its scale) as shape [1] tensors."""
    import torch.distributed as dist
    if not dist.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    dev = _device(b)
    ours = _params(dev)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=b)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    scalers = [ShardedGradScaler(dev.type, init_scale=2.0**8, growth_interval=1) for _ in range(2)]
    for k in range(4):
        for o, ps, s in ((opt, ours, scalers[0]), (ref_opt, ref, scalers[1])):
            o.zero_grad()
            s.scale(sum((p * p).sum() for p in ps)).backward()
            if k == 1:
                ps[1].grad[0, 0] = float("inf")
            if k == 2:
                s.unscale_(o)
            s.step(o)
            s.update()
        assert torch.equal(scalers[0]._scale, scalers[1]._scale)
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    assert int(opt.skipped_steps) == 1 and float(opt.state[ours[0]]["step"]) == 3.0


# ------------------------------------------------------------------ backend entry points


@case
def backend_entry_points_refuse_bad_lists(b):
    mod = backends.get(b)
    if b == "torch":
        return  # no raw pointers: torch's own ops check the lists
    dev = _device(b)
    ps = [torch.randn(BIG, device=dev), torch.randn(5, 7, device=dev)]
    gs = [torch.randn_like(p) for p in ps]

    def adam(params=ps, grads=gs, exp_avgs=None, steps=None, masters=None, lr=1e-2, cache=None):
        exp_avgs = exp_avgs or [torch.zeros_like(p) for p in params]
        steps = steps or [torch.zeros((), device=dev) for _ in params]
        mod.adam_step(params, grads, exp_avgs, [torch.zeros_like(p) for p in params], None,
                      masters, steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      amsgrad=False, maximize=False, decoupled=True, inv_scale=None,
                      clip_coef=None, skip=None, cache={} if cache is None else cache)

    small = torch.zeros(3, device=dev)
    for kwargs, exc, pattern in [
            (dict(exp_avgs=[small, torch.zeros(5, 7, device=dev)]), ValueError,
             r"exp_avgs\[0\] has shape \(3,\)"),
            (dict(grads=[gs[0], gs[1].bfloat16()]), TypeError, r"grads\[1\] has dtype"),
            (dict(steps=[torch.zeros(2, device=dev)] * 2), ValueError, r"steps\[0\] has shape"),
            (dict(params=[_Sub(ps[0]), ps[1]]), TypeError, r"params\[0\] is a _Sub"),
            (dict(masters=[torch.zeros(2, device=dev)] * 2), ValueError, r"master_params\[0\]"),
            (dict(lr=torch.tensor(1e-2, dtype=torch.float64, device=dev)), ValueError, "lr must"),
            (dict(grads=gs[:1]), ValueError, "grads has 1 tensors, expected 2")]:
        before = [p.clone() for p in ps]
        try:
            adam(**kwargs)
        except exc as e:
            assert re.search(pattern, str(e)), (str(e), pattern)
        else:
            raise AssertionError(f"{kwargs}: no {exc.__name__}")
        assert all(torch.equal(x, y) for x, y in zip(before, ps))
    for tensors, exc in [([_Sub(gs[0])], TypeError), ([torch.zeros(4, device="meta")], ValueError),
                         ([torch.zeros(4, 6, device=dev)[:, ::2]], ValueError)]:
        try:
            mod.multi_tensor_norm(tensors, None, {})
        except exc:
            pass
        else:
            raise AssertionError(f"norm of {tensors}: no {exc.__name__}")
    # the fingerprint notices a state resized or swapped after the table was built
    cache, exp_avgs = {}, [torch.zeros_like(p) for p in ps]
    adam(exp_avgs=exp_avgs, cache=cache)
    exp_avgs[0].resize_(3)
    try:
        adam(exp_avgs=exp_avgs, cache=cache)
    except ValueError as e:
        assert "exp_avgs[0] has shape (3,)" in str(e), e
    else:
        raise AssertionError("resized state not noticed")


def main(backend: str) -> int:
    failed = 0
    for fn in CASES:
        try:
            fn(backend)
        except Exception:
            failed += 1
            why = traceback.format_exc().strip().splitlines()
            print(f"FAIL {fn.__name__}: {' | '.join(why[-3:])}", flush=True)
        else:
            print(f"PASS {fn.__name__}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
