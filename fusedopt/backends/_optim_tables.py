"""Pointer-table helpers shared by the compiled optimizer launchers (`cpu`, `cuda`).

For each bucket a pointer table -- a C++ object (csrc/bindings/optim_tables.h) holding the
addresses of the params, states, masters and step counters / flags, their element counts
and the chunk plan -- is built once and kept in the ``cache`` dict the optimizer owns; a
step passes only the gradient addresses and the scalars.

Every list goes through the kernel boundary first (``_optim_boundary``): the tensors are
verified (in full when their fingerprint changed) and their addresses come from there.  The
table is keyed by those addresses, the element counts, the dtype and the plan limits, so a
tensor replaced by another one, a ``p.data = ...`` or a state moved to new memory rebuilds
it; when nothing changed the key is the same tuple objects and the comparison costs nothing.
"""

from __future__ import annotations

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._ptr import dtype_code


def scalar(value, what, device) -> tuple[float, int]:
    """A hyper-parameter as (host value, address of its fp32 tensor or 0)."""
    value = boundary.scalar(value, what, device)
    if isinstance(value, torch.Tensor):
        return 0.0, value.data_ptr()
    return value, 0


def address_or_zero(tensor, what, device) -> int:
    tensor = boundary.scalar(tensor, what, device)
    return 0 if tensor is None else tensor.data_ptr()


def table(cache: dict, name: str, verified, dtype, limits, build):
    """The pointer table ``name`` of ``cache``, rebuilt when an address, a size, the dtype
    or the limits changed; ``build(numel)`` makes a new one."""
    key = (verified.ptr_key, verified.numels, dtype, limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, build(list(verified.numels)))
        cache[name] = entry
    return entry[1]


def norm(cache: dict, name: str, tensors, limits, make, device_type):
    """(norm table, gradient addresses) for the tensors of a norm, verified first."""
    numels, ptrs = boundary.verify_norm(cache, tensors, device_types=(device_type,))
    code = dtype_code(tensors[0].dtype)
    key = (numels, code, limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, make(list(numels), code, *limits))
        cache[name] = entry
    return entry[1], ptrs


def adam_step(ext, name, limits, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
              master_params, steps, cache, hyper, device_type, extra=()) -> int:
    """One Adam step through the cached ``ext.AdamTable`` ``name``; returns its status.
    ``extra``: the module's own trailing arguments (the stream on cuda)."""
    if hyper["amsgrad"] and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    v = boundary.verify_update(
        cache, params, grads,
        (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
         ("max_exp_avg_sqs", max_exp_avg_sqs), ("master_params", master_params)),
        (("steps", steps),), device_types=(device_type,))
    device = params[0].device
    t = table(cache, name, v, params[0].dtype, limits, lambda numel: ext.AdamTable(
        numel, dtype_code(params[0].dtype), *v.ptr_key[:3], *map(_optional, v.ptr_key[3:5]),
        v.ptr_key[5], *limits))
    return t.step(v.grad_ptrs, *scalar(hyper["lr"], "lr", device),
                  *scalar(hyper["beta1"], "beta1", device),
                  *scalar(hyper["beta2"], "beta2", device), float(hyper["eps"]),
                  float(hyper["weight_decay"]), bool(hyper["amsgrad"]), bool(hyper["maximize"]),
                  bool(hyper["decoupled"]), *_grad_scalars(hyper, device), *extra)


def sgd_step(ext, name, limits, params, grads, momentum_buffers, master_params, initialized,
             cache, hyper, device_type, extra=()) -> int:
    """One SGD step through the cached ``ext.SgdTable`` ``name``; returns its status."""
    if hyper["momentum"] != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    v = boundary.verify_update(
        cache, params, grads,
        (("momentum_buffers", momentum_buffers), ("master_params", master_params)),
        (("initialized", initialized),), device_types=(device_type,))
    device = params[0].device
    t = table(cache, name, v, params[0].dtype, limits, lambda numel: ext.SgdTable(
        numel, dtype_code(params[0].dtype), v.ptr_key[0], *map(_optional, v.ptr_key[1:3]),
        v.ptr_key[3], *limits))
    return t.step(v.grad_ptrs, *scalar(hyper["lr"], "lr", device), float(hyper["momentum"]),
                  float(hyper["dampening"]), float(hyper["weight_decay"]),
                  bool(hyper["nesterov"]), bool(hyper["maximize"]),
                  *_grad_scalars(hyper, device), *extra)


def _optional(ptrs):
    return None if ptrs is None else list(ptrs)


def _grad_scalars(hyper, device) -> tuple[int, int, int]:
    return tuple(address_or_zero(hyper[k], k, device) for k in ("inv_scale", "clip_coef", "skip"))
