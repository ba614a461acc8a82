"""Loss launchers shared by the compiled backends (`cpu`: fusedopt._cpu, `cuda`:
fusedopt._cuda); contracts: docs/architecture.md "Losses".

Both modules bind the same functions (csrc/bindings/loss_bindings.h): tensors become
addresses, element strides and dtype codes, and the last argument is the backend's own
(`num_threads` on cpu, the current stream on cuda).  The kernels read ``scales``
themselves, so nothing here reads a tensor's values and nothing synchronises.

This is the one place where loss tensors become raw pointers for the compiled backends:
every entry point first verifies every tensor it hands over (fusedopt/backends/
_loss_boundary.py: exact type, device, dtype, shape, the strides the kernel walks).
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedopt.backends import _loss_boundary as boundary
from fusedopt.backends._ptr import dtype_code

_F32 = torch.float32

# Class-index storage types (IndexType in csrc/include/fusedopt/params_loss.h).
INDEX_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class LossLauncher:
    """The four loss entry points over one compiled module.

    ``extra(tensor, option)`` gives the module's last argument for a call on ``tensor``
    (``option``: the entry point's backend-specific keyword, e.g. ``num_threads``);
    ``check(status, name)`` raises for a non-zero status; ``new_grad(shape, dtype, device)``
    allocates a gradient buffer; ``device_type`` is the device the module's kernels run on
    ("cpu" or "cuda")."""

    def __init__(self, ext, extra: Callable, check: Callable, new_grad: Callable | None = None,
                 *, device_type: str):
        self.ext = ext
        self.device_types = (device_type,)
        self.extra = extra
        self.check = check
        self.new_grad = new_grad or (lambda shape, dtype, device: torch.empty(
            shape, dtype=dtype, device=device))
        self.sigmoid_focal_span = ext.SIGMOID_FOCAL_SPAN

    def cross_entropy_fwd(self, logits, target, weight, scales, *, ignore_index,
                          label_smoothing, z_loss, softcap, soft_target, inplace, need_grad,
                          option=None):
        """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
        op = "cross_entropy_fwd"
        row_stride = boundary.rows(op, logits, self.device_types)
        n_rows, n_cols = logits.shape
        device = logits.device
        if soft_target:
            target_stride = boundary.soft_targets(op, target, logits)
            index_code = 0
        else:
            boundary.class_targets(op, target, n_rows, device)
            index_code, target_stride = INDEX_CODES[target.dtype], 0
        weight = boundary.class_vector(op, "weight", weight, n_cols, device)
        scales = boundary.scales(op, scales, device)
        ignore_index = boundary.ignore_index(op, ignore_index)
        softcap = boundary.softcap(op, softcap)
        z_loss = boundary.fp32_finite(op, "z_loss", z_loss)
        label_smoothing = boundary.fp32_finite(op, "label_smoothing", label_smoothing)
        row_loss = torch.empty(n_rows, dtype=_F32, device=device)
        grad, grad_stride = None, 0
        if need_grad:
            if inplace:
                grad, grad_stride = logits, row_stride
            else:
                grad = self.new_grad((n_rows, n_cols), logits.dtype, device)
                grad_stride = n_cols
        if n_rows == 0:
            return row_loss, grad
        # one fp32 of scratch: the sum of the class weights (weights with smoothing)
        workspace = None
        if weight is not None and label_smoothing > 0 and not soft_target:
            workspace = torch.empty(1, dtype=_F32, device=device)
        status = self.ext.cross_entropy_fwd(
            logits.data_ptr(), row_stride, _addr(grad), grad_stride, row_loss.data_ptr(),
            target.data_ptr(), target_stride, _addr(weight), scales.data_ptr(), n_rows, n_cols,
            dtype_code(logits.dtype), index_code, ignore_index, label_smoothing, z_loss,
            softcap if softcap is not None else 0.0, bool(soft_target),
            self.extra(logits, option), _addr(workspace))
        self.check(status, op)
        return row_loss, grad

    def focal_loss_fwd(self, logits, target, alpha, scales, *, gamma, ignore_index,
                       label_smoothing, need_grad, option=None):
        """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
        op = "focal_loss_fwd"
        row_stride = boundary.rows(op, logits, self.device_types)
        n_rows, n_cols = logits.shape
        device = logits.device
        boundary.class_targets(op, target, n_rows, device)
        alpha = boundary.class_vector(op, "alpha", alpha, n_cols, device)
        scales = boundary.scales(op, scales, device)
        ignore_index = boundary.ignore_index(op, ignore_index)
        gamma = boundary.fp32_finite(op, "gamma", gamma)
        label_smoothing = boundary.fp32_finite(op, "label_smoothing", label_smoothing)
        row_loss = torch.empty(n_rows, dtype=_F32, device=device)
        grad = self.new_grad((n_rows, n_cols), logits.dtype, device) if need_grad else None
        if n_rows == 0:
            return row_loss, grad
        status = self.ext.focal_loss_fwd(
            logits.data_ptr(), row_stride, _addr(grad), n_cols, row_loss.data_ptr(),
            target.data_ptr(), _addr(alpha), scales.data_ptr(), n_rows, n_cols,
            dtype_code(logits.dtype), INDEX_CODES[target.dtype], ignore_index, gamma,
            label_smoothing, self.extra(logits, option))
        self.check(status, op)
        return row_loss, grad

    def sigmoid_focal_loss_fwd(self, logits, target, scales, *, alpha, gamma, label_smoothing,
                               reduce, need_grad, option=None):
        """(loss, grad): per-element loss in the logits' dtype, or with `reduce` the fp32
        partial sums of fixed spans of SIGMOID_FOCAL_SPAN elements; both times scales[0]."""
        op = "sigmoid_focal_loss_fwd"
        boundary.elementwise(op, logits, target, self.device_types)
        device = logits.device
        scales = boundary.scales(op, scales, device)
        alpha = boundary.fp32_finite(op, "alpha", alpha)
        gamma = boundary.fp32_finite(op, "gamma", gamma)
        label_smoothing = boundary.fp32_finite(op, "label_smoothing", label_smoothing)
        n = logits.numel()
        if reduce:
            loss = torch.empty(-(-n // self.sigmoid_focal_span), dtype=_F32, device=device)
        else:
            loss = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad = self.new_grad(logits.shape, logits.dtype, device) if need_grad else None
        if n == 0:
            return loss, grad
        status = self.ext.sigmoid_focal_loss_fwd(
            logits.data_ptr(), target.data_ptr(), loss.data_ptr(), _addr(grad),
            scales.data_ptr(), n, dtype_code(logits.dtype), alpha, gamma, label_smoothing,
            bool(reduce), self.extra(logits, option))
        self.check(status, op)
        return loss, grad

    def scale_grad_(self, grad, scale, option=None):
        """grad *= scale in place (fp32 product, one rounding); no memory pass when
        scale == 1. `grad` contiguous, `scale` a 0-dim fp32 tensor on grad's device (read by
        the kernel)."""
        op = "scale_grad_"
        boundary.plain_tensor(op, "scale", scale)
        scale = scale.to(device=grad.device, dtype=_F32).contiguous()
        boundary.scaled_grad(op, grad, scale, self.device_types)
        status = self.ext.scale_grad(grad.data_ptr(), grad.numel(), dtype_code(grad.dtype),
                                     scale.data_ptr(), self.extra(grad, option))
        self.check(status, "scale_grad")
