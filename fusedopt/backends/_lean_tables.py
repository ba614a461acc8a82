"""The lean Adam launcher shared by the compiled backends (`cpu`, `cuda`).

Every list goes through the kernel boundary first (``_optim_boundary.verify_update``, with
the lean dtypes of the moments and the absmax lists of 8-bit ones), as for the other
optimizer kernels.  A bucket's ``LeanAdamTable`` (csrc/bindings/lean_tables.h) holds the
verified addresses of its params, moments, absmax lists, masters and step counters, the
element counts, the random stream ids and the chunk plan; it is built once, kept in the
optimizer's ``cache`` dict and rebuilt when an address, a size, the dtypes, the stream ids
or the plan limits change.  A step passes the gradient addresses and the scalars.
"""

from __future__ import annotations

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._optim_tables import address_or_zero, scalar
from fusedopt.backends._ptr import dtype_code

QUANT_BLOCK = boundary.QUANT_BLOCK

# storage codes of the moments (params_lean.h LeanState) by the dtype of exp_avgs
STATE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def state_code(exp_avgs) -> int:
    dtype = exp_avgs[0].dtype if exp_avgs else torch.float32
    if dtype not in STATE_CODES:
        raise TypeError(f"exp_avgs[0] has dtype {dtype}; lean Adam moments are float32, "
                        f"bfloat16 or int8 codes")
    return STATE_CODES[dtype]


def boundary_lists(exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                   master_params, state: int) -> tuple:
    """The vector lists of a lean bucket in the boundary's form (name, list, spec)."""
    if state == STATE_CODES[torch.int8]:
        if exp_avg_absmaxes is None or exp_avg_sq_absmaxes is None:
            raise ValueError("8-bit moments need exp_avg_absmaxes and exp_avg_sq_absmaxes")
        moments = (("exp_avgs", exp_avgs, (torch.int8,)),
                   ("exp_avg_sqs", exp_avg_sqs, (torch.uint8,)),
                   ("exp_avg_absmaxes", exp_avg_absmaxes, boundary.BLOCKS),
                   ("exp_avg_sq_absmaxes", exp_avg_sq_absmaxes, boundary.BLOCKS))
    else:
        if exp_avg_absmaxes is not None or exp_avg_sq_absmaxes is not None:
            raise ValueError("absmax lists go with 8-bit moments only")
        dtype = (torch.bfloat16,) if state == STATE_CODES[torch.bfloat16] else (torch.float32,)
        moments = (("exp_avgs", exp_avgs, dtype), ("exp_avg_sqs", exp_avg_sqs, dtype),
                   ("exp_avg_absmaxes", None), ("exp_avg_sq_absmaxes", None))
    return moments + (("master_params", master_params),)


def streams_and_seed(streams, seed, n: int) -> tuple[tuple, int]:
    """The random stream ids (one per tensor) and the seed, as uint32 values."""
    if len(streams) != n:
        raise ValueError(f"streams has {len(streams)} ids, expected {n} (one per param)")
    out = tuple(int(s) for s in streams)
    if any(not 0 <= s < 2 ** 32 for s in out) or not 0 <= int(seed) < 2 ** 32:
        raise ValueError("seed and streams must be integers in [0, 2^32)")
    return out, int(seed)


def plan_limits(limits, state: int) -> tuple[int, int, int]:
    """The plan limits of a bucket: 8-bit states need chunks of whole 256-element blocks."""
    chunk, max_tensors, max_chunks = limits
    if state == STATE_CODES[torch.int8]:
        chunk = -(-chunk // QUANT_BLOCK) * QUANT_BLOCK
    return chunk, max_tensors, max_chunks


def lean_adam_step(ext, name, limits, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                   exp_avg_sq_absmaxes, master_params, steps, streams, cache, device_type, *,
                   lr, beta1, beta2, eps, weight_decay, maximize, decoupled,
                   stochastic_rounding, seed, inv_scale, clip_coef, skip, extra=()) -> int:
    """One lean Adam step through the cached ``ext.LeanAdamTable`` ``name``; its status."""
    state = state_code(exp_avgs)
    vectors = boundary_lists(exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                             master_params, state)
    v = boundary.verify_update(cache, params, grads, vectors, (("steps", steps),),
                               device_types=(device_type,))
    streams, seed = streams_and_seed(streams, seed, len(params))
    limits = plan_limits(limits, state)
    device = params[0].device
    key = (v.ptr_key, v.numels, params[0].dtype, state, streams, limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        ptrs = [None if p is None else list(p) for p in v.ptr_key]
        # ptr_key: params, exp_avgs, exp_avg_sqs, the two absmax lists, masters, steps
        table = ext.LeanAdamTable(list(v.numels), dtype_code(params[0].dtype), state, *ptrs,
                                  list(streams), *limits)
        entry = (key, table)
        cache[name] = entry
    return entry[1].step(v.grad_ptrs, *scalar(lr, "lr", device), *scalar(beta1, "beta1", device),
                         *scalar(beta2, "beta2", device), float(eps), float(weight_decay),
                         bool(maximize), bool(decoupled), bool(stochastic_rounding), seed,
                         *(address_or_zero(x, what, device) for x, what in
                           ((inv_scale, "inv_scale"), (clip_coef, "clip_coef"), (skip, "skip"))),
                         *extra)
