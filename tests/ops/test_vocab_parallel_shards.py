"""The vocab-parallel entry points of every backend that has them (row statistics and
gradient of one rank's columns), with the ops layer's combination of the ranks, emulated
in one process: the shards' row losses and gradient columns equal F.cross_entropy on the
full logits in float64.  Covers what the 2-rank tests (tests/distributed) do not reach:
empty shards, many shards, multi-chunk rows, -inf and huge logits, bad targets."""

import pytest
import torch
import torch.nn.functional as F

from conftest import require_op
from fusedopt import backends
from loss_helpers import IGNORE, assert_close, assert_lowp_rule
from vocab_parallel_helpers import emulate, inputs, reference

OP = "vocab_parallel_cross_entropy"


SPLITS = {"one": [0, 13], "two": [0, 7, 13], "uneven_with_empty": [0, 2, 2, 11, 13],
          "four_with_one_column": [0, 1, 4, 9, 13]}
FLAGS = {"plain": dict(), "smoothing_weight": dict(label_smoothing=0.2, weighted=True),
         "z_softcap": dict(z_loss=0.05, softcap=2.5),
         "everything": dict(label_smoothing=0.1, z_loss=0.01, softcap=3.0, weighted=True)}


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("soft", (False, True), ids=("class", "soft"))
def test_shards_match_full_logits(backend, split, flags, soft):
    device = require_op(backend, OP)
    impl = backends.get(backend)
    x, y, w = inputs(device, soft=soft)
    flags = dict(FLAGS[flags])
    w = w if flags.pop("weighted", False) else None
    losses, grad = emulate(impl, x, y, w, SPLITS[split], soft=soft, **flags)
    want, want_grad = reference(x, y, w, **flags)
    for rank, loss in enumerate(losses):
        assert torch.equal(loss, losses[0]), f"rank {rank} has another loss than rank 0"
    assert_close(losses[0], want, what="row loss")
    assert_close(grad, want_grad, what="grad")


def test_multi_chunk_rows(backend):
    """Rows longer than one chunk (Triton: block_size below the shard width)."""
    device = require_op(backend, OP)
    impl = backends.get(backend)
    options = dict(block_size=4) if backend == "triton" else {}
    for soft in (False, True):
        x, y, w = inputs(device, n_classes=37, soft=soft)
        flags = dict(label_smoothing=0.1, z_loss=0.01, softcap=4.0)
        losses, grad = emulate(impl, x, y, w, [0, 17, 37], soft=soft, **flags, **options)
        want, want_grad = reference(x, y, w, **flags)
        assert_close(losses[1], want, what=f"soft={soft} row loss")
        assert_close(grad, want_grad, what=f"soft={soft} grad")


def test_extreme_logits_and_bad_targets(backend):
    """A row of -inf on one shard, huge equal logits, a target outside [0, C): finite
    results where torch's are, NaN loss and gradient row for the bad target."""
    device = require_op(backend, OP)
    impl = backends.get(backend)
    x, y, w = inputs(device, n_rows=4, n_classes=10)
    x[0, :5] = float("-inf")
    x[1] = 1e4
    y[0], y[1], y[2], y[3] = 7, 2, 3, 10
    losses, grad = emulate(impl, x, y, w, [0, 5, 10], label_smoothing=0.0)
    want, want_grad = reference(x[:3], y[:3], w)
    assert_close(losses[0][:3], want, what="row loss")
    assert_close(grad[:3], want_grad, what="grad")
    assert torch.isnan(losses[0][3]) and torch.isnan(grad[3]).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision(backend, dtype):
    device = require_op(backend, OP)
    impl = backends.get(backend)
    x, y, w = inputs(device, n_rows=16, n_classes=96, dtype=dtype)
    losses, grad = emulate(impl, x, y, w, [0, 40, 96], label_smoothing=0.1)
    want, want_grad = reference(x, y, w, label_smoothing=0.1)
    assert grad.dtype == dtype
    assert_close(losses[0], want, rtol=1e-5, atol=1e-5, what="fp32 row loss")
    full = x.clone().requires_grad_()
    F.cross_entropy(full, y, w.to(dtype), ignore_index=IGNORE, reduction="sum",
                    label_smoothing=0.1).backward()
    assert_lowp_rule(grad, want_grad, full.grad, dtype, what="grad")


