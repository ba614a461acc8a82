"""fusedopt.linear_cross_entropy under torch's autograd patterns, against the float64 loss on
materialised logits (test_linear_cross_entropy.reference) run through the same pattern:
a second backward through a retained graph, a double backward (gradient penalty), an
input modified in place before a double backward, torch.func.grad, forward-mode AD and a
class weight that requires grad."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import IGNORE, assert_close, random_grad_output
from test_linear_cross_entropy import H, N, OP, V, make_inputs, reference

def _inputs(device, **make):
    x, w, b, y, cw = make_inputs((N,), H, V, device, bias=True, ignore=True, **make)
    return x, w, b, y, cw


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_second_backward_through_retained_graph(backend, reduction):
    """The stored gradients serve a second backward unchanged (retain_graph=True)."""
    device = require_op(backend, OP)
    x, w, b, y, cw = _inputs(device, weight=True)
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                  label_smoothing=0.1, z_loss=1e-3, softcap=4.0, chunk_size=4,
                                  backend=backend)
    want = reference(x, w, b, y, cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                     softcap=4.0)
    g_out = random_grad_output(got)
    want_grads = torch.autograd.grad(want, (x, w, b), g_out)
    for _ in range(2):
        got_grads = torch.autograd.grad(got, (x, w, b), g_out, retain_graph=True)
        for g, r in zip(got_grads, want_grads):
            assert_close(g, r, what="grad")


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_double_backward_gradient_penalty(backend, reduction):
    """grad(loss, create_graph=True) has a graph: the penalty Σ‖∂loss/∂t‖² differentiates
    to the second derivatives of the float64 loss on materialised logits."""
    device = require_op(backend, OP)
    x, w, b, y, cw = _inputs(device, weight=True)

    def penalty(loss):
        g_out = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) \
            if loss.dim() else None
        first = torch.autograd.grad(loss, (x, w, b), g_out, create_graph=True)
        return first, sum((g.double() ** 2).sum() for g in first)

    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                  label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                                  backend=backend)
    want = reference(x, w, b, y, cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                     softcap=4.0)
    got_first, got_penalty = penalty(got)
    want_first, want_penalty = penalty(want)
    for g, r in zip(got_first, want_first):
        assert_close(g, r, what="first derivative")
    for g, r in zip(torch.autograd.grad(got_penalty, (x, w, b)),
                    torch.autograd.grad(want_penalty, (x, w, b))):
        assert_close(g, r, what="second derivative")


def test_double_backward_refuses_an_operand_modified_in_place(backend):
    device = require_op(backend, OP)
    x, w, b, y, _ = _inputs(device)
    loss = fo.linear_cross_entropy(x, w, y, linear_bias=b, backend=backend)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, (x, w, b), create_graph=True)


def test_torch_func_grad_and_forward_ad(backend):
    """Inside torch.func and with dual tensors the loss is formed from differentiable ops."""
    device = require_op(backend, OP)
    x, w, b, y, _ = _inputs(device)
    x, w, b = x.detach(), w.detach(), b.detach()

    def ours(w):
        return fo.linear_cross_entropy(x, w, y, linear_bias=b, z_loss=1e-3, backend=backend)

    def theirs(w):
        return reference(x, w, b, y, None, z_loss=1e-3)

    assert_close(torch.func.grad(ours)(w), torch.func.grad(theirs)(w), what="func.grad")
    tangent = torch.randn_like(w)
    _, got = torch.func.jvp(ours, (w,), (tangent,))
    _, want = torch.func.jvp(theirs, (w,), (tangent,))
    assert_close(got, want, what="jvp")
    fwd = torch.autograd.forward_ad
    with fwd.dual_level():
        got = fwd.unpack_dual(fo.linear_cross_entropy(
            x, fwd.make_dual(w, tangent), y, linear_bias=b, z_loss=1e-3,
            backend=backend)).tangent
    assert_close(got, want, what="forward AD tangent")


def test_class_weight_gradient(backend):
    """A class weight that requires grad gets the gradient of Σ w_y·ce_i / Σ w_y (written
    out in float64; F.cross_entropy refuses such a weight)."""
    device = require_op(backend, OP)
    x, w, b, y, cw = _inputs(device, weight=True)
    cw.requires_grad_()
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, backend=backend)
    z = F.linear(x.double(), w.double(), b.double())
    valid = y != IGNORE
    rows = y.clamp(0, V - 1)
    ce = -torch.log_softmax(z, dim=1).gather(1, rows[:, None]).squeeze(1)
    w_y = torch.where(valid, cw.double()[rows], 0.0)
    want = (w_y * ce).sum() / w_y.sum()
    assert_close(got, want, what="loss")
    for g, r in zip(torch.autograd.grad(got, (x, w, b, cw)),
                    torch.autograd.grad(want, (x, w, b, cw))):
        assert_close(g, r, what="grad")
