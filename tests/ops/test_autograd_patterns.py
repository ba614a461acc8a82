"""The autograd patterns torch users write around F.cross_entropy, run as the same code with
torch's loss (or, where torch has none, the float64 formula of the loss's test module) and
with ours, on every backend: double backward (a gradient penalty on the logits, MAML's
second-order gradients of a model's parameters), a second backward through a retained
graph, gradients w.r.t. probability targets, class weights and alpha, and what
inplace_backward does with each.  torch.func transforms and gradcheck:
test_autograd_transforms.py."""

import weakref

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
import test_cross_entropy_extras as ce_extras
import test_focal
import test_sigmoid_focal
from conftest import require_op
from loss_helpers import IGNORE, assert_close, random_grad_output
from test_cross_entropy import make_inputs


def soft_target(shape, device, seed=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=gen), dim=1).to(device, dtype)


def gradient_penalty(loss_fn, x, grad_output=None):
    """loss, its gradient g (with a graph) and d(Σ g²)/dx, the usual gradient penalty."""
    loss = loss_fn(x)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (g,) = torch.autograd.grad(loss, x, go, create_graph=True)
    assert g.requires_grad, "the gradient has no graph"
    (second,) = torch.autograd.grad(g.pow(2).sum(), x)
    return loss.detach(), g.detach(), second


def assert_same_penalty(ours, theirs, x, x_ref=None, grad_output=None, what=""):
    x_ref = x if x_ref is None else x_ref
    go_ref = None if grad_output is None else grad_output.to(x_ref.dtype)
    for got, want, name in zip(gradient_penalty(ours, x, grad_output),
                               gradient_penalty(theirs, x_ref, go_ref),
                               ("loss", "gradient", "second derivative")):
        assert_close(got, want, rtol=1e-4, atol=1e-6, what=f"{what} {name}")


CE_CASES = {
    "class": dict(),
    "weight_ignore_smoothing": dict(weight=True, ignore=True, label_smoothing=0.2),
    "soft_weight_smoothing": dict(soft=True, weight=True, label_smoothing=0.1),
}


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("shape", ((6, 7), (2, 7, 3)), ids=("nc", "ncd"))
def test_cross_entropy_gradient_penalty(backend, shape, case, reduction):
    device = require_op(backend, "cross_entropy")
    opts = dict(CE_CASES[case])
    soft = opts.pop("soft", False)
    x, y, w = make_inputs(shape, device, ignore=opts.pop("ignore", False),
                          weight=opts.pop("weight", False))
    y = soft_target(shape, device) if soft else y
    kw = dict(weight=w, ignore_index=IGNORE, reduction=reduction, **opts)
    go = random_grad_output(F.cross_entropy(x, y, **kw)) if reduction == "none" else None
    assert_same_penalty(lambda t: fo.cross_entropy(t, y, backend=backend, **kw),
                        lambda t: F.cross_entropy(t, y, **kw), x, grad_output=go, what=case)


def test_cross_entropy_gradient_penalty_z_loss_softcap(backend):
    device = require_op(backend, "cross_entropy")
    x, y, w = make_inputs((9, 11), device, ignore=True, weight=True, scale=4.0)
    opts = dict(z_loss=0.05, softcap=2.5, label_smoothing=0.2)
    x64 = x.detach().double().requires_grad_()
    assert_same_penalty(lambda t: fo.cross_entropy(t, y, w, IGNORE, backend=backend, **opts),
                        lambda t: ce_extras.reference(t, y, w, reduction="mean", **opts),
                        x, x64, what="z-loss softcap")


@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
def test_focal_gradient_penalty(backend, gamma):
    device = require_op(backend, "focal_loss")
    x, y, _ = make_inputs((8, 9), device, ignore=True)
    a = test_focal.alpha_for("tensor", 9, device)
    x64 = x.detach().double().requires_grad_()
    kw = dict(gamma=gamma, alpha=a, label_smoothing=0.1)
    assert_same_penalty(lambda t: fo.focal_loss(t, y, ignore_index=IGNORE, backend=backend, **kw),
                        lambda t: test_focal.reference(t, y, **kw), x, x64, what="focal")


