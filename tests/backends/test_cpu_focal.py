"""The `cpu` softmax focal and sigmoid focal entry points and scale_grad_, called directly,
against torch formulas written out from docs/losses.md in float64 (autograd for the gradients;
torchvision's RetinaNet loss for the sigmoid one), F.cross_entropy for gamma = 0, and the
registry entries of the cpu loss ops."""

import pytest
import torch

from fusedopt import backends

_OK, _REASON = backends.status("cpu")
if not _OK:
    pytest.skip(f"cpu backend cannot run here: {_REASON}", allow_module_level=True)

from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule,  # noqa: E402
                              assert_rounded_once, ce_reference, focal_reference, make_ce_case,
                              same_bits, scales, sigmoid_focal_reference)
from fusedopt.backends import cpu as cb  # noqa: E402


def focal_fwd(x, y, alpha=None, scale=1.0, *, gamma=2.0, eps=0.0, need_grad=True,
              num_threads=None):
    return cb.focal_loss_fwd(x, y, alpha, scales(scale, 1.0), gamma=gamma, ignore_index=IGNORE,
                             label_smoothing=eps, need_grad=need_grad, num_threads=num_threads)


def sigmoid_fwd(x, t, scale=1.0, *, alpha=0.25, gamma=2.0, eps=0.0, reduce=False,
                need_grad=True, num_threads=None):
    return cb.sigmoid_focal_loss_fwd(x, t, scales(scale, 1.0), alpha=alpha, gamma=gamma,
                                     label_smoothing=eps, reduce=reduce, need_grad=need_grad,
                                     num_threads=num_threads)


# ----------------------------------------------------------------------------- softmax focal

@pytest.mark.parametrize("c", [37, 4099])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_focal_variants(with_alpha, smooth, gamma, c):
    x, y, alpha = make_ce_case(6, c)
    alpha = alpha if with_alpha else None
    eps = 0.1 if smooth else 0.0
    loss, grad = focal_fwd(x, y, alpha, 0.6, gamma=gamma, eps=eps)
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma, eps, 0.6)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")
    assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)
    loss_only, none = focal_fwd(x, y, alpha, 0.6, gamma=gamma, eps=eps, need_grad=False)
    assert none is None and same_bits(loss_only, loss)


@pytest.mark.parametrize("smooth", [False, True])
def test_focal_gamma_zero_is_cross_entropy(smooth):
    x, y, _ = make_ce_case(6, 300)
    eps = 0.15 if smooth else 0.0
    loss, grad = focal_fwd(x, y, gamma=0.0, eps=eps)
    ref_loss, ref_grad = ce_reference(x, y, eps=eps)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.0])
def test_focal_confident_rows_stay_finite(gamma, smooth):
    x = torch.zeros(3, 40)
    y = torch.tensor([2, 11, 39])
    x[torch.arange(3), y] = torch.tensor([12.0, 20.0, 200.0])  # p_y -> 1, exactly 1 in fp32
    eps = 0.1 if smooth else 0.0
    loss, grad = focal_fwd(x, y, gamma=gamma, eps=eps)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = focal_reference(x, y, None, gamma, eps)
    assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, what="grad")


