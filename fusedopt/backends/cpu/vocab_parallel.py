"""Vocab-parallel cross-entropy entry points of the `cpu` backend (contracts:
docs/architecture.md, "Vocab-parallel cross-entropy"): the launcher shared with the `cuda`
backend (fusedopt/backends/_vocab_launch.py: every tensor checked, then turned into an
address) over the C++ kernels of csrc/cpu/vocab_parallel.cpp, which run without the GIL on
OpenMP threads.  Nothing here reads a tensor's values.

Both entry points take ``num_threads=None`` (default ``torch.get_num_threads()``), like the
other cpu loss entry points; results do not depend on it.
"""

from __future__ import annotations

import torch

from fusedopt import _cpu
from fusedopt.backends._vocab_launch import VocabParallelLauncher

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS: frozenset[str] = frozenset({"vocab_parallel_cross_entropy"})

_STATUS = {1: "unsupported dtype code", 2: "unsupported target index type", 3: "invalid shape",
           4: "missing tensor address"}


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu kernel {name} failed: "
                           f"{_STATUS.get(status, 'error')} (status {status})")


def _threads(_tensor, num_threads) -> int:
    return int(num_threads) if num_threads else torch.get_num_threads()


_launch = VocabParallelLauncher(_cpu, "cpu", "num_threads", _threads, _check)


def vocab_parallel_row_stats(logits, target, weight, *, num_threads=None, **kw):
    """(N, 4) fp32 row statistics of this rank's columns."""
    return _launch.row_stats(logits, target, weight, option=num_threads, **kw)


def vocab_parallel_grad(logits, target, weight, coefs, *, num_threads=None, **kw):
    """The gradient of this rank's columns from the combined coefficients (N, 5)."""
    return _launch.grad(logits, target, weight, coefs, option=num_threads, **kw)
