"""The `cuda` backend's focal-loss kernels and scale_grad (csrc/cuda/focal.cu), called
through their launchers on CUDA tensors, against the formulas written out in torch (softmax
focal; torchvision's sigmoid focal, cpu_loss_helpers.py) in float64, bf16/fp16 gradients by
flash-attention's rule (fp32 losses at fp32 tolerance, bf16/fp16 ones as one rounding): both sides of the row-cache limit, strided and misaligned rows,
ignored and out-of-range targets, partial sums, determinism. Every test is marked `gpu`:
without a CUDA device they are skipped with the reason (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule, assert_rounded_once,
                              ce_reference, focal_reference, make_ce_case, same_bits,
                              sigmoid_focal_reference)
from cuda_loss_helpers import BF16, DEV, F16, F32, cuda  # noqa: F401  (fixture)
from cuda_loss_helpers import device_scales as _scales

pytestmark = pytest.mark.gpu


# ----------------------------------------------------------------------------- softmax focal

def _focal(cuda, x, y, alpha=None, scale=1.0, *, gamma, label_smoothing, ignore_index=IGNORE,
           need_grad=True):
    loss, grad = cuda.focal_loss_fwd(
        x.to(DEV), y.to(DEV), None if alpha is None else alpha.to(DEV), _scales(scale, 1.0),
        gamma=gamma, ignore_index=ignore_index, label_smoothing=label_smoothing,
        need_grad=need_grad)
    return loss.cpu(), None if grad is None else grad.cpu()


@pytest.mark.parametrize("c", [1, 7, 4097, 16385, 32000])
@pytest.mark.parametrize("gamma,smooth,with_alpha", [(2.0, 0.0, False), (0.5, 0.1, True),
                                                     (0.0, 0.0, True), (2.0, 0.2, False),
                                                     (3.5, 0.0, True)])
def test_focal_loss(cuda, c, gamma, smooth, with_alpha):
    n = 4 if c > 5000 else 10
    x, y, _ = make_ce_case(n, c, spread=3.0)
    y[0] = min(3, c - 1)
    alpha = torch.rand(c) + 0.25 if with_alpha else None
    loss, grad = _focal(cuda, x, y, alpha, 0.5, gamma=gamma, label_smoothing=smooth)
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma, smooth, scale=0.5)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


def test_focal_gamma_zero_is_cross_entropy(cuda):
    x, y, _ = make_ce_case(9, 333)
    loss, grad = _focal(cuda, x, y, gamma=0.0, label_smoothing=0.1)
    ref_loss, ref_grad = ce_reference(x, y, eps=0.1)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


def test_focal_confident_rows_keep_a_finite_gradient(cuda):
    x = torch.zeros(3, 50)
    x[:, 4] = 60.0  # p_y rounds to 1
    y = torch.tensor([4, 4, 9])
    for gamma in (0.0, 0.5, 2.0):
        loss, grad = _focal(cuda, x, y, gamma=gamma, label_smoothing=0.0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref_loss, ref_grad = focal_reference(x, y, None, gamma, 0.0)
        assert_close(loss, ref_loss, what="loss")
        assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.uint8])
def test_focal_out_of_range_and_ignored_rows(cuda, index_dtype):
    x, y, _ = make_ce_case(5, 20, ignore_row=None)
    ignore = 200 if index_dtype == torch.uint8 else IGNORE
    y[1], y[2], y[3] = ignore, 20, 255 if index_dtype == torch.uint8 else -3
    loss, grad = _focal(cuda, x, y.to(index_dtype), gamma=2.0, label_smoothing=0.1,
                        ignore_index=ignore)
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isnan(loss[[2, 3]]).all() and torch.isnan(grad[[2, 3]]).all()
    ref_loss, ref_grad = focal_reference(x[[0, 4]], y[[0, 4]], None, 2.0, 0.1)
    assert_close(loss[[0, 4]], ref_loss, what="loss")
    assert_close(grad[[0, 4]], ref_grad, what="grad")


@pytest.mark.parametrize("c", [33, 40000])
def test_focal_strided_and_misaligned_rows(cuda, c):
    base = torch.randn(6, c + 3) * 2
    y = torch.randint(0, c, (6,))
    on_device = base.to(DEV)
    for rows in (lambda b: b[:, 1:c + 1], lambda b: b[::2, :c]):
        x = rows(on_device)  # a view: misaligned rows, or rows 2 (C + 3) apart
        loss, grad = _focal(cuda, x, y[:x.shape[0]], gamma=1.5, label_smoothing=0.05)
        ref_loss, ref_grad = focal_reference(rows(base), y[:x.shape[0]], None, 1.5, 0.05)
        assert_close(loss, ref_loss, what="loss")
        assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("smooth", [0.0, 0.1])
def test_focal_low_precision(cuda, dtype, smooth):
    x, y, _ = make_ce_case(8, 3000, dtype=dtype)
    alpha = torch.rand(3000) + 0.5
    loss, grad = _focal(cuda, x, y, alpha, gamma=2.0, label_smoothing=smooth)
    ref_loss, ref_grad = focal_reference(x, y, alpha, 2.0, smooth)
    _, low_grad = focal_reference(x.to(DEV), y.to(DEV), alpha.to(DEV), 2.0, smooth, dtype=dtype)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, what="loss (fp32 row losses)")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


def test_focal_repeat_gives_the_same_bits_and_loss_only(cuda):
    x, y, _ = make_ce_case(7, 20000)
    a = _focal(cuda, x, y, gamma=2.0, label_smoothing=0.1)
    b = _focal(cuda, x, y, gamma=2.0, label_smoothing=0.1)
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    loss, grad = _focal(cuda, x, y, gamma=2.0, label_smoothing=0.1, need_grad=False)
    assert grad is None and same_bits(loss, a[0])


# ----------------------------------------------------------------------------- sigmoid focal

def _sigmoid(cuda, x, t, scale=1.0, **kw):
    kw = dict(alpha=0.25, gamma=2.0, label_smoothing=0.0, reduce=False, need_grad=True) | kw
    loss, grad = cuda.sigmoid_focal_loss_fwd(x.to(DEV) if x.device.type == "cpu" else x,
                                             t.to(DEV) if t.device.type == "cpu" else t,
                                             _scales(scale, 1.0), **kw)
    return loss.cpu(), None if grad is None else grad.cpu()


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 3 * 4096 + 5])
@pytest.mark.parametrize("alpha,gamma,smooth", [(0.25, 2.0, 0.1), (-1.0, 0.0, 0.0),
                                                (0.6, 0.5, 0.0)])
def test_sigmoid_focal_loss(cuda, reduce, n, alpha, gamma, smooth):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    t = (torch.rand(n, generator=g) < 0.3).float()
    loss, grad = _sigmoid(cuda, x, t, 0.25, alpha=alpha, gamma=gamma, label_smoothing=smooth,
                          reduce=reduce)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, alpha, gamma, smooth, scale=0.25)
    assert_close(grad, ref_grad, what="grad")
    if reduce:
        assert loss.dtype == F32 and loss.numel() == -(-n // cuda.losses.SIGMOID_FOCAL_SPAN)
        assert_close(loss.sum(), ref_loss.sum(), rtol=1e-5, what="loss")
    else:
        assert_close(loss, ref_loss, what="loss")


def test_sigmoid_focal_misaligned_and_multidimensional(cuda):
    """A view starting one element in (scalar path) and a 3-D tensor (treated as flat)."""
    base_x, base_t = torch.randn(9001) * 2, (torch.rand(9001) < 0.5).float()
    x, t = base_x.to(DEV)[1:], base_t.to(DEV)[1:]
    loss, grad = _sigmoid(cuda, x, t)
    ref_loss, ref_grad = sigmoid_focal_reference(base_x[1:], base_t[1:])
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")
    x3, t3 = base_x[:9000].view(10, 30, 30), base_t[:9000].view(10, 30, 30)
    loss, grad = _sigmoid(cuda, x3, t3)
    ref_loss, ref_grad = sigmoid_focal_reference(x3, t3)
    assert loss.shape == x3.shape
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_sigmoid_focal_low_precision(cuda, dtype):
    x = (torch.randn(5000) * 3).to(dtype)
    t = (torch.rand(5000) < 0.3).to(dtype)
    loss, grad = _sigmoid(cuda, x, t, label_smoothing=0.1)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, 0.25, 2.0, 0.1)
    _, low_grad = sigmoid_focal_reference(x.to(DEV), t.to(DEV), 0.25, 2.0, 0.1, dtype=dtype)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_rounded_once(loss, ref_loss, dtype, what="loss (fp32, stored once in the dtype)")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


def test_sigmoid_focal_partials_are_deterministic_and_loss_only(cuda):
    x, t = torch.randn(50_000) * 2, (torch.rand(50_000) < 0.2).float()
    a, _ = _sigmoid(cuda, x, t, reduce=True)
    b, grad = _sigmoid(cuda, x, t, reduce=True, need_grad=False)
    assert grad is None and same_bits(a, b)


# ----------------------------------------------------------------------------- scale_grad

@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("n,offset", [(10_001, 0), (4096 * 3, 0), (999, 1), (1, 0)])
def test_scale_grad(cuda, dtype, n, offset):
    base = torch.randn(n + offset + 3, device=DEV).to(dtype)
    g = base[offset:offset + n]  # offset 1: not 16-byte aligned, the scalar path
    outside = torch.cat([base[:offset], base[offset + n:]]).clone()
    before = g.clone()
    cuda.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert same_bits(g, before)
    cuda.scale_grad_(g, torch.tensor(0.37, device=DEV))
    assert same_bits(g, (before.float() * 0.37).to(dtype))
    assert same_bits(torch.cat([base[:offset], base[offset + n:]]), outside)
