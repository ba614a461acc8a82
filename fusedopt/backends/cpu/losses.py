"""Loss entry points of the `cpu` backend (contracts: docs/architecture.md "Losses").

Tensors become addresses, element strides and dtype codes for the C++ kernels in
csrc/cpu/cross_entropy.cpp and csrc/cpu/focal.cpp (module ``fusedopt._cpu``), which run
without the GIL on OpenMP threads.  The kernels read ``scales`` themselves, so nothing
here reads a tensor's values.

Every entry point takes one extra keyword, ``num_threads=None``: the OpenMP thread count
of the call (default: ``torch.get_num_threads()``).  Results do not depend on it (each row,
or each fixed span of elements, is computed by one thread in a fixed order); tests use it
to check exactly that.  Callers of the contract never pass it.
"""

from __future__ import annotations

import torch

from fusedopt import _cpu
from fusedopt.backends._ptr import dtype_code

__all__ = ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd", "scale_grad_"]

OPS: frozenset[str] = frozenset({"cross_entropy", "focal_loss", "sigmoid_focal_loss"})

_F32 = torch.float32

# Class-index storage types (IndexType in csrc/include/fusedopt/params_loss.h).
INDEX_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}

# Elements per partial sum of the reduced sigmoid focal loss (kSigmoidFocalSpan).
SIGMOID_FOCAL_SPAN = _cpu.SIGMOID_FOCAL_SPAN

_STATUS = {1: "unsupported dtype code", 2: "unsupported target index type", 3: "invalid shape"}


def _threads(num_threads):
    return int(num_threads) if num_threads else torch.get_num_threads()


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu kernel {name} failed: "
                           f"{_STATUS.get(status, 'error')} (status {status})")


def _index_code(target: torch.Tensor) -> int:
    try:
        return INDEX_CODES[target.dtype]
    except KeyError:
        raise TypeError(f"class targets must be int64, int32 or uint8, not {target.dtype}") from None


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


# Fresh gradient buffers from this size up get transparent huge pages (fewer page faults
# on their first write; see csrc/cpu/loss_buffers.cpp).
HUGE_PAGE_MIN_BYTES = 8 << 20


def _new_grad(shape, dtype) -> torch.Tensor:
    grad = torch.empty(shape, dtype=dtype)
    nbytes = grad.numel() * grad.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        _cpu.advise_huge_pages(grad.data_ptr(), nbytes)
    return grad


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _scales(scales: torch.Tensor) -> torch.Tensor:
    return _f32_vector(scales, 2, "scales")


def cross_entropy_fwd(logits, target, weight, scales, *, ignore_index, label_smoothing, z_loss,
                      softcap, soft_target, inplace, need_grad, num_threads=None):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    _check_rows("cross_entropy_fwd", logits)
    n_rows, n_cols = logits.shape
    row_loss = torch.empty(n_rows, dtype=_F32)
    grad = None
    if need_grad:
        grad = logits if inplace else _new_grad((n_rows, n_cols), logits.dtype)
    if n_rows == 0:
        return row_loss, grad
    weight = _f32_vector(weight, n_cols, "weight")
    if soft_target:
        if target.shape != logits.shape or target.dtype != logits.dtype or not target.is_contiguous():
            raise ValueError(f"soft targets must be contiguous, of the logits' shape and dtype; got "
                             f"{target.dtype} {tuple(target.shape)} for logits "
                             f"{logits.dtype} {tuple(logits.shape)}")
        index_code, target_stride = 0, target.stride(0)
    else:
        if target.shape != (n_rows,) or not target.is_contiguous():
            raise ValueError(f"class targets must be contiguous of shape ({n_rows},), got "
                             f"{tuple(target.shape)}")
        index_code, target_stride = _index_code(target), 0
    status = _cpu.cross_entropy_fwd(
        logits.data_ptr(), logits.stride(0), _addr(grad), grad.stride(0) if grad is not None else 0,
        row_loss.data_ptr(), target.data_ptr(), target_stride, _addr(weight),
        _scales(scales).data_ptr(), n_rows, n_cols, dtype_code(logits.dtype), index_code,
        int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 0.0, bool(soft_target), _threads(num_threads))
    _check(status, "cross_entropy_fwd")
    return row_loss, grad


def focal_loss_fwd(logits, target, alpha, scales, *, gamma, ignore_index, label_smoothing,
                   need_grad, num_threads=None):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None)."""
    _check_rows("focal_loss_fwd", logits)
    n_rows, n_cols = logits.shape
    row_loss = torch.empty(n_rows, dtype=_F32)
    grad = _new_grad((n_rows, n_cols), logits.dtype) if need_grad else None
    if n_rows == 0:
        return row_loss, grad
    if target.shape != (n_rows,) or not target.is_contiguous():
        raise ValueError(f"class targets must be contiguous of shape ({n_rows},), got "
                         f"{tuple(target.shape)}")
    alpha = _f32_vector(alpha, n_cols, "alpha")
    status = _cpu.focal_loss_fwd(
        logits.data_ptr(), logits.stride(0), _addr(grad), n_cols, row_loss.data_ptr(),
        target.data_ptr(), _addr(alpha), _scales(scales).data_ptr(), n_rows, n_cols,
        dtype_code(logits.dtype), _index_code(target), int(ignore_index), float(gamma),
        float(label_smoothing), _threads(num_threads))
    _check(status, "focal_loss_fwd")
    return row_loss, grad


def sigmoid_focal_loss_fwd(logits, target, scales, *, alpha, gamma, label_smoothing, reduce,
                           need_grad, num_threads=None):
    """(loss, grad): per-element loss in the logits' dtype, or with `reduce` the fp32
    partial sums of fixed spans of SIGMOID_FOCAL_SPAN elements; both times scales[0]."""
    if not (logits.is_contiguous() and target.is_contiguous()) or target.shape != logits.shape \
            or target.dtype != logits.dtype:
        raise ValueError(f"sigmoid_focal_loss_fwd: logits and target must be contiguous with the "
                         f"same shape and dtype, got {logits.dtype} {tuple(logits.shape)} and "
                         f"{target.dtype} {tuple(target.shape)}")
    n = logits.numel()
    if reduce:
        loss = torch.empty(-(-n // SIGMOID_FOCAL_SPAN), dtype=_F32)
    else:
        loss = torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad = _new_grad(logits.shape, logits.dtype) if need_grad else None
    if n == 0:
        return loss, grad
    status = _cpu.sigmoid_focal_loss_fwd(
        logits.data_ptr(), target.data_ptr(), loss.data_ptr(), _addr(grad),
        _scales(scales).data_ptr(), n, dtype_code(logits.dtype), float(alpha), float(gamma),
        float(label_smoothing), bool(reduce), _threads(num_threads))
    _check(status, "sigmoid_focal_loss_fwd")
    return loss, grad


def scale_grad_(grad, scale, *, num_threads=None):
    """grad *= scale in place (fp32 product, one rounding); no memory pass when scale == 1.

    `grad` contiguous, `scale` a 0-dim fp32 CPU tensor (read by the kernel)."""
    if not grad.is_contiguous():
        raise ValueError("scale_grad_: grad must be contiguous")
    scale = scale.to(_F32).contiguous()
    if scale.numel() != 1:
        raise ValueError(f"scale_grad_: scale must hold one value, got shape {tuple(scale.shape)}")
    status = _cpu.scale_grad(grad.data_ptr(), grad.numel(), dtype_code(grad.dtype),
                             scale.data_ptr(), _threads(num_threads))
    _check(status, "scale_grad")
