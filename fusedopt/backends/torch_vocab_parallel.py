"""Vocab-parallel cross-entropy of the `torch` backend: one rank's slice of the classes.

Each rank of a process group holds the columns [class_offset, class_offset + C_local) of
logits whose full width is C; every rank holds the same rows and the same targets.  The
row statistics of the full softmax come from two all-reduces of O(rows) values, never
from the logits, and each rank computes the loss (identical on every rank) and the
gradient of its own columns in the forward pass, exactly as cross_entropy_fwd does for
the full row (docs/architecture.md, "Losses").

Per row, with x = softcap·tanh(l/softcap) or l, w = class weights or 1, ε = label
smoothing, c = z-loss coefficient, [s_ce, s_z] = scales, Σ_r = sum over the ranks:

    m    = max_r max_j x_j                                      all-reduce MAX  (N,)
    S    = Σ_r Σ_j exp(x_j - m),  u_y = Σ_r [y is local] (x_y - m),
    V    = Σ_r Σ_j w_j (x_j - m)      (ε > 0)                   all-reduce SUM  (N, 2..3)
    lse  = m + log S,  log p_j = (x_j - m) - log S
    ce   = (1-ε)·w_y·(log S - u_y) + (ε/C)·(Σw·log S - V)      (= torch's weighted smoothing)
    soft targets q (this rank's columns):  r_j = w_j·((1-ε)·q_j + ε/C),
         R = Σ_r Σ_j r_j,  U = Σ_r Σ_j r_j (x_j - m),  ce = R·log S - U
    row_loss = s_ce·ce + s_z·c·lse²       (0 for ignored rows, NaN for targets outside [0, C))
    dx_j = p_j·A - t_j  on the local columns, A and t_j as in torch_losses.py, times
           (1 - tanh²(l_j/softcap)) with soft-capping.

Memory: fp32 work buffers of the local slice (N x C_local), like the rest of this backend;
the gradient is returned in the logits' dtype (or written into the logits with `inplace`).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["vocab_parallel_cross_entropy_fwd"]

OPS: frozenset[str] = frozenset({"vocab_parallel_cross_entropy"})

_F32 = torch.float32


def vocab_parallel_cross_entropy_fwd(logits, target, weight, scales,
                                     all_reduce: Callable[[torch.Tensor, str], None], *,
                                     class_offset, num_classes, ignore_index, label_smoothing,
                                     z_loss, softcap, soft_target, inplace, need_grad):
    """(row_loss (N,) fp32, grad (N, C_local) in the logits' dtype or None).

    `weight` is the full (C,) fp32 vector (or None), `target` the global class indices (N,)
    or this rank's (N, C_local) slice of probability targets.  `all_reduce(t, op)` reduces
    an fp32 tensor in place over the group, op "max" then "sum": called exactly twice, in
    that order, on every rank."""
    n_rows, n_local = logits.shape
    n_classes, eps = int(num_classes), float(label_smoothing)
    s_ce, s_z = scales[0], scales[1]
    dev = logits.device
    x = logits.to(_F32)
    capped = None
    if softcap is not None:
        capped = torch.tanh(x / softcap)
        x = softcap * capped

    # 1. the row max over every rank's columns
    if n_local > 0:
        row_max = x.amax(dim=1)
    else:
        row_max = torch.full((n_rows,), float("-inf"), dtype=_F32, device=dev)
    all_reduce(row_max, "max")
    shifted = x - row_max[:, None]

    w_local = None
    if weight is not None:
        w_local = weight[class_offset:class_offset + n_local]

    # 2. per-row partial sums of this rank, added over the ranks in one all-reduce
    if soft_target:
        r = (1.0 - eps) * target.to(_F32) + eps / n_classes
        if w_local is not None:
            r = r * w_local
        partials = [r.sum(dim=1), (r * shifted).sum(dim=1)]
        valid = torch.ones(n_rows, dtype=torch.bool, device=dev)
        bad = torch.zeros_like(valid)
    else:
        y = target.long()
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= n_classes))
        local_y = y - class_offset
        owned = valid & ~bad & (local_y >= 0) & (local_y < n_local)
        local_y = local_y.clamp(0, max(n_local - 1, 0))[:, None]
        if n_local > 0:
            target_shifted = torch.where(owned, shifted.gather(1, local_y).squeeze(1), 0.0)
        else:
            target_shifted = torch.zeros(n_rows, dtype=_F32, device=dev)
        partials = [target_shifted]
        if eps > 0:  # (skipped at ε = 0 so that -inf logits give 0, not 0 * -inf)
            weighted = shifted * w_local if w_local is not None else shifted
            partials.append(weighted.sum(dim=1))
    probs = shifted.exp_()  # shifted is not needed any more: reuse its buffer
    sums = torch.stack([probs.sum(dim=1)] + partials, dim=1)
    all_reduce(sums, "sum")
    log_sum = torch.log(sums[:, 0])
    lse = row_max + log_sum

    # 3. the loss of the full row, the same on every rank
    if soft_target:
        sum_r, sum_r_shifted = sums[:, 1], sums[:, 2]
        ce = sum_r * log_sum - sum_r_shifted
        a = s_ce * sum_r + 2.0 * s_z * z_loss * lse
    else:
        y_safe = y.clamp(0, n_classes - 1)
        w_y = weight[y_safe] if weight is not None else torch.ones_like(lse)
        sum_w = weight.sum() if weight is not None else float(n_classes)
        ce = (1.0 - eps) * w_y * (log_sum - sums[:, 1])
        if eps > 0:
            ce = ce + (eps / n_classes) * (sum_w * log_sum - sums[:, 2])
        a = s_ce * ((1.0 - eps) * w_y + (eps / n_classes) * sum_w) + 2.0 * s_z * z_loss * lse
    nan = torch.full((), float("nan"), dtype=_F32, device=dev)
    row_loss = torch.where(valid, s_ce * ce + s_z * z_loss * lse * lse, 0.0)
    row_loss = torch.where(bad, nan, row_loss)
    if not need_grad:
        return row_loss, None

    # 4. the gradient of this rank's columns: p·A - t, in place in the probabilities
    grad = probs.mul_((a / sums[:, 0])[:, None])
    if soft_target:
        grad.sub_(s_ce * r)
    else:
        if eps > 0:
            smooth = w_local if w_local is not None else torch.ones((), dtype=_F32, device=dev)
            grad.sub_((s_ce * (eps / n_classes)) * smooth)
        if n_local > 0:
            hit = torch.where(owned, s_ce * (1.0 - eps) * w_y, 0.0)
            grad.scatter_add_(1, local_y, -hit[:, None])
    if capped is not None:
        grad.mul_(1.0 - capped * capped)
    grad.masked_fill_(~valid[:, None], 0.0)
    grad.masked_fill_(bad[:, None], float("nan"))
    if inplace:
        logits.copy_(grad)
        return row_loss, logits
    return row_loss, grad.to(logits.dtype)
