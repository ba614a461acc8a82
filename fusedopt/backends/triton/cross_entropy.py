"""Triton fused softmax cross-entropy: loss and gradient of every row in ONE kernel launch.

Math, per row (logits l_1..l_C, class target y or probability target q, smoothing eps,
class weights w (all 1 without `weight`), soft-cap s, z-loss coefficient c,
scales = [ce_scale, z_scale] read from device memory):

    x_j  = s * tanh(l_j / s)                     (x = l without soft-capping)
    lse  = log sum_j exp(x_j)                    online: running max m, sum exp(x - m)
    p_j  = exp((x_j - m) - log sum_j exp(x_j - m))
    class target: ce = (1-eps)*w_y*(lse - x_y) + (eps/C)*sum_j w_j*(lse - x_j)
    soft target:  ce = sum_j r_j*(lse - x_j),             r_j = w_j*((1-eps)*q_j + eps/C)
    loss = ce_scale*ce + z_scale*c*lse^2
    dloss/dx_j = p_j*A - t_j with
      class: A = ce_scale*((1-eps)*w_y + (eps/C)*sum w) + 2*z_scale*c*lse,
             t_j = ce_scale*((1-eps)*w_y*[j == y] + (eps/C)*w_j)
      soft:  A = ce_scale*sum r + 2*z_scale*c*lse,     t_j = ce_scale*r_j
    dloss/dl_j = dloss/dx_j * (1 - (x_j/s)^2)

The weighted sums are taken relative to the row max M, as torch's log-softmax does:
lse - x_j = log_sum + (M - x_j), so ce = log_sum * (sum of the weights) + the gap sum
sum_j w_j*(M - x_j), whose terms are all >= 0.  (lse*sum w - sum w*x cancels: a row of
equal logits 1e30 would lose every digit.)

One program per row.  Pass 1 streams the row in BLOCK-wide chunks; every lane keeps its
own fp32 running max and exp-sum (and sum w with weighted smoothing, sum r for soft
targets), so the loop has no cross-warp reduction and no barrier; the lanes are combined
once at the end of the row.  x_y (and w_y) is one masked scalar load.  Pass 2 streams the
row again, writing each gradient chunk once (computed in fp32, the target-class term
included, rounded once at the store) and adding up the gap sum, which needs M; the loss
is stored after it (without a gradient pass 2 only adds up the gap sum, and runs only
when there is one).  When the row fits in one block (C <= BLOCK) it stays in registers
and pass 2 reads nothing again.

Memory traffic for N rows, C classes, b bytes per logit:
    reads  2*N*C*b   (N*C*b when C <= BLOCK, or without need_grad for class targets
                      without smoothing)          + soft targets: 2*N*C*b (N*C*b)
    writes N*C*b (gradient, none without need_grad) + 4*N (row losses)
plus class weights (4*C per row, L2-resident) when a weighted term needs them.  No
intermediate tensor is allocated.  Ignored rows write zeros and read nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt.backends import _loss_boundary as boundary
from fusedopt.backends.triton._interpreter import INTERPRETED, loop_bound

__all__ = ["cross_entropy_fwd"]

OPS = frozenset({"cross_entropy"})

# Largest chunk of a row one program processes at a time (a power of two).  8192 values
# with 16 warps are 16 per thread: the plain kernel fits in 64 registers (ptxas, sm_90),
# so two programs share an SM, 16 or 32 KiB of loads in flight each (bf16 or fp32).
MAX_BLOCK = 8192


def block_size_for(n_cols: int) -> int:
    """Chunk width for rows of `n_cols` classes: the whole row up to MAX_BLOCK."""
    return min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)


def num_warps_for(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def check_block_size(block: int) -> int:
    if block < 1 or block & (block - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block}")
    return block


@triton.jit
def _cast_for(v, ptr):
    """fp32 v in the element type of ptr, rounded to nearest even on every target (the
    interpreter casts fp32 -> bf16 by truncation; the GPU rounds to nearest even)."""
    if INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _expm1(v):
    """exp(v) - 1 without cancellation: degree-9 Taylor polynomial for |v| < 0.5."""
    small = tl.abs(v) < 0.5
    w = tl.where(small, v, 0.0)
    poly = w * (1.0 + w * (0.5 + w * (0.16666666666666666 + w * (0.041666666666666664 + w * (
        0.008333333333333333 + w * (0.001388888888888889 + w * (0.0001984126984126984 + w * (
            2.48015873015873e-05 + w * 2.755731922398589e-06))))))))
    return tl.where(small, poly, tl.exp(v) - 1.0)


@triton.jit
def _tanh(z):
    """tanh(z) = -expm1(-2|z|) / (2 + expm1(-2|z|)), sign restored; exact limits at +-inf."""
    e = _expm1(-2.0 * tl.abs(z))
    t = -e / (2.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _load_x(row_ptr, cols, mask, softcap, SOFTCAP: tl.constexpr):
    """One chunk of a row in fp32 (soft-capped); -inf in the masked tail."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if SOFTCAP:
        x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
    return x


