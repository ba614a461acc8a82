"""The step of a fused optimizer as ``torch.compile`` traces it.

The eager step (``_plan``) keeps a plan per param group and a fingerprint of every tensor
at the kernel boundary, compared with C-level ``map``s over addresses: fast on the host,
and nothing Dynamo can trace (``data_ptr()`` has no meaning on the fake tensors it traces
with).  A compiled step needs none of it: its guards re-check the metadata of every param,
gradient and state tensor at each call and recompile when one changed.  So when
``torch.compiler.is_compiling()``, the step builds its lists straight from
``optimizer.state`` with plain Python that Dynamo traces without a graph break:

- the params with a gradient, per group and (device, dtype), each checked as at an eager
  step (``_checks``, at trace time: a bad param, gradient or state tensor fails the
  compilation with the eager step's message, before anything runs);
- their state read from ``optimizer.state``; missing state is created in the graph and
  written to the state dicts after it (Dynamo replays those writes), hidden until a step
  completed for it as in eager mode.  The call that creates state compiles once more at the
  next call, when the state exists (the guards on the state dicts change);
- ``fusedopt::verify_step`` over every bucket (the kernel boundary's checks of what guards
  do not see, e.g. a storage freed in place), then the norm and the updates as the custom
  ops of ``_ops`` (``torch.ops.fusedopt.*``), each taking the verification's result so
  that it runs after it; the scale / clip / skip arithmetic between them as traced ops.

State tensors are marked as static inputs (`mark_static`), by the eager step and the
traced one when they create them: they keep their address, so CUDA graphs
(``mode="reduce-overhead"``) update them in place instead of copying them.
"""

from __future__ import annotations

from numbers import Real

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._plain import shown
from fusedopt.optim import _checks, _distributed, _ops  # noqa: F401  (_ops registers torch.ops.fusedopt.*)
from fusedopt.optim._scalars import on_device

_F32 = torch.float32


class TracedBucket:
    """The params of one group on one (device, dtype), as the traced step lists them."""

    def __init__(self, gi, group, device, dtype, backend):
        self.gi, self.group, self.device, self.dtype = gi, group, device, dtype
        self.math_dtype = boundary.math_dtype(dtype)
        self.backend = backend  # the name of the backend module
        self.params, self.grads, self.wheres, self.positions = [], [], [], []
        self.lists: dict = {}
        self.token = None  # verify_step's result on the bucket's device


def step(opt, scaler, amp_scale, amp_found_inf):
    """The traced counterpart of the eager ``prepare`` + ``_fo_step_buckets``."""
    loss_scale, flag_group, unscaled_found = scaler if scaler is not None else (None,) * 3
    if opt.process_group is not None or flag_group is not None:
        raise RuntimeError(_DISTRIBUTED)
    buckets = _buckets(opt)
    for b in buckets:
        opt._traced_lists(b)
    hypers = [opt._traced_hyper(b) for b in buckets]
    if buckets:
        home = (loss_scale.device if loss_scale is not None
                else unscaled_found.device if unscaled_found is not None
                else buckets[0].device)
        token = _verify(opt, buckets, home)
        for b in buckets:
            b.token = on_device(token, b.device)
        # the skip count is written after the checks too
        if unscaled_found is not None:
            scaler = (loss_scale, flag_group, on_device(unscaled_found, home) + token)
        elif amp_found_inf is not None:
            amp_found_inf = on_device(amp_found_inf, home) + token
    opt._fo_step_buckets(buckets, hypers, scaler, amp_scale, amp_found_inf,
                         lambda bs, inv_scale, home: global_norm(opt, bs, inv_scale, home),
                         opt._traced_run)


_DISTRIBUTED = ("torch.compile of a fused optimizer's step on torch.distributed (DTensor "
                "params, a process_group, or a LossScaler with a process_group) is not "
                "supported: the norm's all-reduce is not traced. Run the step eagerly "
                "(e.g. under torch.compiler.disable)")


def _verify(opt, buckets, home):
    """``fusedopt::verify_step`` over the lists of every bucket (see _ops)."""
    tensors, spec = [], []
    for b in buckets:
        vectors, scalars = opt._boundary_lists(b)
        lists = [entry[1] for entry in vectors + scalars]
        spec += [b.gi, len(b.params), len(vectors), len(scalars)]
        spec += [0 if entry[1] is None else _ops.LIST_CODES[entry[2]] if len(entry) > 2 else 1
                 for entry in vectors + scalars]
        tensors += b.params + b.grads
        for lst in lists:
            if lst is not None:
                tensors += lst
    return torch.ops.fusedopt.verify_step(tensors, spec, opt._fo_store_id, home)


