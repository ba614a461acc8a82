"""The `cpu` cross-entropy entry point (C++ kernels of csrc/cpu), called directly, against
F.cross_entropy in float64 (reduction='none', autograd for the gradient) and independent
torch formulas for z-loss and soft-capping; bf16/fp16 gradients by flash-attention's rule
(the fp32 row losses at fp32 tolerance); the shapes that break kernels (one class, odd and
vector-unaligned class counts, strided rows); thread-count independence and determinism.
Focal and sigmoid focal: test_cpu_focal.py."""

import itertools

import pytest
import torch

from fusedopt import backends

_OK, _REASON = backends.status("cpu")
if not _OK:
    pytest.skip(f"cpu backend cannot run here: {_REASON}", allow_module_level=True)

from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule, ce_fwd,  # noqa: E402
                              ce_reference, make_ce_case, same_bits, scales)

FLAGS = list(itertools.product([False, True], repeat=5))
FLAG_IDS = ["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl)) for fl in FLAGS]


def _case_kwargs(smooth, zloss, capped, soft):
    return dict(eps=0.1 if smooth else 0.0, z_loss=0.05 if zloss else 0.0,
                softcap=4.0 if capped else None, soft=soft)


@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS, ids=FLAG_IDS)
def test_every_flag_combination(weighted, smooth, zloss, capped, soft):
    x, y, weight = make_ce_case(6, 37, soft=soft)
    kwargs = _case_kwargs(smooth, zloss, capped, soft)
    w = weight if weighted else None
    loss, grad = ce_fwd(x, y, w, scales(0.7, 1.3), **kwargs)
    ref_loss, ref_grad = ce_reference(x, y, w, (0.7, 1.3), **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == (6,)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")
    if not soft:
        assert loss[1].item() == 0.0 and torch.all(grad[1] == 0)


@pytest.mark.parametrize("c", [1, 15, 16, 17, 1000, 4099, 32003])
@pytest.mark.parametrize("smooth", [False, True])
def test_odd_vocab_sizes(c, smooth):
    n = 3 if c > 5000 else 8
    x, y, weight = make_ce_case(n, c, spread=4.0, ignore_row=None)
    eps = 0.2 if smooth else 0.0
    loss, grad = ce_fwd(x, y, weight, eps=eps, z_loss=1e-3)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=eps, z_loss=1e-3)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


def test_single_row_large_vocab_soft_capped():
    x, y, _ = make_ce_case(1, 32003, spread=20.0, ignore_row=None)
    loss, grad = ce_fwd(x, y, eps=0.1, softcap=30.0, z_loss=1e-4)
    ref_loss, ref_grad = ce_reference(x, y, eps=0.1, softcap=30.0, z_loss=1e-4)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


def test_all_rows_ignored_never_touch_an_infinite_scale():
    x, _, weight = make_ce_case(5, 50)
    y = torch.full((5,), IGNORE)
    loss, grad = ce_fwd(x, y, weight, scales(float("inf"), float("inf")), eps=0.1, z_loss=0.1)
    assert torch.equal(loss, torch.zeros(5))
    assert torch.equal(grad, torch.zeros_like(x))


def test_other_ignore_index_and_target_dtypes():
    x, y, weight = make_ce_case(7, 40, ignore_row=None)
    y[2] = 3
    loss64, grad64 = ce_fwd(x, y, weight, eps=0.1, ignore_index=3)
    assert loss64[2] == 0 and torch.all(grad64[2] == 0)
    for dtype in (torch.int32, torch.uint8):
        loss, grad = ce_fwd(x, y.to(dtype), weight, eps=0.1, ignore_index=3)
        assert torch.equal(loss, loss64) and torch.equal(grad, grad64), dtype


def test_out_of_range_targets_give_nan_rows_only():
    x, y, _ = make_ce_case(6, 20, ignore_row=None)
    y[1], y[4] = 20, -3
    loss, grad = ce_fwd(x, y, eps=0.1)
    bad = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    ref_loss, ref_grad = ce_reference(x[~bad], y[~bad], eps=0.1)
    assert_close(loss[~bad], ref_loss)
    assert_close(grad[~bad], ref_grad)
    # uint8 targets beyond C (but < 256) as well
    loss8, grad8 = ce_fwd(x[:2], torch.tensor([255, 0], dtype=torch.uint8))
    assert torch.isnan(loss8[0]) and not torch.isnan(loss8[1])
    assert torch.isnan(grad8[0]).all() and not torch.isnan(grad8[1]).any()


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("capped", [False, True])
def test_minus_inf_logits(smooth, capped):
    x, y, weight = make_ce_case(4, 33, ignore_row=None)
    x[:, ::3] = float("-inf")
    x[torch.arange(4), y] = 1.0  # finite target logits
    kwargs = dict(eps=0.1 if smooth else 0.0, softcap=5.0 if capped else None)
    loss, grad = ce_fwd(x, y, weight, **kwargs)
    ref_loss, ref_grad = ce_reference(x, y, weight, **kwargs)
    assert_close(loss, ref_loss, what="loss")  # inf with smoothing, as torch
    assert_close(grad, ref_grad, what="grad")
    if not smooth:  # p = 0 exactly there
        assert torch.all(grad[x == float("-inf")] == 0)


