"""torch.func transforms (grad, vmap, jacrev, jvp, hessian, per-sample gradients),
forward-mode AD, and torch.autograd.gradcheck / gradgradcheck in float64 for every loss and
flag: the same code run with F.cross_entropy (or the float64 formulas) and with ours."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, hessian, jacrev, jvp, vmap

import fusedopt as fo
import test_cross_entropy_extras as ce_extras
import test_focal
import test_sigmoid_focal
from conftest import require_op
from loss_helpers import IGNORE, assert_close
from test_cross_entropy import make_inputs

F64 = torch.float64


def assert_all_close(got, want, what):
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        assert_close(a, b, rtol=1e-4, atol=1e-6, what=what)


@pytest.mark.parametrize("inplace", (False, True), ids=("plain", "inplace_backward"))
def test_func_transforms_cross_entropy(backend, inplace):
    """grad, jacrev, hessian, jvp on a batch, vmap over samples and vmap(grad) (per-sample
    gradients), with weights, ignore_index and label smoothing: equal to F.cross_entropy
    under the same transforms (torch's weighted label smoothing does not vmap -- it
    masked_selects -- so the vmapped cases take the written-out formula for it)."""
    device = require_op(backend, "cross_entropy")
    x, y, w = make_inputs((5, 6), device, ignore=True, weight=True)
    x = x.detach()

    def ours(**kw):
        return lambda t, target: fo.cross_entropy(t, target, inplace_backward=inplace,
                                                  backend=backend, ignore_index=IGNORE, **kw)

    def theirs(**kw):
        return lambda t, target: F.cross_entropy(t, target, ignore_index=IGNORE, **kw)

    def formula(**kw):
        return lambda t, target: ce_extras.reference(t[None], target[None], kw.get("weight"),
                                                     reduction="mean",
                                                     label_smoothing=kw["label_smoothing"])

    full, weighted = dict(weight=w, label_smoothing=0.1), dict(weight=w)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    cases = {  # name: (transform, loss arguments, reference)
        "grad": (lambda f: grad(f)(x, y), full, theirs),
        "jacrev": (lambda f: jacrev(f)(x, y), full, theirs),
        "hessian": (lambda f: hessian(f)(x, y), full, theirs),
        "jvp": (lambda f: jvp(lambda t: f(t, y), (x,), (tangent,)), full, theirs),
        "vmap": (lambda f: vmap(f)(x, y), weighted, theirs),
        "per_sample_grad": (lambda f: vmap(grad(f))(x, y), weighted, theirs),
        "vmap_smoothing": (lambda f: vmap(f)(x, y), full, formula),
        "per_sample_grad_smoothing": (lambda f: vmap(grad(f))(x, y), full, formula),
    }
    for name, (transform, kw, reference) in cases.items():
        assert_all_close(transform(ours(**kw)), transform(reference(**kw)), name)


def test_func_transforms_soft_targets_and_z_loss(backend):
    """Probability targets (the target gradient too), z-loss and soft-capping under
    grad/vmap/jacrev, against the written-out formula under the same transforms."""
    device = require_op(backend, "cross_entropy")
    x, _, w = make_inputs((4, 6), device, weight=True)
    x = x.detach()
    q = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(2)), 1).to(device)
    opts = dict(label_smoothing=0.1, z_loss=0.02, softcap=3.0)

    def ours(t, target):
        return fo.cross_entropy(t, target, w, backend=backend, **opts)

    def theirs(t, target):
        return ce_extras.reference(t, target, w, reduction="mean", **opts)

    for name, transform in {"grad": lambda f: grad(f, argnums=(0, 1))(x, q),
                            "jacrev": lambda f: jacrev(f, argnums=1)(x, q),
                            "vmap": lambda f: vmap(f)(x[:, None], q[:, None])}.items():
        assert_all_close(transform(ours), transform(theirs), name)


def test_func_transforms_focal_losses(backend):
    device = require_op(backend, "focal_loss")
    x, y, _ = make_inputs((5, 6), device, ignore=True)
    x = x.detach()
    a = test_focal.alpha_for("tensor", 6, device)
    kw = dict(gamma=2.0, alpha=a, label_smoothing=0.1)

    def ours(t, target):
        return fo.focal_loss(t, target, ignore_index=IGNORE, backend=backend, **kw)

    def theirs(t, target):
        return test_focal.reference(t, target, **kw)

    for name, transform in {"grad": lambda f: grad(f)(x, y),
                            "hessian": lambda f: hessian(f)(x, y)}.items():
        assert_all_close(transform(ours), transform(theirs), f"focal {name}")
    # (the formula's one_hot does not vmap: its per-sample gradients one sample at a time)
    assert_all_close(vmap(grad(ours))(x[:, None], y[:, None]),
                     torch.stack([grad(theirs)(x[i:i + 1], y[i:i + 1]) for i in range(5)]),
                     "focal per-sample grad")
    z, t = test_sigmoid_focal.make((4, 5), device, soft=True)
    z = z.detach()
    kw = dict(alpha=0.25, gamma=2.0, label_smoothing=0.1, reduction="sum")
    for name, transform in {"grad": lambda f: grad(f, argnums=(0, 1))(z, t),
                            "vmap": lambda f: vmap(f)(z, t)}.items():
        assert_all_close(transform(lambda u, v: fo.sigmoid_focal_loss(u, v, backend=backend, **kw)),
                         transform(lambda u, v: test_sigmoid_focal.reference(u, v, **kw)),
                         f"sigmoid focal {name}")


def test_forward_mode_ad():
    """torch.autograd.forward_ad dual tensors (outside torch.func) give F.cross_entropy's
    tangent."""
    import torch.autograd.forward_ad as fwAD

    x, y, w = make_inputs((5, 6), "cpu", ignore=True, weight=True)
    tangent = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    out = []
    for fn in (fo.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.detach(), tangent)
            loss = fn(dual, y, w, ignore_index=IGNORE, label_smoothing=0.2)
            out.append(fwAD.unpack_dual(loss))
    assert_close(out[0].primal, out[1].primal, what="primal")
    assert_close(out[0].tangent, out[1].tangent, what="tangent")


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_batched_grad_outputs(backend, reduction):
    """autograd.grad(..., is_grads_batched=True) (vmap over the backward, no retained
    graph): one gradient per grad_output, as torch's."""
    device = require_op(backend, "cross_entropy")
    x, y, w = make_inputs((4, 6), device, ignore=True, weight=True)
    batch = (3,) if reduction == "mean" else (3, 4)
    go = torch.randn(batch, generator=torch.Generator().manual_seed(6)).to(device)
    got, want = (torch.autograd.grad(fn(x, y, w, ignore_index=IGNORE, reduction=reduction,
                                        label_smoothing=0.1, **extra), x, go,
                                     is_grads_batched=True)[0]
                 for fn, extra in ((fo.cross_entropy, dict(backend=backend)),
                                   (F.cross_entropy, {})))
    assert_close(got, want, what="batched gradients")


