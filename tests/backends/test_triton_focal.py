"""The Triton softmax focal and sigmoid focal entry points, called directly, against
independent torch formulas written out from docs/losses.md (torchvision's RetinaNet loss for the
sigmoid one) and F.cross_entropy for gamma = 0.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before python
starts); `block_size` forces several chunks per row on small rows.
"""

import pytest
import torch
import torch.nn.functional as F

from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)

from fusedopt.backends import triton as tb  # noqa: E402
from triton_loss_helpers import (DEVICE, IGNORE,  # noqa: E402
                                 assert_low_precision_rule, assert_matches,
                                 assert_rounded_once, ce_reference, make_ce_case, scales_tensor)

# ----------------------------------------------------------------------------- softmax focal

def focal_fwd(x, y, alpha=None, scale=1.0, *, gamma=2.0, eps=0.0, need_grad=True,
              block_size=None):
    return tb.focal_loss_fwd(x, y, alpha, scales_tensor(scale, 1.0), gamma=gamma,
                             ignore_index=IGNORE, label_smoothing=eps, need_grad=need_grad,
                             block_size=block_size)


def focal_reference(x, y, alpha=None, scale=1.0, *, gamma=2.0, eps=0.0, dtype=torch.float64):
    """loss_i = -sum_c alpha_c*q_c*(1-p_c)^gamma*log p_c, q = (1-eps)*onehot + eps/C.
    1 - p as -expm1(log p), kept >= the smallest normal so that autograd of u**gamma stays
    finite where p rounds to 1; terms with q_c = 0 are 0 (also where log p = -inf)."""
    x = x.detach().to(dtype).requires_grad_()
    c = x.shape[1]
    log_p = torch.log_softmax(x, dim=1)
    valid = y != IGNORE
    q = torch.full_like(log_p, eps / c)
    q[valid] += (1 - eps) * F.one_hot(y[valid].long(), c).to(dtype)
    a = torch.ones(c, dtype=dtype, device=x.device) if alpha is None else alpha.to(dtype)
    u = (-torch.expm1(log_p)).clamp_min(torch.finfo(dtype).tiny)
    terms = a * q * u ** gamma * torch.where(q > 0, log_p, 0.0)
    loss = -scale * terms.sum(dim=1) * valid
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_focal_variants(with_alpha, smooth, gamma, block_size):
    x, y, alpha = make_ce_case(6, 37)
    alpha = alpha if with_alpha else None
    eps = 0.1 if smooth else 0.0
    loss, grad = focal_fwd(x, y, alpha, 0.6, gamma=gamma, eps=eps, block_size=block_size)
    ref_loss, ref_grad = focal_reference(x, y, alpha, 0.6, gamma=gamma, eps=eps)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)


@pytest.mark.parametrize("block_size", [None, 16])
def test_focal_gamma_zero_is_cross_entropy(block_size):
    x, y, _ = make_ce_case(6, 37)
    loss, grad = focal_fwd(x, y, gamma=0.0, eps=0.15, block_size=block_size)
    ref_loss, ref_grad = ce_reference(x, y, eps=0.15)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.0])
def test_focal_confident_rows_stay_finite(gamma, smooth):
    x = torch.zeros(3, 40, device=DEVICE)
    y = torch.tensor([2, 11, 39], device=DEVICE)
    x[torch.arange(3), y] = torch.tensor([12.0, 20.0, 200.0], device=DEVICE)  # p_y -> 1
    eps = 0.05 if smooth else 0.0
    loss, grad = focal_fwd(x, y, gamma=gamma, eps=eps, block_size=16)
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(grad))
    # log p_y = -log(1 + 39 e^-12) is at fp32's resolution of log near 1: compare with
    # torch's own fp32 error, as for the low precisions, atol = 2 fp32 ulps of the values
    ref_loss, ref_grad = focal_reference(x, y, gamma=gamma, eps=eps)
    f32_loss, f32_grad = focal_reference(x, y, gamma=gamma, eps=eps, dtype=torch.float32)
    ulp = torch.finfo(torch.float32).eps
    assert_low_precision_rule(loss, f32_loss, ref_loss, "loss",
                              atol=2 * ulp * ref_loss.abs().max().item())
    assert_low_precision_rule(grad, f32_grad, ref_grad, "grad",
                              atol=2 * ulp * ref_grad.abs().max().item())
    if not smooth:  # p_y == 1 in fp32: no loss and no gradient
        assert loss[2].item() == 0.0 and torch.all(grad[2] == 0)


