"""Helpers shared by the loss ops: backend lookup, target range check, (M, C) row layout,
device-side scales and the final 'mean' reduction.  Nothing here synchronises with a
device except the range check, which SPEC §3 allows for CPU tensors and for CUDA tensors
under ``FUSEDOPT_CHECK=1``."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fusedopt import backends

_F32 = torch.float32


def backend_module(op: str, device: torch.device, backend: str) -> ModuleType:
    """The backend that runs `op` on `device`; `backend` is a name or "" for the default."""
    return backends.select(op, device, backend or None)


def check_class_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError for a class target outside [0, n_classes) other than ignore_index.

    Runs for CPU tensors always and for other devices only when FUSEDOPT_CHECK=1 (it reads
    a device value on the host)."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu" and os.environ.get("FUSEDOPT_CHECK", "0") != "1":
        return
    y = target.long()
    bad = (y != ignore_index) & ((y < 0) | (y >= n_classes))
    if bool(bad.any()):
        value = int(y[bad][0])
        raise IndexError(
            f"target value {value} is out of range: expected 0 <= target < {n_classes} "
            f"(the number of classes) or target == ignore_index ({ignore_index})")


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits` (M, C) in a layout the backends accept: class dim contiguous, rows at a
    stride >= C.  Such strided rows pass unchanged (no copy); anything else is copied."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) == 1 and (logits.stride(0) >= n_cols or n_rows <= 1):
        if n_rows <= 1 and logits.stride(0) < n_cols:
            return logits.as_strided((n_rows, n_cols), (n_cols, 1))
        return logits
    return logits.contiguous()


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C); (N, C) unchanged; (N, C, d1..dk) -> (N·d1..dk, C) (a copy)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def class_mean_denominators(target: torch.Tensor, weight: torch.Tensor | None,
                            ignore_index: int, n_classes: int):
    """(Σ w_{y_i} over non-ignored rows, number of non-ignored rows) as fp32 device scalars.

    Targets are clamped before the weight gather so a bad target cannot index out of range
    (its row loss is NaN anyway)."""
    y = target.long()
    valid = y != ignore_index
    n_valid = valid.sum().to(_F32)
    if weight is None:
        return n_valid, n_valid
    w_y = weight[y.clamp(0, n_classes - 1)]
    return torch.where(valid, w_y, 0.0).sum(), n_valid


def mean_scales(*denominators: torch.Tensor) -> torch.Tensor:
    """fp32 (2,) tensor of 1/denominator, on the device, without a sync (1/0 = inf)."""
    return torch.reciprocal(torch.stack(list(denominators)).to(_F32))


def unit_scales(device: torch.device) -> torch.Tensor:
    return torch.ones(2, dtype=_F32, device=device)


def nan_if_zero(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`total`, or NaN where the mean's denominator is 0 (every row ignored), no sync."""
    return torch.where(denominator == 0, torch.full_like(total, float("nan")), total)


@torch.library.custom_op("fusedopt::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, op: str, backend: str) -> None:
    """grad *= grad_output, in place.  A 0-dim fp32 grad_output and a contiguous grad go to
    the backend's optional ``scale_grad_(grad, scale)`` (which may skip the pass on the
    device when scale == 1); anything else (per-row / per-element grad_output, the strided
    rows of inplace_backward) gets torch's in-place multiply."""
    if grad_output.dim() == 0 and grad.is_contiguous():
        impl = backend_module(op, grad.device, backend)
        scale = getattr(impl, "scale_grad_", None)
        if scale is not None:
            scale(grad, grad_output)
            return
    grad.mul_(grad_output)


@scale_grad_.register_fake
def _(grad, grad_output, op, backend):
    return None


def keep_grad(ctx, grad: torch.Tensor | None, per_row: bool, op: str, backend: str) -> None:
    """Remember, in forward, what `rescale` needs in backward: the gradient computed by the
    fused forward (None when no gradient is needed), whether the loss is per row/element or
    reduced, the op and the backend."""
    ctx.per_row, ctx.op, ctx.backend = per_row, op, backend
    if grad is not None:
        ctx.save_for_backward(grad)


def rescale(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """Backward of a loss whose gradient was saved in forward: grad · grad_output, IN PLACE
    in the stored gradient (no second N×C buffer, SPEC's O(rows) extra memory).

    A scalar grad_output multiplies in fp32 and rounds once; a per-row (or per-element)
    grad_output is in the loss's dtype, which is the gradient's.  The stored gradient is
    consumed, so a second backward through the same loss is refused."""
    per_row, op, backend = ctx.per_row, ctx.op, ctx.backend
    if not torch.compiler.is_compiling():
        if getattr(ctx, "grad_consumed", False):
            raise RuntimeError(
                f"fusedopt {op}: backward through the same loss a second time "
                "(retain_graph=True) is not supported; the stored gradient was scaled in place "
                "by the first backward -- compute the loss again")
        ctx.grad_consumed = True
    (grad,) = ctx.saved_tensors
    if per_row:
        g = grad_output.to(grad.dtype)
        if g.dim() == 1 and grad.dim() == 2:
            g = g[:, None]
    else:
        g = grad_output.to(_F32)
    torch.ops.fusedopt.scale_grad_(grad, g, op, backend)
    return grad