GRADCHECK_CE = {
    "class": dict(),
    "weight_ignore_smoothing": dict(weight=True, ignore=True, label_smoothing=0.2),
    "z_softcap": dict(z_loss=0.05, softcap=2.0, label_smoothing=0.1, ignore=True),
    "soft": dict(soft=True, weight=True, label_smoothing=0.1, z_loss=0.05, softcap=2.0),
}


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("case", GRADCHECK_CE)
def test_gradcheck_cross_entropy(case, reduction):
    """First and second derivatives by finite differences in float64 (the torch backend's
    float64 math; soft targets: w.r.t. the target too)."""
    opts = dict(GRADCHECK_CE[case])
    soft = opts.pop("soft", False)
    x, y, w = make_inputs((2, 4, 2), "cpu", dtype=F64, ignore=opts.pop("ignore", False),
                          weight=opts.pop("weight", False))
    w = None if w is None else w.double()
    if soft:
        q = torch.softmax(torch.randn(2, 4, 2, dtype=F64), 1).requires_grad_()
        inputs = (x, q)
    else:
        inputs = (x,)

    def fn(t, target=y):
        return fo.cross_entropy(t, target, w, IGNORE, reduction, **opts)

    assert gradcheck(fn, inputs, check_batched_grad=True)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("gamma", (0.0, 0.5, 2.0))
def test_gradcheck_focal(gamma, reduction):
    x, y, _ = make_inputs((5, 4), "cpu", dtype=F64, ignore=True)
    alpha = test_focal.alpha_for("tensor", 4, "cpu").double().requires_grad_()

    def fn(t, a):
        return fo.focal_loss(t, y, gamma, a, IGNORE, reduction, 0.1)

    assert gradcheck(fn, (x, alpha), check_batched_grad=True)
    assert gradgradcheck(fn, (x, alpha))


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("alpha,gamma", ((0.25, 2.0), (-1.0, 0.5), (0.25, 0.0)))
def test_gradcheck_sigmoid_focal(alpha, gamma, reduction):
    x, t = test_sigmoid_focal.make((3, 4), "cpu", F64, soft=True)
    t = t.requires_grad_()

    def fn(u, v):
        return fo.sigmoid_focal_loss(u, v, alpha, gamma, reduction, label_smoothing=0.1)

    assert gradcheck(fn, (x, t), check_batched_grad=True)
    assert gradgradcheck(fn, (x, t))
