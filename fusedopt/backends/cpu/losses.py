"""Loss entry points of the `cpu` backend (contracts: docs/architecture.md "Losses").

The launcher is shared with the `cuda` backend (fusedopt/backends/_loss_launch.py); the
C++ kernels (csrc/cpu/cross_entropy.cpp, focal.cpp, module ``fusedopt._cpu``) run without
the GIL on OpenMP threads.  The kernels read ``scales`` themselves, so nothing here reads a
tensor's values.

Every entry point takes one extra keyword, ``num_threads=None``: the OpenMP thread count
of the call (default: ``torch.get_num_threads()``).  Results do not depend on it (each row,
or each fixed span of elements, is computed by one thread in a fixed order); tests use it
to check exactly that.  Callers of the contract never pass it.
"""

from __future__ import annotations

import torch

from fusedopt import _cpu
from fusedopt.backends._loss_launch import INDEX_CODES, LossLauncher  # noqa: F401

__all__ = ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd", "scale_grad_"]

OPS: frozenset[str] = frozenset({"cross_entropy", "focal_loss", "sigmoid_focal_loss"})

# Elements per partial sum of the reduced sigmoid focal loss (kSigmoidFocalSpan).
SIGMOID_FOCAL_SPAN = _cpu.SIGMOID_FOCAL_SPAN

_STATUS = {1: "unsupported dtype code", 2: "unsupported target index type", 3: "invalid shape"}

# Fresh gradient buffers from this size up get transparent huge pages (fewer page faults
# on their first write; see csrc/cpu/loss_buffers.cpp).
HUGE_PAGE_MIN_BYTES = 8 << 20


def _threads(_tensor, num_threads):
    return int(num_threads) if num_threads else torch.get_num_threads()


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu kernel {name} failed: "
                           f"{_STATUS.get(status, 'error')} (status {status})")


def _new_grad(shape, dtype, device=None) -> torch.Tensor:
    grad = torch.empty(shape, dtype=dtype)
    nbytes = grad.numel() * grad.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        _cpu.advise_huge_pages(grad.data_ptr(), nbytes)
    return grad


_launch = LossLauncher(_cpu, _threads, _check, _new_grad, device_type="cpu")


def cross_entropy_fwd(logits, target, weight, scales, *, num_threads=None, **kw):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    return _launch.cross_entropy_fwd(logits, target, weight, scales, option=num_threads, **kw)


def focal_loss_fwd(logits, target, alpha, scales, *, num_threads=None, **kw):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    return _launch.focal_loss_fwd(logits, target, alpha, scales, option=num_threads, **kw)


def sigmoid_focal_loss_fwd(logits, target, scales, *, num_threads=None, **kw):
    """(loss, grad): per-element loss, or with `reduce` fp32 partial sums of fixed spans."""
    return _launch.sigmoid_focal_loss_fwd(logits, target, scales, option=num_threads, **kw)


def scale_grad_(grad, scale, *, num_threads=None):
    """grad *= scale in place (fp32 product, one rounding); no memory pass when scale == 1."""
    _launch.scale_grad_(grad, scale, option=num_threads)
