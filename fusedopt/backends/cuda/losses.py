"""Loss entry points of the `cuda` backend (contracts: docs/architecture.md "Losses").

The launcher is shared with the `cpu` backend (fusedopt/backends/_loss_launch.py); the
kernels (csrc/cuda/cross_entropy.cu, focal.cu, module ``fusedopt._cuda``) are enqueued on
the current torch stream of the tensors' device, with that device current. They read
``scales`` themselves: nothing here reads a device value or synchronises. A non-zero
``cudaError_t`` becomes a RuntimeError naming the kernel and the error.
"""

from __future__ import annotations

import torch

from fusedopt import _cuda
from fusedopt.backends._loss_launch import LossLauncher
from fusedopt.backends.cuda._errors import check

__all__ = ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd", "scale_grad_"]

OPS: frozenset[str] = frozenset({"cross_entropy", "focal_loss", "sigmoid_focal_loss"})

SIGMOID_FOCAL_SPAN = _cuda.SIGMOID_FOCAL_SPAN


def _stream(tensor, _option) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


_launch = LossLauncher(_cuda, _stream, check, device_type="cuda")


def cross_entropy_fwd(logits, target, weight, scales, **kw):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    with torch.cuda.device(logits.device):
        return _launch.cross_entropy_fwd(logits, target, weight, scales, **kw)


def focal_loss_fwd(logits, target, alpha, scales, **kw):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    with torch.cuda.device(logits.device):
        return _launch.focal_loss_fwd(logits, target, alpha, scales, **kw)


def sigmoid_focal_loss_fwd(logits, target, scales, **kw):
    """(loss, grad): per-element loss, or with `reduce` fp32 partial sums of fixed spans."""
    with torch.cuda.device(logits.device):
        return _launch.sigmoid_focal_loss_fwd(logits, target, scales, **kw)


def scale_grad_(grad, scale):
    """grad *= scale in place (fp32 product, one rounding); no memory pass when scale == 1."""
    with torch.cuda.device(grad.device):
        _launch.scale_grad_(grad, scale)
