"""The compiled vocab-parallel kernels -- `cuda` (csrc/cuda/vocab_parallel.cu) on a GPU,
every test marked `gpu`, and the same tests on the `cpu` kernels (csrc/cpu/vocab_parallel.cpp)
everywhere: both share the math header (math_vocab_parallel.h), the params check and the
launcher (backends/_vocab_launch.py), so the cpu runs also check these tests' references and
tolerances.  Each rank's entry points run on emulated shards, combined as the ops layer does
(vocab_parallel_helpers.emulate), against F.cross_entropy on the full logits in float64:
every flag, wide rows (16-byte vector and element paths, masked tails), bf16/fp16 by
flash-attention's rule, extreme logits, empty shards and rows, targets outside the
vocabulary of every index type, strided rows and in-place gradients.  The GPU-only checks
(grid-stride loop, current stream, no host sync, a second device) are at the end."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import require_op
from fusedopt import backends
from loss_helpers import IGNORE, assert_close, assert_lowp_rule
from vocab_parallel_helpers import emulate, inputs, reference

OP = "vocab_parallel_cross_entropy"
INT64 = torch.iinfo(torch.int64)


@pytest.fixture(params=[pytest.param("cpu", id="cpu"),
                        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def kernel(request):
    """(backend module, device) of one compiled backend; skipped with the reason where it
    cannot run."""
    device = require_op(request.param, OP)
    return backends.get(request.param), device


@pytest.fixture
def cuda_kernel():
    device = require_op("cuda", OP)
    return backends.get("cuda"), device


def _check(impl, x, y, w, bounds, **flags):
    """The shards' losses (the same bits on every rank) and gradient against float64."""
    losses, grad = emulate(impl, x, y, w, bounds, **flags)
    want, want_grad = reference(x, y, w, **{k: v for k, v in flags.items() if k != "soft"})
    for rank, loss in enumerate(losses):
        assert torch.equal(loss, losses[0]), f"rank {rank} has another loss than rank 0"
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(losses[0], want, what="row loss")
    assert_close(grad, want_grad, what="grad")
    return losses[0], grad


# every combination of: class weights, smoothing, z-loss, soft-capping, probability targets
FLAGS = list(itertools.product([False, True], repeat=5))
# (classes, shard bounds): narrow rows of element accesses with an empty shard; wide rows
# whose shards all start 16-byte aligned (vector path); an odd width (rows alternately
# aligned or not, masked tails) with an empty shard
SHAPES = {"narrow": (37, [0, 5, 5, 13, 37]), "aligned": (2048, [0, 1024, 2048]),
          "ragged": (2053, [0, 517, 517, 2053])}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS,
                         ids=["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl))
                              for fl in FLAGS])
def test_vocab_every_flag(kernel, weighted, smooth, zloss, capped, soft, shape):
    impl, device = kernel
    n_classes, bounds = SHAPES[shape]
    x, y, w = inputs(device, n_rows=6, n_classes=n_classes, soft=soft)
    _check(impl, x, y, w if weighted else None, bounds, soft=soft,
           label_smoothing=0.1 if smooth else 0.0, z_loss=0.05 if zloss else 0.0,
           softcap=4.0 if capped else None)


@pytest.mark.parametrize("bounds", [[0, 512, 1024], [0, 333, 1024]], ids=["aligned", "ragged"])
@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vocab_low_precision(kernel, dtype, soft, bounds):
    """bf16/fp16 logits: fp32 row losses at fp32 tolerance; the gradient, stored in the
    logits' dtype, within twice torch's own error in that dtype (flash-attention's rule)."""
    impl, device = kernel
    x, y, w = inputs(device, n_rows=8, n_classes=1024, dtype=dtype, soft=soft)
    losses, grad = emulate(impl, x, y, w, bounds, soft=soft, label_smoothing=0.1)
    want, want_grad = reference(x, y, w, label_smoothing=0.1)
    assert grad.dtype == dtype
    assert_close(losses[0], want, rtol=1e-5, atol=1e-5, what="fp32 row loss")
    full = x.clone().requires_grad_()
    F.cross_entropy(full, y, w.to(dtype), ignore_index=IGNORE, reduction="sum",
                    label_smoothing=0.1).backward()
    assert_lowp_rule(grad, want_grad, full.grad, dtype, what="grad")


