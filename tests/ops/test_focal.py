"""fusedopt.focal_loss (softmax, multi-class) against its formula written out with
float64 torch autograd, and against F.cross_entropy for gamma = 0, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import (IGNORE, assert_close, assert_lowp_rule, assert_rounded_once,
                          grads_of, random_grad_output)
from test_cross_entropy import REDUCTIONS, make_inputs

OP = "focal_loss"


def reference(x, y, *, gamma, alpha=None, label_smoothing=0.0, reduction="mean"):
    """loss_i = -Σ_c α_c q_c (1 - p_c)^γ log p_c, q = (1-ε)·onehot(y) + ε/C; ignored rows
    contribute 0; 'mean' divides by the number of non-ignored rows."""
    n_classes = x.shape[1]
    log_p = torch.log_softmax(x, dim=1)
    p = log_p.exp()
    valid = y != IGNORE
    q = F.one_hot(torch.where(valid, y, 0).long(), n_classes).to(x.dtype)
    q = (1 - label_smoothing) * q + label_smoothing / n_classes
    if alpha is not None:
        q = q * (alpha.to(x.dtype) if isinstance(alpha, torch.Tensor) else alpha)
    loss = -(q * (1 - p) ** gamma * log_p).sum(dim=1)
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def alpha_for(kind, n_classes, device):
    if kind == "tensor":
        return (torch.rand(n_classes, generator=torch.Generator().manual_seed(11)) + 0.2).to(device)
    return {"none": None, "float": 0.25}[kind]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", ("none", "float", "tensor"))
@pytest.mark.parametrize("gamma,smoothing", ((0.0, 0.1), (0.5, 0.0), (2.0, 0.0), (2.0, 0.2)))
def test_matches_formula(backend, gamma, smoothing, alpha, reduction):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((8, 9), device, ignore=True, scale=2.0)
    a = alpha_for(alpha, 9, device)
    got = fo.focal_loss(x, y, gamma, a, IGNORE, reduction, smoothing, backend=backend)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, gamma=gamma, alpha=a, label_smoothing=smoothing, reduction=reduction)
    assert_close(got, want, what="loss")
    g_out = random_grad_output(got)
    assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()), what="grad")


@pytest.mark.parametrize("shape", ((9,), (2, 9, 3, 2)), ids=("c", "ncd"))
def test_shapes(backend, shape):
    device = require_op(backend, OP)
    x, y, _ = make_inputs(shape, device, ignore=True)
    for reduction in REDUCTIONS:
        got = fo.focal_loss(x, y, 1.5, reduction=reduction, backend=backend)
        x64 = x.detach().double().requires_grad_()
        rows64 = x64.unsqueeze(0) if x.dim() == 1 else x64.movedim(1, -1).reshape(-1, 9)
        want = reference(rows64, y.reshape(-1), gamma=1.5, reduction=reduction)
        if reduction == "none":
            want = want.reshape(y.shape)
        assert_close(got, want, what=f"loss {reduction}")
        assert_close(grads_of(got, x), grads_of(want, x64), what=f"grad {reduction}")


@pytest.mark.parametrize("smoothing", (0.0, 0.15))
def test_gamma_zero_is_cross_entropy(backend, smoothing):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((7, 10), device, ignore=True, seed=3)
    for reduction in REDUCTIONS:
        got = fo.focal_loss(x, y, gamma=0.0, alpha=None, reduction=reduction,
                            label_smoothing=smoothing, backend=backend)
        want = F.cross_entropy(x, y, ignore_index=IGNORE, reduction=reduction,
                               label_smoothing=smoothing)
        assert_close(got, want, what=f"loss {reduction}")
        g_out = random_grad_output(want)
        assert_close(grads_of(got, x, g_out), grads_of(want, x, g_out), what=f"grad {reduction}")


@pytest.mark.parametrize("gamma", (0.0, 0.5, 1.0, 2.0))
def test_gradient_finite_as_p_goes_to_one(backend, gamma):
    device = require_op(backend, OP)
    x = torch.zeros(4, 6)
    x[:, 2] = torch.tensor([30.0, 60.0, 200.0, 1e4])  # p_y -> 1, exactly 1 in fp32
    x = x.to(device).requires_grad_()
    y = torch.full((4,), 2, device=device)
    for smoothing in (0.0, 0.1):
        loss = fo.focal_loss(x, y, gamma, label_smoothing=smoothing, reduction="none",
                             backend=backend)
        g = grads_of(loss, x)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (loss, g)
        x64 = x.detach().double()[:1].requires_grad_()  # margin 30: fp64 still has 1 - p > 0
        want = reference(x64, y[:1], gamma=gamma, label_smoothing=smoothing, reduction="none")
        assert_close(loss[:1], want, what="loss at margin 30")
        assert_close(g[:1], grads_of(want, x64), what="grad at margin 30")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_low_precision(backend, dtype):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((12, 33), device, dtype=dtype, ignore=True, scale=4.0)
    a = alpha_for("tensor", 33, device)
    opts = dict(gamma=2.0, alpha=a, label_smoothing=0.1, reduction="none")
    got = fo.focal_loss(x, y, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, **opts)
    x_low = x.detach().cpu().requires_grad_()
    lowp = reference(x_low, y.cpu(), **{**opts, "alpha": a.cpu().to(dtype)})
    assert_rounded_once(got, want, dtype, what="loss")
    g_out = random_grad_output(got)
    assert_lowp_rule(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                     grads_of(lowp, x_low, g_out.cpu()), dtype, what="grad")


def test_large_classes(backend):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((3, 4099), device, ignore=True, scale=3.0)
    got = fo.focal_loss(x, y, 2.0, 0.5, label_smoothing=0.05, backend=backend)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, gamma=2.0, alpha=0.5, label_smoothing=0.05)
    assert_close(got, want, what="loss")
    assert_close(grads_of(got, x), grads_of(want, x64), what="grad")


def test_all_ignored_and_empty(backend):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((3, 5), device)
    y = torch.full_like(y, IGNORE)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        loss = fo.focal_loss(x, y, reduction=reduction, backend=backend)
        assert_close(loss, torch.tensor(expected), what=reduction)
        assert not grads_of(loss, x).any()
    x, y, _ = make_inputs((0, 5), device)
    assert fo.focal_loss(x, y, reduction="none", backend=backend).shape == (0,)
    assert torch.isnan(fo.focal_loss(x, y, backend=backend))
    loss = fo.focal_loss(x, y, reduction="sum", backend=backend)
    assert loss.item() == 0.0 and grads_of(loss, x).shape == (0, 5)


def test_deterministic(backend):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((8, 700), device, dtype=torch.bfloat16, ignore=True)
    runs = [fo.focal_loss(x, y, 2.0, 0.25, label_smoothing=0.1, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(grads_of(runs[0], x), grads_of(runs[1], x))


def test_module(backend):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((6, 9), device, ignore=True)
    a = alpha_for("tensor", 9, "cpu")
    module = fo.nn.FocalLoss(gamma=1.0, alpha=a, backend=backend)
    assert "alpha" in dict(module.named_buffers())
    module.to(device)
    got = module(x, y)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, gamma=1.0, alpha=a.to(device))
    assert_close(got, want, what="module loss")
    assert_close(grads_of(got, x), grads_of(want, x64), what="module grad")
