"""The `cuda` backend's loss kernels (csrc/cuda), called through their launchers on CUDA
tensors, against PyTorch: F.cross_entropy / the written-out focal formulas in float64 (the
references of the cpu kernel tests). bf16 by flash-attention's rule. The optimizer kernels
are tested in test_cuda_optim.py. Every test is marked `gpu`: without a CUDA device they
are skipped with the reason (tests/conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedopt import backends
from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule, ce_reference,
                              focal_reference, make_ce_case, same_bits,
                              sigmoid_focal_reference)

pytestmark = pytest.mark.gpu

F32 = torch.float32


@pytest.fixture(scope="module")
def cuda():
    ok, reason = backends.status("cuda")
    if not ok:
        pytest.skip(f"backend 'cuda' cannot run here: {reason}")
    from fusedopt.backends import cuda as module
    return module


DEV = "cuda"


def _scales(ce=1.0, z=1.0):
    return torch.tensor([ce, z], dtype=F32, device=DEV)


def _ce(cuda, x, y, weight=None, sc=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
        inplace=False, need_grad=True, ignore_index=IGNORE):
    loss, grad = cuda.cross_entropy_fwd(
        x.to(DEV), y.to(DEV), None if weight is None else weight.to(DEV),
        _scales() if sc is None else sc, ignore_index=ignore_index, label_smoothing=eps,
        z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace, need_grad=need_grad)
    return loss.cpu(), None if grad is None else grad.cpu()


# ----------------------------------------------------------------------------- cross-entropy

FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS,
                         ids=["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl))
                              for fl in FLAGS])
def test_cross_entropy_every_flag(cuda, weighted, smooth, zloss, capped, soft):
    x, y, weight = make_ce_case(6, 37, soft=soft)
    kw = dict(eps=0.1 if smooth else 0.0, z_loss=0.05 if zloss else 0.0,
              softcap=4.0 if capped else None, soft=soft)
    w = weight if weighted else None
    loss, grad = _ce(cuda, x, y, w, _scales(0.7, 1.3), **kw)
    ref_loss, ref_grad = ce_reference(x, y, w, (0.7, 1.3), **kw)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("c", [1, 3, 16, 4097, 12032, 12033, 32000, 50257, 128256])
@pytest.mark.parametrize("smooth", [False, True])
def test_cross_entropy_vocab_sizes(cuda, c, smooth):
    n = 3 if c > 5000 else 9
    x, y, weight = make_ce_case(n, c, spread=4.0, ignore_row=None)
    loss, grad = _ce(cuda, x, y, weight, eps=0.2 if smooth else 0.0, z_loss=1e-3)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.2 if smooth else 0.0, z_loss=1e-3)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("c", [37, 4096, 20001])
def test_cross_entropy_misaligned_rows_take_the_scalar_path(cuda, c):
    base, y, _ = make_ce_case(5, c + 1, ignore_row=None)
    y = y.clamp_max(c - 1)
    x = base.to(DEV)[:, 1:]  # rows start 4 bytes past a 16-byte boundary, stride c + 1
    loss, grad = cuda.cross_entropy_fwd(x, y.to(DEV), None, _scales(), ignore_index=IGNORE,
                                        label_smoothing=0.1, z_loss=0.0, softcap=None,
                                        soft_target=False, inplace=False, need_grad=True)
    ref_loss, ref_grad = ce_reference(base[:, 1:], y, eps=0.1)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")


def test_cross_entropy_out_of_range_targets_give_nan_rows(cuda):
    x, y, weight = make_ce_case(4, 50, ignore_row=None)
    y[1], y[2] = 50, -7
    loss, grad = _ce(cuda, x, y, weight, eps=0.1)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[2]).all()
    ref_loss, ref_grad = ce_reference(x[[0, 3]], y[[0, 3]], weight, eps=0.1)
    assert_close(loss[[0, 3]], ref_loss, what="loss")
    assert_close(grad[[0, 3]], ref_grad, what="grad")


@pytest.mark.parametrize("c", [300, 20000])
def test_cross_entropy_inplace_and_repeat_give_the_same_bits(cuda, c):
    x, y, weight = make_ce_case(5, c)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, softcap=10.0)
    loss2, grad2 = _ce(cuda, x, y, weight, eps=0.1, softcap=10.0)
    xd = x.to(DEV)
    loss3, grad3 = cuda.cross_entropy_fwd(xd, y.to(DEV), weight.to(DEV), _scales(),
                                          ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.0,
                                          softcap=10.0, soft_target=False, inplace=True,
                                          need_grad=True)
    assert grad3.data_ptr() == xd.data_ptr()
    assert same_bits(loss, loss2) and same_bits(grad, grad2)
    assert same_bits(loss, loss3.cpu()) and same_bits(grad, grad3.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision(cuda, dtype):
    x, y, weight = make_ce_case(8, 5000, dtype=dtype, spread=4.0)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, z_loss=1e-3)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1, z_loss=1e-3)
    low_loss, low_grad = ce_reference(x.to(DEV), y.to(DEV), weight.to(DEV), eps=0.1,
                                      z_loss=1e-3, dtype=dtype)
    assert grad.dtype == dtype
    assert_lowp_rule(loss, ref_loss, low_loss.cpu(), dtype, what="loss")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


def test_cross_entropy_loss_only(cuda):
    x, y, weight = make_ce_case(6, 999)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, need_grad=False)
    assert grad is None
    assert_close(loss, ce_reference(x, y, weight, eps=0.1)[0], what="loss")


# ----------------------------------------------------------------------------- focal losses

@pytest.mark.parametrize("c", [1, 7, 4097, 32000])
@pytest.mark.parametrize("gamma,smooth,with_alpha", [(2.0, 0.0, False), (0.5, 0.1, True),
                                                     (0.0, 0.0, True), (2.0, 0.2, False)])
def test_focal_loss(cuda, c, gamma, smooth, with_alpha):
    n = 4 if c > 5000 else 10
    x, y, _ = make_ce_case(n, c, spread=3.0)
    y[0] = min(3, c - 1)
    alpha = torch.rand(c) + 0.25 if with_alpha else None
    loss, grad = cuda.focal_loss_fwd(
        x.to(DEV), y.to(DEV), None if alpha is None else alpha.to(DEV), _scales(0.5, 1.0),
        gamma=gamma, ignore_index=IGNORE, label_smoothing=smooth, need_grad=True)
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma, smooth, scale=0.5)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")


def test_focal_loss_out_of_range_and_ignored_rows(cuda):
    x, y, _ = make_ce_case(4, 20, ignore_row=None)
    y[1], y[2] = IGNORE, 20
    loss, grad = cuda.focal_loss_fwd(x.to(DEV), y.to(DEV), None, _scales(), gamma=2.0,
                                     ignore_index=IGNORE, label_smoothing=0.0, need_grad=True)
    loss, grad = loss.cpu(), grad.cpu()
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("n", [1, 4095, 4096, 3 * 4096 + 5])
def test_sigmoid_focal_loss(cuda, reduce, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    t = (torch.rand(n, generator=g) < 0.3).float()
    loss, grad = cuda.sigmoid_focal_loss_fwd(x.to(DEV), t.to(DEV), _scales(0.25, 1.0),
                                             alpha=0.25, gamma=2.0, label_smoothing=0.1,
                                             reduce=reduce, need_grad=True)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, 0.25, 2.0, 0.1, scale=0.25)
    assert_close(grad.cpu(), ref_grad, what="grad")
    if reduce:
        assert loss.numel() == -(-n // cuda.SIGMOID_FOCAL_SPAN)
        assert_close(loss.sum().cpu(), ref_loss.sum(), rtol=1e-5, what="loss")
    else:
        assert_close(loss.cpu(), ref_loss, what="loss")


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_scale_grad(cuda, dtype):
    g = torch.randn(10_001, device=DEV).to(dtype)
    before = g.clone()
    cuda.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert same_bits(g, before)
    cuda.scale_grad_(g, torch.tensor(0.37, device=DEV))
    assert same_bits(g, (before.float() * 0.37).to(dtype))
