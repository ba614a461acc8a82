"""Sigmoid (binary / multi-label) focal loss as an autograd Function over a custom op.

``fusedopt::sigmoid_focal_loss_fwd`` runs the backend's fused elementwise forward once and
returns the loss (per element in the logits' dtype, or the total in fp32 -- float64 for
float64 logits -- when reducing) and the gradient, already multiplied by the 'mean' scale
1/numel.  The backend's partial sums are
added inside the op, so the op's output shape never depends on the backend.
``SigmoidFocalLossFunction`` keeps the gradient and rescales it in place by grad_output in
backward (``_common.rescale``); where the fused kernel cannot serve (torch.func, a target
that requires grad) the loss is formed from differentiable torch ops (``_formulas``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt.ops import _common, _dtensor, _formulas


@torch.library.custom_op("fusedopt::sigmoid_focal_loss_fwd", mutates_args=())
def sigmoid_focal_loss_fwd(logits: Tensor, target: Tensor, scales: Tensor, alpha: float,
                           gamma: float, label_smoothing: float, reduce: bool, need_grad: bool,
                           backend: str) -> tuple[Tensor, Tensor]:
    """(loss: logits' shape and dtype, or with `reduce` a 0-dim total in the accumulation
    dtype (fp32; float64 for float64 logits); grad or (0,))."""
    impl = _common.backend_module("sigmoid_focal_loss", logits.device, backend, logits.dtype)
    if logits.numel() == 0:
        loss = (logits.new_zeros((), dtype=_common.accumulation_dtype(logits.dtype)) if reduce
                else logits.new_empty(logits.shape))
        return loss, logits.new_empty(logits.shape if need_grad else (0,))
    loss, grad = impl.sigmoid_focal_loss_fwd(
        logits, target, scales, alpha=alpha, gamma=gamma, label_smoothing=label_smoothing,
        reduce=reduce, need_grad=need_grad)
    loss = loss.sum() if reduce else loss.reshape(logits.shape).contiguous()
    grad = grad.reshape(logits.shape).contiguous() if need_grad else logits.new_empty(0)
    return loss, grad


@sigmoid_focal_loss_fwd.register_fake
def _(logits, target, scales, alpha, gamma, label_smoothing, reduce, need_grad, backend):
    acc = _common.accumulation_dtype(logits.dtype)
    loss = logits.new_empty((), dtype=acc) if reduce else logits.new_empty(logits.shape)
    return loss, logits.new_empty(logits.shape if need_grad else (0,))


class SigmoidFocalLossFunction(torch.autograd.Function):
    """Contiguous logits -> per-element loss ('none') or the total in the accumulation dtype;
    gradient stored (`recompute`: see CrossEntropyFunction)."""

    @staticmethod
    def forward(ctx, logits, target, scales, alpha, gamma, label_smoothing, reduction,
                need_grad, backend, recompute=None):
        loss, grad = torch.ops.fusedopt.sigmoid_focal_loss_fwd(
            logits, target, scales, alpha, gamma, label_smoothing, reduction != "none",
            need_grad, backend)
        _common.keep_grad(ctx, grad if need_grad else None, reduction == "none",
                          "sigmoid_focal_loss", backend, recompute,
                          "for sigmoid_focal_loss on DTensor logits")
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 9


@_dtensor.dtensor_aware("elementwise")
def sigmoid_focal_loss(input, target, alpha, gamma, reduction, label_smoothing, backend):
    """The loss for validated arguments (see fusedopt.functional.sigmoid_focal_loss)."""
    acc = _common.accumulation_dtype(input.dtype)
    logits = input.contiguous()
    target_flat = target.to(input.dtype).contiguous()
    n = logits.numel()
    if reduction == "mean":
        inv = float("inf") if n == 0 else 1.0 / n
        scales = torch.tensor([inv, 1.0], dtype=acc, device=input.device)
    else:
        scales = _common.unit_scales(input.device, acc)
    alpha, gamma, label_smoothing = float(alpha), float(gamma), float(label_smoothing)
    backend = backend or ""

    def output(elements):
        """The Function's output from the contiguous logits, in differentiable torch ops."""
        return _formulas.sigmoid_focal(elements, target.to(elements.dtype), scales,
                                       alpha=alpha, gamma=gamma,
                                       label_smoothing=label_smoothing,
                                       reduce=reduction != "none")

    if _common.needs_formula(input, target):
        if _dtensor.is_dtensor(input):
            raise ValueError("sigmoid_focal_loss on DTensor logits: a target that requires "
                             "grad, and torch.func transforms, are not supported; pass "
                             "target.detach()")
        _common.backend_module("sigmoid_focal_loss", input.device, backend, input.dtype)
        out = output(logits)
    else:
        need_grad = input.requires_grad and torch.is_grad_enabled()
        recompute = None
        if need_grad and not _dtensor.is_dtensor(input) and not torch.compiler.is_compiling():
            recompute = _common.Recompute(input, torch.Tensor.contiguous, output)
        out = SigmoidFocalLossFunction.apply(logits, target_flat, scales, alpha, gamma,
                                             label_smoothing, reduction, need_grad, backend,
                                             recompute)
    if reduction == "mean" and n == 0:
        out = out * float("nan")
    return out.to(input.dtype)
