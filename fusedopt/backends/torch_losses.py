"""Pure-PyTorch loss entry points of the `torch` backend (contracts: docs/architecture.md).

The readable statement of the loss math, and the fallback on every device.  Everything is
computed in fp32 (bf16/fp16 logits are upcast: this backend may materialise fp32 copies,
the kernels may not), and float64 logits in float64 (the one backend that takes them: row
losses, weights, alpha and scales are then float64 too); the gradient is formed
analytically and rounded once to the logits' dtype.

cross_entropy_fwd, per row (x = softcap·tanh(l/softcap) or l, lse = logsumexp(x),
p = softmax(x), w = class weights or 1, ε = label smoothing, c = z-loss coefficient,
[s_ce, s_z] = scales):

    class target y:  ce = (1-ε)·w_y·(lse - x_y) + (ε/C)·Σ_j w_j·(lse - x_j)
                        (computed as -(1-ε)·w_y·log p_y - (ε/C)·Σ_j w_j·log p_j)
                     dx_j = p_j·A - t_j,  A = s_ce·((1-ε)·w_y + (ε/C)·Σ w) + 2·s_z·c·lse,
                                          t_j = s_ce·((1-ε)·w_y·[j=y] + (ε/C)·w_j)
    soft target q:   r_j = w_j·((1-ε)·q_j + ε/C),  ce = Σ_j r_j·(lse - x_j)
                        (computed as -Σ_j r_j·log p_j)
                     dx_j = p_j·(s_ce·Σ r + 2·s_z·c·lse) - s_ce·r_j
    row_loss = s_ce·ce + s_z·c·lse²;   dl_j = dx_j·(1 - tanh²(l_j/softcap)) with soft-capping

log p is formed relative to the row max (below), so no weighted sum subtracts large terms:
the form lse·Σ r - Σ r_j·x_j would cancel for large logits.

focal_loss_fwd, with u_c = 1 - p_c = -expm1(log p_c), q = (1-ε)·onehot(y) + ε/C:

    loss = -Σ_c α_c q_c u_c^γ log p_c
    dx_j = p_j·S - v_j,  v_c = α_c q_c u_c^γ (1 - γ p_c log(p_c)/u_c),  S = Σ_c v_c
    (log(p)/u -> -1 as p -> 1, so the gradient is finite for every γ >= 0)

sigmoid_focal_loss_fwd, with p = sigmoid(x), t' = (1-ε)·t + ε/2, m = 1 - p_t =
p·(1-t') + (1-p)·t', a = α·t' + (1-α)·(1-t') (or 1 when α < 0):

    ce   = max(x, 0) - x·t' + log1p(exp(-|x|))
    loss = a·ce·m^γ
    dx   = a·((p - t')·m^γ + γ·(ce/m)·m^γ·p·(1-p)·(1-2t'))

Rows (or elements) with an out-of-range class target get NaN loss and gradient; targets
are clamped before every gather, so nothing is indexed out of bounds.
"""

from __future__ import annotations

import torch

__all__ = ["cross_entropy_fwd", "focal_loss_fwd", "sigmoid_focal_loss_fwd"]

OPS: frozenset[str] = frozenset({"cross_entropy", "focal_loss", "sigmoid_focal_loss"})

def _acc(logits):
    """The dtype the math runs in: float64 for float64 logits, else fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _class_rows(target, ignore_index, n_cols):
    """(clamped int64 targets, valid-row mask, out-of-range mask) of class targets."""
    y = target.long()
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= n_cols))
    return y.clamp(0, n_cols - 1), valid, bad


def _finish(row_loss, grad, logits, valid, bad, inplace, need_grad):
    """Zero ignored rows, NaN out-of-range rows, round the gradient into the logits' dtype."""
    nan = torch.full((), float("nan"), dtype=row_loss.dtype, device=row_loss.device)
    row_loss = torch.where(valid, row_loss, 0.0)
    row_loss = torch.where(bad, nan, row_loss)
    if not need_grad:
        return row_loss, None
    grad = torch.where(valid[:, None], grad, 0.0)
    grad = torch.where(bad[:, None], nan, grad)
    if inplace:
        logits.copy_(grad)
        return row_loss, logits
    return row_loss, grad.to(logits.dtype).contiguous()


