"""No host<->device synchronisation in the losses' forward and backward, proven on CUDA:
each loss runs forward and backward under torch.cuda.set_sync_debug_mode("error"), where
every synchronising CUDA call (a device value read on the host, a blocking copy, a
synchronize) raises.  Every loss and flag that changes the host code (weights, smoothing,
ignored targets, z-loss, soft-capping, soft targets, every reduction, in-place backward,
low precision, (N, C, d) inputs), on every backend that runs on CUDA.  The results are then
checked against PyTorch, or a float64 formula, so a test that ran nothing cannot pass.
Marked `gpu`; FUSEDOPT_CHECK (which synchronises on purpose) is unset."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import assert_lowp_rule

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda", "torch"]
IGNORE = -100
N, C = 8, 20001  # rows over one Triton block and over the cuda kernels' 64 KB row cache

CE_CASES = {
    "mean_ignore": dict(),
    "weight_smoothing": dict(weight=True, label_smoothing=0.1),
    "z_loss_softcap_sum": dict(z_loss=1e-3, softcap=30.0, reduction="sum"),
    "soft_targets": dict(soft=True, label_smoothing=0.1),
    "none": dict(reduction="none"),
    "inplace_bf16": dict(dtype=torch.bfloat16, inplace_backward=True),
    "ncd": dict(shape=(2, 300, 3, 2)),
}


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises RuntimeError."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@pytest.fixture(autouse=True)
def no_index_check(monkeypatch):
    monkeypatch.delenv("FUSEDOPT_CHECK", raising=False)


def _inputs(device, shape=(N, C), dtype=torch.float32, soft=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (4.0 * torch.randn(shape, generator=gen)).to(device, dtype).requires_grad_()
    classes = shape[1]
    if soft:
        y = torch.softmax(torch.randn(shape, generator=gen), dim=1).to(device, dtype)
    else:
        y = torch.randint(0, classes, shape[:1] + shape[2:], generator=gen)
        y.view(-1)[::3] = IGNORE
        y = y.to(device)
    weight = (torch.rand(classes, generator=gen) + 0.5).to(device)
    return x, y, weight


def _backward(loss, x):
    grad_out = torch.ones_like(loss) if loss.dim() == 0 else torch.linspace(
        0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape).to(loss.dtype)
    (g,) = torch.autograd.grad(loss, x, grad_out)
    return g, grad_out


@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_forward_and_backward_do_not_sync(backend, case):
    device = require_op(backend, "cross_entropy")
    opts = dict(CE_CASES[case])
    shape, dtype = opts.pop("shape", (N, C)), opts.pop("dtype", torch.float32)
    soft, use_weight = opts.pop("soft", False), opts.pop("weight", False)
    x, y, weight = _inputs(device, shape, dtype, soft)
    w = weight if use_weight else None
    x_ref = x.detach().double().requires_grad_()  # before an in-place backward overwrites x
    with no_host_sync():
        loss = fo.cross_entropy(x, y, w, IGNORE, backend=backend, **opts)
        grad, grad_out = _backward(loss, x)
    z_loss, softcap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
    opts.pop("inplace_backward", None)
    logits = softcap * torch.tanh(x_ref / softcap) if softcap else x_ref
    want = F.cross_entropy(logits, y.double() if soft else y, None if w is None else w.double(),
                           ignore_index=IGNORE, **opts)
    if z_loss:
        want = want + z_loss * (torch.logsumexp(logits, 1) ** 2)[y != IGNORE].sum()
    want_grad, _ = _backward(want, x_ref)
    if dtype == torch.bfloat16:  # flash-attention's rule against torch's own bf16 result
        x_low = x_ref.detach().to(dtype).requires_grad_()
        low = F.cross_entropy(x_low, y, ignore_index=IGNORE, **opts)
        assert_lowp_rule(loss.detach(), want.detach(), low.detach(), dtype, what="loss")
        assert_lowp_rule(grad, want_grad, _backward(low, x_low)[0], dtype, what="grad")
        return
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert grad_out.shape == loss.shape


def _focal_reference(x, y, alpha, gamma, smoothing):
    """Per-row focal loss in float64: -sum_c alpha_c q_c (1-p_c)^gamma log p_c."""
    logp = torch.log_softmax(x, dim=1)
    q = torch.full_like(logp, smoothing / x.shape[1])
    valid = y != IGNORE
    q[valid, y[valid]] += 1.0 - smoothing
    rows = -(alpha * q * (1 - logp.exp()) ** gamma * logp).sum(1)
    return torch.where(valid, rows, 0.0), valid


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_loss_forward_and_backward_do_not_sync(backend, reduction):
    device = require_op(backend, "focal_loss")
    x, y, alpha = _inputs(device)
    x_ref = x.detach().double().requires_grad_()
    with no_host_sync():
        loss = fo.focal_loss(x, y, gamma=2.0, alpha=alpha, ignore_index=IGNORE,
                             reduction=reduction, label_smoothing=0.1, backend=backend)
        grad, _ = _backward(loss, x)
    rows, valid = _focal_reference(x_ref, y, alpha.double(), 2.0, 0.1)
    want = rows.sum() / valid.sum() if reduction == "mean" else rows
    want_grad, _ = _backward(want, x_ref)
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_focal_loss_forward_and_backward_do_not_sync(backend, reduction):
    device = require_op(backend, "sigmoid_focal_loss")
    gen = torch.Generator().manual_seed(4)
    x = (3.0 * torch.randn(N, 1001, generator=gen)).to(device).requires_grad_()
    t = (torch.rand(N, 1001, generator=gen) < 0.1).float().to(device)
    with no_host_sync():
        loss = fo.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction=reduction,
                                     backend=backend)
        grad, _ = _backward(loss, x)
    x_ref = x.detach().double().requires_grad_()
    p = torch.sigmoid(x_ref)
    ce = F.binary_cross_entropy_with_logits(x_ref, t.double(), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    rows = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
    want = rows.mean() if reduction == "mean" else rows
    want_grad, _ = _backward(want, x_ref)
    torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