def test_vocab_extreme_logits(kernel):
    """-inf columns (a whole shard of one row), equal logits of 1e4, spreads of 300, +-1e4
    outliers and a target on a -inf logit (infinite loss, as torch): the results of
    torch in float64."""
    impl, device = kernel
    gen = torch.Generator().manual_seed(1)
    n_classes = 300
    x = 3.0 * torch.randn(6, n_classes, generator=gen)
    y = torch.randint(0, n_classes, (6,), generator=gen)
    x[0, :100] = float("-inf")
    y[0] = 150
    x[1] = 1e4
    x[2] = 300.0 * torch.randn(n_classes, generator=gen)
    x[3, 7], x[3, 250], y[3] = 1e4, -1e4, 250
    x[4, 7], y[4] = 1e4, 7
    x[5, 42], y[5] = float("-inf"), 42
    x, y = x.to(device), y.to(device)
    for w in (None, torch.rand(n_classes, generator=gen).add(0.5).to(device)):
        for flags in (dict(), dict(z_loss=1e-4), dict(softcap=30.0)):
            loss, grad = _check(impl, x, y, w, [0, 100, 100, 229, 300], **flags)
            assert torch.isfinite(grad).all()
            assert torch.isinf(loss[5]) == ("softcap" not in flags)  # capped: -inf -> -30


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.uint8])
def test_vocab_out_of_range_targets(kernel, index_dtype):
    """Targets outside [0, C) of every index type (just past the end, negative, the
    extremes of the type): a NaN loss and a NaN gradient row, nothing read at the bad
    index; ignored rows get 0 and a zero row; the other rows are exact."""
    impl, device = kernel
    n_classes, bounds = 200, [0, 64, 64, 131, 200]
    info = torch.iinfo(index_dtype)
    if index_dtype == torch.uint8:
        ignore, good, bad = 255, [3, 199, 64, 0], [200, 254]
    else:
        ignore, good, bad = IGNORE, [3, 199, 64, 0], [200, -1, info.min, info.max, info.min + 1]
        if index_dtype == torch.int64:
            bad += [2 ** 40, -(2 ** 40)]
    values = good + bad + [ignore, 130, 131]
    y = torch.tensor(values, dtype=index_dtype)
    x, _, w = inputs("cpu", n_rows=len(values), n_classes=n_classes)
    x, y, w = x.to(device), y.to(device), w.to(device)
    is_bad = torch.tensor([v in bad for v in values], device=device)
    is_ignored = torch.tensor([v == ignore for v in values], device=device)
    for flags in (dict(), dict(label_smoothing=0.1, z_loss=0.01, softcap=5.0)):
        losses, grad = emulate(impl, x, y, w, bounds, ignore_index=ignore, **flags)
        y_ok = torch.where(is_bad, torch.full_like(y, ignore), y)
        want, want_grad = reference(x, y_ok, w, ignore_index=ignore, **flags)
        assert torch.isnan(losses[0][is_bad]).all() and torch.isnan(grad[is_bad]).all()
        assert (losses[0][is_ignored] == 0).all() and (grad[is_ignored] == 0).all()
        keep = ~is_bad
        assert_close(losses[0][keep], want[keep], what="row loss")
        assert_close(grad[keep], want_grad[keep], what="grad")


def test_vocab_empty_shards_and_rows(kernel):
    """A rank without columns gets (-inf, 0, 0, 0) statistics and an empty gradient; no
    rows gives empty results; one-column shards are exact."""
    impl, device = kernel
    x, y, w = inputs(device, n_rows=5, n_classes=6)
    shard = dict(class_offset=3, num_classes=6, ignore_index=IGNORE, label_smoothing=0.1,
                 softcap=None, soft_target=False)
    stats = impl.vocab_parallel_row_stats(x[:, 3:3], y, w[3:3], **shard)
    want = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]] * 5, device=device)
    assert torch.equal(stats, want)
    coefs = torch.zeros(5, 5, device=device)
    assert impl.vocab_parallel_grad(x[:, 3:3], y, w[3:3], coefs, inplace=False,
                                    **shard).shape == (5, 0)
    stats = impl.vocab_parallel_row_stats(x[:0, 3:5], y[:0], w[3:5], **shard)
    assert stats.shape == (0, 4)
    assert impl.vocab_parallel_grad(x[:0, 3:5], y[:0], w[3:5], coefs[:0], inplace=False,
                                    **shard).shape == (0, 2)
    for soft in (False, True):
        x, y, w = inputs(device, n_rows=5, n_classes=6, soft=soft)
        _check(impl, x, y, w, [0, 1, 2, 3, 4, 5, 6], soft=soft, label_smoothing=0.2,
               z_loss=0.01)