def cross_entropy_fwd(logits, target, weight, scales, *, ignore_index, label_smoothing, z_loss,
                      softcap, soft_target, inplace, need_grad):
    n_rows, n_cols = logits.shape
    eps = float(label_smoothing)
    s_ce, s_z = scales[0], scales[1]
    raw = logits.to(_acc(logits))
    if softcap is not None:
        capped = torch.tanh(raw / softcap)
        x = softcap * capped
    else:
        x = raw
    # log p = (x - max) - log Σ exp(x - max): exact for rows of huge equal logits, where
    # x - lse would lose the digits of lse.
    row_max = x.amax(dim=1, keepdim=True)
    shifted = x - row_max
    log_sum = torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    log_p = shifted - log_sum
    p = torch.exp(log_p)
    lse = (row_max + log_sum).squeeze(1)
    w = weight.to(x.dtype) if weight is not None else None

    if soft_target:
        r = (1.0 - eps) * target.to(x.dtype) + eps / n_cols
        if w is not None:
            r = r * w
        sum_r = r.sum(dim=1)
        ce = -(r * log_p).sum(dim=1)
        a = s_ce * sum_r + 2.0 * s_z * z_loss * lse
        t = s_ce * r
        valid = torch.ones(n_rows, dtype=torch.bool, device=logits.device)
        bad = torch.zeros_like(valid)
    else:
        y, valid, bad = _class_rows(target, ignore_index, n_cols)
        log_p_y = log_p.gather(1, y[:, None]).squeeze(1)
        w_y = w[y] if w is not None else torch.ones_like(lse)
        sum_w = w.sum() if w is not None else torch.tensor(float(n_cols), dtype=x.dtype,
                                                             device=x.device)
        ce = -(1.0 - eps) * w_y * log_p_y
        if eps > 0:  # (skipped at eps = 0 so that -inf logits give 0, not 0 * -inf)
            sum_w_log_p = (log_p * w).sum(dim=1) if w is not None else log_p.sum(dim=1)
            ce = ce - (eps / n_cols) * sum_w_log_p
        a = s_ce * ((1.0 - eps) * w_y + (eps / n_cols) * sum_w) + 2.0 * s_z * z_loss * lse
        smooth = (eps / n_cols) * (w if w is not None else torch.ones_like(x[0]))
        t = s_ce * smooth.expand(n_rows, n_cols).clone()
        t.scatter_add_(1, y[:, None], (s_ce * (1.0 - eps) * w_y)[:, None])

    row_loss = s_ce * ce + s_z * z_loss * lse * lse
    grad = None
    if need_grad:
        grad = p * a[:, None] - t
        if softcap is not None:
            grad = grad * (1.0 - capped * capped)
    return _finish(row_loss, grad, logits, valid, bad, inplace, need_grad)


def focal_loss_fwd(logits, target, alpha, scales, *, gamma, ignore_index, label_smoothing,
                   need_grad):
    n_rows, n_cols = logits.shape
    eps = float(label_smoothing)
    scale = scales[0]
    x = logits.to(_acc(logits))
    log_p = torch.log_softmax(x, dim=1)
    p = torch.exp(log_p)
    u = -torch.expm1(log_p)
    y, valid, bad = _class_rows(target, ignore_index, n_cols)
    q = torch.full_like(x, eps / n_cols)
    q.scatter_add_(1, y[:, None], torch.full((n_rows, 1), 1.0 - eps, dtype=x.dtype,
                                             device=x.device))
    if alpha is not None:
        q = q * alpha.to(x.dtype)
    u_pow = u.pow(gamma)
    # Terms with alpha_c q_c = 0 contribute nothing, even where log p = -inf (but a NaN
    # log p -- a row of all -inf logits, or holding a NaN -- keeps the row NaN).  A negative
    # alpha_c is used as the formula stands (docs/losses.md).
    terms = torch.where((q != 0) | torch.isnan(log_p), q * u_pow * log_p, 0.0)
    row_loss = -scale * terms.sum(dim=1)
    grad = None
    if need_grad:
        log_p_over_u = torch.where(u > 0, log_p / u, -1.0)
        v = torch.where(q != 0, q * u_pow * (1.0 - gamma * p * log_p_over_u), 0.0)
        grad = scale * (p * v.sum(dim=1, keepdim=True) - v)
    return _finish(row_loss, grad, logits, valid, bad, False, need_grad)


def sigmoid_focal_loss_fwd(logits, target, scales, *, alpha, gamma, label_smoothing, reduce,
                           need_grad):
    scale = scales[0]
    x = logits.to(_acc(logits))
    t = target.to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / 2.0
    p = torch.sigmoid(x)
    one_minus_p = torch.sigmoid(-x)
    m = p * (1.0 - t) + one_minus_p * t
    ce = torch.clamp_min(x, 0.0) - x * t + torch.log1p(torch.exp(-x.abs()))
    m_pow = m.pow(gamma)
    a = alpha * t + (1.0 - alpha) * (1.0 - t) if alpha >= 0 else None
    loss = ce * m_pow
    if a is not None:
        loss = a * loss
    loss = scale * loss
    if reduce:
        loss_out = loss.sum().reshape(1)
    else:
        loss_out = loss.to(logits.dtype)
    grad = None
    if need_grad:
        ce_over_m = torch.where(m > 0, ce / m, 1.0)
        grad = (p - t) * m_pow + gamma * ce_over_m * m_pow * p * one_minus_p * (1.0 - 2.0 * t)
        if a is not None:
            grad = a * grad
        grad = (scale * grad).to(logits.dtype)
    return loss_out, grad
