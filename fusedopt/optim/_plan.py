"""The step plan of the fused optimizers: which params of a group step, in which buckets,
with which state tensors -- checked at every step, rebuilt only when something changed.

A group's plan is reused while the group's params are the same objects, the same params
have a gradient, and the group settings that shape the state lists did not change.  Each
of its buckets (the params of one (device, dtype)) then re-reads ``optimizer.state`` --
the state tensors of every param, compared by identity with the bucket's lists, so a tensor
the user replaced or removed is noticed (the per-param dicts are looked up again whenever
``optimizer._fo_version`` says an entry was added, replaced or deleted) -- and hands its lists to the kernel boundary,
whose fingerprint notices replaced, moved or resized tensors and changed gradients.

Anything that differs rebuilds the group's plan: every param, gradient and state tensor is
checked with messages that name it (``_checks``), missing state is prepared (zeros, a
master copy, a step counter) but kept aside, and the boundary verifies the new lists in
full.  Only when every bucket of every group passed is anything written (`Pending.commit`):
a refused step leaves ``optimizer.state`` untouched.

DTensor params (``_distributed``): a bucket's ``keys`` are the params as the user holds them
(the keys of ``optimizer.state``), its ``params`` and ``lists`` the local tensors the
kernels step; the state lists as ``optimizer.state`` holds them (DTensors) are compared
with it, and the local tensors are taken from them again at every step.
"""

from __future__ import annotations

import operator
from itertools import repeat

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim import _checks, _distributed, _traced

_F32 = torch.float32
LOW_PRECISION = (torch.bfloat16, torch.float16)  # the param dtypes that may have fp32 masters
_GRAD = torch.Tensor.grad.__get__
_is = operator.is_
_entry_get = dict.get

# list names of the backend entry points -> the state key each holds
STATE_KEY = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq",
             "max_exp_avg_sqs": "max_exp_avg_sq", "master_params": "master_param",
             "steps": "step", "momentum_buffers": "momentum_buffer"}


class Bucket:
    """The params of one param group on one (device, dtype) and their lists for a backend.

    ``lists`` maps a list name of the backend entry point (``exp_avgs``, ``steps``, ...) to
    a list of tensors, or None when the layout has no such list; ``state_lists`` are the
    (state key, list) pairs read back from ``optimizer.state`` at every step.  ``keys`` are
    the params as ``optimizer.state`` knows them, ``params`` what the kernels step (the same
    list unless some are DTensors: then their local tensors, and ``dist`` says how the
    gradients become local ones); ``counted``: whether the bucket's gradients add to the
    norm on this rank (``_distributed.NormGroup.counted``)."""

    __slots__ = ("gi", "group", "index", "positions", "keys", "params", "device", "dtype",
                 "backend", "lists", "state_lists", "copy_idx", "grads", "cache", "verified",
                 "entries", "version", "dist", "counted", "wide", "math_dtype", "sparse_ok")

    def __init__(self, gi, group, positions, keys, device, dtype, backend, cache, counted=True):
        self.gi, self.group, self.positions = gi, group, positions
        self.index = None if positions == list(range(len(group["params"]))) else positions
        self.keys, self.device, self.dtype, self.counted = keys, device, dtype, counted
        self.params = keys
        self.dist = None
        self.wide = dtype in boundary.WIDE_DTYPES  # stepped by the `torch` backend
        self.math_dtype = boundary.math_dtype(dtype)
        self.sparse_ok = False
        self.backend, self.cache = backend, cache
        self.lists: dict = {}
        self.state_lists: tuple = ()
        self.copy_idx: list = []
        self.grads: list = []
        self.verified = None
        self.entries: list = []
        self.version = -1  # of optimizer._fo_state's entries when `entries` was read

    def where(self, i: int) -> str:
        return f"param {self.positions[i]} of param group {self.gi}"

    def describe(self, lst: str, i: int) -> str:
        """Names a tensor of the bucket in the boundary's messages."""
        if lst == "params":
            return self.where(i)
        if lst == "grads":
            return f"the gradient of {self.where(i)}"
        if lst in STATE_KEY:
            return f"optimizer.state[{self.where(i)}][{STATE_KEY[lst]!r}]"
        return f"{lst}[{i}] of {self.where(i)}"