@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_strided_rows_in_place(kernel, dtype, soft):
    """Logits (and soft targets) that are every other row of a wider buffer, starting at
    an odd column: no copy, the results right (bf16 gradients by flash-attention's rule);
    in place the gradient has the same bits, and the memory between the rows is
    untouched."""
    impl, device = kernel
    n_rows, n_classes, lo = 6, 203, 3
    gen = torch.Generator().manual_seed(2)
    big = (3.0 * torch.randn(2 * n_rows, n_classes + 11, generator=gen)).to(dtype).to(device)
    x = big[::2, lo:lo + n_classes]
    if soft:
        probs = torch.softmax(torch.randn(2 * n_rows, n_classes + 11, generator=gen), dim=1)
        y = probs.to(dtype).to(device)[::2, lo:lo + n_classes]
    else:
        _, y, _ = inputs(device, n_rows=n_rows, n_classes=n_classes)
    _, _, w = inputs(device, n_rows=n_rows, n_classes=n_classes)
    bounds, flags = [0, 77, 203], dict(label_smoothing=0.1, soft=soft)
    losses, grad = emulate(impl, x, y, w, bounds, **flags)
    want, want_grad = reference(x, y, w, label_smoothing=0.1)
    assert_close(losses[0], want, rtol=1e-5, atol=1e-5, what="row loss")
    if dtype == torch.float32:
        assert_close(grad, want_grad, what="grad")
    else:
        full = x.clone().requires_grad_()
        F.cross_entropy(full, y, w.to(dtype), ignore_index=IGNORE, reduction="sum",
                        label_smoothing=0.1).backward()
        assert_lowp_rule(grad, want_grad, full.grad, dtype, what="grad")
    before = big.clone()
    in_place, in_place_grad = emulate(impl, x, y, w, bounds, inplace=True, **flags)
    assert torch.equal(in_place[0], losses[0])
    assert torch.equal(in_place_grad, grad) and torch.equal(x, grad)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[::2, lo:lo + n_classes] = False
    assert torch.equal(big[outside], before[outside])


def test_vocab_results_are_deterministic(kernel):
    impl, device = kernel
    for soft in (False, True):
        x, y, w = inputs(device, n_rows=64, n_classes=3001, soft=soft)
        runs = [emulate(impl, x, y, w, [0, 1500, 3001], soft=soft, label_smoothing=0.1,
                        z_loss=0.01, softcap=3.0) for _ in range(2)]
        assert torch.equal(runs[0][0][0], runs[1][0][0])
        assert torch.equal(runs[0][1], runs[1][1])


def test_vocab_kernel_boundary_refuses_bad_tensors(kernel):
    """What reaches the compiled kernels is checked first: a tensor subclass, a dtype or
    layout the kernels cannot walk, a class range outside the vocabulary, wrong-sized side
    tensors."""
    impl, device = kernel
    x, y, w = inputs(device, n_rows=4, n_classes=6)
    shard = dict(class_offset=0, num_classes=6, ignore_index=IGNORE, label_smoothing=0.1,
                 softcap=None, soft_target=False)
    coefs = torch.zeros(4, 5, device=device)
    plain = "is a Subclass; compiled kernels take plain torch.Tensor"

    class Subclass(torch.Tensor):
        pass

    def refused(error, match, *args, grad=False, **overrides):
        fn = impl.vocab_parallel_grad if grad else impl.vocab_parallel_row_stats
        extra = dict(inplace=False) if grad else {}
        with pytest.raises(error, match=match):
            fn(*args, **extra, **dict(shard, **overrides))

    refused(TypeError, plain, x.as_subclass(Subclass), y, w)
    refused(TypeError, plain, x, y.as_subclass(Subclass), w)
    refused(TypeError, "logits must be float32, bfloat16", x.double(), y, w)
    refused(ValueError, "stride", x.t().contiguous().t(), y, w)
    refused(ValueError, r"\(N, C_local\)", x[0], y, w)
    refused(ValueError, "must lie in", x, y, w, class_offset=2)
    refused(ValueError, "must lie in", x, y, w, class_offset=-1)
    refused(ValueError, "weight", x, y, torch.ones(7, device=device))
    refused(ValueError, "weight", x, y, w.double())
    refused(TypeError, "target must be int64", x, y.float(), w)
    refused(ValueError, "class targets", x, y[:3], w)
    refused(ValueError, "soft targets", x, x.double(), w, soft_target=True)
    refused(ValueError, "soft targets", x, x[:, :5], w, soft_target=True)
    refused(ValueError, "coefs", x, y, w, coefs[:, :4], grad=True)
    refused(ValueError, "coefs", x, y, w, coefs.t().contiguous().t(), grad=True)
    refused(TypeError, plain, x, y, w, coefs.as_subclass(Subclass), grad=True)
    refused(ValueError, "negated", torch._neg_view(x), y, w)
    freed = x.clone()
    view = freed[:, :]
    freed.untyped_storage().resize_(0)
    refused(ValueError, "no data|past the end of its storage", view, y, w)
    refused(ValueError, "ignore_index", x, y, w, ignore_index=2 ** 63)
    refused(ValueError, "softcap", x, y, w, softcap=0.0)
    # an nn.Parameter is a plain tensor with a flag
    param = impl.vocab_parallel_row_stats(torch.nn.Parameter(x), y, torch.nn.Parameter(w),
                                          **shard)
    assert torch.equal(param, impl.vocab_parallel_row_stats(x, y, w, **shard))
    # a one-column shard may have any column stride: it is never stepped over
    column = x.t().contiguous().t()[:, 2:3]
    assert column.stride() == (1, 4)
    got = impl.vocab_parallel_row_stats(column, y, w[2:3], **dict(shard, class_offset=2))
    want = impl.vocab_parallel_row_stats(column.contiguous(), y, w[2:3],
                                         **dict(shard, class_offset=2))
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
def test_vocab_more_rows_than_blocks(cuda_kernel):
    """2^20 + 5 rows: blocks walk further rows (grid-stride loop past 2^20 blocks)."""
    impl, device = cuda_kernel
    x, y, w = inputs(device, n_rows=(1 << 20) + 5, n_classes=8)
    _check(impl, x, y, w, [0, 3, 8], label_smoothing=0.1)


