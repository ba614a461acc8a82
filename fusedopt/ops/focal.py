"""Softmax (multi-class) focal loss as an autograd Function over a torch.library custom op.

``fusedopt::focal_loss_fwd`` runs the backend's fused forward once: row losses
``scale · (-Σ_c α_c q_c (1-p_c)^γ log p_c)`` (fp32; float64 for float64 logits) and their
gradient in the logits' dtype.
``FocalLossFunction`` keeps the gradient and rescales it in place by grad_output in backward
(``_common.rescale``).  ``focal_loss`` below reshapes (C,) / (N, C, d1..dk) inputs to (M, C)
rows, computes the 'mean' scale (1 / non-ignored rows) on the device and reduces, and forms
the loss from differentiable torch ops (``_formulas``) where the fused kernel cannot serve;
arguments are validated by fusedopt.functional.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedopt.ops import _common, _dtensor, _formulas


@torch.library.custom_op("fusedopt::focal_loss_fwd", mutates_args=())
def focal_loss_fwd(logits: Tensor, target: Tensor, alpha: Optional[Tensor], scales: Tensor,
                   gamma: float, ignore_index: int, label_smoothing: float, need_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(row_loss (N,) in the accumulation dtype (fp32; float64 for float64 logits), grad
    (N, C) in the logits' dtype, or (0,) without need_grad)."""
    impl = _common.backend_module("focal_loss", logits.device, backend, logits.dtype)
    _common.check_class_targets(target, logits.shape[1], ignore_index)
    if logits.shape[0] == 0:
        return (logits.new_empty(0, dtype=_common.accumulation_dtype(logits.dtype)),
                logits.new_empty(logits.shape if need_grad else 0))
    row_loss, grad = impl.focal_loss_fwd(
        logits, target, alpha, scales, gamma=gamma, ignore_index=ignore_index,
        label_smoothing=label_smoothing, need_grad=need_grad)
    return row_loss, grad.contiguous() if need_grad else logits.new_empty(0)


@focal_loss_fwd.register_fake
def _(logits, target, alpha, scales, gamma, ignore_index, label_smoothing, need_grad, backend):
    row_loss = logits.new_empty(logits.shape[0], dtype=_common.accumulation_dtype(logits.dtype))
    return row_loss, logits.new_empty(logits.shape if need_grad else (0,))


class FocalLossFunction(torch.autograd.Function):
    """(M, C) logits -> row losses ('none') or their sum in the accumulation dtype; gradient
    stored in forward (`recompute`: see CrossEntropyFunction)."""

    @staticmethod
    def forward(ctx, logits, target, alpha, scales, gamma, ignore_index, label_smoothing,
                reduction, need_grad, backend, recompute=None):
        row_loss, grad = torch.ops.fusedopt.focal_loss_fwd(
            logits, target, alpha, scales, gamma, ignore_index, label_smoothing, need_grad,
            backend)
        _common.keep_grad(ctx, grad if need_grad else None, reduction == "none", "focal_loss",
                          backend, recompute, "for focal_loss on DTensor logits")
        return row_loss if ctx.per_row else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 10


def _rows_of(input):
    return _common.as_rows(_common.to_rows(input))


@_dtensor.dtensor_aware("class")
def focal_loss(input, target, gamma, alpha, ignore_index, reduction, label_smoothing, backend):
    """The loss for validated arguments (see fusedopt.functional.focal_loss)."""
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    acc = _common.accumulation_dtype(input.dtype)
    logits = _rows_of(input)
    target_rows = target.reshape(-1).contiguous()
    if alpha is None:
        alpha_acc = None
    elif isinstance(alpha, Tensor):
        alpha_acc = alpha.to(device=input.device, dtype=acc).contiguous()
    else:
        alpha_acc = torch.full((n_classes,), float(alpha), dtype=acc, device=input.device)

    n_valid = None
    if reduction == "mean":
        _, n_valid = _common.class_mean_denominators(target_rows, None, ignore_index, n_classes,
                                                     acc)
        scales = torch.stack([torch.reciprocal(n_valid), torch.ones_like(n_valid)])
    else:
        scales = _common.unit_scales(input.device, acc)
    gamma, label_smoothing, backend = float(gamma), float(label_smoothing), backend or ""

    def output(rows):
        """The Function's output from (M, C) rows, in differentiable torch ops."""
        row_loss = _formulas.focal_rows(rows, target_rows, alpha_acc, scales, gamma=gamma,
                                        ignore_index=ignore_index,
                                        label_smoothing=label_smoothing)
        return row_loss if reduction == "none" else row_loss.sum()

    if _common.needs_formula(input, alpha if isinstance(alpha, Tensor) else None):
        if _dtensor.is_dtensor(input):
            raise ValueError("focal_loss on DTensor logits: an alpha that requires grad, and "
                             "torch.func transforms, are not supported; pass alpha.detach()")
        _common.backend_module("focal_loss", input.device, backend, input.dtype)
        _common.check_class_targets(target_rows, n_classes, ignore_index)
        out = output(logits)
    else:
        need_grad = input.requires_grad and torch.is_grad_enabled()
        recompute = None
        if need_grad and not _dtensor.is_dtensor(input) and not torch.compiler.is_compiling():
            recompute = _common.Recompute(input, _rows_of, output)
        out = FocalLossFunction.apply(logits, target_rows, alpha_acc, scales, gamma,
                                      ignore_index, label_smoothing, reduction, need_grad,
                                      backend, recompute)
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
        return out.reshape(shape).to(input.dtype)
    if n_valid is not None:
        out = _common.nan_if_zero(out, n_valid)
    return out.to(input.dtype)
