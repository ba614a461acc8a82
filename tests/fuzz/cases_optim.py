"""The optimizer cases the fuzz worker runs (worker.py): a fused optimizer built from a
spec (params of any dtype, shape and layout in param groups, random hyper-parameters,
clipping, a loss scaler, skip_nonfinite, master weights) stepped with seeded gradients, and
edits of its state, checkpoint, gradients or hyper-parameters before a step.  The worker
returns plain CPU tensors; the parent compares them with torch.optim (test_fuzz_optim.py)."""

from __future__ import annotations

import copy

import torch

import fusedopt as fo
from build import DTYPES, corrupt, generator, plain
from fusedopt.backends._plain import check_storage

CASES = {}
F32 = torch.float32


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def make_params(spec):
    gen = generator(spec["seed"])
    params = []
    for p in spec["params"]:
        t = torch.randn(p["shape"], generator=gen).to(DTYPES[p["dtype"]])
        if p["layout"] == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif p["layout"] == "transposed" and t.dim() >= 2:
            t = t.t().contiguous().t() if t.dim() == 2 else t.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        params.append(torch.nn.Parameter(t))
    return params


def make_grads(spec, params):
    """Unscaled gradients of each step (in the params' dtypes), with the spec's specials."""
    gen = generator(spec["seed"] + 1)
    steps = []
    for k in range(spec["steps"]):
        grads = [(torch.randn(p.shape, generator=gen) * spec["grad_scale"]).to(p.dtype)
                 for p in params]
        for step, index, pos, value in spec.get("specials", ()):
            if step == k and grads[index % len(grads)].numel():
                g = grads[index % len(grads)].view(-1)
                g[pos % g.numel()] = float(value)
        steps.append(grads)
    return steps


def laid_out_grad(g, p, layout):
    if layout == "contiguous":
        return g.contiguous()
    return torch.empty_like(p).copy_(g)  # the param's own strides


def build(spec):
    params = make_params(spec)
    groups = {}
    for p, ps in zip(params, spec["params"]):
        groups.setdefault(ps["group"], []).append(p)
    group_list = []
    for gi in sorted(groups):
        group = {"params": groups[gi]}
        group.update(spec["group_overrides"].get(gi, {}))
        group_list.append(group)
    cls = {"adam": fo.optim.FusedAdam, "adamw": fo.optim.FusedAdamW,
           "sgd": fo.optim.FusedSGD}[spec["optimizer"]]
    hyper = dict(spec["hyper"])
    if "state_dtype" in hyper:
        hyper["state_dtype"] = {"bfloat16": torch.bfloat16, "int8": torch.int8}[hyper["state_dtype"]]
    opt = cls(group_list, backend=spec["backend"], **hyper)
    return params, opt


def make_scaler(spec):
    kind = spec.get("scaler")
    if kind == "loss_scaler":
        return fo.amp.LossScaler(init_scale=spec["init_scale"], growth_interval=2)
    if kind == "grad_scaler":
        return torch.amp.GradScaler("cpu", init_scale=spec["init_scale"], growth_interval=2)
    return None


