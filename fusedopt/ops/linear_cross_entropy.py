"""Fused linear cross-entropy: ``cross_entropy(input @ W^T + b, target)`` without the N x V
logits, as an autograd Function over the custom op ``fusedopt::linear_cross_entropy_fwd``.

The rows of ``x`` (N, H) are processed in chunks of ``R`` rows.  Per chunk c, with one
(R, V) logits buffer reused by every chunk:

    1. logits  = x_c @ W^T (+ b)                 platform GEMM (torch.mm / addmm)
    2. the backend's fused loss kernel (``cross_entropy_fwd``, inplace=True) writes the
       chunk's row losses and OVERWRITES the logits with d row_loss / d logits
    3. dX_c    = dlogits @ W                     GEMM, rows of the returned dX
    4. dW     += dlogits^T @ x_c                 GEMM into an fp32 accumulator
    5. db     += column sums of dlogits          (fp32)

The scales of the reduction ('mean': 1 / Σ w_{y_i} over non-ignored rows) are computed on
the device before the loop, so every chunk's gradient already carries them and nothing
synchronises.  The gradients are complete when forward returns; backward only multiplies
them by the scalar grad_output, in place.

reduction='none' has one grad_output per row, known only in backward, and dW, db need it
inside the sum over rows.  Keeping d logits for that would be the N x V buffer this op
exists to avoid, so forward computes only the row losses (the kernel writes no gradient)
and saves the inputs; backward runs the chunk loop again with each chunk's d logits
multiplied by its rows' grad_output (one extra logits GEMM, no N x V buffer).

Extra memory: the (R, V) logits buffer, the returned gradients (N x H, V x H, V) and an
fp32 V x H accumulator for dW -- the gradient itself for fp32 on CUDA; on CPU it holds
the transpose (the faster GEMM layout there) and is copied into the (V, H) gradient after
the logits buffer is freed; bf16/fp16 gradients are rounded from it at the end (on CPU
the dW GEMM also needs fp32 copies of the chunk's operands: torch has no bf16 x bf16 ->
fp32 GEMM there).  Work: 3 GEMMs of 2·N·V·H flops (4 for 'none' with gradients); the
loss kernel reads each chunk's logits at most twice and writes them once, while the chunk
is still in cache.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedopt.ops import _common, _formulas

_F32 = torch.float32

MIN_CHUNK_ROWS = 16


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def default_chunk_rows(n_rows: int, n_classes: int, hidden: int, device_type: str) -> int:
    """Rows per chunk for an (n_rows, hidden) input and n_classes classes (a power of two,
    at least MIN_CHUNK_ROWS, at most n_rows; docs/linear_cross_entropy.md "Chunk size").

    CPU: the chunk's logits hold at most as many elements as the larger of the weight
    (V x H) and the input (N x H) -- tall enough GEMMs, measured, within a memory that is
    already O(V x H).  Other devices: about as many as the input (chunk ≈ N·H / V rows),
    the budget of the GPU implementations this op is compared with."""
    if n_rows <= 0:
        return 1
    if device_type == "cpu":
        rows = _pow2_floor(max(hidden, n_rows * hidden // n_classes))
    else:
        rows = _pow2_floor(max(n_rows * hidden // n_classes, 1))
    return min(max(rows, MIN_CHUNK_ROWS), n_rows)


def _has_fp32_out_gemm(device: torch.device) -> bool:
    """torch's GEMM with bf16/fp16 operands and an fp32 output (``out_dtype=``): CUDA
    devices of compute capability 8.0 and newer only."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _add_weight_grad(acc: Tensor, dlogits: Tensor, x_chunk: Tensor, transposed: bool) -> None:
    """acc += dlogits^T @ x_chunk in fp32 for every input dtype; acc is the (V, H) fp32
    gradient, or with `transposed` its (H, V) transpose (x_chunk^T @ dlogits: the faster
    GEMM layout for MKL on CPU, measured)."""
    if dlogits.dtype != _F32:
        if _has_fp32_out_gemm(dlogits.device):   # bf16/fp16 operands, fp32 output
            torch.addmm(acc, dlogits.t(), x_chunk, out_dtype=_F32, out=acc)
            return
        # no mixed-precision GEMM on this device: the chunk's operands in fp32
        dlogits, x_chunk = dlogits.to(_F32), x_chunk.to(_F32)
    if transposed:
        acc.addmm_(x_chunk.t(), dlogits)
    else:
        acc.addmm_(dlogits.t(), x_chunk)


