"""fusedopt.linear_cross_entropy beyond the values: argument errors, the nn module against
torch.nn.LinearCrossEntropyLoss, chunk sizing, the memory bound (measured), torch.compile
without graph breaks, and the GPU checks (marked gpu)."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from conftest import require_op
from fusedopt.bench.timing import cpu_peak_memory
from fusedopt.ops.linear_cross_entropy import MIN_CHUNK_ROWS, default_chunk_rows
from loss_helpers import IGNORE, assert_close, assert_lowp_rule, random_grad_output
from test_linear_cross_entropy import grads, make_inputs, reference

N, H, V = 6, 4, 5


def _args():
    return dict(input=torch.randn(N, H), linear_weight=torch.randn(V, H),
                target=torch.randint(0, V, (N,)))


ERRORS = {
    "input_type": (dict(input=[[1.0] * H] * N), TypeError, "input"),
    "input_dtype": (dict(input=torch.randn(N, H, dtype=torch.float64)), TypeError, "float64"),
    "input_0d": (dict(input=torch.tensor(1.0)), ValueError, "0-dim"),
    "weight_type": (dict(linear_weight="W"), TypeError, "linear_weight"),
    "weight_1d": (dict(linear_weight=torch.randn(H)), ValueError, "(4,)"),
    "weight_hidden": (dict(linear_weight=torch.randn(V, H + 1)), ValueError, "(5, 5)"),
    "weight_dtype": (dict(linear_weight=torch.randn(V, H, dtype=torch.bfloat16)), TypeError,
                     "torch.bfloat16"),
    "weight_device": (dict(linear_weight=torch.randn(V, H, device="meta")), ValueError, "meta"),
    "no_classes": (dict(linear_weight=torch.randn(0, H)), ValueError, "(0, 4)"),
    "bias_shape": (dict(linear_bias=torch.randn(V + 1)), ValueError, "(6,)"),
    "bias_dtype": (dict(linear_bias=torch.randn(V, dtype=torch.float16)), TypeError,
                   "linear_bias"),
    "soft_target": (dict(target=torch.rand(N, V)), ValueError, "probability"),
    "float_target": (dict(target=torch.zeros(N)), TypeError, "torch.float32"),
    "target_dtype": (dict(target=torch.zeros(N, dtype=torch.int16)), TypeError, "torch.int16"),
    "target_shape": (dict(target=torch.zeros(N + 1, dtype=torch.int64)), ValueError, "(7,)"),
    "target_device": (dict(target=torch.zeros(N, dtype=torch.int64, device="meta")),
                      ValueError, "meta"),
    "class_weight_shape": (dict(weight=torch.ones(V + 1)), ValueError, "(6,)"),
    "class_weight_dtype": (dict(weight=torch.ones(V, dtype=torch.int64)), TypeError, "weight"),
    "ignore_index_type": (dict(ignore_index=1.5), TypeError, "ignore_index"),
    "reduction": (dict(reduction="avg"), ValueError, "'avg'"),
    "smoothing": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "z_loss": (dict(z_loss=-1.0), ValueError, "z_loss"),
    "softcap": (dict(softcap=0.0), ValueError, "softcap"),
    "chunk_zero": (dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk_bool": (dict(chunk_size=True), TypeError, "chunk_size"),
    "chunk_float": (dict(chunk_size=2.5), TypeError, "2.5"),
    "backend": (dict(backend="numpy"), ValueError, "'numpy'"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_before_any_kernel(case, monkeypatch):
    kwargs, exc, text = ERRORS[case]
    args = _args()
    args.update(kwargs)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the argument check")

    for name in fo.backends.usable("cross_entropy", "cpu"):
        monkeypatch.setattr(fo.backends._load(name), "cross_entropy_fwd", no_kernel)
    monkeypatch.setattr(torch, "mm", no_kernel)
    with pytest.raises(exc) as info:
        fo.linear_cross_entropy(args.pop("input"), args.pop("linear_weight"),
                                args.pop("target"), **args)
    assert text in str(info.value), f"message {str(info.value)!r} lacks {text!r}"


def test_dtensor_refused(monkeypatch):
    """A DTensor operand gets a TypeError naming it (detection patched: a real DTensor needs
    a process group; tests/distributed covers DTensor losses)."""
    args = _args()
    monkeypatch.setattr(fo.functional, "is_dtensor", lambda t: t is args["linear_weight"])
    with pytest.raises(TypeError, match="linear_weight: linear_cross_entropy does not take "
                                        "DTensors"):
        fo.linear_cross_entropy(**args)


@pytest.mark.parametrize("bad", (V, -1))
def test_out_of_range_target_cpu_raises(backend, bad):
    device = require_op(backend, "cross_entropy")
    if device.type != "cpu":
        pytest.skip(f"backend {backend!r} runs on {device.type} here")
    args = _args()
    args["target"][2] = bad
    with pytest.raises(IndexError, match=f"target value {bad} is out of range"):
        fo.linear_cross_entropy(args["input"], args["linear_weight"], args["target"],
                                backend=backend)


def test_ignore_index_none_means_minus_100():
    args = _args()
    args["target"][1] = IGNORE
    got = fo.linear_cross_entropy(**args, ignore_index=None)
    want = fo.linear_cross_entropy(**args)
    assert torch.equal(got, want)


def test_module_matches_torch_module():
    """Same constructor, state_dict keys and results as torch.nn.LinearCrossEntropyLoss."""
    torch.manual_seed(0)
    class_weight = torch.rand(V) + 0.5
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, bias=True, weight=class_weight,
                                             label_smoothing=0.1)
    ours = fo.nn.LinearCrossEntropyLoss(H, V, bias=True, weight=class_weight,
                                        label_smoothing=0.1, chunk_size=2)
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(3, N, H, requires_grad=True)
    y = torch.randint(0, V, (3, N))
    y[0, 1] = IGNORE
    got, want = ours(x, y), theirs(x.reshape(-1, H), y.reshape(-1))
    assert_close(got, want, what="loss")
    for g, w in zip(grads(got, (x, *ours.parameters()), None),
                    grads(want, (x, *theirs.parameters()), None)):
        assert_close(g, w.reshape(g.shape), what="grad")
    assert ours.to(torch.bfloat16).linear.weight.dtype == torch.bfloat16


def test_default_chunk_rows():
    # CPU: a chunk of logits no larger than max(V x H, N x H) elements
    assert default_chunk_rows(8192, 32000, 256, "cpu") == 256
    assert default_chunk_rows(2048, 8000, 128, "cpu") == 128
    assert default_chunk_rows(4096, 10, 512, "cpu") == 4096          # small V: one chunk
    # other devices: about N x H elements (the GPU implementations' budget)
    assert default_chunk_rows(8192, 128256, 4096, "cuda") == 256
    assert default_chunk_rows(8192, 32000, 256, "cuda") == 64
    for device in ("cpu", "cuda"):
        assert default_chunk_rows(5, 32000, 16, device) == 5          # never above N
        assert default_chunk_rows(10_000, 262_144, 8, device) == MIN_CHUNK_ROWS
        assert default_chunk_rows(0, 10, 4, device) == 1
        rows = default_chunk_rows(3000, 50_000, 300, device)
        assert rows & (rows - 1) == 0


def test_peak_memory_is_a_chunk_plus_the_gradients():
    """CPU allocations of one forward + backward, recorded by torch's profiler: ours hold a
    chunk of logits and the gradients -- well under 1/4 of the N x V logits and below
    torch's chunked F.linear_cross_entropy measured the same way."""
    require_op("cpu", "cross_entropy")
    n, hidden, n_classes = 2048, 128, 8000
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, hidden, generator=gen).requires_grad_()
    w = (torch.randn(n_classes, hidden, generator=gen) * 0.05).requires_grad_()
    y = torch.randint(0, n_classes, (n,), generator=gen)

    def ours():
        return torch.autograd.grad(fo.linear_cross_entropy(x, w, y, backend="cpu"), (x, w))

    def torch_chunked():
        loss = F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())
        return torch.autograd.grad(loss, (x, w))

    logits_bytes = n * n_classes * 4
    chunk = default_chunk_rows(n, n_classes, hidden, "cpu")
    # dX and the fp32 (H, V) accumulator, with the chunk of logits in the loop or the
    # (V, H) gradient copied from the accumulator at the end; O(N) scalars
    bound = (n * hidden + n_classes * hidden + max(chunk, hidden) * n_classes + 4 * n) * 4
    peak = cpu_peak_memory(ours)
    assert peak is not None, "this torch's profiler records no CPU allocations"
    assert peak <= 1.02 * bound + 65536, (peak, bound)
    assert peak < logits_bytes / 4
    assert peak <= cpu_peak_memory(torch_chunked)


