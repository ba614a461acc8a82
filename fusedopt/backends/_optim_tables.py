"""Pointer-table helpers shared by the compiled optimizer launchers (`cpu`, `cuda`).

For each bucket a pointer table -- a C++ object (csrc/bindings/optim_tables.h) holding the
addresses of the params, states, masters and step counters / flags, their element counts
and the chunk plan -- is built once and kept in the ``cache`` dict the optimizer owns; a
step passes only the gradient addresses and the scalars.

Detecting a changed storage: the table is keyed by the addresses (``data_ptr()``) of every
tensor it holds, the element counts of the params, their dtype and the plan limits,
compared at each step (about 0.1 us per tensor and list). A tensor replaced by another one,
a ``p.data = ...`` or a state tensor moved to new memory changes the key and rebuilds it.
"""

from __future__ import annotations

from itertools import chain

import torch

from fusedopt.backends._ptr import dtype_code

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def addresses(tensors) -> list[int]:
    return list(map(_data_ptr, tensors))


def optional_addresses(tensors) -> list[int] | None:
    return None if tensors is None else addresses(tensors)


def scalar(value) -> tuple[float, int]:
    """A hyper-parameter as (host value, address of its 0-dim fp32 tensor or 0)."""
    if torch.is_tensor(value):
        return 0.0, value.data_ptr()
    return float(value), 0


def address_or_zero(tensor) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def table(cache: dict, name: str, params, lists, limits, build):
    """The pointer table ``name`` of ``cache``, rebuilt when an address or a size changed.

    ``lists`` are the tensor lists held by the table (None for an absent one);
    ``build(numel)`` makes a new one."""
    key = (tuple(map(_data_ptr, chain.from_iterable(lst for lst in lists if lst is not None))),
           tuple(None if lst is None else len(lst) for lst in lists),
           tuple(map(_numel, params)), params[0].dtype, limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, build(list(key[2])))
        cache[name] = entry
    return entry[1]


def norm_table(cache: dict, name: str, tensors, code: int, limits, make):
    """The norm table of ``cache`` for these tensor sizes, dtype code and limits."""
    key = (tuple(map(_numel, tensors)), code, limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, make(list(key[0]), code, *limits))
        cache[name] = entry
    return entry[1]


def adam_args(grads, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              inv_scale, clip_coef, skip) -> tuple:
    """The positional arguments of AdamTable.step (before the backend's own ones)."""
    return (addresses(grads), *scalar(lr), *scalar(beta1), *scalar(beta2), float(eps),
            float(weight_decay), bool(amsgrad), bool(maximize), bool(decoupled),
            address_or_zero(inv_scale), address_or_zero(clip_coef), address_or_zero(skip))


def sgd_args(grads, *, lr, momentum, dampening, weight_decay, nesterov, maximize, inv_scale,
             clip_coef, skip) -> tuple:
    """The positional arguments of SgdTable.step (before the backend's own ones)."""
    return (addresses(grads), *scalar(lr), float(momentum), float(dampening),
            float(weight_decay), bool(nesterov), bool(maximize), address_or_zero(inv_scale),
            address_or_zero(clip_coef), address_or_zero(skip))


def adam_step(ext, name, limits, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
              master_params, steps, cache, hyper, extra=()) -> int:
    """One Adam step through the cached ``ext.AdamTable`` ``name``; returns its status.
    ``extra``: the module's own trailing arguments (the stream on cuda)."""
    lists = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps)
    t = table(cache, name, params, lists, limits, lambda numel: ext.AdamTable(
        numel, dtype_code(params[0].dtype), *map(addresses, (params, exp_avgs, exp_avg_sqs)),
        optional_addresses(max_exp_avg_sqs), optional_addresses(master_params),
        addresses(steps), *limits))
    return t.step(*adam_args(grads, **hyper), *extra)


def sgd_step(ext, name, limits, params, grads, momentum_buffers, master_params, initialized,
             cache, hyper, extra=()) -> int:
    """One SGD step through the cached ``ext.SgdTable`` ``name``; returns its status."""
    lists = (params, momentum_buffers, master_params, initialized)
    t = table(cache, name, params, lists, limits, lambda numel: ext.SgdTable(
        numel, dtype_code(params[0].dtype), addresses(params),
        optional_addresses(momentum_buffers), optional_addresses(master_params),
        addresses(initialized), *limits))
    return t.step(*sgd_args(grads, **hyper), *extra)