@pytest.mark.parametrize("c", [1, 37])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_smoothing_rows_of_negative_logits(c, gamma):
    """Every logit of the row negative and C not a multiple of the SIMD width: the padding
    lanes of the last vector add nothing (a fill of 0, above the row max, once made the
    whole row NaN)."""
    x = -torch.rand(4, c, generator=torch.Generator().manual_seed(c)) * 5 - 1
    y = torch.tensor([0, c - 1, c // 2, 0])
    loss, grad = focal_fwd(x, y, gamma=gamma, eps=0.1)
    ref_loss, ref_grad = focal_reference(x, y, None, gamma, 0.1)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_focal_low_precision_error_rule(dtype, smooth):
    x, y, alpha = make_ce_case(16, 515, dtype=dtype)
    eps = 0.1 if smooth else 0.0
    loss, grad = focal_fwd(x, y, alpha, gamma=2.0, eps=eps)
    assert grad.dtype == dtype
    ref_loss, ref_grad = focal_reference(x, y, alpha, 2.0, eps)
    _, low_grad = focal_reference(x, y, alpha, 2.0, eps, dtype=dtype)
    assert_lowp_rule(grad, ref_grad, low_grad, dtype, "grad")
    assert_close(loss, ref_loss, what="loss (fp32 row losses)")


def test_focal_out_of_range_targets_and_index_types():
    x, y, alpha = make_ce_case(5, 30, ignore_row=None)
    y[3] = 30
    loss, grad = focal_fwd(x, y, alpha, eps=0.1)
    assert torch.isnan(loss[3]) and torch.isnan(grad[3]).all()
    assert torch.isfinite(loss[[0, 1, 2, 4]]).all() and torch.isfinite(grad[[0, 1, 2, 4]]).all()
    loss32, grad32 = focal_fwd(x, y.to(torch.int32), alpha, eps=0.1)
    assert same_bits(loss32, loss) and same_bits(grad32, grad)


def test_focal_thread_count_and_run_to_run_bitwise_equal():
    x, y, alpha = make_ce_case(70, 1031)
    results = [focal_fwd(x, y, alpha, 0.3, gamma=1.5, eps=0.1, num_threads=t) for t in (1, 2, 3, 2)]
    for loss, grad in results[1:]:
        assert same_bits(loss, results[0][0]) and same_bits(grad, results[0][1])


# ----------------------------------------------------------------------------- sigmoid focal

def _binary_case(shape, dtype=torch.float32, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * spread).to(dtype)
    t = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    return x, t


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sigmoid_focal_per_element(alpha, gamma, eps):
    x, t = _binary_case((7, 93))
    x[0, :4] = torch.tensor([1e4, -1e4, 60.0, -60.0])  # saturated sigmoid, both sides
    loss, grad = sigmoid_fwd(x, t, 0.5, alpha=alpha, gamma=gamma, eps=eps)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, alpha, gamma, eps, 0.5)
    assert loss.dtype == x.dtype and loss.shape == x.shape
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_sigmoid_focal_reduced_partial_sums(n):
    x, t = _binary_case((n,), seed=n)
    partials, grad = sigmoid_fwd(x, t, 1.0 / n, reduce=True, eps=0.05)
    assert partials.dtype == torch.float32 and partials.dim() == 1
    assert partials.numel() == -(-n // cb.losses.SIGMOID_FOCAL_SPAN)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, 0.25, 2.0, 0.05, 1.0 / n)
    assert_close(partials.double().sum(), ref_loss.sum(), what="mean")
    assert_close(grad, ref_grad, what="grad")
    per_element, _ = sigmoid_fwd(x, t, 1.0 / n, eps=0.05, need_grad=False)
    assert_close(partials.double().sum(), per_element.double().sum(), what="same terms")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sigmoid_focal_low_precision_error_rule(dtype):
    x, t = _binary_case((33, 65), dtype=dtype)
    loss, grad = sigmoid_fwd(x, t)
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = sigmoid_focal_reference(x, t)
    _, low_grad = sigmoid_focal_reference(x, t, dtype=dtype)
    assert_lowp_rule(grad, ref_grad, low_grad, dtype, "grad")
    assert_rounded_once(loss, ref_loss, dtype, what="loss (fp32, stored once in the dtype)")


def test_sigmoid_focal_thread_count_and_run_to_run_bitwise_equal():
    x, t = _binary_case((9 * 4096 + 5,))
    for reduce in (False, True):
        results = [sigmoid_fwd(x, t, 0.1, reduce=reduce, num_threads=k) for k in (1, 2, 3, 2)]
        for loss, grad in results[1:]:
            assert same_bits(loss, results[0][0]) and same_bits(grad, results[0][1])


# ----------------------------------------------------------------------------- scale_grad_, registry

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_rounds_once_and_skips_one(dtype):
    g = (torch.randn(70001, generator=torch.Generator().manual_seed(4)) * 5).to(dtype)
    g[3] = float("nan")
    before = g.clone()
    cb.scale_grad_(g, torch.tensor(1.0))
    assert same_bits(g, before)
    cb.scale_grad_(g, torch.tensor(0.3))
    want = (before.float() * 0.3).to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(g), nan) and nan.sum() == 1
    assert same_bits(g[~nan], want[~nan])  # NaN payloads aside, every bit equal


def test_cpu_backend_lists_the_loss_ops():
    for op in ("cross_entropy", "focal_loss", "sigmoid_focal_loss"):
        assert op in cb.OPS
        assert cb.supports(op, torch.device("cpu")) == (True, "")
        assert backends.select(op, torch.device("cpu"), "cpu") is cb
