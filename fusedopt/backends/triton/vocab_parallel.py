"""Triton vocab-parallel cross-entropy: the two per-shard passes over one rank's columns.

A rank holds the columns [class_offset, class_offset + C) of logits that are num_classes
wide (contract and notation: docs/architecture.md, "Vocab-parallel cross-entropy").

_row_stats_kernel, one program per row, one streaming read of the row (the online
log-sum-exp of the fused kernel, per-lane accumulators, one cross-lane reduction):

    stats = [max_j x_j, sum_j exp(x_j - max),
             class: x_y if y is a local column else 0  | soft: sum_j r_j*(max - x_j),
             class: sum_j w_j*(max - x_j) (smoothing)  | soft: sum_j r_j]

The gap sums G = sum w (m - x) are kept per lane relative to the lane's running max m: when
m rises to m', G grows by (sum w so far)*(m' - m) (_gap_fold), and the lanes are moved to
the row max the same way at the end; every term is >= 0, so nothing cancels, also for
logits of 1e30.  Ignored rows read nothing and get (-inf, 0, 0, 0) (the ops layer never
uses them).

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

from fusedopt.backends import _loss_boundary as boundary
from fusedopt.backends.triton._interpreter import loop_bound
from fusedopt.backends.triton.cross_entropy import (_load_x, _lse_update, _soft_weights,
                                                    _store_grad, _tanh, _zero_row,
                                                    block_size_for, check_block_size,
                                                    device_types, num_warps_for)

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS = frozenset({"vocab_parallel_cross_entropy"})


@triton.jit
def _gap_fold(x, w, mask, m, gap, sum_w):
    """Fold chunk x (weights w, 0 in the masked tail) into the per-lane gap sums
    gap = sum w*(m - x) relative to the lane max m (before this chunk) and their weights
    sum_w.  m - x is +inf at a -inf logit, also while the lane max is still -inf (w*inf, as
    torch's w*log p)."""
    m_new = tl.maximum(m, x)
    lift = tl.where(m == float("-inf"), 0.0, m_new - m)
    diff = tl.where(x == float("-inf"), float("inf"), m_new - x)
    gap = gap + sum_w * lift + tl.where(mask, w * diff, 0.0)
    return gap, sum_w + w


@triton.jit
def _gap_finish(m, gap, sum_w, row_max):
    """The lanes' gap sums moved from their lane max to the row max, added up."""
    lift = tl.where(m == float("-inf"), 0.0, row_max - m)
    return tl.sum(gap + sum_w * lift, axis=0)


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
        # 2. one pass: per-lane running max and exp-sum, and the gap sums relative to it
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        gap = tl.zeros([BLOCK], tl.float32)
        sum_w = tl.zeros([BLOCK], tl.float32)
        for start in range(0, loop_bound(n_cols), BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = _load_x(in_row, cols, mask, softcap, SOFTCAP)
            if SOFT_TARGET:
                r = _soft_weights(target_ptr + row * target_stride, weight_ptr, cols, mask,
                                  n_classes, smoothing, HAS_WEIGHT, SMOOTHING)
                gap, sum_w = _gap_fold(x, r, mask, m, gap, sum_w)
            elif SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                else:
                    w = tl.where(mask, 1.0, 0.0)
                gap, sum_w = _gap_fold(x, w, mask, m, gap, sum_w)
            m, d = _lse_update(x, m, d)
        # 3. the lanes combined once
        row_max = tl.max(m, axis=0)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        tl.store(out, row_max)
        tl.store(out + 1, tl.sum(d * tl.exp(m - shift), axis=0))
        if SOFT_TARGET:
            tl.store(out + 2, _gap_finish(m, gap, sum_w, row_max))
            tl.store(out + 3, tl.sum(sum_w, axis=0))
        else:
            tl.store(out + 2, x_y)
            if SMOOTHING:
                tl.store(out + 3, _gap_finish(m, gap, sum_w, row_max))
            else:
                tl.store(out + 3, 0.0)


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


def _verified(op, logits, target, weight, coefs=None, **shard):
    """The call's tensors and numbers, verified by the loss kernel boundary
    (fusedopt/backends/_loss_boundary.py, `vocab_shard`)."""
    return boundary.vocab_shard(op, logits, target, weight, coefs, device_types=device_types(),
                                **shard)


def vocab_parallel_row_stats(logits, target, weight, *, block_size=None, **shard):
    """(N, 4) fp32 row statistics of this rank's columns (docs/architecture.md; keywords:
    class_offset, num_classes, ignore_index, label_smoothing, softcap, soft_target)."""
    v = _verified("vocab_parallel_row_stats", logits, target, weight, **shard)
    stats = torch.zeros(v.n_rows, 4, dtype=torch.float32, device=logits.device)
    if v.n_cols == 0 or v.n_rows == 0:
        stats[:, 0] = float("-inf")
        return stats
    block = _block(v.n_cols, block_size)
    _row_stats_kernel[(v.n_rows,)](
        logits, v.row_stride, target, v.target_stride,
        weight if weight is not None else stats, stats, v.n_cols, v.class_offset,
        v.ignore_index, v.label_smoothing, v.num_classes,
        v.softcap if v.softcap is not None else 1.0,
        BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTHING=v.label_smoothing > 0,
        SOFTCAP=v.softcap is not None, SOFT_TARGET=bool(shard["soft_target"]),
        num_warps=num_warps_for(block))
    return stats


def vocab_parallel_grad(logits, target, weight, coefs, *, inplace, block_size=None, **shard):
    """The gradient of this rank's columns from the combined coefficients (N, 5)."""
    v = _verified("vocab_parallel_grad", logits, target, weight, coefs, **shard)
    grad = logits if inplace else torch.empty((v.n_rows, v.n_cols), dtype=logits.dtype,
                                              device=logits.device)
    if v.n_cols == 0 or v.n_rows == 0:
        return grad
    block = _block(v.n_cols, block_size)
    _grad_kernel[(v.n_rows,)](
        logits, v.row_stride, target, v.target_stride,
        weight if weight is not None else coefs, coefs, grad,
        v.row_stride if inplace else v.n_cols, v.n_cols, v.class_offset, v.ignore_index,
        v.label_smoothing, v.num_classes, v.softcap if v.softcap is not None else 1.0,
        BLOCK=block, HAS_WEIGHT=weight is not None, SMOOTHING=v.label_smoothing > 0,
        SOFTCAP=v.softcap is not None, SOFT_TARGET=bool(shard["soft_target"]),
        num_warps=num_warps_for(block))
    return grad
