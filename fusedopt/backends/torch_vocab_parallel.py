"""Vocab-parallel cross-entropy entry points of the `torch` backend: the two per-shard
passes over one rank's columns of the logits (contracts: docs/architecture.md).

A rank holds the columns [class_offset, class_offset + C_local) of logits that are C wide;
x = softcap·tanh(l/softcap) (or l), w = this rank's slice of the class weights (or 1),
ε = label smoothing, y = the global class target, q this rank's columns of a probability
target, r_j = w_j·((1-ε)·q_j + ε/C).

vocab_parallel_row_stats -> (N, 4) fp32, per row, over this rank's columns only:

    [ max_j x_j,  Σ_j exp(x_j - max),
      class: x_y if y is one of these columns else 0   | soft: Σ_j r_j·(max - x_j),
      class: Σ_j w_j·(max - x_j) (ε > 0; else 0)       | soft: Σ_j r_j ]

(-inf, 0, 0, 0 for a rank without columns).  The sums are gap sums, relative to this
rank's max (every term >= 0, so they never cancel, also for logits of 1e30); max - x_j is
+inf at a -inf logit.  The ops layer combines the ranks' rows with
two all-reduces and computes the loss and the coefficients of

vocab_parallel_grad(coefs (N, 5) fp32 = [row_max, log_sum, a, b, c]) -> (N, C_local):

    dx_j = exp((x_j - row_max) - log_sum)·a - t_j,   dl_j = dx_j·(1 - tanh²(l_j/softcap))
    class: t_j = b·[class_offset + j == y] + c·w_j,  rows with y == ignore_index: 0
    soft:  t_j = c·r_j

The same math as cross_entropy_fwd (torch_losses.py) with the row statistics of the full
row.  Everything in fp32 (this backend may materialise fp32 copies of the slice), float64
for float64 logits (stats and coefs are then float64), the gradient rounded once into the
logits' dtype.
"""

from __future__ import annotations

import torch

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS: frozenset[str] = frozenset({"vocab_parallel_cross_entropy"})

def _acc(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _capped(logits, softcap):
    x = logits.to(_acc(logits))
    if softcap is None:
        return x, None
    capped = torch.tanh(x / softcap)
    return softcap * capped, capped


def _soft_weights(target, weight, label_smoothing, num_classes):
    r = (1.0 - label_smoothing) * target.to(_acc(target)) + label_smoothing / num_classes
    return r * weight if weight is not None else r


def _local_targets(target, class_offset, n_local, ignore_index):
    """(local column of each row's target, clamped; whether this rank holds it)."""
    y = target.long()
    local = y - class_offset
    owned = (y != ignore_index) & (local >= 0) & (local < n_local)
    return local.clamp(0, max(n_local - 1, 0)), owned


def vocab_parallel_row_stats(logits, target, weight, *, class_offset, num_classes, ignore_index,
                             label_smoothing, softcap, soft_target):
    n_rows, n_local = logits.shape
    stats = torch.zeros(n_rows, 4, dtype=_acc(logits), device=logits.device)
    if n_local == 0:
        stats[:, 0] = float("-inf")
        return stats
    x, _ = _capped(logits, softcap)
    row_max = x.amax(dim=1)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # an all -inf row: sum 0
    stats[:, 0] = row_max
    stats[:, 1] = torch.exp(x - shift[:, None]).sum(dim=1)
    # max - x_j >= 0, +inf at a -inf logit (also when the max is -inf): w·inf as torch's w·log p
    gap = torch.where(x == float("-inf"), float("inf"), row_max[:, None] - x)
    if soft_target:
        r = _soft_weights(target, weight, label_smoothing, num_classes)
        stats[:, 2] = (r * gap).sum(dim=1)
        stats[:, 3] = r.sum(dim=1)
        return stats
    local, owned = _local_targets(target, class_offset, n_local, ignore_index)
    stats[:, 2] = torch.where(owned, x.gather(1, local[:, None]).squeeze(1), 0.0)
    if label_smoothing > 0:
        stats[:, 3] = (gap * weight if weight is not None else gap).sum(dim=1)
    return stats


def vocab_parallel_grad(logits, target, weight, coefs, *, class_offset, num_classes,
                        ignore_index, label_smoothing, softcap, soft_target, inplace):
    n_rows, n_local = logits.shape
    x, capped = _capped(logits, softcap)
    row_max, log_sum, a, b, c = coefs.unbind(dim=1)
    grad = torch.exp((x - row_max[:, None]) - log_sum[:, None]).mul_(a[:, None])
    if soft_target:
        grad.sub_(c[:, None] * _soft_weights(target, weight, label_smoothing, num_classes))
    else:
        smooth = weight if weight is not None else torch.ones((), dtype=x.dtype, device=x.device)
        grad.sub_(c[:, None] * smooth)
        local, owned = _local_targets(target, class_offset, n_local, ignore_index)
        if n_local > 0:
            grad.scatter_add_(1, local[:, None], -torch.where(owned, b, 0.0)[:, None])
    if capped is not None:
        grad.mul_(1.0 - capped * capped)
    if not soft_target:
        # after the soft-capping factor, which is NaN at a NaN logit of an ignored row
        grad.masked_fill_((target.long() == ignore_index)[:, None], 0.0)
    if inplace:
        logits.copy_(grad)
        return logits
    return grad.to(logits.dtype)