def _buckets(opt) -> list[TracedBucket]:
    name = type(opt).__name__
    out = []
    for gi, group in enumerate(opt.param_groups):
        split: dict = {}
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if _distributed.is_dtensor(p):
                raise RuntimeError(_DISTRIBUTED)
            where = f"param {j} of param group {gi}"
            _checks.step_param(p, where)
            if _checks.grad(g, p, where, name, opt._SPARSE_GRADS, traced=True):
                copy = torch.empty_like(p)
                copy.copy_(g.to_dense() if g.layout == torch.sparse_coo else g)
                g = copy
            else:
                g = g.resolve_conj().resolve_neg()
            key = (p.device, p.dtype)
            b = split.get(key)
            if b is None:
                backend = opt._backend_for(p.device, p.dtype, where)
                b = split[key] = TracedBucket(gi, group, p.device, p.dtype, backend.NAME)
            b.params.append(p)
            b.grads.append(g)
            b.wheres.append(where)
            b.positions.append(j)
        out.extend(split.values())
    return out


def global_norm(opt, buckets, inv_scale, home):
    """``_fo_step_buckets``'s norm: one ``fusedopt::multi_tensor_norm`` per (device, dtype)."""
    per_kind: dict = {}
    for b in buckets:
        per_kind.setdefault((b.device, b.dtype), []).append(b)
    parts = []
    for (device, _), group in per_kind.items():
        grads = [g for b in group for g in b.grads]
        res = torch.ops.fusedopt.multi_tensor_norm(grads, on_device(inv_scale, device),
                                                   group[0].backend, opt._fo_store_id,
                                                   group[0].token)
        parts.append(res.to(home, non_blocking=home.type != "cpu"))
    return combine_norms(parts)


def combine_norms(parts):
    """[Σ g², any inf/NaN] of the per-(device, dtype) parts, in fp64 if one part is."""
    if any(res.dtype == torch.float64 for res in parts):
        parts = [res.to(torch.float64) for res in parts]
    total = parts[0]
    for res in parts[1:]:
        total = torch.stack([total[0] + res[0], torch.maximum(total[1], res[1])])
    return total


# ------------------------------------------------------------------ state, as traced

def entry(opt, p, where) -> dict:
    """``optimizer.state[p]``; a new one is hidden until a step completed for it."""
    found = opt._fo_state.get(p)
    if found is None:
        # no _fo_version bump (Dynamo drops writes to the optimizer's attributes): the eager
        # plan finds the new entry by itself and rebuilds
        found = {}
        opt._fo_state[p] = found
        opt._fo_hidden.add(p)
    elif not isinstance(found, dict):
        raise TypeError(f"optimizer.state[{where}] must be a dict, got {type(found).__name__}")
    return found


def vector(state: dict, key: str, p, where: str, make):
    """``state[key]`` checked as the eager step checks it; made (and stored) when missing."""
    value = state.get(key)
    if value is None:
        value = make(p)
        state[key] = value
        mark_static((value,))
        return value
    return _checks.state_tensor(value, key, p, where, traced=True)


def step_count(state: dict, p, where: str):
    """``state["step"]`` as a 0-dim fp32 tensor on the param's device (converted, stored)."""
    value = state.get("step")
    if value is None:
        value = torch.zeros((), dtype=_F32, device=p.device)
    else:
        value, converted = _checks.step_count(value, p, f"optimizer.state[{where}]['step']")
        if not converted:
            return value
    state["step"] = value
    mark_static((value,))
    return value


def scalar(value, name):
    """A hyper-parameter as the custom ops take it: (float, None) or (0.0, tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() \
                or type(value) not in boundary.PLAIN_TYPES:
            raise TypeError(f"{name} as a tensor must be a plain one-element floating-point "
                            f"tensor, got {type(value).__name__} of shape "
                            f"{tuple(value.shape)}, {value.dtype}")
        return 0.0, value
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {shown(value)}")
    return float(value), None


def mark_static(tensors) -> None:
    """Mark tensors the optimizer owns and updates in place (state, flags, counters) as
    static inputs of compiled graphs, so CUDA graphs update them where they are instead of
    copying them (what Dynamo does for torch's optimizers' state).  This is what
    ``torch._dynamo.mark_static_address(t)`` sets -- set directly, because that function may
    not be called in traced code, and importing torch._dynamo for an eager step would cost
    the eager user a second."""
    for t in tensors:
        t._dynamo_static_input_type = "unguarded"