def _compile_case(reduction):
    x, w, b, y, cw = make_inputs((N,), H, V, "cpu", bias=True, weight=True, ignore=True)

    def loss_fn(x, w, b, y):
        return fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                       chunk_size=4)
    return loss_fn, (x, w, b, y)


@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_compile_fullgraph_matches_eager(reduction):
    """fullgraph=True: no graph break; aot_eager traces the custom op through its fake
    implementation and the Function's backward like inductor does, without a C++ compile
    (tests/ops/test_compile.py runs inductor on the other losses)."""
    torch._dynamo.reset()
    loss_fn, inputs = _compile_case(reduction)
    want = loss_fn(*inputs)
    g_out = random_grad_output(want)
    want_grads = grads(want, inputs[:3], g_out)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        got = compiled(*inputs)
        assert_close(got, want, what="loss")
        for g, w in zip(grads(got, inputs[:3], g_out), want_grads):
            assert_close(g, w, what="grad")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ("triton", "cuda", "torch"))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gpu_bf16_matches_reference(name, reduction):
    device = require_op(name, "cross_entropy")
    if device.type != "cuda":
        pytest.skip(f"backend {name!r} does not run on CUDA here")
    opts = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
    x, w, b, y, cw = make_inputs((512,), 256, 4099, device, dtype=torch.bfloat16, bias=True,
                                 weight=True, ignore=True)
    got = fo.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                  chunk_size=96, backend=name, **opts)
    ref = reference(x, w, b, y, cw, reduction=reduction, **opts)
    lowp = reference(x, w, b, y, cw, reduction=reduction, dtype=torch.bfloat16, **opts)
    assert_lowp_rule(got, ref, lowp, torch.bfloat16, what="loss")
    g_out = random_grad_output(ref).to(torch.bfloat16)
    for g, r, t in zip(grads(got, (x, w, b), g_out), grads(ref, (x, w, b), g_out.double()),
                       grads(lowp, (x, w, b), g_out)):
        assert_lowp_rule(g, r, t, torch.bfloat16, what="grad")


@pytest.mark.gpu
def test_gpu_peak_memory():
    """CUDA bf16: well under 1/4 of the logits, and at most torch's chunked path plus the
    fp32 dW accumulator (4·V·H bytes) that torch's bf16 path does without."""
    device = torch.device("cuda")
    n, hidden, n_classes = 16384, 512, 32000
    x = torch.randn(n, hidden, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(n_classes, hidden, device=device, dtype=torch.bfloat16) * 0.05
         ).requires_grad_()
    y = torch.randint(0, n_classes, (n,), device=device)

    def peak(fn):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    ours = peak(lambda: torch.autograd.grad(fo.linear_cross_entropy(x, w, y), (x, w)))
    theirs = peak(lambda: torch.autograd.grad(F.linear_cross_entropy(
        x, w, y, options=torch.nn.LinearCrossEntropyOptions()), (x, w)))
    assert ours < n * n_classes * 2 / 4
    assert ours <= theirs + 4 * n_classes * hidden, (ours, theirs)
