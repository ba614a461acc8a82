"""fusedopt.cross_entropy against torch.nn.functional.cross_entropy (values and gradients
by autograd), on every backend that can run here (the `backend` fixture)."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import (IGNORE, LOW_PRECISION, assert_close, assert_lowp_rule,
                          assert_rounded_once, grads_of, random_grad_output)

OP = "cross_entropy"
C = 7
SHAPES = {"c": (C,), "nc": (6, C), "ncd": (3, C, 2, 2)}
CASES = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "smoothing": {"label_smoothing": 0.1},
    "weight_smoothing_ignore": {"weight": True, "label_smoothing": 0.25, "ignore": True},
}
REDUCTIONS = ("mean", "sum", "none")


def make_inputs(shape, device, *, dtype=torch.float32, ignore=False, weight=False, seed=0,
                scale=2.0, n_classes=None):
    gen = torch.Generator().manual_seed(seed)
    n_classes = n_classes or (shape[1] if len(shape) >= 2 else shape[0])
    x = (scale * torch.randn(shape, generator=gen)).to(dtype)
    target_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    y = torch.randint(0, n_classes, target_shape, generator=gen)
    if ignore and y.dim() > 0:
        y.view(-1)[::3] = IGNORE
    w = torch.rand(n_classes, generator=gen) + 0.1 if weight else None
    return (x.to(device).requires_grad_(), y.to(device),
            None if w is None else w.to(device))


def torch_ce(x, y, w, **kw):
    return F.cross_entropy(x, y.long(), weight=w, ignore_index=IGNORE, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch(backend, shape, case, reduction):
    device = require_op(backend, OP)
    opts = dict(CASES[case])
    x, y, w = make_inputs(SHAPES[shape], device, ignore=opts.pop("ignore", False),
                          weight=opts.pop("weight", False))
    got = fo.cross_entropy(x, y, w, IGNORE, reduction, backend=backend, **opts)
    want = torch_ce(x, y, w, reduction=reduction, **opts)
    assert_close(got, want, what="loss")
    g_out = random_grad_output(want)
    assert_close(grads_of(got, x, g_out), grads_of(want, x, g_out), what="grad")


@pytest.mark.parametrize("target_dtype", (torch.int32, torch.uint8))
def test_target_dtypes(backend, target_dtype):
    device = require_op(backend, OP)
    x, y, w = make_inputs((9, C), device, weight=True, seed=1)
    for ignore_index in (IGNORE, 3):  # 3: an ignore_index inside [0, C)
        got = fo.cross_entropy(x, y.to(target_dtype), w, ignore_index, label_smoothing=0.1,
                               backend=backend)
        want = F.cross_entropy(x, y, w, ignore_index=ignore_index, label_smoothing=0.1)
        assert_close(got, want, what=f"loss ignore_index={ignore_index}")
        assert_close(grads_of(got, x), grads_of(want, x), what="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "weighted"))
@pytest.mark.parametrize("smoothing", (0.0, 0.2))
def test_soft_targets(backend, smoothing, weighted, reduction):
    device = require_op(backend, OP)
    for shape in ((5, C), (2, C, 3)):
        x, _, w = make_inputs(shape, device, weight=weighted, seed=2)
        gen = torch.Generator().manual_seed(5)
        q = torch.softmax(torch.randn(shape, generator=gen), dim=1).to(device)
        got = fo.cross_entropy(x, q, w, reduction=reduction, label_smoothing=smoothing,
                               backend=backend)
        want = F.cross_entropy(x, q, w, reduction=reduction, label_smoothing=smoothing)
        assert_close(got, want, what=f"loss {shape}")
        g_out = random_grad_output(want)
        assert_close(grads_of(got, x, g_out), grads_of(want, x, g_out), what=f"grad {shape}")


def test_strided_rows_reach_backend_without_copy(backend, monkeypatch):
    device = require_op(backend, OP)
    big = torch.randn(12, 20, generator=torch.Generator().manual_seed(4)).to(device)
    x = big[::2, :C].requires_grad_()  # rows at stride 40, class dim contiguous
    y = torch.randint(0, C, (6,), generator=torch.Generator().manual_seed(4)).to(device)
    module = fo.backends.select(OP, device, backend)
    seen = []
    real = module.cross_entropy_fwd

    def spy(logits, *args, **kwargs):
        seen.append((logits.data_ptr(), logits.stride()))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(module, "cross_entropy_fwd", spy)
    got = fo.cross_entropy(x, y, backend=backend)
    assert seen == [(x.data_ptr(), (40, 1))], f"backend got {seen}, expected the view itself"
    xc = x.detach().contiguous().requires_grad_()
    want = F.cross_entropy(xc, y)
    assert_close(got, want, what="loss")
    assert_close(grads_of(got, x), grads_of(want, xc), what="grad")


def test_transposed_input_is_copied_and_correct(backend):
    device = require_op(backend, OP)
    x = torch.randn(C, 6, generator=torch.Generator().manual_seed(6)).to(device).t()
    x.requires_grad_()
    y = torch.arange(6, device=device) % C
    got, want = fo.cross_entropy(x, y, backend=backend), F.cross_entropy(x, y)
    assert_close(got, want, what="loss")
    assert_close(grads_of(got, x), grads_of(want, x), what="grad")


def test_all_ignored(backend):
    device = require_op(backend, OP)
    x, y, w = make_inputs((4, C), device, weight=True)
    y = torch.full_like(y, IGNORE)
    for reduction in REDUCTIONS:
        for weight in (None, w):
            got = fo.cross_entropy(x, y, weight, reduction=reduction, backend=backend)
            want = F.cross_entropy(x, y, weight, reduction=reduction)
            assert_close(got, want, what=f"loss {reduction}")  # mean: NaN, as torch
            g = grads_of(got, x)
            assert torch.equal(g, torch.zeros_like(g)), f"{reduction}: gradient not zero"


def test_empty_batch(backend):
    device = require_op(backend, OP)
    for shape in ((0, C), (0, C, 3)):
        x, y, _ = make_inputs(shape, device)
        for reduction in REDUCTIONS:
            got = fo.cross_entropy(x, y, reduction=reduction, backend=backend)
            want = F.cross_entropy(x, y, reduction=reduction)
            assert_close(got, want, what=f"{shape} {reduction}")
            g = grads_of(got, x)
            assert g.shape == x.shape and not g.any()


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("case", ("plain", "weight_smoothing_ignore"))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision(backend, dtype, case, reduction):
    device = require_op(backend, OP)
    opts = dict(CASES[case])
    x, y, w = make_inputs((16, 37), device, dtype=dtype, ignore=opts.pop("ignore", False),
                          weight=opts.pop("weight", False), scale=4.0)
    got = fo.cross_entropy(x, y, w, IGNORE, reduction, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = torch_ce(x64, y, w.double() if w is not None else None, reduction=reduction, **opts)
    x_low = x.detach().cpu().requires_grad_()
    lowp = torch_ce(x_low, y.cpu(), w.cpu().to(dtype) if w is not None else None,
                    reduction=reduction, **opts)
    assert_rounded_once(got, want, dtype, what="loss")
    g_out = random_grad_output(got)
    assert_lowp_rule(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                     grads_of(lowp, x_low, g_out.cpu()), dtype, what="grad")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n_classes", (1000, 4099))
def test_large_vocabulary(backend, n_classes, dtype):
    device = require_op(backend, OP)
    x, y, w = make_inputs((3, n_classes), device, dtype=dtype, weight=True, scale=3.0)
    y[1] = IGNORE
    opts = dict(label_smoothing=0.05, reduction="sum")
    got = fo.cross_entropy(x, y, w, IGNORE, backend=backend, **opts)
    x64 = x.detach().double().requires_grad_()
    want = torch_ce(x64, y, w.double(), **opts)
    if dtype == torch.float32:
        assert_close(got, want, what="loss")
        assert_close(grads_of(got, x), grads_of(want, x64), what="grad")
    else:
        x_low = x.detach().cpu().requires_grad_()
        lowp = torch_ce(x_low, y.cpu(), w.cpu().to(dtype), **opts)
        assert_rounded_once(got, want, dtype, what="loss")
        assert_lowp_rule(grads_of(got, x), grads_of(want, x64), grads_of(lowp, x_low), dtype,
                         what="grad")


def test_extreme_logits(backend):
    device = require_op(backend, OP)
    x = torch.tensor([[1e4, -1e4, 0.0, 3.0], [float("-inf"), 2.0, float("-inf"), -1.0],
                      [-1e4, -1e4, -1e4, -1e4], [5.0, 1e4, 1e4, -3.0]], device=device)
    x.requires_grad_()
    y = torch.tensor([1, 1, 2, 2], device=device)
    for reduction in REDUCTIONS:
        got = fo.cross_entropy(x, y, reduction=reduction, backend=backend)
        want = F.cross_entropy(x, y, reduction=reduction)
        assert_close(got, want, what=f"loss {reduction}")
        assert_close(grads_of(got, x), grads_of(want, x), what=f"grad {reduction}")


def test_no_gradient_requested(backend, monkeypatch):
    """Without requires_grad (or under no_grad) the backend is asked for no gradient."""
    device = require_op(backend, OP)
    x, y, w = make_inputs((5, C), device, ignore=True, weight=True)
    module = fo.backends.select(OP, device, backend)
    real, need = module.cross_entropy_fwd, []

    def spy(*args, **kwargs):
        need.append(kwargs["need_grad"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "cross_entropy_fwd", spy)
    want = F.cross_entropy(x, y, w, label_smoothing=0.2)
    with torch.no_grad():
        assert_close(fo.cross_entropy(x, y, w, label_smoothing=0.2, backend=backend), want)
    assert_close(fo.cross_entropy(x.detach(), y, w, label_smoothing=0.2, backend=backend), want)
    assert need == [False, False]


def test_deterministic(backend):
    device = require_op(backend, OP)
    x, y, w = make_inputs((8, 1000), device, dtype=torch.bfloat16, ignore=True, weight=True)
    runs = []
    for _ in range(2):
        loss = fo.cross_entropy(x, y, w, label_smoothing=0.1, z_loss=1e-3, backend=backend)
        runs.append((loss.detach(), grads_of(loss, x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_module(backend):
    device = require_op(backend, OP)
    x, y, w = make_inputs((6, C), device, ignore=True, weight=True)
    module = fo.nn.CrossEntropyLoss(weight=w.cpu(), label_smoothing=0.1, backend=backend)
    assert "weight" in dict(module.named_buffers())
    module.to(device)
    got = module(x, y)
    want = F.cross_entropy(x, y, w, label_smoothing=0.1)
    assert_close(got, want, what="module loss")
    assert_close(grads_of(got, x), grads_of(want, x), what="module grad")
