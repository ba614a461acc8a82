"""Helpers shared by the loss ops: backend lookup, target range check, (M, C) row layout,
device-side scales and the final 'mean' reduction, and the backward of a loss whose
gradient was computed in forward (``keep_grad`` / ``rescale``).  Nothing here synchronises
with a device except the range check, which is allowed for CPU tensors and for CUDA
tensors under ``FUSEDOPT_CHECK=1``."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Callable

import torch

from fusedopt import backends

_F32, _F64 = torch.float32, torch.float64

# Backends whose loss kernels take float64 logits and compute in float64.  The compiled
# kernels (cpu, cuda, triton) compute in fp32 and take fp32/bf16/fp16 logits only.
FLOAT64_BACKENDS = ("torch",)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes and reduces in: float64 for float64 logits, else fp32."""
    return _F64 if dtype == _F64 else _F32


def float64_refusal(op: str, name: str, origin: str = "") -> TypeError:
    return TypeError(
        f"fusedopt backend '{name}'{origin} cannot run {op} on float64 inputs: its kernels "
        f"compute in fp32 and take float32, bfloat16 or float16 logits; float64 runs on the "
        f"'torch' backend, in float64 (backend=None or backend='torch')")


def backend_module(op: str, device: torch.device, backend: str,
                   dtype: torch.dtype | None = None) -> ModuleType:
    """The backend that runs `op` on `device`; `backend` is a name or "" for the default.

    For float64 logits (`dtype`) the default is the `torch` backend; a backend named
    explicitly (argument or FUSEDOPT_BACKEND) whose kernels compute in fp32 is a TypeError
    naming it and the dtype."""
    if dtype != _F64:
        return backends.select(op, device, backend or None)
    name = backend or os.environ.get("FUSEDOPT_BACKEND") or FLOAT64_BACKENDS[0]
    if name in FLOAT64_BACKENDS:
        return backends.select(op, device, name)
    backends.select(op, device, backend or None)  # an unknown or unusable name fails as usual
    raise float64_refusal(op, name, "" if backend else " (forced by FUSEDOPT_BACKEND)")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """`t` without torch.func wrappers (a vmapped tensor: the values of every sample)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def check_class_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError for a class target outside [0, n_classes) other than ignore_index.

    Runs for CPU tensors always and for other devices only when FUSEDOPT_CHECK=1 (it reads
    a device value on the host).  Inside torch.func transforms it checks the values of
    every sample."""
    if target.numel() == 0:
        return
    if target.device.type != "cpu" and os.environ.get("FUSEDOPT_CHECK", "0") != "1":
        return
    if not torch.compiler.is_compiling():
        target = _plain(target)
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
                            ignore_index: int, n_classes: int, dtype: torch.dtype = _F32):
    """(Σ w_{y_i} over non-ignored rows, number of non-ignored rows) as device scalars of
    `dtype` (the accumulation dtype; `weight` is in it).

    Targets are clamped before the weight gather so a bad target cannot index out of range
    (its row loss is NaN anyway)."""
    y = target.long()
    valid = y != ignore_index
    n_valid = valid.sum().to(dtype)
    if weight is None:
        return n_valid, n_valid
    w_y = weight[y.clamp(0, n_classes - 1)]
    return torch.where(valid, w_y, 0.0).sum(), n_valid


def mean_scales(*denominators: torch.Tensor, dtype: torch.dtype = _F32) -> torch.Tensor:
    """(2,) tensor of 1/denominator in `dtype`, on the device, without a sync (1/0 = inf)."""
    return torch.reciprocal(torch.stack(list(denominators)).to(dtype))


def unit_scales(device: torch.device, dtype: torch.dtype = _F32) -> torch.Tensor:
    return torch.ones(2, dtype=dtype, device=device)


