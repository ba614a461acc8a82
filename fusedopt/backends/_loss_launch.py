"""Loss launchers shared by the compiled backends (`cpu`: fusedopt._cpu, `cuda`:
fusedopt._cuda); contracts: docs/architecture.md "Losses".

Both modules bind the same functions (csrc/bindings/loss_bindings.h): tensors become
addresses, element strides and dtype codes, and the last argument is the backend's own
(`num_threads` on cpu, the current stream on cuda).  The kernels read ``scales``
themselves, so nothing here reads a tensor's values and nothing synchronises.
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedopt.backends._ptr import dtype_code

_F32 = torch.float32

# Class-index storage types (IndexType in csrc/include/fusedopt/params_loss.h).
INDEX_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}


def _index_code(target: torch.Tensor) -> int:
    try:
        return INDEX_CODES[target.dtype]
    except KeyError:
        raise TypeError(
            f"class targets must be int64, int32 or uint8, not {target.dtype}") from None


def _check_rows(name: str, logits: torch.Tensor) -> None:
    """The layout the kernels walk: (N, C), class dim contiguous, rows >= C apart."""
    if logits.dim() != 2 or logits.stride(1) != 1 or (
            logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]):
        raise ValueError(f"{name}: logits must be (N, C) with stride(1) == 1 and "
                         f"stride(0) >= C, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")


def _f32_vector(t: torch.Tensor | None, n: int, name: str):
    if t is None:
        return None
    if t.dtype != _F32 or not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"{name} must be a contiguous fp32 tensor of {n} values, got "
                         f"{t.dtype} shape {tuple(t.shape)}")
    return t


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _class_targets(target: torch.Tensor, n_rows: int) -> None:
    if target.shape != (n_rows,) or not target.is_contiguous():
        raise ValueError(f"class targets must be contiguous of shape ({n_rows},), got "
                         f"{tuple(target.shape)}")


class LossLauncher:
    """The four loss entry points over one compiled module.

    ``extra(tensor, option)`` gives the module's last argument for a call on ``tensor``
    (``option``: the entry point's backend-specific keyword, e.g. ``num_threads``);
    ``check(status, name)`` raises for a non-zero status; ``new_grad(shape, dtype, device)``
    allocates a gradient buffer."""

    def __init__(self, ext, extra: Callable, check: Callable, new_grad: Callable | None = None):
        self.ext = ext
        self.extra = extra
        self.check = check
        self.new_grad = new_grad or (lambda shape, dtype, device: torch.empty(
            shape, dtype=dtype, device=device))
        self.sigmoid_focal_span = ext.SIGMOID_FOCAL_SPAN

    def cross_entropy_fwd(self, logits, target, weight, scales, *, ignore_index,
                          label_smoothing, z_loss, softcap, soft_target, inplace, need_grad,
                          option=None):
        """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
        _check_rows("cross_entropy_fwd", logits)
        n_rows, n_cols = logits.shape
        row_loss = torch.empty(n_rows, dtype=_F32, device=logits.device)
        grad = None
        if need_grad:
            grad = logits if inplace else self.new_grad((n_rows, n_cols), logits.dtype,
                                                        logits.device)
        if n_rows == 0:
            return row_loss, grad
        weight = _f32_vector(weight, n_cols, "weight")
        if soft_target:
            if target.shape != logits.shape or target.dtype != logits.dtype or \
                    not target.is_contiguous():
                raise ValueError(f"soft targets must be contiguous, of the logits' shape and "
                                 f"dtype; got {target.dtype} {tuple(target.shape)} for logits "
                                 f"{logits.dtype} {tuple(logits.shape)}")
            index_code, target_stride = 0, target.stride(0)
        else:
            _class_targets(target, n_rows)
            index_code, target_stride = _index_code(target), 0
        # one fp32 of scratch: the sum of the class weights (weights with smoothing)
        workspace = None
        if weight is not None and label_smoothing > 0 and not soft_target:
            workspace = torch.empty(1, dtype=_F32, device=logits.device)
        status = self.ext.cross_entropy_fwd(
            logits.data_ptr(), logits.stride(0), _addr(grad),
            grad.stride(0) if grad is not None else 0, row_loss.data_ptr(), target.data_ptr(),
            target_stride, _addr(weight), _f32_vector(scales, 2, "scales").data_ptr(), n_rows,
            n_cols, dtype_code(logits.dtype), index_code, int(ignore_index),
            float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else 0.0, bool(soft_target),
            self.extra(logits, option), _addr(workspace))
        self.check(status, "cross_entropy_fwd")
        return row_loss, grad

    def focal_loss_fwd(self, logits, target, alpha, scales, *, gamma, ignore_index,
                       label_smoothing, need_grad, option=None):
        """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
        _check_rows("focal_loss_fwd", logits)
        n_rows, n_cols = logits.shape
        row_loss = torch.empty(n_rows, dtype=_F32, device=logits.device)
        grad = self.new_grad((n_rows, n_cols), logits.dtype, logits.device) if need_grad else None
        if n_rows == 0:
            return row_loss, grad
        _class_targets(target, n_rows)
        alpha = _f32_vector(alpha, n_cols, "alpha")
        status = self.ext.focal_loss_fwd(
            logits.data_ptr(), logits.stride(0), _addr(grad), n_cols, row_loss.data_ptr(),
            target.data_ptr(), _addr(alpha), _f32_vector(scales, 2, "scales").data_ptr(),
            n_rows, n_cols, dtype_code(logits.dtype), _index_code(target), int(ignore_index),
            float(gamma), float(label_smoothing), self.extra(logits, option))
        self.check(status, "focal_loss_fwd")
        return row_loss, grad

    def sigmoid_focal_loss_fwd(self, logits, target, scales, *, alpha, gamma, label_smoothing,
                               reduce, need_grad, option=None):
        """(loss, grad): per-element loss in the logits' dtype, or with `reduce` the fp32
        partial sums of fixed spans of SIGMOID_FOCAL_SPAN elements; both times scales[0]."""
        if not (logits.is_contiguous() and target.is_contiguous()) or \
                target.shape != logits.shape or target.dtype != logits.dtype:
            raise ValueError(f"sigmoid_focal_loss_fwd: logits and target must be contiguous "
                             f"with the same shape and dtype, got {logits.dtype} "
                             f"{tuple(logits.shape)} and {target.dtype} {tuple(target.shape)}")
        n = logits.numel()
        if reduce:
            loss = torch.empty(-(-n // self.sigmoid_focal_span), dtype=_F32, device=logits.device)
        else:
            loss = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad = self.new_grad(logits.shape, logits.dtype, logits.device) if need_grad else None
        if n == 0:
            return loss, grad
        status = self.ext.sigmoid_focal_loss_fwd(
            logits.data_ptr(), target.data_ptr(), loss.data_ptr(), _addr(grad),
            _f32_vector(scales, 2, "scales").data_ptr(), n, dtype_code(logits.dtype),
            float(alpha), float(gamma), float(label_smoothing), bool(reduce),
            self.extra(logits, option))
        self.check(status, "sigmoid_focal_loss_fwd")
        return loss, grad

    def scale_grad_(self, grad, scale, option=None):
        """grad *= scale in place (fp32 product, one rounding); no memory pass when
        scale == 1. `grad` contiguous, `scale` a 0-dim fp32 tensor on grad's device (read by
        the kernel)."""
        if not grad.is_contiguous():
            raise ValueError("scale_grad_: grad must be contiguous")
        scale = scale.to(device=grad.device, dtype=_F32).contiguous()
        if scale.numel() != 1:
            raise ValueError(f"scale_grad_: scale must hold one value, got shape "
                             f"{tuple(scale.shape)}")
        status = self.ext.scale_grad(grad.data_ptr(), grad.numel(), dtype_code(grad.dtype),
                                     scale.data_ptr(), self.extra(grad, option))
        self.check(status, "scale_grad")
