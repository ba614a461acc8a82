"""Every GPU backend launches on the current stream (gpu_stream_helpers.py): the losses'
forward and backward and the optimizer steps of the `triton` and `cuda` backends, through
the public API, on a side stream that is held up until it has written the inputs.  A
launch on another stream would read NaN inputs.  The last test shows the check catches
exactly that: with the cuda launcher pointed at the default stream the results are NaN.
Marked `gpu`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from gpu_stream_helpers import nan_like, run_on_a_held_up_stream

pytestmark = pytest.mark.gpu

N, C = 16, 20001
IGNORE = -100
LOSSES = {
    "cross_entropy": lambda x, y, b: fo.cross_entropy(x, y, label_smoothing=0.1, backend=b),
    "focal_loss": lambda x, y, b: fo.focal_loss(x, y, gamma=2.0, backend=b),
}


def _loss_inputs(device):
    gen = torch.Generator().manual_seed(0)
    src = (3.0 * torch.randn(N, C, generator=gen)).to(device)
    y = torch.randint(0, C, (N,), generator=gen).to(device)
    return src, y


def _reference(name, src, y):
    x = src.double().requires_grad_()
    if name == "cross_entropy":
        loss = F.cross_entropy(x, y, label_smoothing=0.1)
    else:
        logp = torch.log_softmax(x, 1).gather(1, y[:, None])[:, 0]
        loss = -((1 - logp.exp()) ** 2 * logp).mean()
    loss.backward()
    return loss.detach(), x.grad


def _loss_on_a_held_up_stream(name, backend, src, y):
    x = nan_like(src).requires_grad_()

    def fill():
        with torch.no_grad():
            x.copy_(src)

    def launch():
        loss = LOSSES[name](x, y, backend)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    return run_on_a_held_up_stream(fill, launch)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_losses_run_on_the_current_stream(backend, name):
    device = require_op(backend, name)
    src, y = _loss_inputs(device)
    loss, grad = _loss_on_a_held_up_stream(name, backend, src, y)
    want_loss, want_grad = _reference(name, src, y)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sigmoid_focal_runs_on_the_current_stream(backend):
    device = require_op(backend, "sigmoid_focal_loss")
    gen = torch.Generator().manual_seed(1)
    src = (3.0 * torch.randn(N, 1001, generator=gen)).to(device)
    t = (torch.rand(N, 1001, generator=gen) < 0.1).float().to(device)
    x = nan_like(src).requires_grad_()

    def fill():
        with torch.no_grad():
            x.copy_(src)

    def launch():
        loss = fo.sigmoid_focal_loss(x, t, reduction="mean", backend=backend)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    loss, grad = run_on_a_held_up_stream(fill, launch)
    xr = src.double().requires_grad_()
    p = torch.sigmoid(xr)
    ce = F.binary_cross_entropy_with_logits(xr, t.double(), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    want = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2).mean()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_optimizer_steps_run_on_the_current_stream(backend):
    """Norm, clip coefficient and update of FusedAdamW(max_grad_norm=...) behind a held-up
    stream, against clip_grad_norm_ + torch.optim.AdamW."""
    device = require_op(backend, "adam")
    gen = torch.Generator().manual_seed(2)
    shapes = [(300, 70), (70,), (1,), (65_536 + 3,)]
    start = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    params = [p.clone().requires_grad_() for p in start]
    for p in params:
        p.grad = nan_like(p)
    opt = fo.optim.FusedAdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                              backend=backend)

    def fill():
        for p, g in zip(params, grads):
            p.grad.copy_(g)

    run_on_a_held_up_stream(fill, opt.step)
    ref = [p.clone().requires_grad_() for p in start]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False).step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


def test_the_check_catches_a_launch_on_another_stream(monkeypatch):
    """With the cuda launchers handed the default stream instead of the current one, the
    loss kernel runs before its inputs are written: the results are NaN, so the tests above
    would fail."""
    device = require_op("cuda", "cross_entropy")
    src, y = _loss_inputs(device)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: torch.cuda.default_stream(device))
    loss, grad = _loss_on_a_held_up_stream("cross_entropy", "cuda", src, y)
    monkeypatch.undo()
    assert torch.isnan(loss).all() and torch.isnan(grad).all()
