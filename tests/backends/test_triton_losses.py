"""The Triton loss entry points, called directly, against PyTorch.

Cross-entropy is compared with F.cross_entropy (reduction='none', autograd for the
gradient); z-loss, soft-capping, softmax focal and sigmoid focal with independent torch
formulas written from SPEC.md.  References run in float64.  bf16/fp16 follow
flash-attention's rule: our error against the float64 reference is at most twice the
error of the same torch computation run in the low precision (plus a tiny atol).

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before python
starts); `block_size` forces several chunks per row on small rows.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)

from fusedopt.backends import triton as tb  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IGNORE = -100


def _scales(ce=1.0, z=1.0):
    return torch.tensor([ce, z], dtype=torch.float32, device=DEVICE)


def ce_fwd(x, y, weight=None, scales=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
           inplace=False, need_grad=True, block_size=None, ignore_index=IGNORE):
    return tb.cross_entropy_fwd(
        x, y, weight, _scales() if scales is None else scales, ignore_index=ignore_index,
        label_smoothing=eps, z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace,
        need_grad=need_grad, block_size=block_size)


def ce_reference(x, y, weight=None, scales=(1.0, 1.0), *, eps=0.0, z_loss=0.0, softcap=None,
                 soft=False, dtype=torch.float64):
    """Row losses and d(sum of rows)/dx with torch in `dtype`: scales[0]*F.cross_entropy
    (on soft-capped logits) + scales[1]*z_loss*logsumexp**2 for the non-ignored rows."""
    x = x.detach().to(dtype).requires_grad_()
    xc = softcap * torch.tanh(x / softcap) if softcap is not None else x
    target = y.to(dtype) if soft else y.long()
    w = weight.to(dtype) if weight is not None else None
    loss = scales[0] * F.cross_entropy(xc, target, weight=w, ignore_index=IGNORE,
                                       reduction="none", label_smoothing=eps)
    if z_loss:
        z = scales[1] * z_loss * torch.logsumexp(xc, dim=1) ** 2
        loss = loss + (z if soft else torch.where(target != IGNORE, z, 0.0))
    loss.sum().backward()
    return loss.detach(), x.grad


def assert_matches(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True)


def assert_low_precision_rule(ours, torch_low, ref, what, atol=1e-6):
    err_ours = (ours.double().cpu() - ref.double().cpu()).abs().max().item()
    err_torch = (torch_low.double().cpu() - ref.double().cpu()).abs().max().item()
    assert err_ours <= 2 * err_torch + atol, (
        f"{what}: our error {err_ours:.3g} > 2 x torch's low-precision error {err_torch:.3g}")


def make_ce_case(n, c, dtype=torch.float32, soft=False, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g) * scale).to(dtype)
    if soft:
        y = torch.softmax(torch.randn(n, c, generator=g), dim=1).to(dtype)
    else:
        y = torch.randint(0, c, (n,), generator=g)
        if n > 2:
            y[1] = IGNORE
    weight = torch.rand(c, generator=g) + 0.5
    return x.to(DEVICE), y.to(DEVICE), weight.to(DEVICE)


# ----------------------------------------------------------------------------- cross-entropy

FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("block_size", [None, 16], ids=["one_block", "blocks_of_16"])
@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS,
                         ids=["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl))
                              for fl in FLAGS])
def test_ce_every_flag_combination(weighted, smooth, zloss, capped, soft, block_size):
    x, y, weight = make_ce_case(6, 37, soft=soft)
    kwargs = dict(eps=0.1 if smooth else 0.0, z_loss=0.05 if zloss else 0.0,
                  softcap=4.0 if capped else None, soft=soft)
    w = weight if weighted else None
    loss, grad = ce_fwd(x, y, w, _scales(0.7, 1.3), block_size=block_size, **kwargs)
    ref_loss, ref_grad = ce_reference(x, y, w, (0.7, 1.3), **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == (6,)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    if not soft:
        assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)


@pytest.mark.parametrize("c,block_size", [(1000, 128), (4099, 512)])
@pytest.mark.parametrize("smooth", [False, True])
def test_ce_many_blocks_odd_vocab(c, block_size, smooth):
    x, y, weight = make_ce_case(3, c, scale=4.0)
    eps = 0.2 if smooth else 0.0
    loss, grad = ce_fwd(x, y, weight, eps=eps, z_loss=1e-3, block_size=block_size)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=eps, z_loss=1e-3)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)


def test_ce_largest_vocab_single_row():
    x, y, _ = make_ce_case(1, 262_144, scale=2.0)
    loss, grad = ce_fwd(x, y)
    ref_loss, ref_grad = ce_reference(x, y)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad, atol=1e-8)


@pytest.mark.parametrize("block_size", [None, 16])
def test_ce_single_row_and_one_class(block_size):
    x, y, weight = make_ce_case(1, 50)
    loss, grad = ce_fwd(x, y, weight, eps=0.3, block_size=block_size)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.3)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    one = torch.randn(4, 1, device=DEVICE)
    loss, grad = ce_fwd(one, torch.zeros(4, dtype=torch.long, device=DEVICE))
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_ce_empty_rows():
    x = torch.empty(0, 10, device=DEVICE)
    loss, grad = ce_fwd(x, torch.empty(0, dtype=torch.long, device=DEVICE))
    assert loss.shape == (0,) and grad.shape == (0, 10)


@pytest.mark.parametrize("block_size", [None, 8])
def test_ce_all_rows_ignored_never_touch_the_inf_scale(block_size):
    x, _, weight = make_ce_case(5, 21)
    y = torch.full((5,), IGNORE, dtype=torch.long, device=DEVICE)
    inf = float("inf")
    loss, grad = ce_fwd(x, y, weight, _scales(inf, inf), eps=0.1, z_loss=0.1,
                        block_size=block_size)
    assert torch.equal(loss, torch.zeros(5, device=DEVICE))
    assert torch.equal(grad, torch.zeros_like(x))


def test_ce_other_ignore_index():
    x, y, _ = make_ce_case(6, 20)
    y[3] = 7
    loss, grad = ce_fwd(x, y, ignore_index=7)
    assert loss[3].item() == 0.0 and torch.all(grad[3] == 0)
    # -100 is now an ordinary out-of-range target
    assert torch.isnan(loss[1]) and torch.all(torch.isnan(grad[1]))


@pytest.mark.parametrize("mean_kind", ["class", "soft"])
def test_ce_mean_scales_give_torch_mean(mean_kind):
    soft = mean_kind == "soft"
    x, y, weight = make_ce_case(8, 30, soft=soft)
    if soft:
        scales = _scales(1 / 8, 1 / 8)
        n_valid = 8
    else:
        valid = y != IGNORE
        n_valid = int(valid.sum())
        scales = _scales(1 / weight[y[valid]].sum().item(), 1 / n_valid)
    loss, grad = ce_fwd(x, y, weight, scales, eps=0.1, z_loss=0.01, soft=soft)
    xr = x.double().requires_grad_()
    mean = F.cross_entropy(xr, y.double() if soft else y, weight=weight.double(),
                           ignore_index=IGNORE, label_smoothing=0.1)
    lse = torch.logsumexp(xr, 1)
    z = lse ** 2 if soft else torch.where(y != IGNORE, lse ** 2, 0.0)
    total = mean + 0.01 * z.sum() / n_valid
    total.backward()
    assert_matches(loss.sum(), total.detach())
    assert_matches(grad, xr.grad)


def test_ce_target_dtypes_agree():
    x, y, weight = make_ce_case(7, 40)
    y[1] = 5
    want = ce_fwd(x, y, weight, eps=0.1)
    for dtype in (torch.int32, torch.uint8):
        got = ce_fwd(x, y.to(dtype), weight, eps=0.1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("block_size", [None, 16])
def test_ce_out_of_range_targets_give_nan_rows(block_size):
    x, y, weight = make_ce_case(6, 37)
    y[0], y[2] = 37, -5
    loss, grad = ce_fwd(x, y, weight, eps=0.1, block_size=block_size)
    bad = torch.tensor([True, False, True, False, False, False], device=DEVICE)
    assert torch.all(torch.isnan(loss[bad])) and torch.all(torch.isnan(grad[bad]))
    good = ~bad
    ref_loss, ref_grad = ce_reference(x[good], y[good], weight, eps=0.1)
    assert_matches(loss[good], ref_loss)
    assert_matches(grad[good], ref_grad)
    loss8, grad8 = ce_fwd(x[:, :20], torch.full((6,), 255, dtype=torch.uint8, device=DEVICE))
    assert torch.all(torch.isnan(loss8)) and torch.all(torch.isnan(grad8))


@pytest.mark.parametrize("smooth,capped", [(False, False), (True, False), (False, True)])
def test_ce_minus_inf_logits(smooth, capped):
    x, y, _ = make_ce_case(5, 40)
    x[0, :] = float("-inf")
    x[0, y[0]] = 1.0
    x[2, ::3] = float("-inf")
    x[2, y[2]] = 0.5
    x[4, 17:] = float("-inf")
    y[4] = 3
    kwargs = dict(eps=0.1 if smooth else 0.0, softcap=5.0 if capped else None)
    loss, grad = ce_fwd(x, y, block_size=16, **kwargs)
    ref_loss, ref_grad = ce_reference(x, y, **kwargs)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    assert torch.all(torch.isfinite(grad))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: log(0)
def test_ce_row_of_only_minus_inf_is_nan_like_torch():
    x = torch.full((2, 10), float("-inf"), device=DEVICE)
    loss, grad = ce_fwd(x, torch.tensor([3, IGNORE], device=DEVICE))
    assert torch.isnan(loss[0]) and loss[1].item() == 0.0
    assert torch.isnan(F.cross_entropy(x[:1].cpu(), torch.tensor([3])))


@pytest.mark.parametrize("capped", [False, True])
def test_ce_huge_logits(capped):
    x, y, weight = make_ce_case(6, 33, scale=1.0)
    x = torch.where(x > 0, 1e4, -1e4) * torch.rand_like(x).round()
    softcap = 30.0 if capped else None
    loss, grad = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-4, softcap=softcap, block_size=8)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1, z_loss=1e-4, softcap=softcap)
    assert torch.all(torch.isfinite(loss[y != IGNORE])) and torch.all(torch.isfinite(grad))
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("block_size", [None, 16])
def test_ce_strided_rows_without_copy(inplace, block_size):
    g = torch.Generator().manual_seed(3)
    big = (torch.randn(6, 2 * 37 + 5, generator=g) * 3).to(DEVICE)
    x = big[:, 3:40]
    assert x.stride() == (79, 1)
    y = torch.randint(0, 37, (6,), generator=g).to(DEVICE)
    before = big.clone()
    ref_loss, ref_grad = ce_reference(x, y, eps=0.1, z_loss=0.01)
    loss, grad = ce_fwd(x, y, eps=0.1, z_loss=0.01, inplace=inplace, block_size=block_size)
    assert_matches(loss, ref_loss)
    assert_matches(grad, ref_grad)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, 3:40] = False
    assert torch.equal(big[outside], before[outside])
    if inplace:
        assert grad.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(big, before)


@pytest.mark.parametrize("soft", [False, True])
def test_ce_inplace_writes_the_same_bits_into_the_logits(soft):
    x, y, weight = make_ce_case(6, 45, dtype=torch.bfloat16, soft=soft)
    want_loss, want_grad = ce_fwd(x, y, weight, eps=0.1, softcap=10.0, soft=soft, block_size=16)
    buf = x.clone()
    loss, grad = ce_fwd(buf, y, weight, eps=0.1, softcap=10.0, soft=soft, block_size=16,
                        inplace=True)
    assert grad is buf
    assert torch.equal(loss, want_loss) and torch.equal(buf, want_grad)


def test_ce_need_grad_false():
    x, y, weight = make_ce_case(6, 37)
    before = x.clone()
    loss, grad = ce_fwd(x, y, weight, eps=0.1, need_grad=False, inplace=True, block_size=16)
    assert grad is None and torch.equal(x, before)
    assert torch.equal(loss, ce_fwd(x, y, weight, eps=0.1, block_size=16)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", [
    (False, False, False, False, False),
    (True, True, False, False, False),
    (False, True, True, True, False),
    (True, True, False, False, True),
])
def test_ce_low_precision_error_rule(dtype, weighted, smooth, zloss, capped, soft):
    x, y, weight = make_ce_case(8, 300, dtype=dtype, soft=soft, scale=4.0, seed=5)
    kwargs = dict(eps=0.1 if smooth else 0.0, z_loss=0.02 if zloss else 0.0,
                  softcap=6.0 if capped else None, soft=soft)
    w = weight if weighted else None
    loss, grad = ce_fwd(x, y, w, block_size=128, **kwargs)
    assert grad.dtype == dtype
    ref_loss, ref_grad = ce_reference(x, y, w, **kwargs)
    low_loss, low_grad = ce_reference(x, y, w, dtype=dtype, **kwargs)
    assert_low_precision_rule(loss, low_loss, ref_loss, "loss")
    assert_low_precision_rule(grad, low_grad, ref_grad, "grad")


def test_ce_target_column_kept_in_fp32():
    # p_y within 2**-12 of 1: bf16 rounding of p_y before subtracting 1 would give 0
    x = torch.zeros(4, 64, dtype=torch.bfloat16, device=DEVICE)
    y = torch.tensor([0, 5, 17, 63], device=DEVICE)
    x[torch.arange(4), y] = 14.0
    _, grad = ce_fwd(x, y)
    _, ref_grad = ce_reference(x, y)
    got, want = grad[torch.arange(4), y].double(), ref_grad[torch.arange(4), y]
    assert torch.all(got < 0)
    assert torch.all((got - want).abs() <= 2 ** -8 * want.abs())


def test_ce_deterministic():
    x, y, weight = make_ce_case(6, 1000, dtype=torch.bfloat16, scale=4.0)
    a = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, softcap=20.0, block_size=128)
    b = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, softcap=20.0, block_size=128)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ce_block_size_must_be_power_of_two():
    x, y, _ = make_ce_case(2, 10)
    with pytest.raises(ValueError, match="block_size"):
        ce_fwd(x, y, block_size=24)


# ----------------------------------------------------------------------------- softmax focal

def focal_fwd(x, y, alpha=None, scale=1.0, *, gamma=2.0, eps=0.0, need_grad=True,
              block_size=None):
    return tb.focal_loss_fwd(x, y, alpha, _scales(scale, 1.0), gamma=gamma, ignore_index=IGNORE,
                             label_smoothing=eps, need_grad=need_grad, block_size=block_size)


def focal_reference(x, y, alpha=None, scale=1.0, *, gamma=2.0, eps=0.0, dtype=torch.float64):
    """SPEC: loss_i = -sum_c alpha_c*q_c*(1-p_c)^gamma*log p_c, q = (1-eps)*onehot + eps/C.
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
    low_loss, low_grad = focal_reference(x, y, alpha, gamma=2.0, eps=eps, dtype=dtype)
    assert_low_precision_rule(loss, low_loss, ref_loss, "loss")
    assert_low_precision_rule(grad, low_grad, ref_grad, "grad")


