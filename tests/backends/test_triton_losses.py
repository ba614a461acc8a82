"""The Triton cross-entropy entry point, called directly, against F.cross_entropy (reduction
'none', autograd for the gradient) and independent torch formulas for z-loss and
soft-capping; plus a compile check of every Triton loss kernel for sm_90.

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

from _subprocess import OUTSIDE
from fusedopt import backends

_OK, _REASON = backends.status("triton")
if not _OK:
    pytest.skip(f"triton backend cannot run here: {_REASON}", allow_module_level=True)

from triton_loss_helpers import (DEVICE, IGNORE,  # noqa: E402
                                 assert_low_precision_rule, assert_matches, ce_fwd,
                                 ce_reference, make_ce_case, scales_tensor)

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
    loss, grad = ce_fwd(x, y, w, scales_tensor(0.7, 1.3), block_size=block_size, **kwargs)
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
    loss, grad = ce_fwd(x, y, weight, scales_tensor(inf, inf), eps=0.1, z_loss=0.1,
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
        scales = scales_tensor(1 / 8, 1 / 8)
        n_valid = 8
    else:
        valid = y != IGNORE
        n_valid = int(valid.sum())
        scales = scales_tensor(1 / weight[y[valid]].sum().item(), 1 / n_valid)
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
    _, low_grad = ce_reference(x, y, w, dtype=dtype, **kwargs)
    assert loss.dtype == torch.float32
    assert_matches(loss, ref_loss)  # fp32 row losses: fp32 tolerance
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

floats = {"smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32", "gamma": "fp32",
          "alpha": "fp32"}
ce_types = dict(floats, logits_ptr="*bf16", target_ptr="*i64", weight_ptr="*fp32",
                scales_ptr="*fp32", loss_ptr="*fp32", grad_ptr="*bf16", logits_stride="i64",
                target_stride="i64",
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
sig_types = dict(floats, logits_ptr="*bf16", target_ptr="*bf16", scales_ptr="*fp32",
                 loss_ptr="*fp32", grad_ptr="*bf16", n_elements="i64")
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
                         text=True, timeout=300, cwd=OUTSIDE)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip(f"no ptxas to compile Triton kernels here: {run.stderr[-300:]}")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
