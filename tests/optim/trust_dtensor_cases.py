"""Trust cases of DTensor params on a one-rank world (run by trust_cases.py): the kernels
step the local shards like plain params, states are DTensors with the param's placements,
and a state, gradient or checkpoint that does not fit a DTensor param -- or a DTensor
handed straight to a backend -- is refused before any kernel runs, with nothing changed.
The same on two ranks, against torch: tests/distributed/test_dtensor_optim.py."""

from __future__ import annotations

import re

import torch

import fusedopt as fo
from fusedopt import backends
from trust_common import case, device_of, params_on


def _mesh(dev):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(dev.type, (1,))


def _dtensor_params(dev):
    """(DTensor params: row-sharded, replicated, column-sharded; plain copies)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(dev)
    plain = params_on(dev)
    placements = [[Shard(0)], [Replicate()], [Shard(1)]]
    shaped = [plain[0], plain[1], plain[1].detach().t().contiguous().requires_grad_()]
    ps = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, pl))
          for p, pl in zip(shaped, placements)]
    return ps, [p.detach().clone().requires_grad_() for p in shaped]


def _grads(ps, plain, seed, scale=1.0):
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(ps, plain):
        g = (torch.randn(q.shape, generator=gen) * scale).to(q.device, q.dtype)
        q.grad = g.clone()
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)


def _bits(opt, ps):
    out = [p.to_local().clone() for p in ps]
    for p in ps:
        for value in opt._fo_state.get(p, {}).values():
            if torch.is_tensor(value):
                out.append((value.to_local() if hasattr(value, "to_local") else value).clone())
    return out


def _twin_steps(ps, plain, kw, dev):
    """FusedAdamW(**kw) over the DTensor params and over their plain copies, 3 steps of the
    same gradients under a LossScaler each; the two optimizers."""
    opts = fo.optim.FusedAdamW(ps, **kw), fo.optim.FusedAdamW(plain, **kw)
    scalers = fo.amp.LossScaler(init_scale=2.0**4), fo.amp.LossScaler(init_scale=2.0**4)
    for k in range(3):
        _grads(ps, plain, k, scale=16.0)
        for opt, scaler in zip(opts, scalers):
            scaler.scale(torch.ones((), device=dev))
            scaler.step(opt)
            scaler.update()
    return opts


def _refused(opt, ps, action, exc, pattern):
    before = _bits(opt, ps)
    try:
        action()
    except exc as e:
        assert re.search(pattern, str(e)), (str(e), pattern)
    else:
        raise AssertionError(f"no {exc.__name__} raised")
    after = _bits(opt, ps)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


@case
def dtensor_params_step_like_plain_params(b):
    from torch.distributed.tensor import DTensor

    dev = device_of(b)
    pairs = [(lambda ps: fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=0.5, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)),
             (lambda ps: fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, max_grad_norm=0.5, backend=b),
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False))]
    for make, ref_make in pairs:
        ps, plain = _dtensor_params(dev)
        opt, ref = make(ps), ref_make(plain)
        for k in range(3):
            _grads(ps, plain, k)
            opt.step()
            norm = torch.nn.utils.clip_grad_norm_(plain, 0.5)
            ref.step()
            torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-6, atol=0)
        for p, q in zip(ps, plain):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
            for key, value in opt.state[p].items():
                if key != "step":
                    assert type(value) is DTensor and value.placements == p.placements, key


@case
def dtensor_params_step_bit_identically_to_plain_ones(b):
    """bf16 params with fp32 master weights, AMSGrad and a loss scale: the DTensor run's
    local shards get exactly the plain run's bits (masters are DTensors too)."""
    from torch.distributed.tensor import DTensor

    dev = device_of(b)
    ps, plain = _dtensor_params(dev)
    ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in ps]
    plain = [q.detach().bfloat16().requires_grad_() for q in plain]
    kw = dict(lr=1e-2, amsgrad=True, master_weights=True, max_grad_norm=0.5, backend=b)
    opts = _twin_steps(ps, plain, kw, dev)
    for p, q in zip(ps, plain):
        assert torch.equal(p.full_tensor().view(torch.int16), q.detach().view(torch.int16))
        for key, value in opts[1].state[q].items():
            mine = opts[0].state[p][key]
            if key == "master_param":
                assert type(mine) is DTensor and mine.placements == p.placements
            assert torch.equal(getattr(mine, "full_tensor", lambda m=mine: m)(), value), key


