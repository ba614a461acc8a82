"""Vocab-parallel cross-entropy entry points of the `cuda` backend (contracts:
docs/architecture.md, "Vocab-parallel cross-entropy"): the launcher shared with the `cpu`
backend (fusedopt/backends/_vocab_launch.py: every tensor checked, then turned into an
address) over the kernels of csrc/cuda/vocab_parallel.cu (module ``fusedopt._cuda``),
enqueued on the current torch stream of the logits' device with that device current.
Nothing here reads a device value or synchronises; a non-zero ``cudaError_t`` becomes a
RuntimeError naming the kernel and the error.
"""

from __future__ import annotations

import contextlib

import torch

from fusedopt import _cuda
from fusedopt.backends._vocab_launch import VocabParallelLauncher
from fusedopt.backends.cuda._errors import check

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS: frozenset[str] = frozenset({"vocab_parallel_cross_entropy"})


def _stream(tensor, _option) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _on_device_of(logits):
    """Makes the logits' device current; nothing for logits that are no CUDA tensor (the
    launcher then refuses them with its own error)."""
    if isinstance(logits, torch.Tensor) and logits.device.type == "cuda":
        return torch.cuda.device(logits.device)
    return contextlib.nullcontext()


_launch = VocabParallelLauncher(_cuda, "cuda", "stream", _stream, check)


def vocab_parallel_row_stats(logits, target, weight, **kw):
    """(N, 4) fp32 row statistics of this rank's columns."""
    with _on_device_of(logits):
        return _launch.row_stats(logits, target, weight, **kw)


def vocab_parallel_grad(logits, target, weight, coefs, **kw):
    """The gradient of this rank's columns from the combined coefficients (N, 5)."""
    with _on_device_of(logits):
        return _launch.grad(logits, target, weight, coefs, **kw)
