"""z-loss and logit soft-capping against an independent float64 autograd formula, and the
inplace_backward contract, on every backend that can run here."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import (IGNORE, assert_close, assert_lowp_rule, assert_rounded_once, grads_of,
                          random_grad_output)
from test_cross_entropy import REDUCTIONS, make_inputs

OP = "cross_entropy"


def reference(x, y, weight, *, reduction, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """The loss written out with plain torch ops (no F.cross_entropy): soft-cap, logsumexp,
    torch's weighted label smoothing; z-loss on non-ignored rows, never weighted, 'mean'
    divides it by the number of non-ignored rows and the CE part by the summed weights."""
    n_classes = x.shape[1]
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    lse = torch.logsumexp(xc, dim=1)
    log_p = xc - lse[:, None]
    ones = torch.ones(n_classes, dtype=x.dtype, device=x.device)
    w = ones if weight is None else weight.to(x.dtype)
    if y.is_floating_point():  # probabilities; no row ignored
        q = (1 - label_smoothing) * y.to(x.dtype) + label_smoothing / n_classes
        ce = -(w * q * log_p).sum(dim=1)
        valid = torch.ones_like(lse, dtype=torch.bool)
        ce_den = torch.tensor(float(x.shape[0]), dtype=x.dtype)
    else:
        valid = y != IGNORE
        yc = torch.where(valid, y, 0).long()
        w_y = w[yc]
        nll = -w_y * log_p.gather(1, yc[:, None]).squeeze(1)
        smooth = -(w * log_p).sum(dim=1) / n_classes
        ce = torch.where(valid, (1 - label_smoothing) * nll + label_smoothing * smooth, 0.0)
        ce_den = torch.where(valid, w_y, 0.0).sum()
    z = torch.where(valid, z_loss * lse**2, 0.0)
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce.sum() + z.sum()
    return ce.sum() / ce_den + z.sum() / valid.sum()


ZCASES = {
    "z": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "z_softcap": dict(z_loss=0.05, softcap=2.5),
    "z_softcap_smoothing_weight": dict(z_loss=0.05, softcap=2.5, label_smoothing=0.2, weight=True),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ZCASES)
def test_z_loss_softcap(backend, case, reduction):
    device = require_op(backend, OP)
    opts = dict(ZCASES[case])
    x, y, w = make_inputs((9, 11), device, ignore=True, weight=opts.pop("weight", False),
                          scale=4.0)
    got = fo.cross_entropy(x, y, w, IGNORE, reduction, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, w, reduction=reduction, **opts)
    assert_close(got, want, what="loss")
    g_out = random_grad_output(got)
    assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()), what="grad")


def test_reference_is_torch_without_extras():
    """The written-out reference itself equals F.cross_entropy when z=0, no softcap."""
    x, y, w = make_inputs((9, 11), "cpu", ignore=True, weight=True)
    for reduction in REDUCTIONS:
        assert_close(reference(x, y, w, reduction=reduction, label_smoothing=0.3),
                     F.cross_entropy(x, y, w, ignore_index=IGNORE, reduction=reduction,
                                     label_smoothing=0.3), what=reduction)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_z_loss_softcap_soft_targets(backend, reduction):
    device = require_op(backend, OP)
    x, _, w = make_inputs((6, 9), device, weight=True, scale=3.0)
    q = torch.softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(8)), 1).to(device)
    opts = dict(z_loss=0.02, softcap=4.0, label_smoothing=0.1)
    got = fo.cross_entropy(x, q, w, reduction=reduction, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, q.double(), w, reduction=reduction, **opts)
    assert_close(got, want, what="loss")
    g_out = random_grad_output(got)
    assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()), what="grad")


def test_z_loss_softcap_bf16(backend):
    device = require_op(backend, OP)
    x, y, _ = make_inputs((12, 40), device, dtype=torch.bfloat16, ignore=True, scale=5.0)
    opts = dict(z_loss=1e-2, softcap=3.0, reduction="none")
    got = fo.cross_entropy(x, y, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, y, None, **opts)
    x_low = x.detach().cpu().requires_grad_()
    lowp = reference(x_low, y.cpu(), None, **opts)
    assert_rounded_once(got, want, torch.bfloat16, what="loss")
    g_out = random_grad_output(got)
    assert_lowp_rule(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                     grads_of(lowp, x_low, g_out.cpu()), torch.bfloat16, what="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_inplace_backward(backend, dtype, reduction):
    """The gradient lands in the logits' buffer during forward, and backward gives the
    same gradient as without inplace_backward."""
    device = require_op(backend, OP)
    x, y, w = make_inputs((6, 13), device, dtype=dtype, ignore=True, weight=True)
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    plain = fo.cross_entropy(x, y, **opts)
    g_out = random_grad_output(plain)
    want = grads_of(plain, x, g_out)
    stored = grads_of(fo.cross_entropy(x, y, **opts), x)  # the gradient of forward

    logits = x.detach() * 1.0  # a non-leaf whose buffer the loss may overwrite
    logits.requires_grad_()
    buffer = logits.detach()
    got = fo.cross_entropy(logits, y, inplace_backward=True, **opts)
    assert_close(got, plain, rtol=0, atol=0, what="loss")
    assert torch.equal(buffer, stored), "forward did not write the gradient into the logits"
    grad = grads_of(got, logits, g_out)
    assert_close(grad, want, rtol=0, atol=0, what="grad")
    assert torch.equal(buffer, grad), "backward did not scale the logits' buffer in place"


def test_inplace_backward_strided_rows(backend):
    device = require_op(backend, OP)
    big = torch.randn(10, 16, generator=torch.Generator().manual_seed(9)).to(device)
    y = torch.tensor([0, 3, IGNORE, 6, 2], device=device)
    ref_x = big[::2, :7].clone().requires_grad_()
    want = grads_of(F.cross_entropy(ref_x, y), ref_x)
    view = big[::2, :7].requires_grad_()
    loss = fo.cross_entropy(view, y, inplace_backward=True, backend=backend)
    assert_close(big[::2, :7], want, what="gradient written into the strided rows")
    untouched = torch.randn(10, 16, generator=torch.Generator().manual_seed(9)).to(device)
    assert torch.equal(big[1::2], untouched[1::2]), "rows between the strided rows were touched"
    assert torch.equal(big[::2, 7:], untouched[::2, 7:]), "columns past C were touched"
    assert_close(grads_of(loss, view), want, what="grad")


def test_backend_scale_grad_hook(backend, monkeypatch):
    """A scalar grad_output reaches the backend's optional scale_grad_(grad, scale) as a
    0-dim fp32 device tensor, with the stored (contiguous) gradient; the result is right."""
    device = require_op(backend, OP)
    module = fo.backends.select(OP, device, backend)
    real = getattr(module, "scale_grad_", None)
    calls = []

    def spy(grad, scale):
        calls.append((grad.shape, grad.is_contiguous(), scale.dim(), scale.dtype))
        return real(grad, scale) if real is not None else grad.mul_(scale)

    monkeypatch.setattr(module, "scale_grad_", spy, raising=False)
    x, y, w = make_inputs((5, 9), device, ignore=True, weight=True)
    loss = fo.cross_entropy(x, y, w, backend=backend)
    got = grads_of(loss, x, torch.tensor(3.5, device=device))
    want = grads_of(F.cross_entropy(x, y, w, ignore_index=IGNORE), x,
                    torch.tensor(3.5, device=device))
    assert calls == [((5, 9), True, 0, torch.float32)]
    assert_close(got, want, what="grad")
