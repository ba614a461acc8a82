"""Optimizer entry points of the `cpu` backend (contracts: docs/architecture.md).

The kernels (csrc/cpu/adam.cpp, sgd.cpp, l2norm.cpp) take raw addresses through the
pointer tables of csrc/bindings/optim_tables.h, built once per bucket and kept in the
``cache`` dict the optimizer owns (fusedopt/backends/_optim_tables.py, shared with the
`cuda` backend); a step passes only the gradient addresses and the scalars.  Every tensor
is verified first by the kernel boundary (fusedopt/backends/_optim_boundary.py).

Tensor hyper-parameters (``lr``, ``beta1``, ``beta2``) and ``inv_scale`` / ``clip_coef`` /
``skip`` are passed as the addresses of their 0-dim fp32 tensors and read by the kernel
when it runs: on CPU tensors that is a plain memory load, not a device synchronisation.
"""

from __future__ import annotations

import torch

from fusedopt import _cpu
from fusedopt.backends import _optim_tables as tables

__all__ = ["multi_tensor_norm", "adam_step", "sgd_step"]

# ops implemented by this module
OPS: frozenset[str] = frozenset({"adam", "sgd"})

# (chunk_size, max_tensors, max_chunks) of the chunk plans: the defaults of
# csrc/include/fusedopt/multi_tensor.h. Tests shrink them to force many chunks and launches.
PLAN_LIMITS: tuple[int, int, int] = (_cpu.DEFAULT_CHUNK_SIZE, _cpu.DEFAULT_MAX_TENSORS,
                                     _cpu.DEFAULT_MAX_CHUNKS)

_F32 = torch.float32


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu {what} failed: {_cpu.optim_status_string(status)} "
                           f"(status {status})")


def multi_tensor_norm(tensors, inv_scale, cache):
    """``[Σ (g·inv_scale)², nonfinite]`` as an fp32 (2,) CPU tensor (sum in double)."""
    out = torch.empty(2, dtype=_F32)
    if not tensors:
        return out.zero_()
    table, ptrs = tables.norm(cache, "cpu_norm", tensors, PLAN_LIMITS, _cpu.NormTable, "cpu")
    _check(table.norm(ptrs, tables.address_or_zero(inv_scale, "inv_scale", tensors[0].device),
                      out.data_ptr()), "multi_tensor_norm")
    return out


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
              cache, **hyper):
    """One Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    _check(tables.adam_step(_cpu, "cpu_adam", PLAN_LIMITS, params, grads, exp_avgs, exp_avg_sqs,
                            max_exp_avg_sqs, master_params, steps, cache, hyper, "cpu"),
           "adam_step")


def sgd_step(params, grads, momentum_buffers, master_params, initialized, *, cache, **hyper):
    """One SGD step over a bucket (torch.optim.SGD semantics); see docs/architecture.md."""
    if not params:
        return
    _check(tables.sgd_step(_cpu, "cpu_sgd", PLAN_LIMITS, params, grads, momentum_buffers,
                           master_params, initialized, cache, hyper, "cpu"), "sgd_step")
