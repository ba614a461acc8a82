"""The lean Adam kernels on a GPU (marked gpu; skipped with the reason elsewhere): the
`cuda` and `triton` backends on CUDA tensors with their default chunking, bit for bit
against the NumPy reference (hence against the cpu and torch backends), tensors spanning
several 65536-element chunks, misaligned views (element path), plans split over many
launches, a skipped step, and a step captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from lean_helpers import LeanBucket, ReferenceBucket, assert_unchanged, make_grads, snapshot

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton"]
SHAPES = [(65_536 * 2 + 300,), (0,), (255,), (257,), (33, 1001)]


def _module(backend):
    from fusedopt import backends
    ok, reason = backends._usable(backend, "lean_adam", torch.device("cuda"))
    if not ok:
        pytest.skip(f"backend {backend!r}: {reason}")
    return backends.get(backend)


def _compare(backend, state, dtype, *, shapes=SHAPES, steps=2, stochastic=True, master=False,
             params_view=None, **hyper):
    module = _module(backend)
    ours = LeanBucket(shapes, state=state, dtype=dtype, master=master, device="cuda")
    if params_view is not None:
        ours.params = [params_view(p) for p in ours.params]
    theirs = ReferenceBucket(ours)
    for grads in make_grads(shapes, steps, dtype=dtype, device="cuda", like=ours.params):
        ours.step(module, grads, stochastic_rounding=stochastic, **hyper)
        theirs.step(grads, stochastic_rounding=stochastic, **hyper)
    torch.cuda.synchronize()
    theirs.assert_equal(ours)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("state", ["fp32", "bf16", "q8"])
def test_gpu_kernels_match_the_reference(backend, state, dtype):
    _compare(backend, state, dtype, weight_decay=0.1,
             inv_scale=torch.tensor(0.25, device="cuda"), clip_coef=torch.tensor(0.5, device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("state", ["bf16", "q8"])
def test_gpu_adam_l2_masters_and_tensor_lr(backend, state):
    _compare(backend, state, torch.bfloat16, master=True, decoupled=False, weight_decay=0.05,
             maximize=True, lr=torch.tensor(3e-3, device="cuda"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_misaligned_views_take_the_element_path(backend):
    def shifted(p):
        buf = torch.empty(p.numel() + 1, dtype=p.dtype, device=p.device)
        view = buf[1:].view(p.shape)
        view.copy_(p)
        return view
    _compare(backend, "bf16", torch.bfloat16, params_view=shifted, shapes=[(1001,), (4099,)])


def test_cuda_plan_split_over_many_launches(monkeypatch):
    from fusedopt.backends.cuda import lean
    monkeypatch.setattr(lean, "PLAN_LIMITS", (512, 3, 4))
    _compare("cuda", "q8", torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_skipped_step_changes_no_byte(backend):
    module = _module(backend)
    ours = LeanBucket(SHAPES, state="q8", dtype=torch.bfloat16, device="cuda")
    grads = make_grads(SHAPES, 1, dtype=torch.bfloat16, device="cuda")[0]
    ours.step(module, grads, stochastic_rounding=True)
    before = snapshot(ours.tensors())
    ours.step(module, grads, stochastic_rounding=True, skip=torch.tensor(1.0, device="cuda"))
    assert_unchanged(before, ours.tensors())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_step_captured_in_a_cuda_graph_replays_like_eager(backend):
    module = _module(backend)
    eager = LeanBucket(SHAPES, state="q8", dtype=torch.bfloat16, device="cuda")
    graphed = LeanBucket(SHAPES, state="q8", dtype=torch.bfloat16, device="cuda")
    steps = make_grads(SHAPES, 3, dtype=torch.bfloat16, device="cuda")
    static = [g.clone() for g in steps[0]]
    lr = torch.tensor(1e-2, device="cuda")
    graphed.step(module, static, lr=lr, stochastic_rounding=True)  # builds the tables
    eager.step(module, steps[0], lr=lr, stochastic_rounding=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(module, static, lr=lr, stochastic_rounding=True)
    for grads in steps[1:]:
        for s, g in zip(static, grads):
            s.copy_(g)
        graph.replay()
        eager.step(module, grads, lr=lr, stochastic_rounding=True)
    torch.cuda.synchronize()
    for a, b in zip(snapshot(eager.tensors()), snapshot(graphed.tensors())):
        assert torch.equal(a, b)
