"""Softmax cross-entropy as an autograd Function over torch.library custom ops.

``fusedopt::cross_entropy_fwd`` runs the backend's fused forward once and returns the fp32
row losses and the gradient (in the logits' dtype); ``fusedopt::cross_entropy_fwd_inplace``
writes the gradient into the logits' storage instead (``inplace_backward=True``).  Both
have fake implementations, so ``torch.compile(fullgraph=True)`` traces through them.  The
backend is chosen inside the op at run time from the name passed as a string ("" = the
default for the device, honouring ``FUSEDOPT_BACKEND``).

``CrossEntropyFunction`` keeps the gradient from forward; backward only rescales it, in
place, by grad_output (a scalar, or one value per row for reduction='none').  ``cross_entropy``
below does the layout work ((C,) and (N, C, d1..dk) inputs to (M, C) rows), computes the
scales on the device and the final reduction; arguments are validated by
fusedopt.functional before it is called.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedopt.ops import _common, _dtensor

_F32 = torch.float32


def _run(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
         soft_target, need_grad, inplace, backend):
    impl = _common.backend_module("cross_entropy", logits.device, backend)
    if not soft_target:
        _common.check_class_targets(target, logits.shape[1], ignore_index)
    if logits.shape[0] == 0:
        return logits.new_empty(0, dtype=_F32), None
    return impl.cross_entropy_fwd(
        logits, target, weight, scales, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        soft_target=soft_target, inplace=inplace, need_grad=need_grad)


@torch.library.custom_op("fusedopt::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: Optional[float], soft_target: bool, need_grad: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(row_loss fp32 (N,), grad (N, C) in the logits' dtype, or (0,) without need_grad)."""
    row_loss, grad = _run(logits, target, weight, scales, ignore_index, label_smoothing,
                          z_loss, softcap, soft_target, need_grad, False, backend)
    if grad is None:
        grad = logits.new_empty(0) if not need_grad else logits.new_empty(logits.shape)
    return row_loss, grad.contiguous()


@cross_entropy_fwd.register_fake
def _(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
      soft_target, need_grad, backend):
    row_loss = logits.new_empty(logits.shape[0], dtype=_F32)
    return row_loss, logits.new_empty(logits.shape if need_grad else (0,))


@torch.library.custom_op("fusedopt::cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                              scales: Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, softcap: Optional[float], soft_target: bool,
                              backend: str) -> Tensor:
    """row_loss fp32 (N,); the gradient overwrites `logits`."""
    row_loss, _ = _run(logits, target, weight, scales, ignore_index, label_smoothing, z_loss,
                       softcap, soft_target, True, True, backend)
    return row_loss


@cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
      soft_target, backend):
    return logits.new_empty(logits.shape[0], dtype=_F32)


class CrossEntropyFunction(torch.autograd.Function):
    """(M, C) logits -> fp32 row losses ('none') or their sum; gradient stored in forward."""

    @staticmethod
    def forward(ctx, logits, target, weight, scales, ignore_index, label_smoothing, z_loss,
                softcap, soft_target, reduction, need_grad, inplace, backend):
        if need_grad and inplace:
            row_loss = torch.ops.fusedopt.cross_entropy_fwd_inplace(
                logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
                soft_target, backend)
            grad = logits
        else:
            row_loss, grad = torch.ops.fusedopt.cross_entropy_fwd(
                logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
                soft_target, need_grad, backend)
        _common.keep_grad(ctx, grad if need_grad else None, reduction == "none",
                          "cross_entropy", backend)
        return row_loss if ctx.per_row else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 12


@_dtensor.dtensor_aware("class")
def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, inplace_backward, backend):
    """The loss for validated arguments (see fusedopt.functional.cross_entropy)."""
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    soft_target = target.is_floating_point()
    logits = _common.as_rows(_common.to_rows(input))
    if soft_target:
        target_rows = _common.to_rows(target).to(input.dtype).contiguous()
    else:
        target_rows = target.reshape(-1).contiguous()
    weight32 = weight.to(_F32).contiguous() if weight is not None else None
    n_rows = logits.shape[0]

    denominator = None
    if reduction == "mean":
        if soft_target:
            denominator = torch.full((), float(n_rows), dtype=_F32, device=input.device)
            scales = _common.mean_scales(denominator, denominator)
        else:
            denominator, n_valid = _common.class_mean_denominators(
                target_rows, weight32, ignore_index, n_classes)
            scales = _common.mean_scales(denominator, n_valid)
    else:
        scales = _common.unit_scales(input.device)

    need_grad = input.requires_grad and torch.is_grad_enabled()
    out = _dtensor.rows_function(logits, CrossEntropyFunction).apply(
        logits, target_rows, weight32, scales, ignore_index, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), soft_target, reduction,
        need_grad, bool(inplace_backward), backend or "")
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
        return out.reshape(shape).to(input.dtype)
    if denominator is not None:
        out = _common.nan_if_zero(out, denominator)
    return out.to(input.dtype)
