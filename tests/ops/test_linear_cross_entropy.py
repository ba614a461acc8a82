"""fusedopt.linear_cross_entropy against the same loss on materialised logits: values and the
gradients of input, linear_weight and linear_bias, for every flag and reduction, on every
backend that runs here (the `backend` fixture), in fp32 and bf16/fp16.

The reference is written out in float64: logits = F.linear(x, W, b), soft-capping
s·tanh(z/s), torch's F.cross_entropy (weights, ignore_index, smoothing, reduction) plus the
z-loss c·lse² per non-ignored row ('mean': divided by the number of non-ignored rows).
Errors, module, memory and torch.compile: test_linear_cross_entropy_extras.py."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import IGNORE, LOW_PRECISION, assert_close, assert_lowp_rule, random_grad_output

OP = "cross_entropy"   # the backend entry point linear_cross_entropy runs on
N, H, V = 11, 8, 13
CASES = {
    "plain": {},
    "bias": {"bias": True},
    "weight_ignore": {"weight": True, "ignore": True},
    "smoothing_bias": {"label_smoothing": 0.2, "bias": True},
    "zloss_softcap": {"z_loss": 1e-2, "softcap": 3.0, "ignore": True},
    "everything": {"bias": True, "weight": True, "ignore": True, "label_smoothing": 0.1,
                   "z_loss": 1e-3, "softcap": 4.0},
}
REDUCTIONS = ("mean", "sum", "none")


def make_inputs(rows_shape, hidden, n_classes, device, *, dtype=torch.float32, bias=False,
                weight=False, ignore=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, hidden, generator=gen)
    w = torch.randn(n_classes, hidden, generator=gen) * (3.0 / max(hidden, 1) ** 0.5)
    b = torch.randn(n_classes, generator=gen) if bias else None
    y = torch.randint(0, n_classes, rows_shape, generator=gen)
    if ignore and y.dim() > 0:
        y.view(-1)[::3] = IGNORE
    cw = torch.rand(n_classes, generator=gen) + 0.1 if weight else None

    def leaf(t):
        return None if t is None else t.to(device, dtype).requires_grad_()
    return leaf(x), leaf(w), leaf(b), y.to(device), None if cw is None else cw.to(device)


def reference(x, w, b, y, cw, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, dtype=torch.float64):
    """The loss on materialised logits, every step in `dtype` with torch ops."""
    def cast(t):
        return None if t is None else t.to(dtype)
    z = F.linear(cast(x), cast(w), cast(b)).reshape(-1, w.shape[0])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = y.reshape(-1)
    loss = F.cross_entropy(z, rows, weight=cast(cw), ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = rows != IGNORE
        zl = torch.where(valid, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
        loss = loss + {"none": zl, "sum": zl.sum(), "mean": zl.sum() / valid.sum()}[reduction]
    return loss.reshape(y.shape) if reduction == "none" else loss


def grads(loss, tensors, grad_output):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, grad_output)


def split_options(case):
    opts = dict(CASES[case])
    make = {k: opts.pop(k, False) for k in ("bias", "weight", "ignore")}
    return make, opts


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, case, reduction):
    device = require_op(backend, OP)
    make, opts = split_options(case)
    x, w, b, y, cw = make_inputs((N,), H, V, device, **make)
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                  chunk_size=4, backend=backend, **opts)   # 3 chunks, 1 partial
    want = reference(x, w, b, y, cw, reduction=reduction, **opts)
    assert got.dtype == torch.float32
    assert_close(got, want, what="loss")
    g_out = random_grad_output(want)
    for name, g, r in zip(("input", "linear_weight", "linear_bias"),
                          grads(got, (x, w, b), g_out.float()), grads(want, (x, w, b), g_out)):
        assert_close(g, r, rtol=1e-5, atol=1e-6, what=f"grad of {name}")


@pytest.mark.parametrize("rows_shape", [(), (2, 5)], ids=("unbatched", "batched3d"))
def test_input_shapes(backend, rows_shape):
    """input (H,) with a 0-dim target and (..., H) with target (...)."""
    device = require_op(backend, OP)
    x, w, b, y, cw = make_inputs(rows_shape, H, V, device, bias=True, weight=True)
    for reduction in REDUCTIONS:
        got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                      label_smoothing=0.1, chunk_size=3, backend=backend)
        want = reference(x, w, b, y, cw, reduction=reduction, label_smoothing=0.1)
        assert got.shape == want.shape
        assert_close(got, want, what=f"loss {reduction}")
        g_out = random_grad_output(want)
        for g, r in zip(grads(got, (x, w, b), g_out.float()), grads(want, (x, w, b), g_out)):
            assert_close(g, r, what=f"grad {reduction}")


def test_chunk_size_does_not_change_the_result(backend):
    device = require_op(backend, OP)
    x, w, b, y, cw = make_inputs((N,), H, V, device, bias=True, weight=True, ignore=True)
    results = []
    for chunk in (1, 4, N, 1000, None):
        loss = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, chunk_size=chunk,
                                       z_loss=1e-3, backend=backend)
        results.append((loss, *grads(loss, (x, w, b), None)))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert_close(got, want, rtol=1e-5, atol=1e-6, what="chunking")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=("bf16", "fp16"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_low_precision(backend, dtype, reduction):
    """bf16/fp16: loss and every gradient within 2x torch's own error in that dtype (the
    same loss computed by torch ops on materialised low-precision logits) of float64."""
    device = require_op(backend, OP)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 8.0}
    x, w, b, y, cw = make_inputs((64,), 32, 100, device, dtype=dtype, bias=True, weight=True,
                                 ignore=True, seed=4)
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                  chunk_size=16, backend=backend, **opts)
    ref = reference(x, w, b, y, cw, reduction=reduction, **opts)
    lowp = reference(x, w, b, y, cw, reduction=reduction, dtype=dtype, **opts)
    assert_lowp_rule(got, ref, lowp, dtype, what="loss")
    g_out = random_grad_output(ref).to(dtype)
    names = ("input", "linear_weight", "linear_bias")
    for name, g, r, t in zip(names, grads(got, (x, w, b), g_out),
                             grads(ref, (x, w, b), g_out.double()),
                             grads(lowp, (x, w, b), g_out)):
        assert_lowp_rule(g, r, t, dtype, what=f"grad of {name}")


def test_frozen_weight_and_bias(backend):
    """Only the gradients asked for are computed; the others stay None."""
    device = require_op(backend, OP)
    x, w, b, y, _ = make_inputs((N,), H, V, device, bias=True)
    w.requires_grad_(False)
    loss = fo.linear_cross_entropy(x, w, y, linear_bias=b.detach(), chunk_size=4,
                                   backend=backend)
    loss.backward()
    want = reference(x, w, b, y, None)
    (g_x,) = torch.autograd.grad(want, (x,))
    assert_close(x.grad, g_x, what="grad of input")
    assert w.grad is None
    x2 = x.detach()
    loss = fo.linear_cross_entropy(x2, w.requires_grad_(), y, chunk_size=4, backend=backend)
    (g_w,) = torch.autograd.grad(loss, (w,))
    assert_close(g_w, torch.autograd.grad(reference(x2, w, None, y, None), (w,))[0],
                 what="grad of linear_weight")


def test_no_grad_gives_the_loss(backend):
    device = require_op(backend, OP)
    x, w, b, y, cw = make_inputs((N,), H, V, device, bias=True, weight=True, ignore=True)
    with torch.no_grad():
        for reduction in REDUCTIONS:
            got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw,
                                          reduction=reduction, backend=backend)
            assert not got.requires_grad
            assert_close(got, reference(x, w, b, y, cw, reduction=reduction), what=reduction)


def test_every_target_ignored_and_empty_input(backend):
    device = require_op(backend, OP)
    x, w, b, y, cw = make_inputs((N,), H, V, device, bias=True, weight=True)
    y = torch.full_like(y, IGNORE)
    loss = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, backend=backend)
    assert torch.isnan(loss)                                   # as torch
    for g in grads(loss, (x, w, b), None):
        assert torch.count_nonzero(g) == 0
    total = fo.linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum", backend=backend)
    assert total.item() == 0.0
    empty = x[:0].detach().requires_grad_()
    for reduction, check in (("mean", torch.isnan), ("sum", lambda t: t == 0)):
        out = fo.linear_cross_entropy(empty, w, y[:0], linear_bias=b, reduction=reduction,
                                      backend=backend)
        assert check(out)
        g_x, g_w, g_b = grads(out, (empty, w, b), None)
        assert g_x.shape == (0, H) and torch.count_nonzero(g_w) == 0 and g_b.shape == (V,)
    out = fo.linear_cross_entropy(empty, w, y[:0], reduction="none", backend=backend)
    assert out.shape == (0,)


@pytest.mark.parametrize("target_dtype", (torch.int32, torch.uint8))
def test_target_dtypes(backend, target_dtype):
    device = require_op(backend, OP)
    x, w, _, y, cw = make_inputs((N,), H, V, device, weight=True)
    for ignore_index in (IGNORE, 3):   # 3: an ignore_index inside [0, V)
        got = fo.linear_cross_entropy(x, w, y.to(target_dtype), weight=cw,
                                      ignore_index=ignore_index, backend=backend)
        want = F.cross_entropy(F.linear(x.double(), w.double()), y, weight=cw.double(),
                               ignore_index=ignore_index)
        assert_close(got, want, what=f"ignore_index={ignore_index}")
        for g, r in zip(grads(got, (x, w), None), grads(want, (x, w), None)):
            assert_close(g, r, what="grad")


def test_strided_operands(backend):
    """A non-contiguous input and a transposed weight give the same results."""
    device = require_op(backend, OP)
    x, w, b, y, _ = make_inputs((N,), H, V, device, bias=True)
    x_wide = torch.randn(N, 2 * H, device=device)
    x_wide[:, ::2] = x.detach()
    x_strided = x_wide[:, ::2].requires_grad_()
    w_t = w.detach().t().contiguous().t().requires_grad_()     # column-major storage
    got = fo.linear_cross_entropy(x_strided, w_t, y, linear_bias=b, chunk_size=4,
                                  backend=backend)
    want = reference(x, w, b, y, None)
    assert_close(got, want, what="loss")
    for g, r in zip(grads(got, (x_strided, w_t, b), None), grads(want, (x, w, b), None)):
        assert_close(g, r, what="grad")


def test_none_backward_can_run_twice(backend):
    """'none' recomputes its gradients in backward: two backward passes through a retained
    graph give the same bits ('mean'/'sum' twice: test_linear_cross_entropy_autograd.py)."""
    device = require_op(backend, OP)
    x, w, b, y, _ = make_inputs((N,), H, V, device, bias=True)
    per_row = fo.linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", chunk_size=4,
                                      backend=backend)
    g_out = random_grad_output(per_row)
    first = torch.autograd.grad(per_row, (x, w, b), g_out, retain_graph=True)
    second = torch.autograd.grad(per_row, (x, w, b), g_out)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_zero_features(backend):
    """H = 0: the logits are the bias alone, dX and dW are empty, db is the usual one."""
    device = require_op(backend, OP)
    x, w, b, y, _ = make_inputs((N,), 0, V, device, bias=True)
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, chunk_size=4, backend=backend)
    want = reference(x, w, b, y, None)
    assert_close(got, want, what="loss")
    g_x, g_w, g_b = grads(got, (x, w, b), None)
    assert g_x.shape == (N, 0) and g_w.shape == (V, 0)
    assert_close(g_b, grads(want, (b,), None)[0], what="grad of linear_bias")