@pytest.mark.parametrize("alpha", (0.25, -1.0))
def test_sigmoid_focal_gradient_penalty(backend, alpha):
    device = require_op(backend, "sigmoid_focal_loss")
    x, t = test_sigmoid_focal.make((4, 6), device, soft=True)
    kw = dict(alpha=alpha, gamma=1.5, label_smoothing=0.1, reduction="mean")
    x64 = x.detach().double().requires_grad_()
    assert_same_penalty(lambda z: fo.sigmoid_focal_loss(z, t, backend=backend, **kw),
                        lambda z: test_sigmoid_focal.reference(z, t.double(), **kw), x, x64,
                        what="sigmoid focal")


@pytest.mark.parametrize("loss", ("cross_entropy", "focal_loss"))
def test_maml_second_order(backend, loss):
    """A MAML step: the inner gradient of a linear model's parameters with a graph, one
    step on the support set, the query loss differentiated through it (the logits are
    temporaries: nothing keeps them but the losses)."""
    device = require_op(backend, loss)
    gen = torch.Generator().manual_seed(3)
    support, query = (torch.randn(6, 5, generator=gen).to(device) for _ in range(2))
    y_support, y_query = (torch.randint(0, 4, (6,), generator=gen).to(device) for _ in range(2))
    ours = {"cross_entropy": lambda z, y: fo.cross_entropy(z, y, label_smoothing=0.1,
                                                           backend=backend),
            "focal_loss": lambda z, y: fo.focal_loss(z, y, 2.0, backend=backend)}[loss]
    theirs = {"cross_entropy": lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
              "focal_loss": lambda z, y: test_focal.reference(z, y, gamma=2.0)}[loss]
    results = []
    for fn in (ours, theirs):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 4).to(device)
        params = list(model.parameters())
        inner = fn(torch.nn.functional.linear(support, *params), y_support)
        grads = torch.autograd.grad(inner, params, create_graph=True)
        fast = [p - 0.5 * g for p, g in zip(params, grads)]
        outer = fn(torch.nn.functional.linear(query, *fast), y_query)
        results.append(torch.autograd.grad(outer, params))
    for got, want in zip(*results):
        assert_close(got, want, rtol=1e-4, atol=1e-6, what="meta-gradient")


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("inplace", (False, True), ids=("plain", "inplace_backward"))
def test_second_backward_through_retained_graph(backend, inplace, reduction):
    """loss.backward(retain_graph=True) then loss.backward(): the gradients add up, as
    with torch (the stored gradient is not scaled in place while the graph is kept)."""
    device = require_op(backend, "cross_entropy")
    x, y, w = make_inputs((5, 8), device, ignore=True, weight=True)
    kw = dict(weight=w, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(x, y, **kw)
    go = random_grad_output(want) if reduction == "none" else torch.tensor(1.5, device=device)
    (want_grad,) = torch.autograd.grad(want, x, go)
    logits = x.detach().clone().requires_grad_()
    loss = fo.cross_entropy(logits * 1.0, y, inplace_backward=inplace, backend=backend, **kw)
    loss.backward(go, retain_graph=True)
    assert_close(logits.grad, want_grad, what="first backward")
    loss.backward(2 * go)
    assert_close(logits.grad, 3 * want_grad, what="second backward")
    with pytest.raises(RuntimeError, match="second time"):  # torch's own message
        loss.backward(go)


@pytest.mark.parametrize("loss", ("focal_loss", "sigmoid_focal_loss"))
def test_second_backward_focal(backend, loss):
    device = require_op(backend, loss)
    x, y, _ = make_inputs((5, 8), device, ignore=True)
    target = torch.rand(5, 8).to(device) if loss == "sigmoid_focal_loss" else y
    out = getattr(fo, loss)(x, target, reduction="sum", backend=backend)
    (first,) = torch.autograd.grad(out, x, retain_graph=True)
    (second,) = torch.autograd.grad(out, x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("shape", ((5, 7), (2, 7, 3)), ids=("nc", "ncd"))
def test_soft_target_and_weight_gradients(backend, shape, reduction):
    """Probability targets and class weights that require grad: d loss/d target and
    d loss/d weight (and d loss/d logits) equal torch's."""
    device = require_op(backend, "cross_entropy")
    x, _, w = make_inputs(shape, device, weight=True)
    q = soft_target(shape, device).requires_grad_()
    w = w.requires_grad_()
    kw = dict(reduction=reduction, label_smoothing=0.15)
    got = fo.cross_entropy(x, q, w, backend=backend, **kw)
    want = F.cross_entropy(x, q, w, **kw)
    assert_close(got, want, what="loss")
    go = random_grad_output(want)
    for a, b, name in zip(torch.autograd.grad(got, (x, q, w), go),
                          torch.autograd.grad(want, (x, q, w), go), ("logits", "target", "weight")):
        assert_close(a, b, what=f"grad of the {name}")


def test_class_weight_gradient(backend):
    """Class targets with weights that require grad (torch refuses these): the gradient of
    the written-out formula, 'mean' dividing by the summed weights included."""
    device = require_op(backend, "cross_entropy")
    x, y, w = make_inputs((9, 6), device, ignore=True, weight=True)
    w64 = w.double().requires_grad_()
    w = w.requires_grad_()
    opts = dict(label_smoothing=0.2, z_loss=0.01)
    got = fo.cross_entropy(x, y, w, IGNORE, backend=backend, **opts)
    want = ce_extras.reference(x.detach().double(), y, w64, reduction="mean", **opts)
    assert_close(got, want, what="loss")
    assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w64)[0],
                 what="grad of the weight")


