"""Lean Adam entry point of the `cpu` backend (contract: docs/architecture.md, "Lean Adam").

The kernel (csrc/cpu/lean_adam.cpp) takes raw addresses through the LeanAdamTable of
csrc/bindings/lean_tables.h, built once per bucket and kept in the optimizer's ``cache``
(fusedopt/backends/_lean_tables.py, shared with the `cuda` backend).
"""

from __future__ import annotations

from fusedopt import _cpu
from fusedopt.backends import _lean_tables
from fusedopt.backends.cpu.optim import PLAN_LIMITS, _check

__all__ = ["lean_adam_step"]

OPS: frozenset[str] = frozenset({"lean_adam"})


def lean_adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
                   master_params, steps, streams, *, cache, **hyper):
    """One lean Adam/AdamW step over a bucket; see docs/architecture.md for the contract."""
    if not params:
        return
    _check(_lean_tables.lean_adam_step(_cpu, "cpu_lean_adam", PLAN_LIMITS, params, grads,
                                       exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                       exp_avg_sq_absmaxes, master_params, steps, streams, cache,
                                       "cpu", **hyper), "lean_adam_step")