@pytest.mark.gpu
def test_vocab_runs_on_the_current_stream(cuda_kernel):
    """Inputs hold NaN until a held-up side stream writes them: kernels launched on any
    other stream would read NaN (gpu_stream_helpers)."""
    from gpu_stream_helpers import nan_like, run_on_a_held_up_stream

    impl, device = cuda_kernel
    x, y, w = inputs(device, n_rows=16, n_classes=301)
    want_losses, want_grad = emulate(impl, x, y, w, [0, 150, 301], label_smoothing=0.1)
    held = nan_like(x)
    losses, grad = run_on_a_held_up_stream(
        lambda: held.copy_(x),
        lambda: emulate(impl, held, y, w, [0, 150, 301], label_smoothing=0.1))
    assert torch.equal(losses[0], want_losses[0]) and torch.equal(grad, want_grad)


@pytest.mark.gpu
def test_vocab_entry_points_do_not_sync(cuda_kernel):
    impl, device = cuda_kernel
    for soft in (False, True):
        x, y, w = inputs(device, n_rows=16, n_classes=301, soft=soft)
        shard = dict(class_offset=100, num_classes=301, ignore_index=IGNORE,
                     label_smoothing=0.1, softcap=3.0, soft_target=soft)
        target = y[:, 100:250] if soft else y
        coefs = torch.rand(16, 5, device=device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            impl.vocab_parallel_row_stats(x[:, 100:250], target, w[100:250], **shard)
            impl.vocab_parallel_grad(x[:, 100:250], target, w[100:250], coefs, inplace=False,
                                     **shard)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_vocab_second_device(cuda_kernel):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    impl, _ = cuda_kernel
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    x, y, w = inputs("cuda:1", n_rows=8, n_classes=301)
    with torch.cuda.device(0):
        _check(impl, x, y, w, [0, 150, 301], label_smoothing=0.1, z_loss=0.01)


@pytest.mark.gpu
def test_vocab_cuda_launcher_refuses_tensors_on_other_devices(cuda_kernel):
    impl, device = cuda_kernel
    x, y, w = inputs(device, n_rows=4, n_classes=6)
    shard = dict(class_offset=0, num_classes=6, ignore_index=IGNORE, label_smoothing=0.1,
                 softcap=None, soft_target=False)
    coefs = torch.zeros(4, 5, device=device)
    with pytest.raises(ValueError, match="the logits' device"):
        impl.vocab_parallel_row_stats(x, y.cpu(), w, **shard)
    with pytest.raises(ValueError, match="the logits' device"):
        impl.vocab_parallel_row_stats(x, y, w.cpu(), **shard)
    with pytest.raises(ValueError, match="the logits' device"):
        impl.vocab_parallel_grad(x, y, w, coefs.cpu(), inplace=False, **shard)
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        impl.vocab_parallel_row_stats(x.cpu(), y, w, **shard)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="the logits' device"):
            impl.vocab_parallel_row_stats(x, y, w.to("cuda:1"), **shard)