def chunked_pass(impl, x: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor],
                 class_weight: Optional[Tensor], scales: Tensor, row_scale: Optional[Tensor],
                 *, ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: Optional[float], chunk_rows: int, need_input_grad: bool,
                 need_weight_grad: bool, need_bias_grad: bool):
    """The chunk loop (module docstring) over the backend module `impl`.

    Returns (row_loss fp32 (N,), grad_input (N, H) or None, grad_weight (V, H) or None,
    grad_bias (V,) or None); gradients in the dtypes of their tensors.  `row_scale` (N,)
    multiplies each row's gradient (the grad_output of reduction='none')."""
    n_rows, hidden = x.shape
    n_classes = w.shape[0]
    need_grad = need_input_grad or need_weight_grad or need_bias_grad
    row_loss = x.new_empty(n_rows, dtype=_F32)
    grad_input = x.new_empty((n_rows, hidden)) if need_input_grad else None
    transposed = x.device.type == "cpu"
    weight_acc = None
    if need_weight_grad:
        weight_acc = w.new_zeros((hidden, n_classes) if transposed else (n_classes, hidden),
                                 dtype=_F32)
    bias_acc = x.new_zeros(n_classes, dtype=_F32) if need_bias_grad else None
    logits_buf = x.new_empty((min(chunk_rows, n_rows), n_classes))
    w_t = w.t()
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        x_chunk = x[start:stop]
        logits = logits_buf[: stop - start]
        if bias is None:
            torch.mm(x_chunk, w_t, out=logits)
        else:
            torch.addmm(bias, x_chunk, w_t, out=logits)
        chunk_loss, _ = impl.cross_entropy_fwd(
            logits, target[start:stop], class_weight, scales, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            soft_target=False, inplace=True, need_grad=need_grad)
        row_loss[start:stop] = chunk_loss
        if not need_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[start:stop, None])
        if need_input_grad:
            torch.mm(logits, w, out=grad_input[start:stop])
        if need_weight_grad:
            _add_weight_grad(weight_acc, logits, x_chunk, transposed)
        if need_bias_grad:
            bias_acc += logits.sum(0, dtype=_F32)
    logits_buf = logits = None   # the chunk is freed before the weight gradient's copy
    grad_weight = None
    if weight_acc is not None:
        grad_weight = (weight_acc.t() if transposed else weight_acc).to(
            w.dtype, memory_format=torch.contiguous_format)
    grad_bias = None if bias_acc is None else bias_acc.to(bias.dtype)
    return row_loss, grad_input, grad_weight, grad_bias


