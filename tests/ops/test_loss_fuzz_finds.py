"""Regression tests of what the fuzz suite (tests/fuzz) found in the losses, through the
public API, against torch (float64) or the documented rule:
- a NaN logit that was the first value one of the cpu kernels' lanes saw was dropped (the
  online log-sum-exp took it for a -inf): the row's loss was finite instead of NaN;
- a +inf logit gave the cpu kernels an infinite loss and a finite gradient where torch
  (and the torch and triton backends) give NaN for the row;
- the `torch` backend's vocab-parallel gradient compared int32/uint8 class targets with an
  ignore_index beyond their range after wrapping it (a target 0 with ignore_index 2**32 was
  treated as ignored), and its soft-capping factor made the gradient of an ignored row
  with a NaN logit NaN;
- fo.vocab_parallel_cross_entropy took z_loss and softcap values the fp32 kernels cannot
  compute right (cross_entropy refuses them);
- a view of a freed storage (as FSDP frees memory) given to a loss: (N, C, d..) inputs were
  read out of bounds by the reshape before any kernel boundary, and the `torch` backend
  read it too; now refused by the public layer (run in a subprocess);
- focal_loss with a zero class weight on a row whose logits are all -inf: the torch and
  cpu backends gave 0 (the zero weight masked the term), triton NaN; the rule is NaN
  (the row's softmax is undefined, as F.cross_entropy's NaN with a zero weight);
- vocab-parallel: a shard whose logits in a row are all NaN was taken for a shard without
  finite logits by the ranks' combination (its NaN exp-sum dropped): a finite row loss."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from loss_helpers import IGNORE

NAN = float("nan")


@pytest.mark.parametrize("gamma", (0.0, 2.0))
def test_focal_row_of_all_minus_inf_logits_is_nan_whatever_its_weights(backend, gamma):
    device = require_op(backend, "focal_loss")
    x = torch.tensor([[float("-inf")] * 3, [0.5, float("-inf"), 1.0]], device=device)
    y = torch.tensor([1, 1], device=device)
    alpha = torch.tensor([1.0, 0.0, 2.0], device=device)
    rows = fo.focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="none", backend=backend)
    # torch: a zero weight does not make an undefined softmax defined
    assert torch.isnan(F.cross_entropy(x[:1].cpu().double(), y[:1].cpu(),
                                       weight=alpha.cpu().double(), reduction="sum"))
    assert torch.isnan(rows[0])
    # a zero-weight class at a -inf logit in a row with finite logits contributes 0
    p = torch.softmax(x[1].double().cpu(), 0)
    assert float(rows[1]) == 0.0 and float(p[1]) == 0.0
    for a in (0.0, None):
        assert torch.isnan(fo.focal_loss(x[:1], y[:1], alpha=a, gamma=gamma, backend=backend))


@pytest.mark.parametrize("column", (0, 5, 16, 17))
def test_nan_logit_first_in_its_lane_gives_a_nan_loss(backend, column):
    """Columns 0 and 16 are the first values of a cpu lane (16 lanes per block)."""
    device = require_op(backend, "cross_entropy")
    n_classes = 20
    x = torch.randn(3, n_classes, generator=torch.Generator().manual_seed(0))
    x[0, column] = NAN
    y = torch.tensor([(column + 1) % n_classes, 2, 3])
    x, y = x.to(device), y.to(device)
    want = F.cross_entropy(x.cpu().double(), y.cpu(), reduction="none")
    assert torch.isnan(want[0]) and torch.isfinite(want[1:]).all()
    for kw in (dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3)):
        got = fo.cross_entropy(x, y, reduction="none", backend=backend, **kw)
        assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all(), (kw, got)
    soft = torch.softmax(torch.randn(3, n_classes), dim=1).to(device)
    got = fo.cross_entropy(x, soft, reduction="none", backend=backend)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all(), got
    got = fo.focal_loss(x, y, reduction="none", backend=backend)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all(), got


@pytest.mark.parametrize("target_on_inf", (False, True))
def test_plus_inf_logit_gives_a_nan_row_as_torch(backend, target_on_inf):
    device = require_op(backend, "cross_entropy")
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    x[0, 3] = float("inf")
    y = torch.tensor([3 if target_on_inf else 7, 2, 3])
    x, y = x.to(device), y.to(device)
    x64 = x.cpu().double().requires_grad_()
    want = F.cross_entropy(x64, y.cpu(), reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    assert torch.isnan(want[0]) and torch.isnan(want_grad[0]).all()
    for kw in (dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3)):
        xg = x.clone().requires_grad_()
        got = fo.cross_entropy(xg, y, reduction="none", backend=backend, **kw)
        (grad,) = torch.autograd.grad(got.sum(), xg)
        assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all(), (kw, got)
        assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1:]).all(), (kw, grad[0])
    got = fo.focal_loss(x, y, reduction="none", backend=backend)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all(), got


@pytest.mark.parametrize("column", (0, 16))
def test_nan_logit_first_in_its_lane_vocab_parallel(backend, column):
    """The vocab-parallel row statistics use the same online log-sum-exp."""
    from vocab_parallel_helpers import emulate, inputs

    device = require_op(backend, "vocab_parallel_cross_entropy")
    from fusedopt import backends

    x, y, w = inputs(device, n_rows=3, n_classes=40)
    x[0, column] = NAN
    y[0] = column + 1
    losses, grad = emulate(backends.get(backend), x, y, None, [0, 20, 40])
    assert torch.isnan(losses[0][0]) and torch.isfinite(losses[0][1:][y[1:] != IGNORE]).all()


@pytest.mark.parametrize("target", (0, 1, 2))
def test_vocab_parallel_shard_of_only_nan_logits_keeps_the_row_nan(backend, target):
    """A shard whose logits in a row are all NaN: the compiled kernels' row max skips NaN
    (-inf), and the combination took the shard for one without finite logits, dropping
    its NaN exp-sum -- the row's loss came out finite (0) where torch gives NaN."""
    from vocab_parallel_helpers import emulate

    device = require_op(backend, "vocab_parallel_cross_entropy")
    from fusedopt import backends

    x = torch.tensor([[NAN, 123.0, -4.0], [0.5, 1.0, 2.0]], device=device)
    y = torch.tensor([target, 1], device=device)
    want = F.cross_entropy(x.cpu().double(), y.cpu(), reduction="none")
    losses, grad = emulate(backends.get(backend), x.clone(), y, None, [0, 1, 3])
    for row_losses in losses:
        assert torch.isnan(row_losses[0]) and torch.isnan(want[0])
        torch.testing.assert_close(row_losses[1:].double().cpu(), want[1:], rtol=1e-6, atol=1e-6)
    assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all()


