"""Trust cases: swapped gradients and params, tensor subclasses, FSDP's scaler flags, bad
lists handed straight to a backend (run by trust_cases.py)."""

from __future__ import annotations

import itertools
import re

import torch

import fusedopt as fo
from fusedopt import backends
from optim_helpers import assert_bit_identical, snapshot
from trust_common import (BF16, BIG, Sub, case, device_of, params_on, refused, seeded_grads,
                          step_refused, stepped_adam, stepped_sgd)

# ------------------------------------------------------------------ gradients and params


def _grad_data(value_fn, index=0):
    def edit(opt, ps):
        ps[index].grad.data = value_fn(ps[index])
    return edit


@case
def grad_swapped_dtype_shape_or_device(b):
    swaps = [(lambda p: torch.zeros(p.shape, dtype=BF16, device=p.device), TypeError,
              "gradient of param 0 of param group 0 has dtype torch.bfloat16"),
             (lambda p: torch.zeros(p.numel() // 2, device=p.device), ValueError,
              rf"gradient of param 0 .* has shape \({BIG // 2},\)"),
             (lambda p: torch.zeros(p.shape, dtype=torch.float64, device=p.device), TypeError,
              "float64")]
    if device_of(b).type == "cuda":  # torch's .data setter lets a CPU tensor in
        swaps.append((lambda p: torch.zeros(p.shape), ValueError, "gradient of .* is on cpu"))
    for make in (stepped_adam, stepped_sgd):
        for value_fn, exc, pattern in swaps:
            step_refused(b, make, _grad_data(value_fn), exc, pattern,
                         fix=lambda opt, ps: seeded_grads(ps))


@case
def grad_resized_sparse_or_subclass(b):
    def resize(opt, ps):
        ps[0].grad.resize_(3)

    def sparse(opt, ps):
        ps[1].grad = ps[1].grad.to_sparse()

    def sub(opt, ps):
        ps[2].grad = Sub(ps[2].grad.clone())

    step_refused(b, stepped_adam, resize, ValueError, r"shape \(3,\)")
    step_refused(b, stepped_adam, sparse, TypeError, "does not support torch.sparse_coo gradients")
    step_refused(b, stepped_adam, sub, TypeError, "gradient of param 2 .* is a Sub")


@case
def param_swapped_or_freed(b):
    def to_float64(opt, ps):
        ps[1].data = ps[1].data.double()

    def to_float64_with_grad(opt, ps):
        ps[1].data = ps[1].data.double()
        ps[1].grad = ps[1].grad.double()

    def reshaped(opt, ps):
        ps[1].data = ps[1].data.reshape(7, 5)
        ps[1].grad = torch.zeros(7, 5, device=ps[1].device)

    step_refused(b, stepped_adam, to_float64, TypeError,
                 "gradient of param 1 of param group 0 has dtype torch.float32, expected "
                 "torch.float64")
    # a float64 param is stepped by the torch backend with float64 states only
    step_refused(b, stepped_adam, to_float64_with_grad, TypeError,
                 r"\['exp_avg'\] has dtype torch.float32, expected torch.float64" if b == "torch"
                 else f"param 1 of param group 0 has dtype torch.float64, which fusedopt "
                      f"backend '{b}' cannot step")
    step_refused(b, stepped_adam, reshaped, ValueError, r"\['exp_avg'\] has shape \(5, 7\), expected \(7, 5\)")
    # a param whose storage was freed (as FSDP does between uses); torch itself crashes on
    # reading it, so only the other params are compared
    ps, opt = stepped_adam(b)
    before = [p.detach().clone() for p in ps[:2]]
    ps[2].untyped_storage().resize_(0)
    try:
        opt.step()
    except ValueError as e:
        assert re.search("param 2 of param group 0 .*no data", str(e)), e
    else:
        raise AssertionError("freed storage not refused")
    assert all(torch.equal(a, p) for a, p in zip(before, ps[:2]))


@case
def gradient_storage_freed_or_shrunk_after_a_verified_step(b):
    """A gradient that is a view into a storage freed (resize_(0)) or shrunk afterwards, at
    an offset, so its data pointer is not 0 (found by the fuzz suite: the per-step
    fingerprint compared the gradients' metadata, not their storages, and the step read
    freed memory -- a crash on cpu and torch); laid out like the param, or transposed (a
    gradient the optimizer copies into the param's layout first: that copy read it)."""
    for size, make, transposed in itertools.product((0, 8), (stepped_adam, stepped_sgd),
                                                    (False, True)):
        ps, opt = make(b)
        opt.step()  # the bucket is verified and fingerprinted with ordinary gradients
        g = ps[1].grad  # (5, 7)
        big = torch.zeros(g.numel() + 4, dtype=g.dtype, device=g.device)
        view = big[4:].view(7, 5).t() if transposed else big[4:].view(g.shape)
        view.copy_(g)
        ps[1].grad = view
        big.untyped_storage().resize_(size)
        refused(opt, ps, opt.step, ValueError,
                "gradient of param 1 of param group 0 reaches past the end of its storage")


@case
def compiled_step_with_freed_storage(b):
    """The guards of a compiled step do not see a storage freed in place (the shape stays):
    fusedopt::verify_step refuses it before any op of the step wrote, so the bucket of the
    other param group is unchanged too."""
    ps = params_on(device_of(b))
    opt = fo.optim.FusedAdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, backend=b)
    # aot_eager as Inductor restores grad mode when an op raises (Dynamo's "eager" does not)
    compiled = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    compiled()
    compiled()
    before = snapshot(opt, ps[:2])
    ps[2].untyped_storage().resize_(0)
    try:
        compiled()
    except ValueError as e:
        assert re.search("bucket of param group 1: params\\[0\\] .*no data", str(e)), e
    else:
        raise AssertionError("freed storage not refused")
    assert_bit_identical(before, snapshot(opt, ps[:2]))


def _subclass_params():
    """A wrapper subclass and a FakeTensor param (DTensor params are stepped:
    trust_dtensor_cases.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    out = [("TwoTensor", torch.nn.Parameter(TwoTensor(torch.zeros(3), torch.zeros(3))))]
    with FakeTensorMode():
        out.append(("FakeTensor", torch.nn.Parameter(torch.zeros(3))))
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
    ps, opt = stepped_adam(b)
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

    dev = device_of(b)
    ours = params_on(dev)
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
    dev = device_of(b)
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
            (dict(params=[Sub(ps[0]), ps[1]]), TypeError, r"params\[0\] is a Sub"),
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
    for tensors, exc in [([Sub(gs[0])], TypeError), ([torch.zeros(4, device="meta")], ValueError),
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