@torch.library.custom_op("fusedopt::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(input: Tensor, linear_weight: Tensor, target: Tensor,
                             linear_bias: Optional[Tensor], weight: Optional[Tensor],
                             scales: Tensor, row_scale: Optional[Tensor], ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: Optional[float],
                             chunk_rows: int, need_input_grad: bool, need_weight_grad: bool,
                             need_bias_grad: bool, backend: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss fp32 (N,), grad_input (N, H), grad_weight (V, H), grad_bias (V,)); a
    gradient that is not asked for is an empty (0,) tensor."""
    impl = _common.backend_module("cross_entropy", input.device, backend)
    _common.check_class_targets(target, linear_weight.shape[0], ignore_index)
    row_loss, grad_input, grad_weight, grad_bias = chunked_pass(
        impl, input, linear_weight, target, linear_bias, weight, scales, row_scale,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, chunk_rows=chunk_rows, need_input_grad=need_input_grad,
        need_weight_grad=need_weight_grad, need_bias_grad=need_bias_grad)
    return (row_loss,) + tuple(input.new_empty(0) if g is None else g
                               for g in (grad_input, grad_weight, grad_bias))


@linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, target, linear_bias, weight, scales, row_scale, ignore_index,
      label_smoothing, z_loss, softcap, chunk_rows, need_input_grad, need_weight_grad,
      need_bias_grad, backend):
    row_loss = input.new_empty(input.shape[0], dtype=_F32)
    grad_input = input.new_empty(input.shape if need_input_grad else (0,))
    grad_weight = linear_weight.new_empty(linear_weight.shape if need_weight_grad else (0,))
    grad_bias = (linear_bias.new_empty(linear_bias.shape) if need_bias_grad
                 else input.new_empty(0))
    return row_loss, grad_input, grad_weight, grad_bias


class Operands:
    """What a differentiable backward (create_graph=True) needs to form the loss again: the
    caller's input, linear weight and bias (references, never copies) with their versions,
    `rows(input)` the Function's (N, H) input and `output(x, w, b)` the Function's output
    in differentiable torch ops (the full N x V logits: docs/linear_cross_entropy.md,
    "Autograd")."""

    __slots__ = ("tensors", "versions", "rows", "output")

    def __init__(self, tensors, rows, output):
        self.tensors = tensors
        self.versions = tuple(None if t is None else t._version for t in tensors)
        self.rows, self.output = rows, output


def _differentiable_grads(ctx, grad_output):
    """The gradients with a graph of their own: the loss recomputed from the caller's
    tensors in differentiable torch ops, differentiated by autograd."""
    operands = getattr(ctx, "operands", None)
    if operands is None:
        raise RuntimeError(
            "fusedopt linear_cross_entropy: backward with create_graph=True (a double "
            "backward, e.g. a gradient penalty) is not supported for a loss computed under "
            "torch.compile")
    for t, version in zip(operands.tensors, operands.versions):
        if t is not None and t._version != version:
            raise RuntimeError(
                "fusedopt linear_cross_entropy: backward with create_graph=True recomputes "
                "the loss from input, linear_weight and linear_bias, one of which was "
                "modified in place after the loss was computed")
    input, linear_weight, linear_bias = operands.tensors
    x = operands.rows(input)
    wrt = [t for t, needed in zip((x, linear_weight, linear_bias), ctx.needs) if needed]
    grads = iter(torch.autograd.grad(operands.output(x, linear_weight, linear_bias), wrt,
                                     grad_output, create_graph=True))
    return tuple(next(grads) if needed else None for needed in ctx.needs)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(N, H) input -> fp32 row losses ('none') or their sum; for 'mean'/'sum' the gradients
    come from forward, for 'none' backward recomputes them chunk by chunk.  `operands` (an
    Operands or None) is how a differentiable backward forms the loss again."""

    @staticmethod
    def forward(ctx, input, linear_weight, target, linear_bias, weight, scales, ignore_index,
                label_smoothing, z_loss, softcap, chunk_rows, reduction, needs, backend,
                operands=None):
        ctx.per_row, ctx.needs, ctx.backend = reduction == "none", needs, backend
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_rows)
        if any(needs) and not torch.compiler.is_compiling():
            ctx.operands = operands
        op = torch.ops.fusedopt.linear_cross_entropy_fwd
        if ctx.per_row:
            row_loss = op(input, linear_weight, target, linear_bias, weight, scales, None,
                          *ctx.options, False, False, False, backend)[0]
            if any(needs):
                ctx.save_for_backward(input, linear_weight, target, linear_bias, weight,
                                      scales)
            return row_loss
        row_loss, *grads = op(input, linear_weight, target, linear_bias, weight, scales, None,
                              *ctx.options, *needs, backend)
        ctx.save_for_backward(*grads)
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if not torch.compiler.is_compiling():
            if torch.is_grad_enabled():
                grad_input, grad_weight, grad_bias = _differentiable_grads(ctx, grad_output)
                return (grad_input, grad_weight, None, grad_bias) + (None,) * 11
            if not _common.graph_kept():
                ctx.operands = None  # the graph is freed after this backward
        if ctx.per_row:
            input, linear_weight, target, linear_bias, weight, scales = ctx.saved_tensors
            _, *grads = torch.ops.fusedopt.linear_cross_entropy_fwd(
                input, linear_weight, target, linear_bias, weight, scales,
                grad_output.to(_F32).contiguous(), *ctx.options, *ctx.needs, ctx.backend)
        else:   # 'mean'/'sum': the gradients from forward, scaled (in place unless kept)
            scale = grad_output.to(_F32)
            grads = [_common.scale_stored(grad, scale, "cross_entropy", ctx.backend)
                     if needed else None for grad, needed in zip(ctx.saved_tensors, ctx.needs)]
        grad_input, grad_weight, grad_bias = (g if needed else None
                                              for g, needed in zip(grads, ctx.needs))
        return (grad_input, grad_weight, None, grad_bias) + (None,) * 11