def test_focal_alpha_and_sigmoid_target_gradients(backend):
    device = require_op(backend, "focal_loss")
    x, y, _ = make_inputs((7, 6), device, ignore=True)
    alpha = test_focal.alpha_for("tensor", 6, device).requires_grad_()
    alpha64 = alpha.detach().double().requires_grad_()
    got = fo.focal_loss(x, y, 1.5, alpha, IGNORE, label_smoothing=0.1, backend=backend)
    want = test_focal.reference(x.detach().double(), y, gamma=1.5, alpha=alpha64,
                                label_smoothing=0.1)
    assert_close(got, want, what="focal loss")
    assert_close(torch.autograd.grad(got, alpha)[0], torch.autograd.grad(want, alpha64)[0],
                 what="grad of alpha")
    z, t = test_sigmoid_focal.make((4, 6), device, soft=True)
    t = t.requires_grad_()
    t64 = t.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_()
    kw = dict(alpha=0.25, gamma=2.0, label_smoothing=0.1, reduction="sum")
    got = fo.sigmoid_focal_loss(z, t, backend=backend, **kw)
    want = test_sigmoid_focal.reference(z64, t64, **kw)
    for a, b, name in zip(torch.autograd.grad(got, (z, t)), torch.autograd.grad(want, (z64, t64)),
                          ("logits", "target")):
        assert_close(a, b, what=f"sigmoid focal grad of the {name}")


def test_inplace_backward_with_create_graph_is_refused(backend):
    device = require_op(backend, "cross_entropy")
    x, y, _ = make_inputs((4, 6), device)
    loss = fo.cross_entropy(x * 1.0, y, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="create_graph=True.*inplace_backward=True.*"
                                           "inplace_backward=False"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_inplace_backward_with_a_target_that_requires_grad(backend):
    """The loss is then formed from differentiable torch ops: correct gradients, and the
    logits are left as they are."""
    device = require_op(backend, "cross_entropy")
    x, _, _ = make_inputs((4, 6), device)
    q = soft_target((4, 6), device).requires_grad_()
    logits = x.detach() * 1.0
    before = logits.clone()
    logits.requires_grad_()
    got = fo.cross_entropy(logits, q, inplace_backward=True, backend=backend)
    want = F.cross_entropy(before.requires_grad_(), q)
    for a, b in zip(torch.autograd.grad(got, (logits, q)), torch.autograd.grad(want, (before, q))):
        assert_close(a, b, what="grad")
    assert torch.equal(logits.detach(), before.detach())


def test_logits_modified_in_place_before_a_double_backward(backend):
    device = require_op(backend, "cross_entropy")
    x, y, _ = make_inputs((4, 6), device)
    logits = x * 1.0
    loss = fo.cross_entropy(logits, y, backend=backend)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_plain_backward_lets_the_logits_go(backend):
    """The loss keeps its input (no copy) only until its backward: after a plain backward
    the logits are freed while the loss tensor is still alive; a retained graph keeps
    them, and the gradient is scaled in place in the plain case."""
    device = require_op(backend, "cross_entropy")
    x, y, _ = make_inputs((4, 6), device)
    for retain in (False, True):
        logits = x * 2.0
        alive = weakref.ref(logits)
        loss = fo.cross_entropy(logits, y, backend=backend)
        del logits
        assert alive() is not None, "the loss dropped its input before backward"
        loss.backward(retain_graph=retain)
        assert (alive() is not None) == retain, f"retain_graph={retain}"
        del loss
        assert alive() is None