def test_focal_deterministic():
    x, y, alpha = make_ce_case(5, 300, dtype=torch.bfloat16)
    a = focal_fwd(x, y, alpha, gamma=0.5, eps=0.1, block_size=64)
    b = focal_fwd(x, y, alpha, gamma=0.5, eps=0.1, block_size=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- sigmoid focal

def sigmoid_fwd(x, t, scale=1.0, *, alpha=0.25, gamma=2.0, eps=0.0, reduce=False,
                need_grad=True, block_size=None):
    return tb.sigmoid_focal_loss_fwd(x, t, _scales(scale, 1.0), alpha=alpha, gamma=gamma,
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
    low_loss, low_grad = sigmoid_reference(x, t, eps=0.1, dtype=dtype)
    assert_low_precision_rule(loss, low_loss, ref_loss, "loss")
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


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedopt.backends.triton import cross_entropy as ce, focal as fo

def build(kernel, types, consts, num_warps):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    # what the JIT assumes at launch for 16-aligned pointers and sizes divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or sig[n] in ("i32", "i64")}
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps}).asm["ptx"]
    assert "ld.global.v4" in ptx, kernel.__name__ + ": loads not vectorised"

floats = {"smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "gamma": "fp32", "alpha": "fp32"}
ce_types = dict(floats, logits_ptr="*bf16", target_ptr="*i64", weight_ptr="*fp32", scales_ptr="*fp32",
                loss_ptr="*fp32", grad_ptr="*bf16", logits_stride="i64", target_stride="i64",
                grad_stride="i64")
flags = ["HAS_WEIGHT", "SMOOTHING", "Z_LOSS", "SOFTCAP", "SOFT_TARGET", "NEED_GRAD", "SINGLE_BLOCK"]
for values in [(0, 0, 0, 0, 0, 1, 0), (1, 1, 1, 1, 0, 1, 1), (1, 1, 1, 1, 1, 1, 0)]:
    consts = dict(zip(flags, map(bool, values)), BLOCK=ce.MAX_BLOCK)
    types = dict(ce_types, target_ptr="*bf16") if consts["SOFT_TARGET"] else ce_types
    build(ce._cross_entropy_kernel, types, consts, ce.num_warps_for(ce.MAX_BLOCK))
fo_types = dict(floats, logits_ptr="*fp16", target_ptr="*u8", alpha_ptr="*fp32", scales_ptr="*fp32",
                loss_ptr="*fp32", grad_ptr="*fp16", logits_stride="i64", grad_stride="i64")
for smoothing in (False, True):
    consts = dict(BLOCK=ce.MAX_BLOCK, HAS_ALPHA=True, SMOOTHING=smoothing, NEED_GRAD=True,
                  SINGLE_BLOCK=False)
    build(fo._focal_kernel, fo_types, consts, ce.num_warps_for(ce.MAX_BLOCK))
sig_types = dict(floats, logits_ptr="*bf16", target_ptr="*bf16", scales_ptr="*fp32", loss_ptr="*fp32",
                 grad_ptr="*bf16", n_elements="i64")
consts = dict(BLOCK=fo.SIGMOID_BLOCK, HAS_ALPHA=True, SMOOTHING=True, REDUCE=True, NEED_GRAD=True)
build(fo._sigmoid_focal_kernel, sig_types, consts, 8)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter checks no types; compile the main variants for an H100 (needs no GPU:
    Triton ships ptxas) and check the loads are 128-bit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip(f"no ptxas to compile Triton kernels here: {run.stderr[-300:]}")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