@pytest.mark.parametrize("block_size", [None, 16])
def test_focal_out_of_range_and_ignored_rows(block_size):
    x, y, alpha = make_ce_case(6, 37)
    y[0], y[4] = 40, -3
    for eps in (0.0, 0.1):
        loss, grad = focal_fwd(x, y, alpha, eps=eps, block_size=block_size)
        for r in (0, 4):
            assert torch.isnan(loss[r]) and torch.all(torch.isnan(grad[r]))
        assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)
        good = torch.tensor([2, 3, 5], device=DEVICE)
        ref_loss, ref_grad = focal_reference(x[good], y[good], alpha, eps=eps)
        assert_matches(loss[good], ref_loss)
        assert_matches(grad[good], ref_grad)


def test_focal_minus_inf_logits():
    x, y, _ = make_ce_case(4, 30)
    x[0, ::2] = float("-inf")
    x[0, y[0]] = 2.0
    loss, grad = focal_fwd(x, y, gamma=2.0, block_size=8)
    ref_loss, ref_grad = focal_reference(x, y, gamma=2.0)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    assert torch.all(torch.isfinite(grad))


def test_focal_many_blocks_odd_vocab_and_no_grad():
    x, y, alpha = make_ce_case(3, 1000, scale=4.0)
    loss, grad = focal_fwd(x, y, alpha, gamma=1.5, eps=0.1, block_size=128)
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma=1.5, eps=0.1)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    again, none = focal_fwd(x, y, alpha, gamma=1.5, eps=0.1, block_size=128, need_grad=False)
    assert none is None and torch.equal(again, loss)
    empty, grad0 = focal_fwd(x[:0], y[:0])
    assert empty.shape == (0,) and grad0.shape == (0, 1000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_focal_low_precision_error_rule(dtype, smooth):
    x, y, alpha = make_ce_case(8, 200, dtype=dtype, scale=4.0, seed=9)
    eps = 0.1 if smooth else 0.0
    loss, grad = focal_fwd(x, y, alpha, gamma=2.0, eps=eps, block_size=64)
    assert grad.dtype == dtype
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma=2.0, eps=eps)
    _, low_grad = focal_reference(x, y, alpha, gamma=2.0, eps=eps, dtype=dtype)
    assert loss.dtype == torch.float32
    assert_matches(loss, ref_loss)  # fp32 row losses: fp32 tolerance
    assert_low_precision_rule(grad, low_grad, ref_grad, "grad")


def test_focal_deterministic():
    x, y, alpha = make_ce_case(5, 300, dtype=torch.bfloat16)
    a = focal_fwd(x, y, alpha, gamma=0.5, eps=0.1, block_size=64)
    b = focal_fwd(x, y, alpha, gamma=0.5, eps=0.1, block_size=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- sigmoid focal

def sigmoid_fwd(x, t, scale=1.0, *, alpha=0.25, gamma=2.0, eps=0.0, reduce=False,
                need_grad=True, block_size=None):
    return tb.sigmoid_focal_loss_fwd(x, t, scales_tensor(scale, 1.0), alpha=alpha, gamma=gamma,
                                     label_smoothing=eps, reduce=reduce, need_grad=need_grad,
                                     block_size=block_size)


def sigmoid_reference(x, t, scale=1.0, *, alpha=0.25, gamma=2.0, eps=0.0, dtype=torch.float64):
    """torchvision.ops.sigmoid_focal_loss written out, with t' = t*(1-eps) + eps/2."""
    x = x.detach().to(dtype).requires_grad_()
    t = t.to(dtype) * (1 - eps) + eps / 2
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    loss = scale * loss
    loss.sum().backward()
    return loss.detach(), x.grad


def make_sigmoid_case(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.rand(shape, generator=g) > 0.7).to(dtype)
    return x.to(DEVICE), t.to(DEVICE)


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("smooth", [False, True])
def test_sigmoid_focal_variants(smooth, gamma, alpha, reduce):
    x, t = make_sigmoid_case((7, 150))
    eps = 0.1 if smooth else 0.0
    loss, grad = sigmoid_fwd(x, t, alpha=alpha, gamma=gamma, eps=eps, reduce=reduce,
                             block_size=256)
    ref_loss, ref_grad = sigmoid_reference(x, t, alpha=alpha, gamma=gamma, eps=eps)
    if reduce:
        assert loss.dtype == torch.float32 and loss.shape == (5,)  # ceil(1050 / 256)
        expected = [ref_loss.flatten()[i:i + 256].sum() for i in range(0, 1050, 256)]
        assert_matches(loss, torch.stack(expected))
    else:
        assert loss.shape == x.shape and loss.dtype == x.dtype
        assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)


