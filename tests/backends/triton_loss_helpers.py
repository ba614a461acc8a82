"""Shared helpers of the Triton loss tests: entry-point wrappers, torch references and the
comparison rules.  References run in float64.  Each value is judged in the precision it is
computed in: row losses are fp32 whatever the logits' dtype (`assert_matches`); a loss
stored in bf16/fp16 is an fp32 result rounded once (`assert_rounded_once`); a bf16/fp16
gradient follows flash-attention's rule: our error against the float64 reference is at most
twice the error of the same torch computation run in the low precision (plus a tiny atol)."""

import torch
import torch.nn.functional as F

from fusedopt.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IGNORE = -100


def scales_tensor(ce=1.0, z=1.0):
    return torch.tensor([ce, z], dtype=torch.float32, device=DEVICE)


def ce_fwd(x, y, weight=None, scales=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
           inplace=False, need_grad=True, block_size=None, ignore_index=IGNORE):
    return tb.cross_entropy_fwd(
        x, y, weight, scales_tensor() if scales is None else scales, ignore_index=ignore_index,
        label_smoothing=eps, z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace,
        need_grad=need_grad, block_size=block_size)


def ce_reference(x, y, weight=None, scales=(1.0, 1.0), *, eps=0.0, z_loss=0.0, softcap=None,
                 soft=False, dtype=torch.float64):
    """Row losses and d(sum of rows)/dx with torch in `dtype`: scales[0]*F.cross_entropy
    (on soft-capped logits) + scales[1]*z_loss*logsumexp**2 for the non-ignored rows."""
    x = x.detach().to(dtype).requires_grad_()
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    target = y.to(dtype) if soft else y.long()
    w = weight.to(dtype) if weight is not None else None
    loss = scales[0] * F.cross_entropy(xc, target, weight=w, ignore_index=IGNORE,
                                       reduction="none", label_smoothing=eps)
    if z_loss:
        z = scales[1] * z_loss * torch.logsumexp(xc, dim=1) ** 2
        loss = loss + (z if soft else torch.where(target != IGNORE, z, 0.0))
    loss.sum().backward()
    return loss.detach(), x.grad


def assert_matches(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True)


def assert_low_precision_rule(ours, torch_low, ref, what, atol=1e-6):
    err_ours = (ours.double().cpu() - ref.double().cpu()).abs().max().item()
    err_torch = (torch_low.double().cpu() - ref.double().cpu()).abs().max().item()
    assert err_ours <= 2 * err_torch + atol, (
        f"{what}: our error {err_ours:.3g} > 2 x torch's low-precision error {err_torch:.3g}")


def assert_rounded_once(got, ref, dtype, rtol=1e-5, atol=1e-6):
    """`got` (in `dtype`) is an fp32-accurate value rounded once to `dtype` (a loss stored
    in the low precision): per element |got - ref| <= (eps(dtype)/2 + rtol) |ref| + atol."""
    assert got.dtype == dtype, f"dtype {got.dtype}, expected {dtype}"
    assert_matches(got, ref, rtol=torch.finfo(dtype).eps / 2 + rtol, atol=atol)


def make_ce_case(n, c, dtype=torch.float32, soft=False, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * scale).to(dtype)
    if soft:
        y = torch.softmax(torch.randn(n, c, generator=g), dim=1).to(dtype)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        if n > 2:
            y[1] = IGNORE
    weight = torch.rand(c, generator=g) + 0.5
    return x.to(DEVICE), y.to(DEVICE), weight.to(DEVICE)