class GroupPlan:
    __slots__ = ("params", "grad_types", "layout", "epoch", "buckets")

    def __init__(self, params, grads, layout, epoch, buckets):
        self.params = list(params)
        self.grad_types = list(map(type, grads))
        self.layout, self.epoch, self.buckets = layout, epoch, buckets

    def fits(self, params, grads, layout, epoch) -> bool:
        return (len(params) == len(self.params) and all(map(_is, params, self.params))
                and list(map(type, grads)) == self.grad_types and layout == self.layout
                and epoch == self.epoch)


class Pending:
    """State prepared by a step, written into ``optimizer.state`` only once every bucket of
    the step passed the checks: (param, key, tensor) writes and per-optimizer extras."""

    def __init__(self):
        self.writes: list = []
        self.extras: list = []

    def commit(self, opt) -> None:
        state = opt._fo_state
        _traced.mark_static(value for _, _, value in self.writes)
        for p, key, value in self.writes:
            entry = state.get(p)
            if entry is None:
                entry = state[p] = {}
                opt._fo_hidden.add(p)
                opt._fo_version += 1
            entry[key] = value
        for apply in self.extras:
            apply()


def prepare(opt) -> list[Bucket]:
    """The buckets of this step, every tensor checked and vouched for at the boundary; lazy
    state created.  Raises (changing nothing) on any bad param, gradient or state."""
    pending = Pending()
    buckets, new_plans = [], {}
    for gi, group in enumerate(opt.param_groups):
        params = group["params"]
        grads = list(map(_GRAD, params))
        layout = opt._layout(group)
        plan = opt._fo_plans.get(gi)
        if plan is None or not plan.fits(params, grads, layout, opt._fo_epoch) \
                or not all([_refresh(opt, b, grads) for b in plan.buckets]):
            plan = _build(opt, gi, group, grads, layout, pending)
            new_plans[gi] = plan
        buckets.extend(plan.buckets)
    pending.commit(opt)
    opt._fo_plans.update(new_plans)
    return buckets


def _refresh(opt, b: Bucket, grads) -> bool:
    """The bucket still holds: same state tensors, and the boundary's fingerprint matches."""
    try:
        g = grads if b.index is None else list(map(grads.__getitem__, b.index))
        if b.dist is not None:
            if not all(map(_is, _distributed.localize(b.keys), b.params)):
                return False
            g = b.dist.local_grads(b.keys, g, check=True)
            if g is None:
                return False
        if b.copy_idx:
            g = _copies(b, g)
        if b.version != opt._fo_version:
            b.entries = list(map(opt._fo_state.get, b.keys))
            b.version = opt._fo_version
        entries = b.entries
        for key, lst in b.state_lists:
            if not all(map(_is, map(_entry_get, entries, repeat(key)), lst)):
                return False
        if b.dist is not None:  # the local tensors of the states, taken again
            b.lists = {name: _distributed.localize(lst) for name, lst in b.dist.states.items()}
        vectors, scalars = opt._boundary_lists(b)
        b.verified = boundary.verify_update(b.cache, b.params, g, vectors, scalars,
                                            vouch=True, fingerprint_only=True, wide=b.wide)
    except Exception:  # anything unexpected: rebuild the plan, which checks in full
        return False
    b.grads = g
    return b.verified is not None


def _copies(b: Bucket, grads) -> list:
    """The gradients with those at ``copy_idx`` copied to their param's layout (a sparse
    one made dense)."""
    out = list(grads)
    for k in b.copy_idx:
        g, p = out[k], b.params[k]
        if type(g) not in boundary.PLAIN_TYPES or g.dtype != p.dtype or g.device != p.device \
                or g.shape != p.shape:
            raise ValueError("gradient changed")
        if g.layout == torch.sparse_coo and b.sparse_ok:
            g = _checks.sparse_values(g, b.where(k)).to_dense()
        elif g.layout != torch.strided:
            raise ValueError("gradient changed")
        boundary.check_storage(g, "gradient")  # the copy reads it (a freed storage: refused)
        copy = torch.empty_like(p)
        copy.copy_(g)
        out[k] = copy
    return out