@triton.jit
def _lse_update(x, m, d):
    """Per-lane online log-sum-exp: fold chunk x into (lane max m, lane sum exp(x - m) d)."""
    m_new = tl.maximum(m, x)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane of -inf so far keeps d = 0
    d = d * tl.exp(m - shift) + tl.exp(x - shift)
    return m_new, d


@triton.jit
def _lse_finish(m, d):
    """(row max, log sum exp(x - row max)) from the per-lane (m, d): the one cross-lane
    reduction.  Kept apart so that log p = (x - max) - log_sum keeps fp32 precision for
    large logits (max + log_sum rounds to the ulp of the max)."""
    row_max = tl.max(m, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, tl.log(tl.sum(d * tl.exp(m - shift), axis=0))


@triton.jit
def _store_grad(out_row, cols, mask, x, row_max, log_sum, a, t, row_nan, softcap,
                SOFTCAP: tl.constexpr):
    """grad_j = (p_j*a - t_j) * dx/dl, all fp32, rounded once at the store."""
    g = tl.exp((x - row_max) - log_sum) * a - t
    if SOFTCAP:
        capped = tl.where(mask, x / softcap, 0.0)  # the masked tail holds -inf
        g = g * (1.0 - capped * capped)
    tl.store(out_row + cols, _cast_for(g + row_nan, out_row), mask=mask)


@triton.jit
def _zero_row(out_row, n_cols, offs, BLOCK: tl.constexpr):
    for start in range(0, loop_bound(n_cols), BLOCK):
        cols = start + offs
        tl.store(out_row + cols, tl.zeros([BLOCK], out_row.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _gap(x, w, mask, row_max):
    """w_j*(M - x_j) of one chunk, 0 in the masked tail: the terms of a gap sum."""
    return w * tl.where(mask, row_max - x, 0.0)


@triton.jit
def _class_stats(x, cols, mask, weight_ptr, m, d, sum_w,
                 HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr):
    """Fold one chunk into the per-lane accumulators of pass 1."""
    m, d = _lse_update(x, m, d)
    if SMOOTHING:
        if HAS_WEIGHT:
            sum_w += tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return m, d, sum_w


@triton.jit
def _class_gap(x, cols, mask, weight_ptr, row_max, HAS_WEIGHT: tl.constexpr):
    """The gap terms w_j*(M - x_j) of smoothing of one chunk."""
    if HAS_WEIGHT:
        return _gap(x, tl.load(weight_ptr + cols, mask=mask, other=0.0), mask, row_max)
    return _gap(x, 1.0, mask, row_max)


@triton.jit
def _class_grad(out_row, cols, mask, x, weight_ptr, y, row_max, log_sum, a, b, c, row_nan, softcap,
                HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr):
    t = tl.where(cols == y, b, 0.0)
    if SMOOTHING:
        if HAS_WEIGHT:
            t += c * tl.load(weight_ptr + cols, mask=mask, other=0.0)
        else:
            t += c
    _store_grad(out_row, cols, mask, x, row_max, log_sum, a, t, row_nan, softcap, SOFTCAP)


@triton.jit
def _class_target_row(in_row, out_row, row, y, weight_ptr, scales_ptr, loss_ptr, n_cols,
                      smoothing, z_loss, softcap, offs, BLOCK: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
                      SOFTCAP: tl.constexpr, NEED_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    # 1. the target logit (and weight): a scalar load, masked so a bad target reads nothing
    valid = (y >= 0) & (y < n_cols)
    y_safe = tl.where(valid, y, 0)
    x_y = tl.load(in_row + y_safe, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        x_y = softcap * _tanh(x_y / softcap)
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=valid, other=0.0)
    # 2. pass 1: log-sum-exp (and sum w for weighted smoothing), accumulated per lane
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    sum_w = tl.zeros([BLOCK], tl.float32)
    if SINGLE_BLOCK:
        mask_row = offs < n_cols
        x_row = _load_x(in_row, offs, mask_row, softcap, SOFTCAP)
        m, d, sum_w = _class_stats(x_row, offs, mask_row, weight_ptr, m, d, sum_w, HAS_WEIGHT,
                                   SMOOTHING)
    else:
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            m, d, sum_w = _class_stats(x, cols, mask, weight_ptr, m, d, sum_w, HAS_WEIGHT,
                                       SMOOTHING)
    # 3. the gradient coefficients and the loss without its gap sum
    row_max, log_sum = _lse_finish(m, d)
    lse = row_max + log_sum
    ce_scale = tl.load(scales_ptr)
    ce = (1.0 - smoothing) * w_y * ((row_max - x_y) + log_sum)
    a = (1.0 - smoothing) * w_y
    if SMOOTHING:
        if HAS_WEIGHT:
            total_w = tl.sum(sum_w, axis=0)
        else:
            total_w = n_cols * 1.0
        ce += smoothing / n_cols * (log_sum * total_w)
        a += smoothing / n_cols * total_w
    loss = ce_scale * ce
    a = ce_scale * a
    if Z_LOSS:
        z_scale = tl.load(scales_ptr + 1)
        loss += z_scale * z_loss * lse * lse
        a += 2.0 * z_scale * z_loss * lse
    row_nan = tl.where(valid, 0.0, float("nan"))
    b = ce_scale * (1.0 - smoothing) * w_y
    c = ce_scale * smoothing / n_cols
    # 4. pass 2: the gradient row and the gap sum of smoothing, sum_j w_j*(M - x_j)
    gap = tl.zeros([BLOCK], tl.float32)
    if SINGLE_BLOCK:
        if NEED_GRAD:
            _class_grad(out_row, offs, mask_row, x_row, weight_ptr, y, row_max, log_sum, a, b, c,
                        row_nan, softcap, HAS_WEIGHT, SMOOTHING, SOFTCAP)
        if SMOOTHING:
            gap += _class_gap(x_row, offs, mask_row, weight_ptr, row_max, HAS_WEIGHT)
    elif NEED_GRAD or SMOOTHING:
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            if NEED_GRAD:
                _class_grad(out_row, cols, mask, x, weight_ptr, y, row_max, log_sum, a, b, c,
                            row_nan, softcap, HAS_WEIGHT, SMOOTHING, SOFTCAP)
            if SMOOTHING:
                gap += _class_gap(x, cols, mask, weight_ptr, row_max, HAS_WEIGHT)
    if SMOOTHING:
        loss += c * tl.sum(gap, axis=0)
    tl.store(loss_ptr + row, loss + row_nan)


@triton.jit
def _soft_weights(target_row, weight_ptr, cols, mask, n_cols, smoothing,
                  HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr):
    """r_j = w_j * ((1-eps)*q_j + eps/C), 0 in the masked tail."""
    r = tl.load(target_row + cols, mask=mask, other=0.0).to(tl.float32)
    if SMOOTHING:
        r = r * (1.0 - smoothing) + smoothing / n_cols
    if HAS_WEIGHT:
        r = r * tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return tl.where(mask, r, 0.0)


@triton.jit
def _soft_target_row(in_row, out_row, target_row, row, weight_ptr, scales_ptr, loss_ptr, n_cols,
                     smoothing, z_loss, softcap, offs, BLOCK: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, Z_LOSS: tl.constexpr,
                     SOFTCAP: tl.constexpr, NEED_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    # 1. pass 1: log-sum-exp and sum r, accumulated per lane
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    sum_r = tl.zeros([BLOCK], tl.float32)
    if SINGLE_BLOCK:
        mask_row = offs < n_cols
        x_row = _load_x(in_row, offs, mask_row, softcap, SOFTCAP)
        r_row = _soft_weights(target_row, weight_ptr, offs, mask_row, n_cols, smoothing,
                              HAS_WEIGHT, SMOOTHING)
        m, d = _lse_update(x_row, m, d)
        sum_r += r_row
    else:
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            r = _soft_weights(target_row, weight_ptr, cols, mask, n_cols, smoothing,
                              HAS_WEIGHT, SMOOTHING)
            m, d = _lse_update(x, m, d)
            sum_r += r
    # 2. the gradient coefficient and the loss without its gap sum
    row_max, log_sum = _lse_finish(m, d)
    lse = row_max + log_sum
    ce_scale = tl.load(scales_ptr)
    total_r = tl.sum(sum_r, axis=0)
    loss = ce_scale * (log_sum * total_r)
    a = ce_scale * total_r
    if Z_LOSS:
        z_scale = tl.load(scales_ptr + 1)
        loss += z_scale * z_loss * lse * lse
        a += 2.0 * z_scale * z_loss * lse
    # 3. pass 2: the gradient row and the gap sum sum_j r_j*(M - x_j)
    gap = tl.zeros([BLOCK], tl.float32)
    if SINGLE_BLOCK:
        if NEED_GRAD:
            _store_grad(out_row, offs, mask_row, x_row, row_max, log_sum, a, ce_scale * r_row, 0.0,
                        softcap, SOFTCAP)
        gap += _gap(x_row, r_row, mask_row, row_max)
    else:
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            r = _soft_weights(target_row, weight_ptr, cols, mask, n_cols, smoothing,
                              HAS_WEIGHT, SMOOTHING)
            if NEED_GRAD:
                _store_grad(out_row, cols, mask, x, row_max, log_sum, a, ce_scale * r, 0.0,
                            softcap, SOFTCAP)
            gap += _gap(x, r, mask, row_max)
    tl.store(loss_ptr + row, loss + ce_scale * tl.sum(gap, axis=0))


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, scales_ptr,
    loss_ptr, grad_ptr, grad_stride,
    n_cols, ignore_index, smoothing, z_loss, softcap,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    Z_LOSS: tl.constexpr, SOFTCAP: tl.constexpr, SOFT_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * logits_stride
    out_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    if SOFT_TARGET:
        _soft_target_row(in_row, out_row, target_ptr + row * target_stride, row, weight_ptr,
                         scales_ptr, loss_ptr, n_cols, smoothing, z_loss, softcap, offs, BLOCK,
                         HAS_WEIGHT, SMOOTHING, Z_LOSS, SOFTCAP, NEED_GRAD, SINGLE_BLOCK)
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        if y == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if NEED_GRAD:
                _zero_row(out_row, n_cols, offs, BLOCK)
        else:
            _class_target_row(in_row, out_row, row, y, weight_ptr, scales_ptr, loss_ptr, n_cols,
                              smoothing, z_loss, softcap, offs, BLOCK, HAS_WEIGHT, SMOOTHING,
                              Z_LOSS, SOFTCAP, NEED_GRAD, SINGLE_BLOCK)


def device_types() -> tuple[str, ...]:
    """The devices the kernels take tensors on: CUDA, and CPU under the interpreter."""
    return ("cuda", "cpu") if INTERPRETED.value else ("cuda",)


def cross_entropy_fwd(logits, target, weight, scales, *, ignore_index, label_smoothing, z_loss,
                      softcap, soft_target, inplace, need_grad, block_size=None):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None).

    Contract: docs/architecture.md "Losses".  `block_size` (a power of two) overrides the
    chunk width; tests use it to run the multi-chunk path on small rows.  Every tensor is
    verified first (fusedopt/backends/_loss_boundary.py).
    """
    op = "cross_entropy_fwd"
    row_stride = boundary.rows(op, logits, device_types())
    n_rows, n_cols = logits.shape
    device = logits.device
    if soft_target:
        target_stride = boundary.soft_targets(op, target, logits)
    else:
        boundary.class_targets(op, target, n_rows, device)
        target_stride = 0
    weight = boundary.class_vector(op, "weight", weight, n_cols, device)
    boundary.scales(op, scales, device)
    ignore_index = boundary.ignore_index(op, ignore_index)
    softcap = boundary.softcap(op, softcap)
    z_loss = boundary.fp32_finite(op, "z_loss", z_loss)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype,
                                                  device=device)
    if n_rows == 0:
        return row_loss, grad
    block = check_block_size(block_size) if block_size else block_size_for(n_cols)
    out = grad if need_grad else logits  # not written when need_grad is False
    out_stride = row_stride if out is logits else n_cols
    _cross_entropy_kernel[(n_rows,)](
        logits, row_stride, target, target_stride,
        weight if weight is not None else scales, scales,
        row_loss, out, out_stride,
        n_cols, ignore_index, float(label_smoothing), z_loss,
        softcap if softcap is not None else 1.0,
        BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTHING=label_smoothing > 0,
        Z_LOSS=z_loss > 0, SOFTCAP=softcap is not None, SOFT_TARGET=bool(soft_target),
        NEED_GRAD=bool(need_grad), SINGLE_BLOCK=n_cols <= block,
        num_warps=num_warps_for(block),
    )
    return row_loss, grad
