"""Triton focal losses: softmax focal (multi-class) and sigmoid focal (binary / multi-label),
loss and gradient fused in one kernel launch each.

Softmax focal, per row (logits x, target y, smoothing eps, class weights alpha, gamma,
scale = scales[0]):

    L_j = log p_j = (x_j - max x) - log sum_c exp(x_c - max x),  u_j = 1 - p_j = -expm1(L_j)
    q_j = (1-eps)*[j == y] + eps/C
    loss = -scale * sum_j alpha_j*q_j*u_j^gamma*L_j
    g_j  = alpha_j*q_j*u_j^gamma*(1 - gamma*p_j*L_j/u_j)        (p*L/u -> -1 as p -> 1)
    dloss/dx_j = scale * (p_j*G - g_j),  G = sum_c g_c

L and u are formed in fp32 from L (never as 1 - exp(...)), and u^gamma is guarded so
that gamma = 0 gives 1 and 0 < gamma < 1 never raises 0 to a negative power: the gradient
is finite as p -> 1 for every gamma >= 0.  Without smoothing only the target term is
non-zero: g_y comes from two scalars and dloss/dx_j = scale*g_y*(p_j - [j == y]), the
target entry written as -u_y.  With smoothing G needs every p_j, hence the log-sum-exp
first.

Passes over a row of C logits of b bytes (one program per row):
    no smoothing:    2 reads (lse; gradient)                     writes C*b + 4
    with smoothing:  3 reads (lse; G and the loss; gradient)     writes C*b + 4
The third read is the price of G: it depends on lse (pass 1) and every gradient entry
depends on G (pass 3), so with C > BLOCK nothing of pass 2 can be written early.  With
C <= BLOCK the row stays in registers and is read once.

Sigmoid focal, elementwise (torchvision's RetinaNet loss plus smoothing):

    t' = t*(1-eps) + eps/2,  p = sigmoid(x),  ce = max(x, 0) - x*t' + log1p(exp(-|x|))
    v = 1 - p_t = p*(1-t') + (1-p)*t',  loss = a_t * ce * v^gamma
    dloss/dx = a_t * ((p*(1-t') - (1-p)*t')*v^gamma + gamma*ce*v^gamma*p*(1-p)*(1-2t')/v)
    a_t = alpha*t' + (1-alpha)*(1-t')  (1 when alpha < 0)

p and 1-p come from exp(-|x|) without cancellation.  Reads 2*n*b (logits, targets),
writes n*b (gradient) and n*b (per-element loss) or 4 bytes per program (partial sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt.backends import _loss_boundary as boundary
from fusedopt.backends.triton._interpreter import loop_bound
from fusedopt.backends.triton.cross_entropy import (
    _cast_for,
    _expm1,
    _load_x,
    _lse_finish,
    _lse_update,
    _zero_row,
    block_size_for,
    check_block_size,
    device_types,
    num_warps_for,
)

__all__ = ["focal_loss_fwd", "sigmoid_focal_loss_fwd"]

OPS = frozenset({"focal_loss", "sigmoid_focal_loss"})

# Elements per program of the sigmoid focal kernel (8 per thread with 8 warps: 93 registers
# on sm_90, where 4096 would need 171); with reduce=True also the span of one partial sum.
SIGMOID_BLOCK = 2048


@triton.jit
def _pow(u, gamma):
    """u**gamma for u >= 0, gamma >= 0, with 0**0 = 1 and 0**gamma = 0 otherwise."""
    powered = tl.exp2(gamma * tl.log2(tl.where(u == 0, 1.0, u)))
    return tl.where(u == 0, tl.where(gamma == 0, 1.0, 0.0), powered)


@triton.jit
def _plogp_over_u(p, log_p, u):
    """p*log(p)/(1-p) from its parts: -1 at p = 1 and 0 at p = 0 (its limits)."""
    plogp = p * tl.where(p > 0, log_p, 0.0)
    return tl.where(u == 0, -1.0, plogp / tl.where(u == 0, 1.0, u))


@triton.jit
def _focal_terms(x, cols, mask, y, row_max, log_sum, alpha_ptr, n_cols, gamma, smoothing,
                 HAS_ALPHA: tl.constexpr):
    """(p_j, g_j, alpha_j*q_j*u_j^gamma*L_j) of one chunk, 0 in the masked tail.  alpha
    may be negative: the formula is used as it stands (docs/losses.md)."""
    log_p = (x - row_max) - log_sum
    p = tl.exp(log_p)
    u = -_expm1(log_p)
    u_pow = _pow(u, gamma)
    q = tl.where(cols == y, 1.0 - smoothing, 0.0) + smoothing / n_cols
    if HAS_ALPHA:
        q = q * tl.load(alpha_ptr + cols, mask=mask, other=0.0)
    q = tl.where(mask, q, 0.0)
    g = q * u_pow * (1.0 - gamma * _plogp_over_u(p, log_p, u))
    # a class with alpha_j*q_j = 0 adds nothing, even where log p = -inf
    return p, g, q * u_pow * tl.where(q != 0, log_p, 0.0)


@triton.jit
def _focal_kernel(
    logits_ptr, logits_stride, target_ptr, alpha_ptr, scales_ptr, loss_ptr, grad_ptr, grad_stride,
    n_cols, ignore_index, gamma, smoothing,
    BLOCK: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTHING: tl.constexpr,
    NEED_GRAD: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * logits_stride
    out_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    y = tl.load(target_ptr + row).to(tl.int64)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if NEED_GRAD:
            _zero_row(out_row, n_cols, offs, BLOCK)
    else:
        valid = (y >= 0) & (y < n_cols)
        y_safe = tl.where(valid, y, 0)
        row_nan = tl.where(valid, 0.0, float("nan"))
        scale = tl.load(scales_ptr)
        # 1. pass 1: log-sum-exp, per lane
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        if SINGLE_BLOCK:
            mask_row = offs < n_cols
            x_row = _load_x(in_row, offs, mask_row, 1.0, False)
            m, d = _lse_update(x_row, m, d)
        else:
            for start in range(0, loop_bound(n_cols), BLOCK):
                cols = start + offs
                m, d = _lse_update(_load_x(in_row, cols, cols < n_cols, 1.0, False), m, d)
        row_max, log_sum = _lse_finish(m, d)
        if SMOOTHING:
            # 2. pass 2: G = sum g and the loss need lse
            g_sum = tl.zeros([BLOCK], tl.float32)
            f_sum = tl.zeros([BLOCK], tl.float32)
            if SINGLE_BLOCK:
                p_row, g_row, f_row = _focal_terms(x_row, offs, mask_row, y, row_max, log_sum,
                                                   alpha_ptr, n_cols, gamma, smoothing, HAS_ALPHA)
                g_sum += g_row
                f_sum += f_row
            else:
                for start in range(0, loop_bound(n_cols), BLOCK):
                    cols = start + offs
                    mask = cols < n_cols
                    x = _load_x(in_row, cols, mask, 1.0, False)
                    _, g, f = _focal_terms(x, cols, mask, y, row_max, log_sum, alpha_ptr, n_cols,
                                           gamma, smoothing, HAS_ALPHA)
                    g_sum += g
                    f_sum += f
            g_total = tl.sum(g_sum, axis=0)
            tl.store(loss_ptr + row, -scale * tl.sum(f_sum, axis=0) + row_nan)
            # 3. pass 3: the gradient, p_j*G - g_j
            if NEED_GRAD:
                if SINGLE_BLOCK:
                    grad = scale * (p_row * g_total - g_row) + row_nan
                    tl.store(out_row + offs, _cast_for(grad, out_row), mask=mask_row)
                else:
                    for start in range(0, loop_bound(n_cols), BLOCK):
                        cols = start + offs
                        mask = cols < n_cols
                        x = _load_x(in_row, cols, mask, 1.0, False)
                        p, g, _ = _focal_terms(x, cols, mask, y, row_max, log_sum, alpha_ptr,
                                               n_cols, gamma, smoothing, HAS_ALPHA)
                        grad = scale * (p * g_total - g) + row_nan
                        tl.store(out_row + cols, _cast_for(grad, out_row), mask=mask)
        else:
            # 2. the target term from two scalars
            x_y = tl.load(in_row + y_safe, mask=valid, other=0.0).to(tl.float32)
            log_p_y = (x_y - row_max) - log_sum
            p_y = tl.exp(log_p_y)
            u_y = -_expm1(log_p_y)
            coef = scale * _pow(u_y, gamma)
            if HAS_ALPHA:
                coef = coef * tl.load(alpha_ptr + y_safe, mask=valid, other=0.0)
            tl.store(loss_ptr + row, tl.where(coef == 0, 0.0, -coef * log_p_y) + row_nan)
            g_y = coef * (1.0 - gamma * _plogp_over_u(p_y, log_p_y, u_y))
            # 3. pass 2: the gradient, g_y * (p_j - [j == y])
            if NEED_GRAD:
                if SINGLE_BLOCK:
                    p_row = tl.exp((x_row - row_max) - log_sum)
                    grad = g_y * tl.where(offs == y, -u_y, p_row) + row_nan
                    tl.store(out_row + offs, _cast_for(grad, out_row), mask=mask_row)
                else:
                    for start in range(0, loop_bound(n_cols), BLOCK):
                        cols = start + offs
                        mask = cols < n_cols
                        x = _load_x(in_row, cols, mask, 1.0, False)
                        p = tl.exp((x - row_max) - log_sum)
                        grad = g_y * tl.where(cols == y, -u_y, p) + row_nan
                        tl.store(out_row + cols, _cast_for(grad, out_row), mask=mask)


def focal_loss_fwd(logits, target, alpha, scales, *, gamma, ignore_index, label_smoothing,
                   need_grad, block_size=None):
    """Row losses (N,) fp32 and the gradient (N, C) in the logits' dtype (or None).

    Contract: docs/architecture.md "Losses".  `block_size` (a power of two) overrides the
    chunk width; tests use it to run the multi-chunk path on small rows.  Every tensor is
    verified first (fusedopt/backends/_loss_boundary.py).
    """
    op = "focal_loss_fwd"
    row_stride = boundary.rows(op, logits, device_types())
    n_rows, n_cols = logits.shape
    device = logits.device
    boundary.class_targets(op, target, n_rows, device)
    alpha = boundary.class_vector(op, "alpha", alpha, n_cols, device)
    boundary.scales(op, scales, device)
    ignore_index = boundary.ignore_index(op, ignore_index)
    gamma = boundary.fp32_finite(op, "gamma", gamma)
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=device) if need_grad else None
    if n_rows == 0:
        return row_loss, grad
    block = check_block_size(block_size) if block_size else block_size_for(n_cols)
    out = grad if need_grad else logits  # not written when need_grad is False
    _focal_kernel[(n_rows,)](
        logits, row_stride, target, alpha if alpha is not None else scales, scales,
        row_loss, out, n_cols,
        n_cols, ignore_index, gamma, float(label_smoothing),
        BLOCK=block, HAS_ALPHA=alpha is not None, SMOOTHING=label_smoothing > 0,
        NEED_GRAD=bool(need_grad), SINGLE_BLOCK=n_cols <= block,
        num_warps=num_warps_for(block),
    )
    return row_loss, grad


@triton.jit
def _log1p(e):
    """log(1 + e) for e >= 0; 2*atanh(e/(2+e)) series (5 terms) below 0.25."""
    s = e / (2.0 + e)
    s2 = s * s
    series = 2.0 * s * (1.0 + s2 * (0.3333333333333333 + s2 * (0.2 + s2 * (
        0.14285714285714285 + s2 * 0.1111111111111111))))
    return tl.where(e < 0.25, series, tl.log(1.0 + e))


@triton.jit
def _sigmoid_focal_kernel(
    logits_ptr, target_ptr, scales_ptr, loss_ptr, grad_ptr, n_elements, alpha, gamma, smoothing,
    BLOCK: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTHING: tl.constexpr,
    REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SMOOTHING:
        t = t * (1.0 - smoothing) + 0.5 * smoothing
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    q = tl.where(x >= 0, e * inv, inv)  # 1 - p
    ce = tl.maximum(x, 0.0) - x * t + _log1p(e)
    v = p * (1.0 - t) + q * t  # 1 - p_t
    v_pow = _pow(v, gamma)
    dv_over_v = p * q * (1.0 - 2.0 * t) / tl.where(v == 0, 1.0, v)
    loss = ce * v_pow
    grad = (p * (1.0 - t) - q * t) * v_pow + gamma * ce * v_pow * dv_over_v
    if HAS_ALPHA:
        alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        loss = loss * alpha_t
        grad = grad * alpha_t
    scale = tl.load(scales_ptr)
    if NEED_GRAD:
        tl.store(grad_ptr + offs, _cast_for(grad * scale, grad_ptr), mask=mask)
    if REDUCE:
        tl.store(loss_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0) * scale)
    else:
        tl.store(loss_ptr + offs, _cast_for(loss * scale, loss_ptr), mask=mask)


def sigmoid_focal_loss_fwd(logits, target, scales, *, alpha, gamma, label_smoothing, reduce,
                           need_grad, block_size=None):
    """(loss, grad): the per-element loss in the logits' shape and dtype (reduce=False) or
    fp32 partial sums, one per BLOCK elements in order (reduce=True); both scaled by
    scales[0], as is the gradient.  Contract: docs/architecture.md "Losses".  Every tensor
    is verified first (fusedopt/backends/_loss_boundary.py)."""
    op = "sigmoid_focal_loss_fwd"
    boundary.elementwise(op, logits, target, device_types())
    boundary.scales(op, scales, logits.device)
    alpha = boundary.fp32_finite(op, "alpha", alpha)
    gamma = boundary.fp32_finite(op, "gamma", gamma)
    n_elements = logits.numel()
    block = check_block_size(block_size) if block_size else SIGMOID_BLOCK
    n_programs = triton.cdiv(n_elements, block)
    device = logits.device
    if reduce:
        loss = torch.empty(n_programs, dtype=torch.float32, device=device)
    else:
        loss = torch.empty_like(logits)
    grad = torch.empty_like(logits) if need_grad else None
    if n_elements == 0:
        return loss, grad
    _sigmoid_focal_kernel[(n_programs,)](
        logits, target, scales, loss, grad if need_grad else logits, n_elements,
        alpha, gamma, float(label_smoothing),
        BLOCK=block, HAS_ALPHA=alpha >= 0, SMOOTHING=label_smoothing > 0,
        REDUCE=bool(reduce), NEED_GRAD=bool(need_grad), num_warps=8 if block >= 2048 else 4,
    )
    return loss, grad