def test_sigmoid_focal_mean_scale_and_default_block():
    x, t = make_sigmoid_case((5000,))
    partial, grad = sigmoid_fwd(x, t, 1 / 5000, reduce=True)
    assert partial.shape == (-(-5000 // tb.focal.SIGMOID_BLOCK),)
    xr = x.double().requires_grad_()
    p = torch.sigmoid(xr)
    ce = F.binary_cross_entropy_with_logits(xr, t.double(), reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    mean = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean()
    mean.backward()
    assert_matches(partial.sum(), mean.detach())
    assert_matches(grad, xr.grad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_sigmoid_focal_extreme_logits(gamma):
    x = torch.tensor([-200.0, -30.0, -12.0, 0.0, 12.0, 30.0, 200.0] * 2, device=DEVICE)
    t = torch.tensor([0.0] * 7 + [1.0] * 7, device=DEVICE)
    loss, grad = sigmoid_fwd(x, t, gamma=gamma)
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(grad))
    moderate = x.abs() <= 12
    ref_loss, ref_grad = sigmoid_reference(x[moderate], t[moderate], gamma=gamma)
    assert_matches(loss[moderate], ref_loss)
    assert_matches(grad[moderate], ref_grad)
    # confidently right: loss and gradient vanish; confidently wrong: loss ~ |x|, grad ~ +-a_t
    right = ((x > 20) & (t == 1)) | ((x < -20) & (t == 0))
    assert torch.all(loss[right].abs() < 1e-12) and torch.all(grad[right].abs() < 1e-12)
    wrong = ((x > 20) & (t == 0)) | ((x < -20) & (t == 1))
    a_t = torch.where(t == 1, 0.25, 0.75)
    assert_matches(loss[wrong], (x.abs() * a_t)[wrong])
    assert_matches(grad[wrong], (torch.sign(x) * a_t)[wrong])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sigmoid_focal_low_precision_error_rule(dtype):
    x, t = make_sigmoid_case((4, 300), dtype=dtype, seed=4)
    loss, grad = sigmoid_fwd(x, t, eps=0.1, block_size=512)
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = sigmoid_reference(x, t, eps=0.1)
    _, low_grad = sigmoid_reference(x, t, eps=0.1, dtype=dtype)
    assert_rounded_once(loss, ref_loss, dtype)  # fp32 per-element loss stored once
    assert_low_precision_rule(grad, low_grad, ref_grad, "grad")


def test_sigmoid_focal_no_grad_empty_and_deterministic():
    x, t = make_sigmoid_case((3000,), dtype=torch.bfloat16)
    a = sigmoid_fwd(x, t, eps=0.1, gamma=0.5, reduce=True, block_size=512)
    b = sigmoid_fwd(x, t, eps=0.1, gamma=0.5, reduce=True, block_size=512)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    loss, grad = sigmoid_fwd(x, t, eps=0.1, gamma=0.5, reduce=True, block_size=512,
                             need_grad=False)
    assert grad is None and torch.equal(loss, a[0])
    empty, grad0 = sigmoid_fwd(x[:0], t[:0], reduce=True)
    assert empty.shape == (0,) and grad0.shape == (0,)
