"""The losses written in differentiable torch ops, for what the fused kernels cannot do.

The fused kernels compute the gradient of the logits in forward and nothing else.  The ops
form a loss from these formulas instead, and let autograd differentiate it (to any order):

- in the backward of a fused loss when the gradient must itself be differentiable
  (``create_graph=True``: double backward, gradient penalties, MAML), recomputed from the
  caller's logits (fusedopt.ops._common.Recompute);
- in forward, inside torch.func transforms (grad, vmap, jacrev, jvp, ...), with
  forward-mode AD tangents, and when a target, class weight or alpha requires grad.

Each function returns what the op's autograd Function returns for the same arguments: the
row (or element) losses already multiplied by ``scales``, in the accumulation dtype (fp32;
float64 for float64 logits), with the semantics of docs/losses.md.  Ignored rows are 0
with a zero gradient (the mask is applied before the scale, so a 'mean' over no rows has
no 0·inf); a class target outside [0, C) gives a NaN row and NaN gradient, as the kernels
do.  Everything is formed relative to the row max (log_softmax), as the kernels are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedopt.ops._common import accumulation_dtype


def _class_rows(target, ignore_index, n_cols):
    """(clamped int64 targets, valid-row mask, out-of-range mask) of class targets."""
    y = target.long()
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= n_cols))
    return y.clamp(0, n_cols - 1), valid, bad


def _mask_rows(row, valid, bad):
    """0 for ignored rows (and no gradient), NaN (value and gradient) for bad targets."""
    row = torch.where(valid, row, 0.0)
    return row * torch.where(bad, float("nan"), 1.0)


def _power(base, gamma):
    """base^gamma for base >= 0 with a finite derivative at base = 0 for every gamma >= 0:
    0 there for gamma > 0 (the term it multiplies vanishes with it), 1 for gamma = 0."""
    if gamma == 0:
        return torch.ones_like(base)
    positive = base > 0
    return torch.where(positive, torch.where(positive, base, 1.0).pow(gamma), 0.0)


def cross_entropy_rows(logits, target, weight, scales, *, ignore_index, label_smoothing,
                       z_loss, softcap, soft_target):
    """(M, C) logits -> (M,) ``s_ce·ce_i + s_z·z_loss·lse_i²``, cross_entropy_fwd's row_loss."""
    n_cols = logits.shape[1]
    eps = float(label_smoothing)
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    log_p = torch.log_softmax(x, dim=1)
    lse = torch.logsumexp(x, dim=1)
    w = weight.to(acc) if weight is not None else None
    s_ce, s_z = scales[0], scales[1]
    if soft_target:
        r = (1.0 - eps) * target.to(acc) + eps / n_cols
        if w is not None:
            r = r * w
        row = s_ce * -(r * log_p).sum(dim=1)
        if z_loss:
            row = row + s_z * z_loss * lse * lse
        return row
    y, valid, bad = _class_rows(target, ignore_index, n_cols)
    log_p = torch.where(valid[:, None], log_p, 0.0)  # (no -inf of an ignored row in a product)
    w_y = w[y] if w is not None else 1.0
    ce = -(1.0 - eps) * w_y * log_p.gather(1, y[:, None]).squeeze(1)
    if eps > 0:  # (skipped at eps = 0 so that -inf logits give 0, not 0 * -inf)
        ce = ce - (eps / n_cols) * (log_p * w if w is not None else log_p).sum(dim=1)
    row = torch.where(valid, ce, 0.0) * s_ce
    if z_loss:
        row = row + torch.where(valid, lse * lse, 0.0) * (s_z * z_loss)
    return _mask_rows(row, valid, bad)


def focal_rows(logits, target, alpha, scales, *, gamma, ignore_index, label_smoothing):
    """(M, C) logits -> (M,) ``scale·(-Σ_c α_c q_c (1-p_c)^γ log p_c)`` (focal_loss_fwd's)."""
    n_rows, n_cols = logits.shape
    eps = float(label_smoothing)
    acc = accumulation_dtype(logits.dtype)
    y, valid, bad = _class_rows(target, ignore_index, n_cols)
    log_p = torch.where(valid[:, None], torch.log_softmax(logits.to(acc), dim=1), 0.0)
    q = torch.full((n_rows, n_cols), eps / n_cols, dtype=acc, device=logits.device)
    q = q.scatter_add(1, y[:, None], torch.full((n_rows, 1), 1.0 - eps, dtype=acc,
                                                device=logits.device))
    if alpha is not None:
        q = q * alpha.to(acc)
    modulation = _power(-torch.expm1(log_p), gamma)  # (1 - p)^γ, 1 - p = -expm1(log p)
    # a term with α_c q_c = 0 is 0, also at log p = -inf (and passes no NaN gradient)
    terms = q * modulation * torch.where(q != 0, log_p, 0.0)
    row = torch.where(valid, -terms.sum(dim=1), 0.0) * scales[0]
    return _mask_rows(row, valid, bad)


def sigmoid_focal(logits, target, scales, *, alpha, gamma, label_smoothing, reduce):
    """Elementwise torchvision sigmoid focal loss times scales[0]: the logits' shape and
    dtype, or with `reduce` the 0-dim total in the accumulation dtype."""
    acc = accumulation_dtype(logits.dtype)
    x = logits.to(acc)
    t = target.to(acc) * (1.0 - label_smoothing) + label_smoothing / 2.0
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    one_minus_p_t = torch.sigmoid(x) * (1.0 - t) + torch.sigmoid(-x) * t
    loss = ce * _power(one_minus_p_t, gamma)
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    loss = scales[0] * loss
    return loss.sum() if reduce else loss.to(logits.dtype)
