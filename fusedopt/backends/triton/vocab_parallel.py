"""Triton vocab-parallel cross-entropy: the two per-shard passes over one rank's columns.

A rank holds the columns [class_offset, class_offset + C) of logits that are num_classes
wide (contract and notation: docs/architecture.md, "Vocab-parallel cross-entropy").

_row_stats_kernel, one program per row, one streaming read of the row (the online
log-sum-exp of the fused kernel, per-lane accumulators, one cross-lane reduction):

    stats = [max_j x_j, sum_j exp(x_j - max),
             class: x_y if y is a local column else 0  | soft: sum_j r_j*x_j,
             class: sum_j w_j*x_j (smoothing)          | soft: sum_j r_j]

Ignored rows read nothing and get (-inf, 0, 0, 0) (the ops layer never uses them).

_grad_kernel, one program per row, after the ops layer combined the ranks' statistics into
coefs = [row_max, log_sum, a, b, c] (the full row's softmax and loss coefficients):

    g_j = exp((x_j - row_max) - log_sum)*a - t_j,  times 1 - (x_j/s)^2 with soft-capping
    class: t_j = b*[j == y - class_offset] + c*w_j;  ignored rows: zeros, nothing read
    soft:  t_j = c*r_j

Memory traffic for N rows, C local classes, b bytes per logit: reads 2*N*C*b (+ soft
targets 2*N*C*b), writes N*C*b (gradient) + 16*N (stats); coefficients 20*N read.  The
all-reduces of the ops layer move O(N) values; no N x C intermediate is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt.backends.triton._interpreter import loop_bound
from fusedopt.backends.triton.cross_entropy import (_load_x, _lse_update, _soft_weights,
                                                    _store_grad, _tanh, _zero_row,
                                                    block_size_for, check_block_size,
                                                    num_warps_for)

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS = frozenset({"vocab_parallel_cross_entropy"})


@triton.jit
def _row_stats_kernel(logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr,
                      stats_ptr, n_cols, class_offset, ignore_index, smoothing, n_classes,
                      softcap, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
                      SOFT_TARGET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * logits_stride
    out = stats_ptr + row * 4
    offs = tl.arange(0, BLOCK)
    skip = False
    x_y = 0.0
    if not SOFT_TARGET:
        y = tl.load(target_ptr + row).to(tl.int64)
        skip = y == ignore_index
        # 1. the target logit: a scalar load, only on the rank that holds the column
        local = y - class_offset
        owned = (y != ignore_index) & (local >= 0) & (local < n_cols)
        x_y = tl.load(in_row + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
        if SOFTCAP:
            x_y = softcap * _tanh(x_y / softcap)
        x_y = tl.where(owned, x_y, 0.0)
    if skip:
        tl.store(out, float("-inf"))
        tl.store(out + 1, 0.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
    else:
        # 2. one pass: per-lane running max and exp-sum, and the weighted sums
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        sum_x = tl.zeros([BLOCK], tl.float32)
        sum_r = tl.zeros([BLOCK], tl.float32)
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            m, d = _lse_update(x, m, d)
            if SOFT_TARGET:
                r = _soft_weights(target_ptr + row * target_stride, weight_ptr, cols, mask,
                                  n_classes, smoothing, HAS_WEIGHT, SMOOTHING)
                sum_x += r * tl.where(mask, x, 0.0)
                sum_r += r
            elif SMOOTHING:
                if HAS_WEIGHT:
                    sum_x += tl.load(weight_ptr + cols, mask=mask, other=0.0) * tl.where(
                        mask, x, 0.0)
                else:
                    sum_x += tl.where(mask, x, 0.0)
        # 3. the lanes combined once
        row_max = tl.max(m, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        tl.store(out, row_max)
        tl.store(out + 1, tl.sum(d * tl.exp(m - shift), axis=0))
        if SOFT_TARGET:
            tl.store(out + 2, tl.sum(sum_x, axis=0))
            tl.store(out + 3, tl.sum(sum_r, axis=0))
        else:
            tl.store(out + 2, x_y)
            tl.store(out + 3, tl.sum(sum_x, axis=0))


@triton.jit
def _grad_kernel(logits_ptr, logits_stride, target_ptr, target_stride, weight_ptr, coefs_ptr,
                 grad_ptr, grad_stride, n_cols, class_offset, ignore_index, smoothing,
                 n_classes, softcap, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, SOFT_TARGET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    in_row = logits_ptr + row * logits_stride
    out_row = grad_ptr + row * grad_stride
    offs = tl.arange(0, BLOCK)
    coefs = coefs_ptr + row * 5
    row_max = tl.load(coefs)
    log_sum = tl.load(coefs + 1)
    a = tl.load(coefs + 2)
    b = tl.load(coefs + 3)
    c = tl.load(coefs + 4)
    local = -1
    skip = False
    if not SOFT_TARGET:
        y = tl.load(target_ptr + row).to(tl.int64)
        skip = y == ignore_index
        local = y - class_offset
    if skip:
        _zero_row(out_row, n_cols, offs, BLOCK)
    else:
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            if SOFT_TARGET:
                t = c * _soft_weights(target_ptr + row * target_stride, weight_ptr, cols, mask,
                                      n_classes, smoothing, HAS_WEIGHT, SMOOTHING)
            else:
                t = tl.where(cols == local, b, 0.0)
                if SMOOTHING:
                    if HAS_WEIGHT:
                        t += c * tl.load(weight_ptr + cols, mask=mask, other=0.0)
                    else:
                        t += c
            _store_grad(out_row, cols, mask, x, row_max, log_sum, a, t, 0.0, softcap, SOFTCAP)


def _block(n_cols, block_size):
    return check_block_size(block_size) if block_size else block_size_for(n_cols)


def vocab_parallel_row_stats(logits, target, weight, *, class_offset, num_classes, ignore_index,
                             label_smoothing, softcap, soft_target, block_size=None):
    """(N, 4) fp32 row statistics of this rank's columns (docs/architecture.md)."""
    n_rows, n_cols = logits.shape
    stats = torch.zeros(n_rows, 4, dtype=torch.float32, device=logits.device)
    if n_cols == 0:
        stats[:, 0] = float("-inf")
        return stats
    block = _block(n_cols, block_size)
    _row_stats_kernel[(n_rows,)](
        logits, logits.stride(0), target, target.stride(0) if soft_target else 0,
        weight if weight is not None else stats, stats, n_cols, int(class_offset),
        int(ignore_index), float(label_smoothing), int(num_classes),
        float(softcap) if softcap is not None else 1.0,
        BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTHING=label_smoothing > 0,
        SOFTCAP=softcap is not None, SOFT_TARGET=bool(soft_target),
        num_warps=num_warps_for(block))
    return stats


def vocab_parallel_grad(logits, target, weight, coefs, *, class_offset, num_classes,
                        ignore_index, label_smoothing, softcap, soft_target, inplace,
                        block_size=None):
    """The gradient of this rank's columns from the combined coefficients (N, 5)."""
    n_rows, n_cols = logits.shape
    grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype,
                                              device=logits.device)
    if n_cols == 0:
        return grad
    block = _block(n_cols, block_size)
    _grad_kernel[(n_rows,)](
        logits, logits.stride(0), target, target.stride(0) if soft_target else 0,
        weight if weight is not None else coefs, coefs, grad, grad.stride(0), n_cols,
        int(class_offset), int(ignore_index), float(label_smoothing), int(num_classes),
        float(softcap) if softcap is not None else 1.0,
        BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTHING=label_smoothing > 0,
        SOFTCAP=softcap is not None, SOFT_TARGET=bool(soft_target),
        num_warps=num_warps_for(block))
    return grad