@case
def dtensor_lean_states_step_bit_identically_to_plain_ones(b):
    """Memory-lean states on row-, replica- and column-placed params (one shard each on one
    rank: the plain run's random streams), clipped and loss-scaled: the local shards get
    the plain run's bits, the moments are DTensors, the 8-bit absmax plain; state_dict()
    holds the 8-bit moments decoded and a fresh optimizer loads them back exactly."""
    from torch.distributed.tensor import DTensor

    if not backends.status(b)[0] or not backends._usable(b, "lean_adam", device_of(b))[0]:
        return
    dev = device_of(b)
    for kw, dtype in ((dict(state_dtype=torch.bfloat16), torch.float32),
                      (dict(state_dtype=torch.int8), torch.float32),
                      (dict(state_dtype=torch.int8, param_rounding="stochastic"), torch.bfloat16)):
        ps, plain = _dtensor_params(dev)
        ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in ps]
        plain = [q.detach().to(dtype).requires_grad_() for q in plain]
        kw = dict(kw, lr=1e-2, max_grad_norm=0.5, seed=11, backend=b)
        opts = _twin_steps(ps, plain, kw, dev)
        for p, q in zip(ps, plain):
            assert torch.equal(p.to_local().view(torch.int16 if dtype != torch.float32
                                                 else torch.int32),
                               q.detach().view(torch.int16 if dtype != torch.float32
                                               else torch.int32))
            for key, value in opts[1].state[q].items():
                mine = opts[0].state[p][key]
                if key in ("exp_avg", "exp_avg_sq"):
                    assert type(mine) is DTensor and mine.placements == p.placements, key
                    mine = mine.to_local()
                assert torch.equal(mine, value), key
        sd = opts[0].state_dict()
        fresh = fo.optim.FusedAdamW(ps, **kw)
        fresh.load_state_dict(sd)
        for i, p in enumerate(ps):
            for key, value in opts[0].state[p].items():
                mine = fresh.state[p][key]
                local = getattr(value, "to_local", lambda v=value: v)()
                assert torch.equal(getattr(mine, "to_local", lambda m=mine: m)(), local), key
            if kw["state_dtype"] == torch.int8:
                assert sd["state"][i]["exp_avg"].dtype == torch.float32


@case
def dtensor_state_and_grads_that_do_not_fit_are_refused(b):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dev = device_of(b)
    ps, plain = _dtensor_params(dev)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend=b)
    _grads(ps, plain, 0)
    opt.step()
    _grads(ps, plain, 1)
    state = opt.state[ps[0]]
    exp_avg, mesh = state["exp_avg"], ps[0].device_mesh
    for value, exc, pattern in [
            (exp_avg.to_local().clone(), TypeError,
             r"\['exp_avg'\] is a Tensor; the state of a DTensor"),
            (distribute_tensor(exp_avg.full_tensor(), mesh, [Replicate()]), ValueError,
             r"\['exp_avg'\] is a DTensor .*expected the param's shape"),
            (distribute_tensor(torch.zeros(7, device=dev), mesh, [Shard(0)]), ValueError,
             r"expected the param's shape \(3000,\)")]:
        state["exp_avg"] = value
        _refused(opt, ps, opt.step, exc, pattern)
    state["exp_avg"] = exp_avg
    good = ps[1].grad
    ps[1].grad = good.to_local().clone()
    _refused(opt, ps, opt.step, TypeError,
             "gradient of param 1 .* is a Tensor, but the param is a DTensor")
    ps[1].grad = good
    opt.step()