def nan_if_zero(total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`total`, or NaN where the mean's denominator is 0 (every row ignored), no sync."""
    return torch.where(denominator == 0, torch.full_like(total, float("nan")), total)


def needs_formula(input: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a loss must be formed from differentiable torch ops (fusedopt.ops._formulas)
    instead of its fused kernel: when one of `others` (targets, class weights: inputs the
    fused kernels give no gradient) requires grad while grad mode is on, inside a torch.func
    transform (grad, vmap, jacrev, jvp, ...), or with forward-mode AD tangents."""
    present = [t for t in others if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    forward_ad = torch.autograd.forward_ad
    return forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in [input] + present)


@torch.library.custom_op("fusedopt::scale_grad_", mutates_args=("grad",))
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, op: str, backend: str) -> None:
    """grad *= grad_output, in place.  A 0-dim fp32 grad_output and a contiguous grad go to
    the backend's optional ``scale_grad_(grad, scale)`` (which may skip the pass on the
    device when scale == 1); anything else (per-row / per-element grad_output, the strided
    rows of inplace_backward, float64) gets torch's in-place multiply."""
    if grad_output.dim() == 0 and grad.is_contiguous() and grad.dtype != _F64:
        impl = backend_module(op, grad.device, backend)
        scale = getattr(impl, "scale_grad_", None)
        if scale is not None:
            scale(grad, grad_output)
            return
    grad.mul_(grad_output)


@scale_grad_.register_fake
def _(grad, grad_output, op, backend):
    return None


class Recompute:
    """How the backward of a loss recomputes it when its gradient must itself be
    differentiable (create_graph=True): from `source`, the input the caller passed (a
    reference, never a copy), `rows(source)` is the Function's first input and
    `output(rows)` the Function's output, both in differentiable torch ops.  `output` must
    hold only what is small or the caller's own (targets, weights, scales), never a copy
    of the logits."""

    __slots__ = ("source", "version", "rows", "output")

    def __init__(self, source: torch.Tensor, rows: Callable, output: Callable):
        self.source, self.version = source, source._version
        self.rows, self.output = rows, output


def keep_grad(ctx, grad: torch.Tensor | None, per_row: bool, op: str, backend: str,
              recompute: Recompute | None = None, no_recompute: str = "") -> None:
    """Remember, in forward, what `rescale` needs in backward: the gradient computed by the
    fused forward (None when no gradient is needed), whether the loss is per row/element or
    reduced, the op, the backend, and how a differentiable backward recomputes the loss
    (`recompute`, or `no_recompute`: why it cannot)."""
    ctx.per_row, ctx.op, ctx.backend = per_row, op, backend
    if grad is not None:
        ctx.save_for_backward(grad)
        if not torch.compiler.is_compiling():
            ctx.recompute, ctx.no_recompute = recompute, no_recompute


def _differentiable_grad(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient with a graph of its own (create_graph=True): the loss recomputed from
    the caller's input in differentiable torch ops, differentiated by autograd."""
    recompute, op = getattr(ctx, "recompute", None), ctx.op
    if recompute is None:
        why = getattr(ctx, "no_recompute", "") or "for this loss"
        raise RuntimeError(
            f"fusedopt {op}: backward with create_graph=True (a double backward, e.g. a "
            f"gradient penalty) is not supported {why}")
    if recompute.source._version != recompute.version:
        raise RuntimeError(
            f"fusedopt {op}: backward with create_graph=True recomputes the loss from its "
            f"input, which was modified in place after the loss was computed")
    rows = recompute.rows(recompute.source)
    (grad,) = torch.autograd.grad(recompute.output(rows), rows, grad_output,
                                  create_graph=True)
    return grad


def graph_kept() -> bool:
    """Whether the running backward keeps the graph for another one (retain_graph=True,
    also implied by create_graph=True).  False while compiling: a compiled graph is
    traced for the plain backward."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._autograd._get_current_graph_task_keep_graph()


def _dense(t: torch.Tensor) -> bool:
    """A tensor of a device's own memory (or a subclass over one), not a vmap batch."""
    return torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Dense)


def scale_stored(grad: torch.Tensor, scale: torch.Tensor, op: str, backend: str) -> torch.Tensor:
    """`grad · scale` for a gradient stored in forward: in place (no second N×C buffer) in
    the plain backward; a new tensor when the graph is kept (retain_graph=True), so that
    the stored gradient serves the next backward unchanged, and for a batch of scales
    (``autograd.grad(..., is_grads_batched=True)`` vmaps the backward)."""
    if graph_kept() or (not torch.compiler.is_compiling() and not _dense(scale)):
        return grad * scale
    torch.ops.fusedopt.scale_grad_(grad, scale, op, backend)
    return grad


def rescale(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """Backward of a loss whose gradient was saved in forward: grad · grad_output.

    - Plain backward: IN PLACE in the stored gradient (no second N×C buffer: O(rows) extra
      memory).  A scalar grad_output multiplies in the accumulation dtype (fp32, float64
      for float64) and rounds once; a per-row (or per-element) grad_output is in the loss's
      dtype, which is the gradient's.
    - retain_graph=True: a new tensor, so that the stored gradient serves the next backward.
    - create_graph=True (grad mode on in backward): the loss recomputed from its input in
      differentiable torch ops (`Recompute`), so that the gradient has a graph.
    Under torch.compile the plain form is traced (a compiled graph has no double backward)."""
    (grad,) = ctx.saved_tensors
    if not torch.compiler.is_compiling():
        if torch.is_grad_enabled():
            return _differentiable_grad(ctx, grad_output)
        if not graph_kept():
            ctx.recompute = None  # the graph is freed after this backward
    if ctx.per_row:
        g = grad_output.to(grad.dtype)
        if g.dim() == 1 and grad.dim() == 2:
            g = g[:, None]
    else:
        g = grad_output.to(accumulation_dtype(grad.dtype))
    return scale_stored(grad, g, ctx.op, ctx.backend)