def test_cpu_results_do_not_depend_on_the_thread_count():
    device = require_op("cpu", OP)
    impl = backends.get("cpu")
    for soft in (False, True):
        x, y, w = inputs(device, n_rows=256, n_classes=301, soft=soft)
        runs = [emulate(impl, x, y, w, [0, 150, 301], soft=soft, label_smoothing=0.1,
                        softcap=3.0, num_threads=n) for n in (1, 2)]
        assert torch.equal(runs[0][0][0], runs[1][0][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("weighted", (False, True))
@pytest.mark.parametrize("soft", (False, True), ids=("smoothing", "soft"))
@pytest.mark.parametrize("offset", (1e6, 1e30))
def test_large_offset_logits_match_torch(backend, soft, weighted, offset):
    """Logits around a large offset, split unevenly over three shards (one of them all -inf
    in one row): the per-shard sums are gap sums relative to the shard's max, moved to the
    row max in the combination, so nothing cancels (the form lse·Σw - Σw·x lost every digit
    at 1e30 and gave a 1e-2 relative error at 1e6).  Against float64 F.cross_entropy on the
    full logits, at fp32 tolerances."""
    device = require_op(backend, OP)
    impl = backends.get(backend)
    x, y, w = inputs(device, n_rows=5, n_classes=37, soft=soft)
    x = x + offset if offset < 1e10 else torch.full_like(x, offset)  # equal huge logits
    x[2, 20:] = float("-inf")
    flags = dict(label_smoothing=0.2 if not soft else 0.05)
    options = dict(block_size=4) if backend == "triton" else {}
    losses, grad = emulate(impl, x, y, w if weighted else None, [0, 11, 20, 37], soft=soft,
                           **flags, **options)
    want, want_grad = reference(x, y, w if weighted else None, **flags)
    finite = torch.isfinite(want)
    assert_close(losses[0][finite], want[finite], what="row loss")
    assert torch.equal(torch.isinf(losses[0]), torch.isinf(want)), (losses[0], want)
    assert_close(grad, want_grad, what="grad")


@pytest.mark.parametrize("backend_name", ("cpu", "triton"))
def test_kernel_boundary_refuses_bad_tensors(backend_name):
    """What reaches the vocab-parallel kernels goes through the loss kernel boundary
    (fusedopt/backends/_loss_boundary.py, vocab_shard) first: a tensor subclass, a layout
    the kernel cannot walk, a class range outside the vocabulary, wrong-sized side tensors,
    a freed storage, fp32-unusable numbers.  An nn.Parameter and a (N, 1) view with any
    column stride pass (the kernel never steps over a dimension of size 1)."""
    device = require_op(backend_name, OP)
    impl = backends.get(backend_name)
    x, y = torch.randn(4, 6, device=device), torch.tensor([0, 1, 2, 3], device=device)
    shard = dict(class_offset=0, num_classes=6, ignore_index=IGNORE, label_smoothing=0.1,
                 softcap=None, soft_target=False)

    class Subclass(torch.Tensor):
        pass

    freed = torch.randn(6, 6, device=device)
    view = freed[2:]
    freed.untyped_storage().resize_(0)
    cases = [
        ((x.as_subclass(Subclass), y, None), {}, TypeError, "logits is a Subclass"),
        ((torch.randn(6, 4, device=device).t(), y, None), {}, ValueError, "stride"),
        ((x, y, None), dict(class_offset=2), ValueError, "must lie in"),
        ((x, y, None), dict(num_classes=2 ** 63), ValueError, "must lie in"),
        ((x, y, torch.ones(7, device=device)), {}, ValueError, "weight"),
        ((x, y.float(), None), {}, TypeError, "target must be int64"),
        ((view, y, None), {}, ValueError, "past the end of its storage"),
        ((x, y, None), dict(softcap=1e-50), ValueError, "softcap"),
        ((x, y, None), dict(ignore_index=2 ** 64), ValueError, "ignore_index"),
    ]
    for args, change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            impl.vocab_parallel_row_stats(*args, **dict(shard, **change))
    with pytest.raises(ValueError, match="coefs"):
        impl.vocab_parallel_grad(x, y, None, torch.zeros(4, 4, device=device), inplace=False,
                                 **shard)
    one_column = torch.randn(4, 3, device=device).t()[:, 1:2]  # (3, 1), strides (1, 3)
    for logits in (torch.nn.Parameter(x.clone()), one_column):
        target = y[:logits.shape[0]]
        stats = impl.vocab_parallel_row_stats(logits, target, None,
                                              **dict(shard, num_classes=logits.shape[1]))
        assert torch.equal(stats[:, 0], logits.detach().amax(dim=1))
