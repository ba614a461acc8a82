"""The lean Adam launcher shared by the compiled backends (`cpu`, `cuda`).

A bucket's ``LeanAdamTable`` (csrc/bindings/lean_tables.h) holds the addresses of its
params, moments, absmax lists, masters and step counters, the element counts, the random
stream ids and the chunk plan; it is built once and kept in the optimizer's ``cache`` dict,
keyed like the other pointer tables (fusedopt/backends/_optim_tables.py) by every address,
the sizes, the dtypes, the stream ids and the plan limits, so any change of storage
rebuilds it.  A step passes the gradient addresses and the scalars.
"""

from __future__ import annotations

from itertools import chain

import torch

from fusedopt.backends._optim_tables import address_or_zero, addresses, optional_addresses, scalar
from fusedopt.backends._ptr import dtype_code

QUANT_BLOCK = 256

# storage codes of the moments (params_lean.h LeanState)
STATE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def state_code(dtype: torch.dtype) -> int:
    try:
        return STATE_CODES[dtype]
    except KeyError:
        raise TypeError(f"lean Adam moments are float32, bfloat16 or int8 codes, not {dtype}") from None


def plan_limits(limits, state: int) -> tuple[int, int, int]:
    """The plan limits of a bucket: 8-bit states need chunks of whole 256-element blocks."""
    chunk, max_tensors, max_chunks = limits
    if state == STATE_CODES[torch.int8]:
        chunk = -(-chunk // QUANT_BLOCK) * QUANT_BLOCK
    return chunk, max_tensors, max_chunks


def lean_adam_step(ext, name, limits, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                   exp_avg_sq_absmaxes, master_params, steps, streams, cache, *, lr, beta1,
                   beta2, eps, weight_decay, maximize, decoupled, stochastic_rounding, seed,
                   inv_scale, clip_coef, skip, extra=()) -> int:
    """One lean Adam step through the cached ``ext.LeanAdamTable`` ``name``; its status."""
    state = state_code(exp_avgs[0].dtype)
    limits = plan_limits(limits, state)
    lists = (params, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes, master_params,
             steps)
    key = (tuple(map(torch.Tensor.data_ptr, chain.from_iterable(x for x in lists if x is not None))),
           tuple(None if x is None else len(x) for x in lists),
           tuple(map(torch.Tensor.numel, params)), params[0].dtype, state, tuple(streams), limits)
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        table = ext.LeanAdamTable(
            list(key[2]), dtype_code(params[0].dtype), state, addresses(params),
            addresses(exp_avgs), addresses(exp_avg_sqs), optional_addresses(exp_avg_absmaxes),
            optional_addresses(exp_avg_sq_absmaxes), optional_addresses(master_params),
            addresses(steps), list(streams), *limits)
        entry = (key, table)
        cache[name] = entry
    return entry[1].step(addresses(grads), *scalar(lr), *scalar(beta1), *scalar(beta2),
                         float(eps), float(weight_decay), bool(maximize), bool(decoupled),
                         bool(stochastic_rounding), int(seed), address_or_zero(inv_scale),
                         address_or_zero(clip_coef), address_or_zero(skip), *extra)
