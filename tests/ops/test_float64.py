"""float64 logits for every loss: with backend=None they run on the `torch` backend in
float64 and equal torch's own float64 results (F.cross_entropy, or the float64 formulas of
the other test modules) to float64 rounding; a backend whose kernels compute in fp32,
named explicitly or by FUSEDOPT_BACKEND, is a TypeError naming it and the dtype.

The logits carry an offset of 1e3, where fp32 keeps only ~4 decimal digits below the
offset: a loss computed in fp32 anywhere (scales, row losses, the reduction) misses the
1e-12 tolerance by many orders of magnitude."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
import test_cross_entropy_extras as ce_extras
import test_focal
import test_sigmoid_focal
from loss_helpers import IGNORE, assert_close, grads_of, random_grad_output
from test_cross_entropy import REDUCTIONS, make_inputs

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-13)
OFFSET = 1e3


def inputs(shape, *, ignore=False, weight=False, seed=0):
    x, y, w = make_inputs(shape, "cpu", dtype=F64, ignore=ignore, weight=weight, seed=seed)
    x = (x.detach() + OFFSET).requires_grad_()
    return x, y, None if w is None else w.to(F64)


def assert_matches(got, want, x, what):
    """Loss and gradient (random grad_output) in float64, to float64 rounding."""
    assert got.dtype == F64, f"{what}: loss dtype {got.dtype}"
    assert_close(got, want, what=f"{what} loss", **TIGHT)
    g_out = random_grad_output(got)
    got_grad = grads_of(got, x, g_out)
    assert got_grad.dtype == F64, f"{what}: grad dtype {got_grad.dtype}"
    assert_close(got_grad, grads_of(want, x, g_out), what=f"{what} grad", **TIGHT)


CASES = {
    "plain": {},
    "weight_ignore_smoothing": dict(weight=True, ignore=True, label_smoothing=0.25),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", ((7,), (6, 7), (2, 7, 3)), ids=("c", "nc", "ncd"))
def test_cross_entropy_class_targets(shape, case, reduction):
    opts = dict(CASES[case])
    x, y, w = inputs(shape, ignore=opts.pop("ignore", False) and len(shape) > 1,
                     weight=opts.pop("weight", False))
    got = fo.cross_entropy(x, y, w, IGNORE, reduction, **opts)
    want = F.cross_entropy(x, y, w, ignore_index=IGNORE, reduction=reduction, **opts)
    assert_matches(got, want, x, f"{shape} {case}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((5, 7), (2, 7, 3)), ids=("nc", "ncd"))
def test_cross_entropy_soft_targets(shape, reduction):
    x, _, w = inputs(shape, weight=True, seed=1)
    q = torch.softmax(torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(2)),
                      dim=1)
    got = fo.cross_entropy(x, q, w, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(x, q, w, reduction=reduction, label_smoothing=0.1)
    assert_matches(got, want, x, f"soft {shape}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_z_loss_softcap(reduction):
    """z-loss and soft-capping against the float64 formula (the softcap of 2e3 keeps the
    offset logits in the non-linear part of tanh)."""
    x, y, w = inputs((9, 11), ignore=True, weight=True, seed=3)
    opts = dict(z_loss=1e-3, softcap=2e3, label_smoothing=0.2)
    got = fo.cross_entropy(x, y, w, IGNORE, reduction, **opts)
    want = ce_extras.reference(x, y, w, reduction=reduction, **opts)
    assert_matches(got, want, x, "z-loss softcap")


def test_cross_entropy_inplace_backward():
    x, y, w = inputs((6, 9), ignore=True, weight=True, seed=4)
    want = F.cross_entropy(x, y, w, ignore_index=IGNORE, label_smoothing=0.1)
    want_grad = grads_of(want, x)
    logits = x.detach() * 1.0
    logits.requires_grad_()
    buffer = logits.detach()
    got = fo.cross_entropy(logits, y, w, IGNORE, label_smoothing=0.1, inplace_backward=True)
    assert_close(got, want, what="loss", **TIGHT)
    assert_close(buffer, want_grad, what="gradient written into the logits", **TIGHT)
    assert_close(grads_of(got, logits), want_grad, what="grad", **TIGHT)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", ("none", "tensor"))
def test_focal_loss(alpha, reduction):
    x, y, _ = inputs((8, 9), ignore=True, seed=5)
    a = test_focal.alpha_for(alpha, 9, "cpu")
    got = fo.focal_loss(x, y, 1.5, a, IGNORE, reduction, 0.1)
    want = test_focal.reference(x, y, gamma=1.5, alpha=a, label_smoothing=0.1,
                                reduction=reduction)
    assert_matches(got, want, x, f"focal alpha={alpha}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", (0.25, -1.0))
def test_sigmoid_focal_loss(alpha, reduction):
    """Logits around 0 (an offset would saturate the sigmoid): rounding them to fp32 alone
    changes the loss by ~1e-8 relative, far beyond the tolerance."""
    x, t = test_sigmoid_focal.make((4, 3, 5), "cpu", F64, soft=True, seed=6)
    opts = dict(alpha=alpha, gamma=1.5, reduction=reduction, label_smoothing=0.1)
    got = fo.sigmoid_focal_loss(x, t, **opts)
    want = test_sigmoid_focal.reference(x, t, **opts)
    assert_matches(got, want, x, f"sigmoid focal alpha={alpha}")


@pytest.mark.parametrize("op", ("cross_entropy", "focal_loss", "sigmoid_focal_loss"))
def test_default_backend_is_torch_in_float64(op, monkeypatch):
    """backend=None and backend='torch' run the torch backend's entry point on float64
    logits (on CPU the default would otherwise be `cpu`)."""
    module = fo.backends._load("torch")
    entry = f"{op}_fwd"
    real, seen = getattr(module, entry), []

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(module, entry, spy)
    x, y, _ = inputs((4, 5))
    target = torch.rand(4, 5, dtype=F64) if op == "sigmoid_focal_loss" else y
    for backend in (None, "torch"):
        getattr(fo, op)(x, target, reduction="sum", backend=backend).backward()
    assert seen == [F64, F64]


@pytest.mark.parametrize("name", ("cpu", "triton", "cuda"))
def test_fp32_backend_forced_by_environment(name, monkeypatch):
    """FUSEDOPT_BACKEND naming an fp32-only backend: a TypeError when the op runs, naming
    the backend, the dtype and the variable (an unavailable one fails as it always does)."""
    monkeypatch.setenv("FUSEDOPT_BACKEND", name)
    x, y, _ = inputs((4, 5))
    ok, reason = fo.backends._usable(name, "cross_entropy", torch.device("cpu"))
    if not ok:
        with pytest.raises(RuntimeError, match=f"'{name}'.*FUSEDOPT_BACKEND"):
            fo.cross_entropy(x, y)
        return
    with pytest.raises(TypeError, match=f"'{name}' \\(forced by FUSEDOPT_BACKEND\\) cannot "
                                        f"run cross_entropy on float64"):
        fo.cross_entropy(x, y)
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch")
    assert fo.cross_entropy(x, y).dtype == F64


@pytest.mark.parametrize("name", ("cpu", "triton"))
def test_compiled_kernel_boundary_refuses_float64(name):
    """The last line: an fp32 kernel's entry point called directly with float64 logits."""
    ok, reason = fo.backends._usable(name, "cross_entropy", torch.device("cpu"))
    if not ok:
        pytest.skip(f"backend {name!r}: {reason}")
    x, y, _ = inputs((4, 5))
    with pytest.raises(TypeError, match="logits must be float32.*float64"):
        fo.backends._load(name).cross_entropy_fwd(
            x.detach(), y, None, torch.ones(2), ignore_index=IGNORE, label_smoothing=0.0,
            z_loss=0.0, softcap=None, soft_target=False, inplace=False, need_grad=True)
