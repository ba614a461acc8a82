"""Optimizer entry points of the `cpu` backend (contracts: docs/architecture.md).

The kernels (csrc/cpu/adam.cpp, sgd.cpp, l2norm.cpp) take raw addresses. For each bucket a
pointer table -- a C++ object holding the addresses of the params, states, masters and
step counters / flags, their element counts and the chunk plan -- is built once and kept
in the ``cache`` dict the optimizer owns; a step passes only the gradient addresses and
the scalars.

Detecting a changed storage: the table is keyed by the addresses (``data_ptr()``) of every
tensor it holds and the element counts of the params, compared at each step (about 0.1 us
per tensor and list). A tensor replaced by another one, a ``p.data = ...`` or a state
tensor moved to new memory changes the key and rebuilds the table.

Tensor hyper-parameters (``lr``, ``beta1``, ``beta2``) and ``inv_scale`` / ``clip_coef`` /
``skip`` are passed as the addresses of their 0-dim fp32 tensors and read by the kernel
when it runs: on CPU tensors that is a plain memory load, not a device synchronisation.
"""

from __future__ import annotations

from itertools import chain

import torch

from fusedopt import _cpu
from fusedopt.backends._ptr import dtype_code

__all__ = ["multi_tensor_norm", "adam_step", "sgd_step"]

# ops implemented by this module
OPS: frozenset[str] = frozenset({"adam", "sgd"})

# (chunk_size, max_tensors, max_chunks) of the chunk plans: the defaults of
# csrc/include/fusedopt/multi_tensor.h. Tests shrink them to force many chunks and launches.
PLAN_LIMITS: tuple[int, int, int] = (_cpu.DEFAULT_CHUNK_SIZE, _cpu.DEFAULT_MAX_TENSORS,
                                     _cpu.DEFAULT_MAX_CHUNKS)

_F32 = torch.float32
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def _addresses(tensors) -> list[int]:
    return list(map(_data_ptr, tensors))


def _scalar(value) -> tuple[float, int]:
    """A hyper-parameter as (host value, address of its 0-dim fp32 tensor or 0)."""
    if torch.is_tensor(value):
        return 0.0, value.data_ptr()
    return float(value), 0


def _address_or_zero(tensor) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu {what} failed: {_cpu.optim_status_string(status)} "
                           f"(status {status})")


def _table(cache: dict, name: str, params, lists, build):
    """The pointer table ``name`` of ``cache``, rebuilt when an address or a size changed.

    ``lists`` are the tensor lists held by the table (None for an absent one)."""
    key = (tuple(map(_data_ptr, chain.from_iterable(lst for lst in lists if lst is not None))),
           tuple(None if lst is None else len(lst) for lst in lists),
           tuple(map(_numel, params)), params[0].dtype, PLAN_LIMITS)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        entry = (key, build(list(key[2])))
        cache[name] = entry
    return entry[1]


def multi_tensor_norm(tensors, inv_scale, cache):
    """``[Σ (g·inv_scale)², nonfinite]`` as an fp32 (2,) CPU tensor (sum in double)."""
    out = torch.empty(2, dtype=_F32)
    if not tensors:
        return out.zero_()
    code = dtype_code(tensors[0].dtype)
    key = (tuple(map(_numel, tensors)), code, PLAN_LIMITS)
    entry = cache.get("cpu_norm")
    if entry is None or entry[0] != key:
        entry = (key, _cpu.NormTable(list(key[0]), code, *PLAN_LIMITS))
        cache["cpu_norm"] = entry
    _check(entry[1].norm(_addresses(tensors), _address_or_zero(inv_scale), out.data_ptr()),
           "multi_tensor_norm")
    return out


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
              lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
              inv_scale, clip_coef, skip, cache):
    """One Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    code = dtype_code(params[0].dtype)
    lists = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps)
    table = _table(cache, "cpu_adam", params, lists, lambda numel: _cpu.AdamTable(
        numel, code, _addresses(params), _addresses(exp_avgs), _addresses(exp_avg_sqs),
        None if max_exp_avg_sqs is None else _addresses(max_exp_avg_sqs),
        None if master_params is None else _addresses(master_params), _addresses(steps),
        *PLAN_LIMITS))
    lr_value, lr_ptr = _scalar(lr)
    beta1_value, beta1_ptr = _scalar(beta1)
    beta2_value, beta2_ptr = _scalar(beta2)
    status = table.step(_addresses(grads), lr_value, lr_ptr, beta1_value, beta1_ptr,
                        beta2_value, beta2_ptr, float(eps), float(weight_decay), bool(amsgrad),
                        bool(maximize), bool(decoupled), _address_or_zero(inv_scale),
                        _address_or_zero(clip_coef), _address_or_zero(skip))
    _check(status, "adam_step")


def sgd_step(params, grads, momentum_buffers, master_params, initialized, *, lr, momentum,
             dampening, weight_decay, nesterov, maximize, inv_scale, clip_coef, skip, cache):
    """One SGD step over a bucket (torch.optim.SGD semantics); see docs/architecture.md."""
    if not params:
        return
    code = dtype_code(params[0].dtype)
    lists = (params, momentum_buffers, master_params, initialized)
    table = _table(cache, "cpu_sgd", params, lists, lambda numel: _cpu.SgdTable(
        numel, code, _addresses(params),
        None if momentum_buffers is None else _addresses(momentum_buffers),
        None if master_params is None else _addresses(master_params), _addresses(initialized),
        *PLAN_LIMITS))
    lr_value, lr_ptr = _scalar(lr)
    status = table.step(_addresses(grads), lr_value, lr_ptr, float(momentum), float(dampening),
                        float(weight_decay), bool(nesterov), bool(maximize),
                        _address_or_zero(inv_scale), _address_or_zero(clip_coef),
                        _address_or_zero(skip))
    _check(status, "sgd_step")