def _readable(t) -> bool:
    """A plain tensor whose elements may be read (an edited state may be freed, meta...)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return False
    try:
        check_storage(t, "t")
    except ValueError:
        return False
    return True


def state_bits(opt, params):
    """Bit copies of the readable params and state tensors, with their keys."""
    out = [p.detach().clone() for p in params if _readable(p)]
    for i, p in enumerate(params):
        for key, value in sorted(opt.state[p].items()) if p in opt.state else ():
            if torch.is_tensor(value) and _readable(value):
                out.append(value.detach().clone())
    return out


def _bits(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


def bit_identical(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype
                                    and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def run_steps(spec, params, opt, grads_per_step):
    """Steps with the (scaled) gradients; per step (params after, skipped?, whether a
    skipped step left params and state bit-identical)."""
    scaler = make_scaler(spec)
    layouts = [ps["grad_layout"] for ps in spec["params"]]
    after, skipped, identical = [], [], []
    for grads in grads_per_step:
        # the scale of this step (LossScaler wants a scale(loss) call before its step)
        scale = float(scaler.scale(torch.ones(()))) if scaler is not None else 1.0
        for p, g, layout in zip(params, grads, layouts):
            p.grad = None if g is None else laid_out_grad(g * scale, p, layout)
        nonfinite = any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        skip = nonfinite and (scaler is not None or spec["hyper"].get("skip_nonfinite", False))
        before = state_bits(opt, params)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        skipped.append(skip)
        identical.append(bit_identical(before, state_bits(opt, params)) if skip else True)
        after.append([plain(p) for p in params])
    return after, skipped, identical


@case
def optim_run(spec):
    params, opt = build(spec)
    initial = [plain(p) for p in params]
    grads = make_grads(spec, params)
    after, skipped, identical = run_steps(spec, params, opt, grads)
    state = {i: {k: plain(v) for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for i, p in enumerate(params) if p in opt.state}
    return dict(initial=initial, grads=[[plain(g) for g in gs] for gs in grads], after=after,
                skipped=skipped, identical=identical, state=state,
                skipped_steps=float(opt.skipped_steps))


def _edit_state(opt, params, edit):
    what, index, key, how = edit
    p = params[index % len(params)]
    st = opt.state[p]
    keys = sorted(k for k, v in st.items() if torch.is_tensor(v))
    if not keys:
        return
    key = keys[key % len(keys)]
    value = st[key]
    if how == "delete":
        del st[key]
    elif how == "wrong_shape":
        st[key] = torch.zeros(value.numel() + 3)
    elif how == "uint8":
        st[key] = torch.zeros(value.shape, dtype=torch.uint8)
    elif how == "float64":
        st[key] = value.double()
    elif how == "transposed" and value.dim() == 2:
        st[key] = value.t().contiguous().t() if value.shape[0] != value.shape[1] else value.t()
    elif how in ("freed", "shrunk", "tagged", "wrapper", "meta", "negated"):
        st[key] = corrupt(value, how)
    elif how == "python_float":
        st[key] = 0.5
    elif how == "reset":
        opt.state[p] = {}
    elif how == "freed_float64":  # a value the step would convert (read) first
        st[key] = corrupt(value.double(), "freed")


def _edit_checkpoint(sd, edit):
    what, index, key, how = edit
    states = sd["state"]
    if not states:
        return
    i = sorted(states)[index % len(states)]
    entry = states[i]
    keys = sorted(entry)
    k = keys[key % len(keys)]
    value = entry[k]
    if how == "delete":
        del entry[k]
    elif how == "wrong_shape" and torch.is_tensor(value):
        entry[k] = torch.zeros(max(value.numel(), 1) + 3)
    elif how == "uint8" and torch.is_tensor(value):
        entry[k] = torch.zeros(value.shape, dtype=torch.uint8)
    elif how == "float64" and torch.is_tensor(value):
        entry[k] = value.double()
    elif how == "python_float":
        entry[k] = 1.0
    elif how == "extra_index":
        states[max(states) + 7] = dict(entry)
    elif how == "string":
        entry[k] = "garbage"
    elif how in ("tagged", "wrapper", "meta", "freed", "shrunk", "negated") and torch.is_tensor(value):
        entry[k] = corrupt(value, how)
    elif how == "drop_groups":
        sd["param_groups"] = sd["param_groups"][:0]


def _edit_grad(params, edit):
    try:
        _swap_grad(params, edit)
    except RuntimeError:  # torch refused the assignment itself: nothing was swapped
        pass


def _swap_grad(params, edit):
    what, index, key, how = edit
    p = params[index % len(params)]
    if how == "bf16_data":
        p.grad.data = torch.zeros(p.shape, dtype=torch.bfloat16)
    elif how == "wrong_shape_data":
        p.grad.data = torch.zeros(p.numel() + 2)
    elif how == "float64":
        p.grad = torch.zeros(p.shape, dtype=torch.float64) if p.dtype == torch.float64 else \
            p.grad.double()
    elif how == "sparse" and p.dim() >= 1:
        p.grad = p.grad.to_sparse()
    elif how in ("tagged", "wrapper", "freed", "shrunk", "negated", "meta"):
        p.grad = corrupt(p.grad, how)
    elif how == "expanded" and p.numel():
        p.grad = p.grad.reshape(-1)[:1].expand(p.numel()).view(p.shape) if p.dim() else p.grad


def _edit_hyper(opt, edit):
    what, index, key, how = edit  # key in 0..11 (strategies_optim.edit_spec)
    group = opt.param_groups[index % len(opt.param_groups)]
    name = ("lr", "eps", "weight_decay", "betas", "momentum", "max_grad_norm", "state_dtype",
            "seed", "amsgrad", "maximize", "nesterov", "dampening")[key % 12]
    if name not in group:
        return
    group[name] = {"nan": float("nan"), "negative": -1.0, "string": "fast", "inf": float("inf"),
                   "tensor2": torch.tensor([0.1, 0.2]), "int_tensor": torch.tensor(1),
                   "huge": 1e300, "freed_tensor": corrupt(torch.tensor(0.1), "freed"),
                   "meta_tensor": torch.tensor(0.1, device="meta")}.get(how, float("nan"))
    if name == "betas":
        group[name] = (group[name], 0.9)


@case
def optim_edit(spec):
    """Good steps, then an edit (state, checkpoint, gradient, hyper-parameter, param
    storage), then a step (or the load): ('ok') or (error type, message, whether params
    and state stayed bit-identical)."""
    params, opt = build(spec)
    grads = make_grads(dict(spec, specials=()), params)
    run_steps(dict(spec, scaler=None), params, opt, grads[:-1])
    for p, g in zip(params, grads[-1]):
        p.grad = g.clone()
    edit = spec["edit"]
    action = opt.step
    if edit[0] == "state":
        _edit_state(opt, params, edit)
    elif edit[0] == "checkpoint":
        sd = copy.deepcopy(opt.state_dict())
        _edit_checkpoint(sd, edit)
        action = lambda: opt.load_state_dict(sd)  # noqa: E731
    elif edit[0] == "grad":
        _edit_grad(params, edit)
    elif edit[0] == "hyper":
        _edit_hyper(opt, edit)
    elif edit[0] == "param_storage":
        params[edit[1] % len(params)].untyped_storage().resize_(0)
    before = state_bits(opt, params) if edit[0] != "param_storage" else None
    try:
        action()
    except Exception as exc:
        same = before is None or bit_identical(before, state_bits(opt, params))
        if isinstance(exc, (TypeError, ValueError, IndexError)):
            return dict(outcome="raised", type=type(exc).__name__, message=str(exc)[:500],
                        identical=same)
        raise
    if edit[0] == "checkpoint":  # a load that was accepted must give a working optimizer
        opt.step()
    return dict(outcome="ok", finite=all(bool(torch.isfinite(p.detach()).all())
                                        for p in params if p.untyped_storage().nbytes()))