def test_ignored_soft_capped_nan_row_has_a_zero_vocab_parallel_gradient(backend):
    """An ignored row's gradient is 0 whatever its logits: the `torch` backend's soft-capping
    factor (NaN at a NaN logit) was applied after the ignored rows were zeroed."""
    from test_vocab_parallel_shards import emulate, inputs

    device = require_op(backend, "vocab_parallel_cross_entropy")
    from fusedopt import backends

    x, y, w = inputs(device, n_rows=3, n_classes=40)
    x[0, 5] = NAN
    y[0] = IGNORE
    losses, grad = emulate(backends.get(backend), x, y, None, [0, 20, 40], softcap=3.0)
    assert torch.equal(grad[0], torch.zeros_like(grad[0])), grad[0]
    assert torch.isfinite(grad[1:]).all() and all(loss[0] == 0 for loss in losses), losses


@pytest.mark.parametrize("dtype", (torch.int32, torch.uint8))
def test_torch_vocab_grad_keeps_rows_whose_target_wraps_to_ignore_index(dtype):
    """ignore_index = 2**32 (2**8 for uint8) wraps to 0 in the target's dtype: a target 0
    must not be taken for ignored."""
    from fusedopt.backends import torch_vocab_parallel as impl

    x = torch.randn(2, 5)
    y = torch.tensor([0, 3], dtype=dtype)
    ignore = 2 ** 32 if dtype == torch.int32 else 2 ** 8
    shard = dict(class_offset=0, num_classes=5, ignore_index=ignore, label_smoothing=0.0,
                 softcap=None, soft_target=False)
    coefs = torch.zeros(2, 5)
    coefs[:, 0] = x.amax(dim=1)
    coefs[:, 1] = torch.log(torch.exp(x - coefs[:, :1]).sum(dim=1))
    coefs[:, 2] = coefs[:, 3] = 1.0
    grad = impl.vocab_parallel_grad(x, y, None, coefs, inplace=False, **shard)
    want = torch.softmax(x, dim=1) - F.one_hot(y.long(), 5)
    torch.testing.assert_close(grad, want)


def test_vocab_parallel_refuses_fp32_unusable_floats():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for kw, name in ((dict(z_loss=1e39), "z_loss"), (dict(softcap=1e-50), "softcap"),
                     (dict(softcap=1e30), "softcap")):
        with pytest.raises(ValueError, match=name):
            fo.vocab_parallel_cross_entropy(x, y, **kw)


_FREED = r"""
import sys, torch, fusedopt as fo
backend, shape, which = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), sys.argv[3]
n = 1
for s in shape:
    n *= s
big = torch.randn(n + 8)
x = big[8:].view(shape)
target = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
if which == "input":
    big.untyped_storage().resize_(0)
else:
    tbig = torch.zeros(target.numel() + 4, dtype=torch.long)
    target = tbig[4:].view(target.shape)
    tbig.untyped_storage().resize_(0)
for fn in (fo.cross_entropy, fo.focal_loss):
    try:
        fn(x, target, backend=backend)
    except ValueError as exc:
        assert f"{which} reaches past the end of its storage" in str(exc), exc
    else:
        raise SystemExit(f"{fn.__name__}: no ValueError")
print("refused")
"""


@pytest.mark.parametrize("which", ("input", "target"))
@pytest.mark.parametrize("shape", ((4, 6), (2, 5, 3)), ids=("2d", "kd"))
def test_freed_storage_refused_by_the_public_layer(backend, shape, which):
    """A view of a storage resized to 0: refused before the (N, C, d..) reshape and before
    any backend (the torch backend crashed on it, as torch itself does).  In a subprocess,
    so a miss is a failed test, not a crashed run."""
    require_op(backend, "cross_entropy")
    run = subprocess.run([sys.executable, "-c", _FREED, backend, ",".join(map(str, shape)),
                          which], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert run.returncode == 0 and "refused" in run.stdout, (
        f"exit {run.returncode}: {run.stdout[-500:]} {run.stderr[-1500:]}")
