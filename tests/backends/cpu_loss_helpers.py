"""Shared helpers of the `cpu` loss-kernel tests: entry-point wrappers, references computed
by PyTorch in float64 (F.cross_entropy and autograd; written-out formulas where PyTorch has
no equivalent), and the tolerance of the precision each value is computed in: the row
losses are fp32 (fp32 tolerances, whatever the logits' dtype); a value stored in bf16/fp16
is either an fp32 result rounded once (`assert_rounded_once`: the per-element sigmoid focal
loss) or a gradient, judged by flash-attention's rule (`assert_lowp_rule`: our error against
the float64 reference at most twice the error of the same torch computation run in the low
precision, plus one ulp of the final store and a tiny atol)."""

import torch
import torch.nn.functional as F

from fusedopt.backends import cpu as cpu_backend

IGNORE = -100


def scales(ce=1.0, z=1.0):
    return torch.tensor([ce, z], dtype=torch.float32)


def ce_fwd(x, y, weight=None, sc=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
           inplace=False, need_grad=True, ignore_index=IGNORE, num_threads=None):
    return cpu_backend.cross_entropy_fwd(
        x, y, weight, scales() if sc is None else sc, ignore_index=ignore_index,
        label_smoothing=eps, z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace,
        need_grad=need_grad, num_threads=num_threads)


def ce_reference(x, y, weight=None, sc=(1.0, 1.0), *, eps=0.0, z_loss=0.0, softcap=None,
                 soft=False, dtype=torch.float64):
    """Row losses and d(sum of rows)/dx by torch in `dtype`: sc[0]*F.cross_entropy (on
    soft-capped logits) + sc[1]*z_loss*logsumexp**2 for the non-ignored rows."""
    x = x.detach().to(dtype).requires_grad_()
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    target = y.to(dtype) if soft else y.long()
    w = weight.to(dtype) if weight is not None else None
    loss = sc[0] * F.cross_entropy(xc, target, weight=w, ignore_index=IGNORE, reduction="none",
                                   label_smoothing=eps)
    if z_loss:
        z = sc[1] * z_loss * torch.logsumexp(xc, dim=1) ** 2
        loss = loss + (z if soft else torch.where(target != IGNORE, z, 0.0))
    loss.sum().backward()
    return loss.detach(), x.grad


def focal_reference(x, y, alpha=None, gamma=2.0, eps=0.0, scale=1.0, dtype=torch.float64):
    """Softmax focal loss per row, -scale * sum_c alpha_c q_c (1-p_c)^gamma log p_c written
    out with torch ops in `dtype`, and d(sum of rows)/dx by autograd.  1 - p is formed as
    -expm1(log p) and kept >= the smallest normal, so that autograd of u**gamma (gamma < 1)
    gives the finite limit where p rounds to 1; terms with q_c = 0 are 0."""
    x = x.detach().to(dtype).requires_grad_()
    n_cols = x.shape[1]
    valid = y != IGNORE
    log_p = torch.log_softmax(x, dim=1)
    u = (-torch.expm1(log_p)).clamp_min(torch.finfo(dtype).tiny)
    q = torch.full_like(log_p, eps / n_cols)
    q[valid, y[valid].long()] += 1.0 - eps
    a = alpha.to(dtype) if alpha is not None else torch.ones(n_cols, dtype=dtype)
    terms = a * q * u.pow(gamma) * torch.where(q > 0, log_p, 0.0)
    loss = -scale * torch.where(valid[:, None], terms, 0.0).sum(dim=1)
    loss.sum().backward()
    return loss.detach(), x.grad


def sigmoid_focal_reference(x, t, alpha=0.25, gamma=2.0, eps=0.0, scale=1.0,
                            dtype=torch.float64):
    """torchvision.ops.sigmoid_focal_loss written out (targets smoothed to t(1-eps)+eps/2),
    per element, times scale; and its gradient by autograd, in `dtype`."""
    x = x.detach().to(dtype).requires_grad_()
    t = t.to(dtype) * (1.0 - eps) + eps / 2
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t).clamp_min(torch.finfo(dtype).tiny) ** gamma  # finite limit at p_t = 1
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    loss = scale * loss
    loss.sum().backward()
    return loss.detach(), x.grad


def assert_close(got, want, rtol=1e-5, atol=1e-6, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_lowp_rule(got, ref64, torch_lowp, dtype, what=""):
    """max |got - ref| <= 2 max |torch_lowp - ref| + one ulp of the largest reference value
    in `dtype` (the unavoidable rounding of the final store) + 1e-7."""
    ref = ref64.double()
    ours = (got.double() - ref).abs().max().item()
    theirs = (torch_lowp.double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert ours <= 2 * theirs + ulp + 1e-7, (
        f"{what}: error {ours:.3g} vs fp64 reference exceeds 2x torch's {dtype} error "
        f"{theirs:.3g} + ulp {ulp:.3g}")


def assert_rounded_once(got, ref64, dtype, rtol=1e-5, atol=1e-6, what=""):
    """`got` (in `dtype`) is an fp32-accurate value rounded once to `dtype` (a loss stored
    in the low precision): per element |got - ref| <= (eps(dtype)/2 + rtol) |ref| + atol."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert_close(got, ref64, rtol=torch.finfo(dtype).eps / 2 + rtol, atol=atol, what=what)


def same_bits(a, b):
    """Bitwise equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def make_ce_case(n, c, dtype=torch.float32, soft=False, spread=3.0, seed=0, ignore_row=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * spread).to(dtype)
    if soft:
        y = torch.softmax(torch.randn(n, c, generator=g), dim=1).to(dtype)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        if ignore_row is not None and n > ignore_row + 1:
            y[ignore_row] = IGNORE
    weight = torch.rand(c, generator=g) + 0.5
    return x, y, weight
