"""Softmax cross-entropy as an autograd Function over torch.library custom ops.

``fusedopt::cross_entropy_fwd`` runs the backend's fused forward once and returns the row
losses (fp32; float64 for float64 logits) and the gradient (in the logits' dtype);
``fusedopt::cross_entropy_fwd_inplace`` writes the gradient into the logits' storage
instead (``inplace_backward=True``).  Both have fake implementations, so
``torch.compile(fullgraph=True)`` traces through them.  The backend is chosen inside the op
at run time from the name passed as a string ("" = the default for the device, honouring
``FUSEDOPT_BACKEND``; float64 logits: the `torch` backend).

``CrossEntropyFunction`` keeps the gradient from forward; backward only rescales it, in
place, by grad_output (a scalar, or one value per row for reduction='none'); a backward
that keeps the graph or must be differentiable is handled by ``_common.rescale``.
``cross_entropy`` below does the layout work ((C,) and (N, C, d1..dk) inputs to (M, C)
rows), computes the scales on the device and the final reduction, and forms the loss from
differentiable torch ops (``_formulas``) where the fused kernel cannot serve (torch.func,
a target or weight that requires grad); arguments are validated by fusedopt.functional
before it is called.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedopt.ops import _common, _dtensor, _formulas


def _run(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
         soft_target, need_grad, inplace, backend):
    impl = _common.backend_module("cross_entropy", logits.device, backend, logits.dtype)
    if not soft_target:
        _common.check_class_targets(target, logits.shape[1], ignore_index)
    if logits.shape[0] == 0:
        return logits.new_empty(0, dtype=_common.accumulation_dtype(logits.dtype)), None
    return impl.cross_entropy_fwd(
        logits, target, weight, scales, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        soft_target=soft_target, inplace=inplace, need_grad=need_grad)


@torch.library.custom_op("fusedopt::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: Optional[float], soft_target: bool, need_grad: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(row_loss (N,) in the accumulation dtype (fp32; float64 for float64 logits), grad
    (N, C) in the logits' dtype, or (0,) without need_grad)."""
    row_loss, grad = _run(logits, target, weight, scales, ignore_index, label_smoothing,
                          z_loss, softcap, soft_target, need_grad, False, backend)
    if grad is None:
        grad = logits.new_empty(0) if not need_grad else logits.new_empty(logits.shape)
    return row_loss, grad.contiguous()


@cross_entropy_fwd.register_fake
def _(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
      soft_target, need_grad, backend):
    row_loss = logits.new_empty(logits.shape[0], dtype=_common.accumulation_dtype(logits.dtype))
    return row_loss, logits.new_empty(logits.shape if need_grad else (0,))


@torch.library.custom_op("fusedopt::cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                              scales: Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, softcap: Optional[float], soft_target: bool,
                              backend: str) -> Tensor:
    """row_loss (N,) in the accumulation dtype; the gradient overwrites `logits`."""
    row_loss, _ = _run(logits, target, weight, scales, ignore_index, label_smoothing, z_loss,
                       softcap, soft_target, True, True, backend)
    return row_loss


@cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, scales, ignore_index, label_smoothing, z_loss, softcap,
      soft_target, backend):
    return logits.new_empty(logits.shape[0], dtype=_common.accumulation_dtype(logits.dtype))


class CrossEntropyFunction(torch.autograd.Function):
    """(M, C) logits -> row losses ('none') or their sum in the accumulation dtype; gradient
    stored in forward.  `recompute` (a _common.Recompute or None) is how a differentiable
    backward forms the loss again."""

    @staticmethod
    def forward(ctx, logits, target, weight, scales, ignore_index, label_smoothing, z_loss,
                softcap, soft_target, reduction, need_grad, inplace, backend, recompute=None):
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
                          "cross_entropy", backend, recompute, _no_recompute(inplace))
        return row_loss if ctx.per_row else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 13


def _no_recompute(inplace):
    if inplace:
        return ("with inplace_backward=True: forward overwrote the logits with their gradient; "
                "compute the loss with inplace_backward=False")
    return "for cross_entropy on DTensor logits"


def _target_rows(target, dtype, soft_target):
    if soft_target:
        return _common.to_rows(target).to(dtype).contiguous()
    return target.reshape(-1).contiguous()


def _rows_of(input):
    return _common.as_rows(_common.to_rows(input))


@_dtensor.dtensor_aware("class")
def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, inplace_backward, backend):
    """The loss for validated arguments (see fusedopt.functional.cross_entropy)."""
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    soft_target = target.is_floating_point()
    acc = _common.accumulation_dtype(input.dtype)
    logits = _rows_of(input)
    target_rows = _target_rows(target, input.dtype, soft_target)
    weight_acc = weight.to(acc).contiguous() if weight is not None else None
    n_rows = logits.shape[0]

    denominator = None
    if reduction == "mean":
        if soft_target:
            denominator = torch.full((), float(n_rows), dtype=acc, device=input.device)
            scales = _common.mean_scales(denominator, denominator, dtype=acc)
        else:
            denominator, n_valid = _common.class_mean_denominators(
                target_rows, weight_acc, ignore_index, n_classes, acc)
            scales = _common.mean_scales(denominator, n_valid, dtype=acc)
    else:
        scales = _common.unit_scales(input.device, acc)

    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    softcap = None if softcap is None else float(softcap)
    dtype, backend = input.dtype, backend or ""

    def output(rows, target_rows=target_rows):
        """The Function's output from (M, C) rows, in differentiable torch ops."""
        if soft_target:  # (the caller's target again: the forward's copy is not kept)
            target_rows = _target_rows(target, dtype, True)
        row_loss = _formulas.cross_entropy_rows(
            rows, target_rows, weight_acc, scales, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            soft_target=soft_target)
        return row_loss if reduction == "none" else row_loss.sum()

    if _common.needs_formula(input, target, weight):
        if _dtensor.is_dtensor(input):
            raise ValueError("cross_entropy on DTensor logits: a target or weight that "
                             "requires grad, and torch.func transforms, are not supported; "
                             "pass target.detach() / weight.detach()")
        _common.backend_module("cross_entropy", input.device, backend, input.dtype)
        if not soft_target:
            _common.check_class_targets(target_rows, n_classes, ignore_index)
        out = output(logits)
    else:
        need_grad = input.requires_grad and torch.is_grad_enabled()
        recompute = None
        if need_grad and not inplace_backward and not _dtensor.is_dtensor(input) and \
                not torch.compiler.is_compiling():
            recompute = _common.Recompute(input, _rows_of, output)
        out = _dtensor.rows_function(logits, CrossEntropyFunction).apply(
            logits, target_rows, weight_acc, scales, ignore_index, label_smoothing, z_loss,
            softcap, soft_target, reduction, need_grad, bool(inplace_backward), backend,
            recompute)
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
        return out.reshape(shape).to(input.dtype)
    if denominator is not None:
        out = _common.nan_if_zero(out, denominator)
    return out.to(input.dtype)
