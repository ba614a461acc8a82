"""Cases and float64 references of the distributed loss tests; used inside the ranks.

Every rank builds the same full inputs from a fixed seed, so each can compute the
reference on the full logits (torch's F.cross_entropy in float64, plus the z-loss term
written out) and compare it with the distributed result it gathered."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")

# flags of cross_entropy; "shape" is the logits' shape, "soft" a probability target
CE_CASES = {
    "plain": dict(),
    "weight_ignore": dict(weight=True, ignore=True),
    "smoothing_weight": dict(label_smoothing=0.2, weight=True, ignore=True),
    "z_softcap": dict(z_loss=0.05, softcap=2.5, ignore=True),
    "everything": dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1, weight=True, ignore=True),
    "soft": dict(soft=True, label_smoothing=0.1, weight=True),
    "soft_z": dict(soft=True, z_loss=0.02),
    "all_ignored": dict(all_ignored=True, weight=True),
    "spatial": dict(shape=(4, 6, 3), weight=True, ignore=True, label_smoothing=0.1),
    "one_row": dict(shape=(6,), label_smoothing=0.1),
    "inplace": dict(inplace_backward=True, label_smoothing=0.1, weight=True, ignore=True),
}


def make_inputs(case: dict, device, seed=0, n_rows=6, n_classes=8, dtype=torch.float32):
    """(logits, target, weight) for a case; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shape = case.get("shape", (n_rows, n_classes))
    if len(shape) >= 2 and "shape" in case:
        n_classes = shape[1]
    elif len(shape) == 1:
        n_classes = shape[0]
    x = (3.0 * torch.randn(shape, generator=gen)).to(dtype)
    class_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    if case.get("soft"):
        y = torch.softmax(torch.randn(shape, generator=gen), dim=1 if len(shape) >= 2 else 0)
    else:
        y = torch.randint(0, n_classes, class_shape, generator=gen)
        if case.get("ignore") and y.dim() > 0:
            y.view(-1)[::3] = IGNORE
        if case.get("all_ignored"):
            y.fill_(IGNORE)
    w = torch.rand(n_classes, generator=gen) + 0.5 if case.get("weight") else None
    return x.to(device), y.to(device), None if w is None else w.to(device)


def loss_kwargs(case: dict, reduction: str) -> dict:
    kw = dict(reduction=reduction, ignore_index=IGNORE,
              label_smoothing=case.get("label_smoothing", 0.0))
    for name in ("z_loss", "softcap", "inplace_backward"):
        if name in case:
            kw[name] = case[name]
    return kw


def reference(x, y, w, *, reduction, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0,
              softcap=None, inplace_backward=False):
    """F.cross_entropy on the soft-capped float64 logits plus the z-loss c·lse² of every
    counted row ('mean' divides it by the number of counted rows)."""
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    w64 = None if w is None else w.double()
    ce = F.cross_entropy(xc, y, w64, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
    if not z_loss:
        return ce
    lse = torch.logsumexp(xc, dim=1 if xc.dim() >= 2 else 0)
    valid = torch.ones_like(lse, dtype=torch.bool) if y.is_floating_point() else y != ignore_index
    z = torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce + z.sum()
    return ce + z.sum() / valid.sum()


def reference_and_grad(x, y, w, grad_output=None, **kw):
    """(loss, d loss / d x) in float64 with `grad_output` (default ones)."""
    x64 = x.detach().double().requires_grad_()
    y64 = y.double() if y.is_floating_point() else y
    loss = reference(x64, y64, w, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, x64, go)
    return loss.detach(), grad


def random_grad_output(shape, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


def assert_close(got, want, what, rtol=1e-5, atol=1e-6):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def focal_reference(x, y, *, gamma, alpha=None, label_smoothing=0.0, reduction="mean"):
    """-Σ_c α_c q_c (1 - p_c)^γ log p_c per row, q = (1-ε)·onehot(y) + ε/C; ignored rows
    give 0 and 'mean' divides by the number of the others."""
    n_classes = x.shape[1]
    log_p = torch.log_softmax(x, dim=1)
    valid = y != IGNORE
    q = F.one_hot(torch.where(valid, y, 0).long(), n_classes).to(x.dtype)
    q = (1 - label_smoothing) * q + label_smoothing / n_classes
    if alpha is not None:
        q = q * (alpha.to(x.dtype) if isinstance(alpha, torch.Tensor) else alpha)
    loss = torch.where(valid, -(q * (1 - log_p.exp()) ** gamma * log_p).sum(dim=1), 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def sigmoid_focal_reference(x, t, *, alpha, gamma, label_smoothing=0.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss with smoothed targets t' = (1-ε)·t + ε/2."""
    t = t * (1 - label_smoothing) + label_smoothing / 2
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    loss = ce * (1 - (p * t + (1 - p) * (1 - t))) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def assert_lowp_rule(got, ref64, torch_lowp, what):
    """flash-attention's rule for a bf16/fp16 result: its error against the float64
    reference is at most twice torch's own error in that dtype, plus one ulp."""
    ref = ref64.double().cpu()
    ours = (got.double().cpu() - ref).abs().max().item()
    theirs = (torch_lowp.double().cpu() - ref).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert ours <= 2 * theirs + ulp + 1e-7, (
        f"{what}: error {ours:.3g} exceeds 2x torch's {got.dtype} error {theirs:.3g} + ulp")