@pytest.mark.parametrize("capped", [False, True])
def test_huge_logits(capped):
    x, y, weight = make_ce_case(6, 300, spread=1.0, ignore_row=None)
    x = torch.where(torch.rand(6, 300, generator=torch.Generator().manual_seed(1)) < 0.5,
                    -1e4, 1e4) + x
    kwargs = dict(eps=0.1, z_loss=1e-6, softcap=50.0 if capped else None)
    loss, grad = ce_fwd(x, y, weight, **kwargs)
    ref_loss, ref_grad = ce_reference(x, y, weight, **kwargs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, rtol=1e-5, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_strided_rows_without_copy(inplace, soft):
    big = torch.randn(12, 70, generator=torch.Generator().manual_seed(2)) * 3
    x = big[::2, :53]
    assert x.stride() == (140, 1)
    _, y, weight = make_ce_case(6, 53, soft=soft)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1, soft=soft)
    before = big.clone()
    loss, grad = ce_fwd(x, y, weight, eps=0.1, soft=soft, inplace=inplace)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[::2, :53] = not inplace
    assert torch.equal(big[untouched], before[untouched])  # nothing outside the rows written
    if inplace:
        assert grad.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True])
def test_inplace_writes_the_same_bits(dtype, soft):
    x, y, weight = make_ce_case(9, 1001, dtype=dtype, soft=soft)
    loss, grad = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, softcap=8.0, soft=soft)
    x2 = x.clone()
    loss2, grad2 = ce_fwd(x2, y, weight, eps=0.1, z_loss=1e-3, softcap=8.0, soft=soft,
                          inplace=True)
    assert grad2 is x2
    assert same_bits(loss, loss2) and same_bits(grad, x2)


@pytest.mark.parametrize("soft", [False, True])
def test_need_grad_false_gives_the_same_losses(soft):
    x, y, weight = make_ce_case(6, 130, soft=soft)
    loss, grad = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, soft=soft)
    loss_only, none = ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, soft=soft, need_grad=False)
    assert none is None and same_bits(loss, loss_only)


LOWP = list(itertools.product([torch.bfloat16, torch.float16], [False, True], [False, True],
                              [False, True]))


@pytest.mark.parametrize("dtype,smooth,capped,soft", LOWP,
                         ids=[f"{str(d)[6:]}-{'S' if s else '-'}{'C' if c else '-'}"
                              f"{'T' if t else '-'}" for d, s, c, t in LOWP])
def test_low_precision_error_rule(dtype, smooth, capped, soft):
    x, y, weight = make_ce_case(16, 515, dtype=dtype, soft=soft, spread=4.0)
    kwargs = _case_kwargs(smooth, True, capped, soft)
    loss, grad = ce_fwd(x, y, weight, **kwargs)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    ref_loss, ref_grad = ce_reference(x, y, weight, **kwargs)
    _, low_grad = ce_reference(x, y, weight, **kwargs, dtype=dtype)
    assert_lowp_rule(grad, ref_grad, low_grad, dtype, "grad")
    assert_close(loss, ref_loss, what="loss (fp32 row losses)")


def test_target_column_kept_in_fp32():
    # p_y close to 1: p_y - 1 rounded through bf16 before the subtraction would be 0.
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    x[0, 5], x[1, 7] = 12.0, 9.0
    y = torch.tensor([5, 7])
    _, grad = ce_fwd(x, y)
    _, ref_grad = ce_reference(x, y)
    assert grad[0, 5] != 0 and grad[1, 7] != 0
    assert_close(grad[:, [5, 7]].diagonal(), ref_grad[:, [5, 7]].diagonal(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_and_run_to_run_bitwise_equal(soft, dtype):
    x, y, weight = make_ce_case(67, 1037, dtype=dtype, soft=soft)  # above the parallel cut
    results = [ce_fwd(x, y, weight, eps=0.1, z_loss=1e-3, softcap=9.0, soft=soft, num_threads=t)
               for t in (1, 2, 3, 2)]
    for loss, grad in results[1:]:
        assert same_bits(loss, results[0][0]) and same_bits(grad, results[0][1])