@case
def dtensor_params_construct_checks(b):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial

    dev = device_of(b)
    ps, plain = _dtensor_params(dev)
    partial = torch.nn.Parameter(DTensor.from_local(torch.zeros(4, device=dev), ps[0].device_mesh,
                                                    [Partial()], run_check=False))
    try:
        fo.optim.FusedAdamW([partial], backend=b)
    except ValueError as e:
        assert "Partial placement" in str(e), e
    else:
        raise AssertionError("a Partial param was taken")
    mixed = fo.optim.FusedAdamW([ps[0], plain[1]], backend=b)  # the group of ps[0]'s mesh
    assert mixed.process_group is ps[0].device_mesh.get_group()
    mixed = fo.optim.FusedAdamW([ps[0], plain[1]], backend=b, process_group=dist.group.WORLD)
    assert mixed.process_group is dist.group.WORLD
    try:
        fo.optim.FusedSGD(plain, backend=b, process_group="world")
    except TypeError as e:
        assert "process_group must be a torch.distributed ProcessGroup" in str(e), e
    else:
        raise AssertionError("a string process_group was taken")


@case
def dtensor_checkpoints_load_and_refuse(b):
    from torch.distributed.tensor import DTensor

    dev = device_of(b)
    ps, plain = _dtensor_params(dev)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend=b)
    _grads(ps, plain, 0)
    opt.step()
    sd = opt.state_dict()
    full = {"state": {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                          for k, v in entry.items()} for i, entry in sd["state"].items()},
            "param_groups": sd["param_groups"]}
    for source in (sd, full):  # DTensor states, or plain tensors holding the full values
        other_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        other = fo.optim.FusedAdamW(other_ps, lr=1e-2, backend=b)
        other.load_state_dict(source)
        for p, q in zip(ps, other_ps):
            for key in ("exp_avg", "exp_avg_sq"):
                mine, theirs = opt.state[p][key], other.state[q][key]
                assert theirs.placements == q.placements
                assert torch.equal(mine.to_local(), theirs.to_local())
    freed = dict(sd, state=dict(sd["state"]))  # a DTensor whose local storage was freed
    local = torch.zeros(ps[0].to_local().numel() + 4, device=dev)
    view = local[4:].view(ps[0].to_local().shape)
    local.untyped_storage().resize_(0)
    freed["state"][0] = dict(sd["state"][0], exp_avg=DTensor.from_local(
        view, ps[0].device_mesh, ps[0].placements, run_check=False))
    _refused(opt, ps, lambda: opt.load_state_dict(freed), ValueError,
             r"param 0, key 'exp_avg' reaches past the end of its storage")
    plain_opt = fo.optim.FusedAdamW(plain, lr=1e-2, backend=b)
    try:
        plain_opt.load_state_dict(sd)
    except TypeError as e:
        assert "is a DTensor, but its param is a plain tensor" in str(e), e
    else:
        raise AssertionError("DTensor states loaded into plain params")


@case
def dtensor_lists_refused_by_backend_entry_points(b):
    if b == "torch":
        return  # no raw pointers: the torch backend takes what torch's ops take
    mod = backends.get(b)
    dev = device_of(b)
    ps, _ = _dtensor_params(dev)
    p = ps[0]
    try:
        mod.adam_step([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)],
                      None, None, [torch.zeros((), device=dev)], lr=1e-2, beta1=0.9, beta2=0.999,
                      eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, decoupled=True,
                      inv_scale=None, clip_coef=None, skip=None, cache={})
    except TypeError as e:
        assert "params[0] is a DTensor; the kernels take local tensors" in str(e), e
    else:
        raise AssertionError("a DTensor reached a kernel")
    try:
        mod.multi_tensor_norm([torch.zeros_like(p)], None, {})
    except TypeError as e:
        assert "is a DTensor" in str(e), e
    else:
        raise AssertionError("a DTensor reached the norm kernel")


@case
def dtensor_params_compiled_step_is_refused(b):
    """torch.compile of the step does not trace the norm's all-reduce: refused at trace
    time, nothing stepped."""
    ps, plain = _dtensor_params(device_of(b))
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=0.5, backend=b)
    _grads(ps, plain, 0)
    compiled = torch.compile(opt.step, backend="eager", fullgraph=True)
    _refused(opt, ps, compiled, Exception, r"on torch\.distributed .* is not supported")
