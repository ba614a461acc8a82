"""float64 references of the losses (PyTorch's own F.cross_entropy, formulas written out
for z-loss, soft-capping and the focal losses) and the tolerance each fusedopt result gets:
the precision it is computed in.

Tolerance model (fp32 math, inputs exact): every loss term is a product of weights and
log-probabilities log p_j = (x_j - M) - log S, so its fp32 error is a few ulps of
|w|·(|x_j - M| + |log S|), and of |w|·|x_j| with soft-capping (tanh rounds the capped logit
to its own ulps).  `loss_tolerance` bounds the error of each row's loss by
K·eps32·(sum of those magnitudes); the gradient p_j·a - t_j by K·eps32·(1 + the row's
largest |log p|)·(|a| + Σ|t|).  A result returned in bf16/fp16 adds one rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS32 = torch.finfo(torch.float32).eps
K = 64  # ulps allowed per term: fp32 exp/log/tanh polynomials + the sums' rounding


def capped(x64: torch.Tensor, softcap):
    return softcap * torch.tanh(x64 / softcap) if softcap is not None else x64


def to_rows(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def cross_entropy(x, target, weight, *, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None):
    """fusedopt's cross-entropy in float64: F.cross_entropy on the capped logits plus
    z_loss·lse² per non-ignored row ('mean' divides that part by the non-ignored rows)."""
    x64 = x.detach().double().requires_grad_()
    xc = capped(x64, softcap)
    soft = target.is_floating_point()
    t = target.double() if soft else target.long()
    w = None if weight is None else weight.double()
    if soft:  # no row is ignored with probability targets (torch refuses the argument)
        ignore_index = -100
    ce = F.cross_entropy(xc, t, w, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(xc, dim=1 if xc.dim() >= 2 else 0)
        valid = torch.ones_like(lse, dtype=torch.bool) if soft else t != ignore_index
        z = torch.where(valid, z_loss * lse * lse, 0.0)
        if reduction == "none":
            ce = ce + z
        elif reduction == "sum":
            ce = ce + z.sum()
        else:
            ce = ce + z.sum() / valid.sum()
    return ce, x64


def row_magnitudes(x, target, weight, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   softcap=None):
    """Per row (as (M,) float64): (Σ|terms| of the loss, |a| + Σ|t| of the gradient,
    1 + max |log p| of the row); ignored rows 0."""
    xr = to_rows(capped(x.detach().double(), softcap))
    n_rows, n_classes = xr.shape
    finite = torch.where(torch.isfinite(xr), xr, torch.zeros((), dtype=xr.dtype))
    row_max = finite.amax(dim=1, keepdim=True) if n_classes else finite.sum(1, keepdim=True)
    spread = (row_max - finite).abs()
    if softcap is not None:
        spread = spread + finite.abs() + row_max.abs()
    log_s = torch.logsumexp(xr, dim=1, keepdim=True).nan_to_num(0, 0, 0) - row_max
    # + 8 ulps of 1: log S is formed from S >= 1 rounded to fp32 (a row with p_y ~ 1 has a
    # loss ~ S - 1 known to ~eps32 only, in torch's fp32 as in the kernels)
    logp = spread + log_s.abs() + 8.0 / K
    w = torch.ones(n_classes, dtype=torch.float64) if weight is None else weight.double().abs()
    eps = label_smoothing
    if target.is_floating_point():
        r = w * ((1 - eps) * to_rows(target.double()).abs() + eps / n_classes)
        valid = torch.ones(n_rows, dtype=torch.bool)
    else:
        y = target.reshape(-1).long()
        valid = y != ignore_index
        onehot = torch.zeros_like(xr)
        onehot[valid, y[valid].clamp(0, n_classes - 1)] = 1.0
        r = w * ((1 - eps) * onehot + eps / n_classes)
    lse = torch.logsumexp(xr, dim=1).nan_to_num(0, 0, 0).abs() + row_max.squeeze(1).abs()
    loss_mag = (r * logp).sum(1) + z_loss * lse * lse
    grad_mag = 2 * r.sum(1) + 2 * z_loss * lse
    zero = torch.zeros((), dtype=torch.float64)
    return (torch.where(valid, loss_mag, zero), torch.where(valid, grad_mag, zero),
            torch.where(valid, 1 + logp.amax(dim=1) if n_classes else zero, zero))


def assert_matches(got, want, atol, dtype, what, roundings=1):
    """|got - want| <= atol (per element, broadcast) + `roundings` roundings to `dtype` when
    it is bf16/fp16 (a gradient: stored in forward, rescaled by grad_output in backward);
    NaN where want is NaN, the same infinities."""
    got = got.double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), (
        f"{what}: NaN at {torch.nonzero(torch.isnan(got) != nan).flatten().tolist()[:6]}; "
        f"got {got.flatten()[:6].tolist()}, want {want.flatten()[:6].tolist()}")
    # a value beyond the dtype's range is returned as the infinity it rounds to
    limit = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    over = torch.isfinite(want) & (want.abs() > limit)
    want = torch.where(over, want.sign() * float("inf"), want)
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got) & ~nan, inf) and torch.equal(got[inf], want[inf]), (
        f"{what}: infinities differ: got {got[inf | torch.isinf(got)].tolist()[:6]}")
    ok = ~(nan | inf)
    lowp = tiny = 0.0
    if dtype in (torch.bfloat16, torch.float16):  # half an ulp per rounding; below the
        info = torch.finfo(dtype)  # normal range the ulp is the subnormals' fixed spacing
        lowp, tiny = roundings * info.eps / 2, roundings * info.smallest_normal * info.eps / 2
    bound = (torch.as_tensor(atol, dtype=torch.float64).expand_as(want) + lowp * want.abs()
             + tiny)
    err = (got - want).abs()
    bad = ok & (err > bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {want.numel()} values off; worst at "
        f"{int(torch.argmax(torch.where(bad, err - bound, -1.0)))}: got "
        f"{got[bad][:4].tolist()}, want {want[bad][:4].tolist()}, allowed "
        f"{bound[bad][:4].tolist()}")
