"""Optimizer entry points of the `cuda` backend (contracts: docs/architecture.md).

The kernels (csrc/cuda/adam.cu, sgd.cu, l2norm.cu) take raw addresses through the pointer
tables of csrc/bindings/optim_tables.h, built once per bucket and kept in the ``cache`` dict
the optimizer owns (fusedopt/backends/_optim_tables.py, shared with the `cpu` backend). A
step passes the gradient addresses, the scalars and the current torch stream; tensor
hyper-parameters and ``inv_scale`` / ``clip_coef`` / ``skip`` go as the addresses of their
0-dim fp32 device tensors, read by the kernels: no host read, no synchronisation, so a step
can be captured in a CUDA graph once its tables exist (after one step).  Every tensor is
verified first by the kernel boundary (fusedopt/backends/_optim_boundary.py).
The norm's per-chunk partials live in a float64 scratch tensor kept with its table.
"""

from __future__ import annotations

import torch

from fusedopt import _cuda
from fusedopt.backends import _optim_tables as tables
from fusedopt.backends.cuda._errors import check

__all__ = ["multi_tensor_norm", "adam_step", "sgd_step"]

OPS: frozenset[str] = frozenset({"adam", "sgd"})

# (chunk_size, max_tensors, max_chunks): the kernel tables' capacity
# (csrc/cuda/multi_tensor_apply.cuh). Tests shrink them to force many chunks and launches.
PLAN_LIMITS: tuple[int, int, int] = (_cuda.DEFAULT_CHUNK_SIZE, _cuda.MAX_TENSORS,
                                     _cuda.MAX_CHUNKS)

_F32 = torch.float32


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def multi_tensor_norm(tensors, inv_scale, cache):
    """``[Σ (g·inv_scale)², nonfinite]`` as an fp32 (2,) device tensor (sum in double)."""
    if not tensors:
        return torch.zeros(2, dtype=_F32)
    table, ptrs = tables.norm(cache, "cuda_norm", tensors, PLAN_LIMITS, _cuda.NormTable, "cuda")
    device = tensors[0].device
    out = torch.empty(2, dtype=_F32, device=device)
    with torch.cuda.device(device):
        scratch = cache.get("cuda_norm_scratch")
        if scratch is None or scratch.numel() < table.num_chunks or scratch.device != device:
            scratch = torch.empty(max(table.num_chunks, 1), dtype=torch.float64, device=device)
            cache["cuda_norm_scratch"] = scratch
        check(table.norm(ptrs, tables.address_or_zero(inv_scale, "inv_scale", device),
                         out.data_ptr(), scratch.data_ptr(), _stream(device)), "multi_tensor_norm")
    return out


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *,
              cache, **hyper):
    """One Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    with torch.cuda.device(params[0].device):
        check(tables.adam_step(_cuda, "cuda_adam", PLAN_LIMITS, params, grads, exp_avgs,
                               exp_avg_sqs, max_exp_avg_sqs, master_params, steps, cache, hyper,
                               "cuda", extra=(_stream(params[0].device),)), "adam_step")


def sgd_step(params, grads, momentum_buffers, master_params, initialized, *, cache, **hyper):
    """One SGD step over a bucket (torch.optim.SGD semantics); see docs/architecture.md."""
    if not params:
        return
    with torch.cuda.device(params[0].device):
        check(tables.sgd_step(_cuda, "cuda_sgd", PLAN_LIMITS, params, grads, momentum_buffers,
                              master_params, initialized, cache, hyper, "cuda",
                              extra=(_stream(params[0].device),)), "sgd_step")
