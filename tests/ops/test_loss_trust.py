"""Regression tests of the loss half of issue 11, through the public API on every backend
that runs here (the `backend` fixture), against F.cross_entropy in float64 or a float64
formula written out in the test:
- soft targets and label smoothing with large logits (sums taken relative to the row max);
- soft targets with class weights on (N, C, d1..dk) inputs, every reduction;
- focal_loss with negative alpha (formula) and negative float alpha (refused);
- float arguments outside the range the kernels compute right in fp32 (refused);
- single-class inputs in any layout;
- ignore_index outside int64 (refused).
Kernel-level paths (need_grad, Triton chunks, the cpu lanes): tests/backends/
test_loss_trust_kernels.py; the kernel boundary: tests/backends/test_loss_boundary.py."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import assert_close, grads_of, random_grad_output
from test_focal import reference as focal_reference

REDUCTIONS = ("mean", "sum", "none")


def _soft(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=gen), dim=1)


def _check_ce(backend, x, target, reduction="mean", **kw):
    """fo.cross_entropy against F.cross_entropy on the same values in float64: loss, and
    the gradient for a random grad_output."""
    x = x.detach().requires_grad_()
    got = fo.cross_entropy(x, target, reduction=reduction, backend=backend, **kw)
    x64 = x.detach().double().requires_grad_()
    target64 = target.double() if target.is_floating_point() else target
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = F.cross_entropy(x64, target64, reduction=reduction, **kw64)
    assert_close(got, want, what="loss")
    g_out = random_grad_output(got)
    assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()), what="grad")
    return got


@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("target", ("soft", "smoothing"))
def test_equal_huge_logits_give_log_c(backend, target, weighted):
    """A row of equal logits 1e30 over 1000 classes: every log p is -log 1000 exactly, so the
    loss is log 1000 (times the weights); lse * sum r - sum r x lost every digit."""
    device = require_op(backend, "cross_entropy")
    n, c = 3, 1000
    x = torch.full((n, c), 1e30, device=device)
    w = (torch.rand(c, generator=torch.Generator().manual_seed(1)) + 0.5).to(device)
    kw = dict(weight=w if weighted else None)
    if target == "soft":
        y = _soft((n, c)).to(device)
        kw["label_smoothing"] = 0.1
    else:
        y = torch.tensor([0, 999, 500], device=device)
        kw["label_smoothing"] = 0.3
    got = _check_ce(backend, x, y, reduction="none", **kw)
    if not weighted:
        assert_close(got, torch.full((n,), math.log(c), dtype=torch.float64), what="log C")


@pytest.mark.parametrize("offset", (1e3, 1e6))
@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("target", ("soft", "smoothing"))
def test_offset_logits_match_torch(backend, target, weighted, offset):
    """Random logits plus a large offset (the fp32 values themselves are the input, also of
    the reference): the sums relative to the row max keep fp32 accuracy."""
    device = require_op(backend, "cross_entropy")
    gen = torch.Generator().manual_seed(2)
    n, c = 4, 300
    x = (3 * torch.randn(n, c, generator=gen) + offset).to(device)
    w = (torch.rand(c, generator=gen) + 0.5).to(device) if weighted else None
    y = _soft((n, c), 3).to(device) if target == "soft" else torch.randint(0, c, (n,)).to(device)
    for reduction in REDUCTIONS:
        _check_ce(backend, x, y, reduction, weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("smoothing", (0.0, 0.2))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", ((5, 7), (3, 7, 4), (2, 7, 3, 2)), ids=("nc", "ncd", "ncdd"))
def test_weighted_soft_targets_match_torch(backend, shape, reduction, smoothing):
    """torch: loss_i = -sum_c w_c q'_c log p_ic, q' = (1-eps) q + eps/C; 'mean' divides the
    sum by the number of positions (not by the weights); the gradient by autograd."""
    device = require_op(backend, "cross_entropy")
    gen = torch.Generator().manual_seed(4)
    x = (4 * torch.randn(shape, generator=gen) + 300).to(device)
    q = _soft(shape, 5).to(device)
    w = (3 * torch.rand(shape[1], generator=gen)).to(device)
    _check_ce(backend, x, q, reduction, weight=w, label_smoothing=smoothing)


def test_focal_negative_alpha_tensor_follows_the_formula(backend):
    device = require_op(backend, "focal_loss")
    gen = torch.Generator().manual_seed(6)
    x = (2 * torch.randn(6, 5, generator=gen)).to(device).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, -100], device=device)
    alpha = torch.tensor([-0.5, 0.0, 0.25, -2.0, 1.0], device=device)
    for smoothing in (0.0, 0.1):
        for reduction in REDUCTIONS:
            got = fo.focal_loss(x, y, 2.0, alpha, -100, reduction, smoothing, backend=backend)
            x64 = x.detach().double().requires_grad_()
            want = focal_reference(x64, y, gamma=2.0, alpha=alpha.double(),
                                   label_smoothing=smoothing, reduction=reduction)
            assert_close(got, want, what=f"loss eps={smoothing} {reduction}")
            g_out = random_grad_output(got)
            assert_close(grads_of(got, x, g_out), grads_of(want, x64, g_out.double()),
                         what=f"grad eps={smoothing} {reduction}")


@pytest.mark.parametrize("alpha", (-0.25, -1.0))
def test_focal_negative_float_alpha_refused(alpha):
    with pytest.raises(ValueError, match=rf"alpha must be >= 0 or None.*{re.escape(str(alpha))}"):
        fo.focal_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), alpha=alpha)


@pytest.mark.parametrize("name,value", [
    ("softcap", 1e-50), ("softcap", 2.0 ** -127), ("softcap", 1e39), ("softcap", 2.0 ** 65),
    ("z_loss", 1e39)])
def test_cross_entropy_floats_outside_fp32_range_refused(name, value, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the argument check")

    for backend_name in fo.backends.usable("cross_entropy", "cpu"):
        monkeypatch.setattr(fo.backends._load(backend_name), "cross_entropy_fwd", no_kernel)
    with pytest.raises(ValueError, match=rf"{name} must be in .*got {re.escape(repr(value))}"):
        fo.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), **{name: value})


@pytest.mark.parametrize("call", ("focal_gamma", "focal_alpha", "sigmoid_gamma",
                                  "sigmoid_alpha"))
def test_focal_floats_outside_fp32_range_refused(call):
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"(gamma|alpha) must be in .*got -?1e\+39"):
        if call == "focal_gamma":
            fo.focal_loss(x, y, gamma=1e39)
        elif call == "focal_alpha":
            fo.focal_loss(x, y, alpha=1e39)
        elif call == "sigmoid_gamma":
            fo.sigmoid_focal_loss(x, torch.rand(3, 4), gamma=1e39)
        else:
            fo.sigmoid_focal_loss(x, torch.rand(3, 4), alpha=-1e39)


# x / 2^-126 overflows to inf (tanh(inf) = 1), which the Triton interpreter reports
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("softcap", (2.0 ** -126, 2.0 ** 64))
def test_softcap_at_the_ends_of_its_range(backend, softcap):
    """softcap = 2^-126: every capped logit is +-s or ~0, so the loss is ~log C and the
    gradient ~0 away from 0; softcap = 2^64: the capping changes nothing an fp32 loss sees.
    Both against s * tanh(x / s) and F.cross_entropy in float64."""
    device = require_op(backend, "cross_entropy")
    gen = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(4, 9, generator=gen)).to(device).requires_grad_()
    y = torch.tensor([0, 3, 8, 5], device=device)
    got = fo.cross_entropy(x, y, softcap=softcap, label_smoothing=0.1, backend=backend)
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(softcap * torch.tanh(x64 / softcap), y, label_smoothing=0.1)
    assert_close(got, want, what="loss")
    assert_close(grads_of(got, x), grads_of(want, x64), what="grad")


def _single_class_inputs():
    gen = torch.Generator().manual_seed(8)
    return {
        "n1": torch.randn(5, 1, generator=gen),
        "n1_transposed": torch.randn(1, 5, generator=gen).t(),  # strides (1, 5)
        "n1d": torch.randn(3, 1, 4, generator=gen),
        "n1d_channels_last": torch.randn(2, 1, 3, 2, generator=gen).contiguous(
            memory_format=torch.channels_last),
        "c1": torch.randn(1, generator=gen),
    }


@pytest.mark.parametrize("layout", ("n1", "n1_transposed", "n1d", "n1d_channels_last", "c1"))
def test_single_class_inputs(backend, layout):
    """One class: every log p is 0, so the loss is 0 and the gradient 0 (as torch), in any
    layout; a dimension of size 1 may have any stride."""
    device = require_op(backend, "cross_entropy")
    x = _single_class_inputs()[layout].to(device)
    class_shape = x.shape[:1] + x.shape[2:] if x.dim() >= 2 else ()
    y = torch.zeros(class_shape, dtype=torch.long, device=device)
    if y.dim() > 0:
        y.view(-1)[0] = -100
    w = torch.tensor([2.0], device=device)
    for reduction in REDUCTIONS:
        _check_ce(backend, x, y, reduction)
        _check_ce(backend, x, y, reduction, weight=w, label_smoothing=0.2)
        _check_ce(backend, x, torch.ones_like(x), reduction, weight=w, label_smoothing=0.2)
        x_f = x.detach().requires_grad_()
        got = fo.focal_loss(x_f, y, reduction=reduction, label_smoothing=0.1, backend=backend)
        assert not torch.any(got) and not torch.any(grads_of(got, x_f)), "focal_loss"


@pytest.mark.parametrize("ignore_index", (2 ** 63, -(2 ** 63) - 1, 2 ** 70))
def test_ignore_index_outside_int64_refused(ignore_index):
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for loss in (fo.cross_entropy, fo.focal_loss):
        with pytest.raises(ValueError, match=rf"ignore_index must fit in int64.*{ignore_index}"):
            loss(x, y, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        fo.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, y)


@pytest.mark.parametrize("ignore_index", (2 ** 63 - 1, -(2 ** 63)))
def test_ignore_index_at_the_int64_limits(backend, ignore_index):
    device = require_op(backend, "cross_entropy")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9)).to(device)
    y = torch.tensor([0, 5, 2, 3], device=device)
    _check_ce(backend, x, y, ignore_index=ignore_index, label_smoothing=0.1)