def _build(opt, gi, group, grads, layout, pending) -> GroupPlan:
    """Check every param with a gradient, split into buckets, build and verify their lists."""
    name = type(opt).__name__
    params = group["params"]
    split: dict[tuple, list] = {}
    needs_copy = {}
    norm_group = opt._fo_norm_group_for(group)
    for j, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        where = f"param {j} of param group {gi}"
        _checks.step_param(p, where)
        needs_copy[j] = _checks.grad(g, p, where, name, opt._SPARSE_GRADS)
        counted = True if norm_group is None else norm_group.counted(p)
        if (p.device, p.dtype) not in opt._fo_backends:
            opt._backend_for(p.device, p.dtype, where)
        split.setdefault((p.device, p.dtype, counted), []).append(j)
    buckets = []
    old = opt._fo_plans.get(gi)
    old_caches = {(b.device, b.dtype, b.counted): b.cache for b in old.buckets} \
        if old is not None else {}
    for (device, dtype, counted), positions in split.items():
        keys = [params[j] for j in positions]
        b = Bucket(gi, group, positions, keys, device, dtype, opt._backend_for(device, dtype),
                   old_caches.get((device, dtype, counted), {}), counted)
        b.sparse_ok = opt._SPARSE_GRADS
        b.copy_idx = [k for k, j in enumerate(positions) if needs_copy[j]]
        opt._state_lists(b, pending)
        bucket_grads = [grads[j] for j in positions]
        if any(map(_distributed.is_dtensor, keys)):
            b.params = _distributed.localize(keys)
            b.dist = _distributed.BucketGrads(keys, bucket_grads)
            b.dist.states = b.lists
            b.lists = {name: _distributed.localize(lst) for name, lst in b.lists.items()}
            bucket_grads = b.dist.local_grads(keys, bucket_grads, check=False)
        b.grads = _copies(b, bucket_grads) if b.copy_idx else bucket_grads
        vectors, scalars = opt._boundary_lists(b)
        b.verified = boundary.verify_update(b.cache, b.params, b.grads, vectors, scalars,
                                            describe=b.describe, vouch=True, wide=b.wide)
        buckets.append(b)
    return GroupPlan(params, grads, layout, opt._fo_epoch, buckets)


def entry_of(opt, b: Bucket, i: int) -> dict:
    """``optimizer.state[p]`` of the bucket's param i (empty when there is none)."""
    entry = opt._fo_state.get(b.keys[i])
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise TypeError(f"optimizer.state[{b.where(i)}] must be a dict, got "
                        f"{type(entry).__name__}")
    return entry


def state_zeros(p):
    """A new moment / momentum buffer of param ``p``: zeros of its state dtype, its layout."""
    return torch.zeros_like(p, dtype=boundary.state_dtype(p.dtype))


def master_copy(p):
    """The fp32 master of a low-precision param, made from it (its layout kept)."""
    return p.detach().to(_F32, copy=True)


def vector_state(opt, b: Bucket, key: str, pending: Pending, make) -> list:
    """The list of ``optimizer.state[p][key]`` over the bucket, checked; a missing one is
    ``make(p)``, written at commit."""
    out = []
    for i, p in enumerate(b.keys):
        entry = entry_of(opt, b, i)
        value = _checks.state_tensor(entry.get(key), key, p, b.where(i))
        if value is None:
            value = make(p)
            pending.writes.append((p, key, value))
        out.append(value)
    return out


def step_state(opt, b: Bucket, pending: Pending) -> list:
    """The 0-dim fp32 step counters of the bucket (0 for a missing one; a number or another
    one-element tensor is converted and written back at commit)."""
    out = []
    for i, p in enumerate(b.keys):
        value = entry_of(opt, b, i).get("step")
        if value is None:
            value, converted = torch.zeros((), dtype=_F32, device=p.device), True
        else:
            value, converted = _checks.step_count(
                value, p, f"optimizer.state[{b.where(i)}]['step']")
        if converted:
            pending.writes.append((p, "step", value))
        out.append(value)
    return out
