"""fusedopt.sigmoid_focal_loss against torchvision's RetinaNet formula, written out here
(torchvision.ops.sigmoid_focal_loss), with float64 autograd, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import (assert_close, assert_lowp_rule, assert_rounded_once, grads_of,
                          random_grad_output)
from test_cross_entropy import REDUCTIONS

OP = "sigmoid_focal_loss"


def reference(x, t, *, alpha=0.25, gamma=2.0, reduction="none", label_smoothing=0.0):
    t = t * (1 - label_smoothing) + label_smoothing / 2
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def make(shape, device, dtype=torch.float32, *, soft=False, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=gen)).to(dtype)
    t = torch.rand(shape, generator=gen)
    t = t if soft else (t < 0.3).float()
    return x.to(device).requires_grad_(), t.to(device, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", (0.25, -1.0))
@pytest.mark.parametrize("gamma,smoothing", ((0.0, 0.0), (0.5, 0.1), (2.0, 0.0), (2.0, 0.2)))
def test_matches_torchvision(backend, gamma, smoothing, alpha, reduction):
    device = require_op(backend, OP)
    for shape, soft in (((6, 7), False), ((2, 3, 5), True)):
        x, t = make(shape, device, soft=soft)
        opts = dict(alpha=alpha, gamma=gamma, reduction=reduction, label_smoothing=smoothing)
        got = fo.sigmoid_focal_loss(x, t, backend=backend, **opts)
        x64 = x.detach().double().requires_grad_()
        want = reference(x64, t.double(), **opts)
        assert_close(got, want, what=f"loss {shape}")
        g_out = random_grad_output(got)
        assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                     what=f"grad {shape}")


def test_defaults(backend):
    """Function default reduction 'none' (torchvision's), module default 'mean'."""
    device = require_op(backend, OP)
    x, t = make((4, 5), device)
    x64 = x.detach().double()
    assert_close(fo.sigmoid_focal_loss(x, t, backend=backend), reference(x64, t.double()))
    module = fo.nn.SigmoidFocalLoss(backend=backend)
    assert_close(module(x, t), reference(x64, t.double(), reduction="mean"))


def test_many_elements(backend):
    device = require_op(backend, OP)
    x, t = make((3, 4099), device, soft=True)
    for reduction in ("sum", "mean"):
        got = fo.sigmoid_focal_loss(x, t, 0.3, 1.5, reduction, backend=backend)
        x64 = x.detach().double().requires_grad_()
        want = reference(x64, t.double(), alpha=0.3, gamma=1.5, reduction=reduction)
        assert_close(got, want, what="loss")
        assert_close(grads_of(got, x), grads_of(want, x64), what="grad")


@pytest.mark.parametrize("gamma", (0.0, 0.5, 1.0, 2.0))
def test_gradient_finite_when_saturated(backend, gamma):
    device = require_op(backend, OP)
    x = torch.tensor([[30.0, -30.0, 120.0, -120.0, 1e4, -1e4]], device=device).requires_grad_()
    for t in (torch.ones_like(x), torch.zeros_like(x)):
        for smoothing in (0.0, 0.1):
            loss = fo.sigmoid_focal_loss(x, t.detach(), gamma=gamma, label_smoothing=smoothing,
                                         backend=backend)
            g = grads_of(loss, x)
            assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (loss, g)
            x64 = x.detach().double()[:, :2].requires_grad_()  # |x| = 30: fp64 keeps 1 - p > 0
            want = reference(x64, t[:, :2].double(), gamma=gamma, label_smoothing=smoothing)
            assert_close(loss[:, :2], want, what="loss at |x| = 30")
            assert_close(g[:, :2], grads_of(want, x64), what="grad at |x| = 30")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision(backend, dtype):
    device = require_op(backend, OP)
    x, t = make((8, 33), device, dtype, soft=True)
    opts = dict(alpha=0.25, gamma=2.0, label_smoothing=0.1)
    got = fo.sigmoid_focal_loss(x, t, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, t.double(), **opts)
    x_low = x.detach().cpu().requires_grad_()
    lowp = reference(x_low, t.cpu(), **opts)
    assert_rounded_once(got, want, dtype, what="loss")
    g_out = random_grad_output(got)
    assert_lowp_rule(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                     grads_of(lowp, x_low, g_out.cpu()), dtype, what="grad")


def test_non_contiguous_and_empty(backend):
    device = require_op(backend, OP)
    x, t = make((6, 5), device)
    xt = x.detach().t().requires_grad_()  # (5, 6), transposed
    got = fo.sigmoid_focal_loss(xt, t.t(), reduction="sum", backend=backend)
    x64 = xt.detach().double().requires_grad_()
    want = reference(x64, t.t().double(), reduction="sum")
    assert_close(got, want, what="loss")
    assert_close(grads_of(got, xt), grads_of(want, x64), what="grad")
    x, t = make((0, 5), device)
    assert fo.sigmoid_focal_loss(x, t, backend=backend).shape == (0, 5)
    assert torch.isnan(fo.sigmoid_focal_loss(x, t, reduction="mean", backend=backend))
    loss = fo.sigmoid_focal_loss(x, t, reduction="sum", backend=backend)
    assert loss.item() == 0.0 and grads_of(loss, x).shape == (0, 5)


def test_deterministic(backend):
    device = require_op(backend, OP)
    x, t = make((16, 300), device, torch.bfloat16, soft=True)
    runs = [fo.sigmoid_focal_loss(x, t, reduction="mean", backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(grads_of(runs[0], x), grads_of(runs[1], x))