def _has_tangent(*tensors):
    """Whether one of `tensors` carries a forward-mode AD tangent (a dual tensor)."""
    forward_ad = torch.autograd.forward_ad
    return not torch.compiler.is_compiling() and forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index,
                         reduction, label_smoothing, z_loss, softcap, chunk_size, backend):
    """The loss for validated arguments (see fusedopt.functional.linear_cross_entropy)."""
    hidden = input.shape[-1]
    n_classes = linear_weight.shape[0]
    n_rows = math.prod(input.shape[:-1])
    x = input.reshape(n_rows, hidden)
    target_rows = target.reshape(-1).contiguous()
    weight32 = weight.to(_F32).contiguous() if weight is not None else None

    denominator = None
    if reduction == "mean":
        denominator, n_valid = _common.class_mean_denominators(
            target_rows, weight32, ignore_index, n_classes)
        scales = _common.mean_scales(denominator, n_valid)
    else:
        scales = _common.unit_scales(input.device)

    label_smoothing, z_loss = float(label_smoothing), float(z_loss)
    softcap = None if softcap is None else float(softcap)
    backend = backend or ""

    def rows(t):
        return t.reshape(n_rows, hidden)

    def output(x_rows, w, b):
        """The Function's output in differentiable torch ops (the full logits)."""
        row_loss = _formulas.cross_entropy_rows(
            F.linear(x_rows, w, b), target_rows, weight32, scales, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            soft_target=False)
        return row_loss if reduction == "none" else row_loss.sum()

    if _common.needs_formula(input, weight) or _has_tangent(linear_weight, linear_bias):
        _common.backend_module("cross_entropy", input.device, backend)
        _common.check_class_targets(target_rows, n_classes, ignore_index)
        out = output(x, linear_weight, linear_bias)
    else:
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
                 grad_on and linear_bias is not None and linear_bias.requires_grad)
        chunk_rows = int(chunk_size) if chunk_size else default_chunk_rows(
            n_rows, n_classes, hidden, input.device.type)
        operands = None
        if any(needs) and not torch.compiler.is_compiling():
            operands = Operands((input, linear_weight, linear_bias), rows, output)
        out = LinearCrossEntropyFunction.apply(
            x, linear_weight, target_rows, linear_bias, weight32, scales, ignore_index,
            label_smoothing, z_loss, softcap, chunk_rows, reduction, needs, backend, operands)
    if reduction == "none":
        return out.reshape(target.shape).to(input.dtype)
    if denominator is not None:
        out = _common.nan_if_zero(out, denominator)
    return out.to(input.dtype)
