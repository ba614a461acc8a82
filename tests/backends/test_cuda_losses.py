"""The `cuda` backend's cross-entropy kernel (csrc/cuda/cross_entropy.cu), called through
its launcher (fusedopt/backends/cuda/losses.py) on CUDA tensors, against F.cross_entropy in
float64: every flag of the losses (class weights, ignore_index, label smoothing, soft targets,
z-loss, soft-capping), int64/int32/uint8 targets; bf16/fp16 gradients by flash-attention's
rule, the fp32 row losses at fp32 tolerance whatever the logits' dtype.
Shapes that break kernels: C = 1, 3, 4097, 32000, 50257, 128256 and both sides of the row-cache
limit, strided and misaligned rows, more rows than blocks. Every test is marked `gpu`:
without a CUDA device they are skipped with the reason (tests/conftest.py). The focal
losses and scale_grad: test_cuda_focal.py; the CPU-runnable checks of the bindings:
test_cuda_loss_bindings.py. The kernel boundary of the launcher: test_loss_boundary.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule, ce_reference,
                              make_ce_case, same_bits)
from cuda_loss_helpers import BF16, DEV, F16, F32, cuda  # noqa: F401  (fixture)
from cuda_loss_helpers import device_scales as _scales
from gpu_stream_helpers import nan_like, run_on_a_held_up_stream

pytestmark = pytest.mark.gpu


def _ce(cuda, x, y, weight=None, sc=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
        inplace=False, need_grad=True, ignore_index=IGNORE):
    """The cuda entry point on copies of CPU tensors (or on CUDA tensors as they are);
    results back on the CPU."""
    loss, grad = cuda.cross_entropy_fwd(
        x.to(DEV), y.to(DEV), None if weight is None else weight.to(DEV),
        _scales() if sc is None else sc, ignore_index=ignore_index, label_smoothing=eps,
        z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace, need_grad=need_grad)
    assert loss.dtype == F32 and loss.shape == (x.shape[0],)
    return loss.cpu(), None if grad is None else grad.cpu()


def _check_ce(cuda, x, y, weight=None, sc=(1.0, 1.0), **kw):
    loss, grad = _ce(cuda, x, y, weight, _scales(*sc), **kw)
    ref_loss, ref_grad = ce_reference(x.cpu(), y.cpu(), None if weight is None else weight.cpu(),
                                      sc, **kw)
    assert grad.dtype == x.dtype
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


# ----------------------------------------------------------------------------- cross-entropy

FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS,
                         ids=["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl))
                              for fl in FLAGS])
@pytest.mark.parametrize("c", [37, 20001])  # cached / not cached in fp32
def test_cross_entropy_every_flag(cuda, weighted, smooth, zloss, capped, soft, c):
    x, y, weight = make_ce_case(6, c, soft=soft)
    _check_ce(cuda, x, y, weight if weighted else None, (0.7, 1.3), eps=0.1 if smooth else 0.0,
              z_loss=0.05 if zloss else 0.0, softcap=4.0 if capped else None, soft=soft)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,smooth", [(False, 0.0), (True, 0.0), (True, 0.2), (False, 0.3)])
def test_public_cross_entropy_matches_torch(cuda, reduction, weighted, smooth):
    """fo.cross_entropy(backend='cuda'): value and gradient equal F.cross_entropy's
    (through the Function, the scales of 'mean' and scale_grad_ in backward)."""
    x, y, weight = make_ce_case(12, 301)
    w = weight.to(DEV) if weighted else None
    theirs = x.to(DEV, torch.float64).requires_grad_()
    ours = x.to(DEV).requires_grad_()
    got = fo.cross_entropy(ours, y.to(DEV), w, reduction=reduction, label_smoothing=smooth,
                           backend="cuda")
    want = F.cross_entropy(theirs, y.to(DEV), None if w is None else w.double(),
                           reduction=reduction, label_smoothing=smooth)
    upstream = torch.rand_like(want) + 0.5
    (got * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    assert_close(got.detach().cpu(), want.detach().cpu(), what="loss")
    assert_close(ours.grad.cpu(), theirs.grad.cpu(), what="grad")


@pytest.mark.parametrize("index_dtype,ignore", [(torch.int64, 7), (torch.int32, -1),
                                                (torch.int32, IGNORE), (torch.uint8, 255),
                                                (torch.uint8, 3)])
def test_cross_entropy_target_dtypes_and_ignore_index(cuda, index_dtype, ignore):
    """int64/int32/uint8 targets; ignore_index a negative value, -100, 255 or a real class."""
    x, y, weight = make_ce_case(16, 200, ignore_row=None)
    y[[2, 5, 11]] = ignore
    ignored = y == ignore
    loss, grad = _ce(cuda, x, y.to(index_dtype), weight, eps=0.1, z_loss=1e-2,
                     ignore_index=ignore)
    # torch's reference with the same rows ignored (its ignore_index spelled IGNORE)
    ref_loss, ref_grad = ce_reference(x, torch.where(ignored, IGNORE, y), weight, eps=0.1,
                                      z_loss=1e-2)
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("c", [1, 3, 4097, 16384, 16385, 32000, 32768, 32769, 50257, 128256])
def test_cross_entropy_vocab_sizes(cuda, c, dtype):
    """Both sides of the row-cache limit of each dtype, and the large vocabularies."""
    n = 3 if c > 5000 else 9
    x, y, weight = make_ce_case(n, c, spread=4.0, ignore_row=None, dtype=dtype)
    y[0] = c - 1  # the last class: the tail of the row
    kw = dict(eps=0.2, z_loss=1e-3)
    if dtype == F32:
        _check_ce(cuda, x, y, weight, **kw)
        return
    loss, grad = _ce(cuda, x, y, weight, **kw)
    ref_loss, ref_grad = ce_reference(x, y, weight, **kw)
    _, low_grad = ce_reference(x.to(DEV), y.to(DEV), weight.to(DEV), dtype=dtype, **kw)
    assert_close(loss, ref_loss, what="loss (fp32 row losses)")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("c", [37, 4096, 20001, 40000])
def test_cross_entropy_misaligned_rows_take_the_scalar_path(cuda, dtype, c):
    base, y, weight = make_ce_case(5, c + 1, ignore_row=None, dtype=dtype)
    y = y.clamp_max(c - 1)
    weight = weight[:c]
    x = base.to(DEV)[:, 1:]  # rows start one element past a 16-byte boundary, stride c + 1
    for soft in (False, True):
        target = torch.softmax(torch.randn(5, c), 1).to(dtype) if soft else y
        kw = dict(eps=0.1, softcap=8.0, soft=soft)
        loss, grad = _ce(cuda, x, target, weight, **kw)
        ref_loss, ref_grad = ce_reference(base[:, 1:], target, weight, **kw)
        if dtype == F32:
            assert_close(loss, ref_loss, what="loss")
            assert_close(grad, ref_grad, what="grad")
        else:
            _, low_grad = ce_reference(x, target.to(DEV), weight.to(DEV), dtype=dtype, **kw)
            assert_close(loss, ref_loss, what="loss (fp32 row losses)")
            assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


@pytest.mark.parametrize("c", [300, 20000])
def test_cross_entropy_strided_rows_without_copy(cuda, c):
    """Rows 2 (C + 8) apart (big[::2, :C]): read where they are; in place, the gradient
    lands in those rows and nothing between them changes."""
    big = torch.randn(12, c + 8, device=DEV) * 3
    x = big[::2, :c]
    y = torch.randint(0, c, (6,), device=DEV)
    y[4] = IGNORE
    ref_loss, ref_grad = ce_reference(x.cpu(), y.cpu(), eps=0.1, z_loss=1e-2)
    loss, grad = _ce(cuda, x, y, eps=0.1, z_loss=1e-2)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")
    before = big.clone()
    _, grad_inplace = cuda.cross_entropy_fwd(x, y, None, _scales(), ignore_index=IGNORE,
                                             label_smoothing=0.1, z_loss=1e-2, softcap=None,
                                             soft_target=False, inplace=True, need_grad=True)
    assert grad_inplace.data_ptr() == x.data_ptr() and grad_inplace.stride() == x.stride()
    assert same_bits(grad_inplace.cpu(), grad)
    assert same_bits(big[1::2].cpu(), before[1::2].cpu())
    assert same_bits(big[::2, c:].cpu(), before[::2, c:].cpu())


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_cross_entropy_out_of_range_targets_give_nan_rows(cuda, index_dtype):
    x, y, weight = make_ce_case(6, 50, ignore_row=None)
    bad = [1, 2, 4]
    y[1], y[2], y[4] = 50, -7, (2**40 if index_dtype == torch.int64 else 2**31 - 1)
    for soft_cap in (None, 5.0):
        loss, grad = _ce(cuda, x, y.to(index_dtype), weight, eps=0.1, softcap=soft_cap)
        assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
        good = [0, 3, 5]
        ref_loss, ref_grad = ce_reference(x[good], y[good], weight, eps=0.1, softcap=soft_cap)
        assert_close(loss[good], ref_loss, what="loss")
        assert_close(grad[good], ref_grad, what="grad")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("c", [300, 20000, 40000])
def test_cross_entropy_inplace_and_repeat_give_the_same_bits(cuda, dtype, c):
    for soft in (False, True):
        x, y, weight = make_ce_case(5, c, dtype=dtype, soft=soft)
        kw = dict(eps=0.1, softcap=10.0, soft=soft)
        loss, grad = _ce(cuda, x, y, weight, **kw)
        loss2, grad2 = _ce(cuda, x, y, weight, **kw)
        xd = x.to(DEV)
        loss3, grad3 = cuda.cross_entropy_fwd(
            xd, y.to(DEV), weight.to(DEV), _scales(), ignore_index=IGNORE, label_smoothing=0.1,
            z_loss=0.0, softcap=10.0, soft_target=soft, inplace=True, need_grad=True)
        assert grad3.data_ptr() == xd.data_ptr()
        assert same_bits(loss, loss2) and same_bits(grad, grad2)
        assert same_bits(loss, loss3.cpu()) and same_bits(grad, grad3.cpu())


def test_cross_entropy_more_rows_than_blocks(cuda):
    """2^20 + 5 rows: the grid stops at 2^20 blocks and walks the rest (grid-stride)."""
    n, c = (1 << 20) + 5, 5
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(n, c, device=DEV, generator=g)
    y = torch.randint(0, c, (n,), device=DEV, generator=g)
    y[-3] = IGNORE
    loss, grad = cuda.cross_entropy_fwd(x, y, None, _scales(), ignore_index=IGNORE,
                                        label_smoothing=0.0, z_loss=0.0, softcap=None,
                                        soft_target=False, inplace=False, need_grad=True)
    xr = x.double().requires_grad_()
    ref = F.cross_entropy(xr, y, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_extreme_logits(cuda):
    """-inf logits (not the target), +-1e4, and a row of equal large values."""
    x = torch.randn(4, 600) * 2
    x[0, :300] = float("-inf")
    x[1, ::3] = 1e4
    x[2, 1::3] = -1e4
    x[3] = 3e4
    y = torch.tensor([400, 3, 1, 599])
    _check_ce(cuda, x, y, z_loss=1e-4)
    _check_ce(cuda, x[1:], y[1:], eps=0.1, softcap=30.0)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", ["plain", "smooth_z", "softcap", "soft"])
def test_cross_entropy_low_precision(cuda, dtype, case):
    soft = case == "soft"
    x, y, weight = make_ce_case(8, 5000, dtype=dtype, spread=4.0, soft=soft)
    kw = {"plain": {}, "smooth_z": dict(eps=0.1, z_loss=1e-3), "softcap": dict(softcap=6.0),
          "soft": dict(soft=True, eps=0.05)}[case]
    loss, grad = _ce(cuda, x, y, weight, **kw)
    ref_loss, ref_grad = ce_reference(x, y, weight, **kw)
    _, low_grad = ce_reference(x.to(DEV), y.to(DEV), weight.to(DEV), dtype=dtype, **kw)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, what="loss (fp32 row losses)")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


def test_cross_entropy_target_gradient_stays_fp32_until_the_store(cuda):
    """p_y = 0.9939 in bf16 logits: p_y - 1 formed in fp32 and rounded once is within one
    bf16 rounding of the exact value; p_y rounded to bf16 first (0.9922 or 0.9961) would be
    off by 28% or more."""
    x = torch.zeros(2, 1000)
    x[:, 17] = 12.0
    y = torch.tensor([17, 17])
    _, grad = _ce(cuda, x.bfloat16(), y)
    _, ref_grad = ce_reference(x.bfloat16(), y)
    torch.testing.assert_close(grad[:, 17].double(), ref_grad[:, 17], rtol=2.0**-8, atol=0)


def test_cross_entropy_loss_only_and_scales_from_the_device(cuda):
    x, y, weight = make_ce_case(6, 999)
    loss, grad = _ce(cuda, x, y, weight, _scales(0.25, 3.0), eps=0.1, z_loss=0.01,
                     need_grad=False)
    assert grad is None
    assert_close(loss, ce_reference(x, y, weight, (0.25, 3.0), eps=0.1, z_loss=0.01)[0],
                 what="loss")


@pytest.mark.parametrize("c", [300, 20001])  # cached / not cached in fp32
@pytest.mark.parametrize("kind", ["equal_1e30", "offset_1e6"])
@pytest.mark.parametrize("soft", [False, True], ids=["smoothing", "soft"])
def test_cross_entropy_large_logits_relative_to_the_max(cuda, kind, soft, c):
    """Soft targets and smoothing on rows of equal logits 1e30 or logits offset by 1e6: the
    weighted sums are taken relative to the row max (lse * sum w - sum w x cancelled), in
    the gradient pass, in place, and in the loss-only pass, from the row cache or not."""
    x, y, weight = make_ce_case(4, c, soft=soft)
    x = torch.full_like(x, 1e30) if kind == "equal_1e30" else x + 1e6
    for w in (None, weight):
        ref_loss, ref_grad = ce_reference(x, y, w, eps=0.1, soft=soft)
        for inplace in (False, True):
            loss, grad = _ce(cuda, x.clone(), y, w, eps=0.1, soft=soft, inplace=inplace)
            assert_close(loss, ref_loss, what=f"loss, in place: {inplace}")
            assert_close(grad, ref_grad, what=f"grad, in place: {inplace}")
        loss, none = _ce(cuda, x, y, w, eps=0.1, soft=soft, need_grad=False)
        assert none is None
        assert_close(loss, ref_loss, what="loss without a gradient")


def test_cross_entropy_all_ignored_and_inf_scale(cuda):
    """Every row ignored: zero losses and gradient, even with the inf scale of 'mean'."""
    x, _, weight = make_ce_case(4, 70)
    y = torch.full((4,), IGNORE)
    loss, grad = _ce(cuda, x, y, weight, _scales(float("inf"), float("inf")), eps=0.1)
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_cross_entropy_runs_on_the_current_stream(cuda):
    """The logits hold NaN until a held-up side stream writes them and launches the kernel
    (gpu_stream_helpers.py): a launch on any other stream would give NaN."""
    x, y, weight = make_ce_case(64, 3000)
    src, yd, wd, scales = x.to(DEV), y.to(DEV), weight.to(DEV), _scales()
    xd = nan_like(src)
    loss, grad = run_on_a_held_up_stream(
        lambda: xd.copy_(src),
        lambda: cuda.cross_entropy_fwd(xd, yd, wd, scales, ignore_index=IGNORE,
                                       label_smoothing=0.1, z_loss=0.0, softcap=None,
                                       soft_target=False, inplace=False, need_grad=True))
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")


def test_second_device(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda", 1)
    x, y, weight = make_ce_case(8, 20000)
    loss, grad = cuda.cross_entropy_fwd(x.to(dev), y.to(dev), weight.to(dev),
                                        _scales(device=dev), ignore_index=IGNORE,
                                        label_smoothing=0.1, z_loss=0.0, softcap=None,
                                        soft_target=False, inplace=False, need_grad=True)
    assert loss.device == dev and grad.device == dev
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")
