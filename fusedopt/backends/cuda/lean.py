"""Lean Adam entry point of the `cuda` backend (contract: docs/architecture.md, "Lean Adam").

The kernel (csrc/cuda/lean_adam.cu) takes raw device addresses through the LeanAdamTable of
csrc/bindings/lean_tables.h, built once per bucket and kept in the optimizer's ``cache``
(fusedopt/backends/_lean_tables.py, shared with the `cpu` backend); a step passes the
gradient addresses, the scalars and the current torch stream, and reads no device value on
the host.
"""

from __future__ import annotations

import torch

from fusedopt import _cuda
from fusedopt.backends import _lean_tables
from fusedopt.backends.cuda._errors import check
from fusedopt.backends.cuda.optim import PLAN_LIMITS

__all__ = ["lean_adam_step"]

OPS: frozenset[str] = frozenset({"lean_adam"})


def lean_adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                   master_params, steps, streams, *, cache, **hyper):
    """One lean Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    device = params[0].device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        check(_lean_tables.lean_adam_step(_cuda, "cuda_lean_adam", PLAN_LIMITS, params, grads,
                                          exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                          exp_avg_sq_absmaxes, master_params, steps, streams,
                                          cache, "cuda", extra=(stream,), **hyper),
              "lean_adam_step")
