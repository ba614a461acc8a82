"""fusedopt.vocab_parallel_cross_entropy on plain local shards, on 2 spawned ranks: each
rank holds some of the classes; the loss (on every rank) and each rank's gradient columns
equal F.cross_entropy in float64 on the full logits, for every flag and reduction, with an
even split and an explicit uneven one; only two all-reduces of O(rows) values are sent."""

import pytest
import torch
import torch.nn.functional as F

import fusedopt as fo
from fusedopt import backends
from _harness import device_for, ranks  # noqa: F401  (ranks: a fixture)
from loss_cases import (CE_CASES, IGNORE, REDUCTIONS, assert_close, assert_lowp_rule,
                        loss_kwargs, make_inputs, random_grad_output, reference_and_grad)

OP = "vocab_parallel_cross_entropy"
_GROUPS = {}


def _subgroup(world):
    """A process group of its own over every rank (new_group is collective: made once)."""
    import torch.distributed as dist

    if world not in _GROUPS:
        _GROUPS[world] = dist.new_group(list(range(world)))
    return _GROUPS[world]


def _columns(t, bounds, rank, class_dim):
    start, stop = bounds[rank], bounds[rank + 1]
    return t.narrow(class_dim, start, stop - start)


def check_matches_full_logits(rank, world, dist_backend, split):
    """Every case of loss_cases on this rank's columns; `split` "even" (the default class
    range) or "uneven" (explicit class_offset / num_classes, rank 0 holding more)."""
    device = device_for(dist_backend, rank)
    group = _subgroup(world)
    checked = 0
    for name, case in CE_CASES.items():
        n_classes = 7 if split == "uneven" else 8
        x, y, w = make_inputs(case, device, n_classes=n_classes)
        class_dim = 1 if x.dim() >= 2 else 0
        n_classes = x.shape[class_dim]
        if split == "even":
            bounds = [n_classes // world * r for r in range(world + 1)]
            extra = {}
        else:
            bounds = [0] + [n_classes - (world - r) * (n_classes // (world + 1))
                            for r in range(1, world)] + [n_classes]
            extra = dict(class_offset=bounds[rank], num_classes=n_classes)
        for backend, reduction in [(b, r) for b in backends.usable(OP, device)
                                   for r in REDUCTIONS]:
            if backend == "triton" and name not in ("everything", "soft", "inplace"):
                continue  # (the interpreter is slow: the Triton kernels on a few cases)
            kw = loss_kwargs(case, reduction)
            local = _columns(x, bounds, rank, class_dim).clone().requires_grad_()
            target = _columns(y, bounds, rank, class_dim) if y.is_floating_point() else y
            loss = fo.vocab_parallel_cross_entropy(local, target, group, w, backend=backend,
                                                   **kw, **extra)
            go = random_grad_output(loss.shape).to(device) if reduction == "none" else None
            loss.backward(go)
            want, want_grad = reference_and_grad(x, y, w, go, **kw)
            tag = f"{split} {name} {backend} {reduction}"
            assert loss.dtype == x.dtype, tag
            assert_close(loss, want, f"{tag}: loss")
            assert_close(local.grad, _columns(want_grad, bounds, rank, class_dim),
                         f"{tag}: grad")
            checked += backend == "torch"
    return checked


@pytest.mark.parametrize("split", ["even", "uneven"])
def test_matches_full_logits(ranks, split):
    dist_backend, pool = ranks
    checked = pool.run(check_matches_full_logits, dist_backend, split)
    assert checked == [len(CE_CASES) * len(REDUCTIONS)] * 2


def check_low_precision(rank, world, dist_backend):
    """bf16 / fp16 logits: the loss and the gradient in that dtype, within twice torch's own
    error in it (F.cross_entropy on the full low-precision logits) of the float64 result."""
    device = device_for(dist_backend, rank)
    for dtype in (torch.bfloat16, torch.float16):
        x, y, w = make_inputs(CE_CASES["smoothing_weight"], device, n_rows=16, n_classes=64,
                              dtype=dtype)
        kw = dict(ignore_index=IGNORE, label_smoothing=0.2)
        local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
        loss = fo.vocab_parallel_cross_entropy(local, y, None, w, **kw)
        loss.backward()
        want, want_grad = reference_and_grad(x, y, w, reduction="mean", **kw)
        full = x.clone().requires_grad_()
        theirs = F.cross_entropy(full, y, w.to(dtype), **kw)
        theirs.backward()
        assert loss.dtype == dtype and local.grad.dtype == dtype
        assert_lowp_rule(loss, want, theirs, f"{dtype} loss")
        assert_lowp_rule(local.grad, want_grad.chunk(world, dim=1)[rank],
                         full.grad.chunk(world, dim=1)[rank], f"{dtype} grad")
    return True


def test_low_precision(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_low_precision, dist_backend) == [True, True]


def check_communication(rank, world, dist_backend):
    """The op's collectives, recorded: a MAX all-reduce of (N,) and a SUM all-reduce of
    (N, k) fp32 values per forward (k = 2, 3 with smoothing or soft targets), none in
    backward."""
    from fusedopt.ops import vocab_parallel

    device = device_for(dist_backend, rank)
    calls = []
    real = vocab_parallel._all_reduce

    def recording(group_name):
        reduce = real(group_name)

        def record(t, op):
            calls.append((op, tuple(t.shape), t.dtype))
            reduce(t, op)

        return record

    vocab_parallel._all_reduce = recording
    try:
        seen = []
        for name, k in (("plain", 2), ("everything", 3), ("soft", 3)):
            x, y, w = make_inputs(CE_CASES[name], device, n_rows=5, n_classes=8)
            local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
            target = y.chunk(world, dim=1)[rank] if y.is_floating_point() else y
            calls.clear()
            loss = fo.vocab_parallel_cross_entropy(
                local, target, None, w, **loss_kwargs(CE_CASES[name], "mean"))
            forward = list(calls)
            loss.backward()
            assert calls == forward, f"{name}: collectives in backward: {calls[len(forward):]}"
            assert forward == [("max", (5,), torch.float32), ("sum", (5, k), torch.float32)], \
                f"{name}: {forward}"
            seen.append(forward)
    finally:
        vocab_parallel._all_reduce = real
    return seen


def test_communication_is_two_row_all_reduces(ranks):
    dist_backend, pool = ranks
    pool.run(check_communication, dist_backend)


def check_refusals(rank, world, dist_backend):
    """Bad arguments: the same clear error on every rank, before any collective."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    x, y, w = make_inputs(CE_CASES["weight_ignore"], device, n_classes=8)
    local = x.chunk(world, dim=1)[rank]
    errors = []

    def expect(exc, fragment, **kw):
        args = dict(local_logits=local, target=y)
        args.update(kw)
        with pytest.raises(exc, match=fragment):
            fo.vocab_parallel_cross_entropy(**args)
        errors.append(fragment)

    expect(ValueError, "weight must hold every class", weight=w.chunk(world)[rank])
    expect(ValueError, "class_offset and num_classes go together", class_offset=0)
    expect(ValueError, r"must lie in \[0, num_classes\)", class_offset=6, num_classes=8)
    expect(TypeError, "group must be a torch.distributed ProcessGroup", group="world")
    other = "cuda" if device.type == "cpu" else "cpu"  # a backend that cannot run here
    expect(RuntimeError, f"backend '{other}'", backend=other)
    expect(ValueError, "z_loss", z_loss=-1.0)
    if device.type == "cpu":  # (on GPUs only with FUSEDOPT_CHECK=1: the check syncs)
        bad = y.clone()
        bad[1] = 8  # a class outside [0, num_classes), the same on every rank
        expect(IndexError, "target value 8 is out of range", target=bad)
    mesh = init_device_mesh(device.type, (world,))
    expect(TypeError, "not a DTensor", local_logits=distribute_tensor(x, mesh, [Shard(1)]))
    dist.barrier()
    return errors


def test_refusals(ranks):
    dist_backend, pool = ranks
    pool.run(check_refusals, dist_backend)


def test_needs_an_initialised_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("this test process already has a default process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fo.vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def check_compiles(rank, world, dist_backend):
    """torch.compile(fullgraph=True) traces through the loss (the custom op is opaque to
    the compiler, its collectives run inside it) and equals eager, loss and gradient."""
    device = device_for(dist_backend, rank)
    x, y, w = make_inputs(CE_CASES["everything"], device, n_classes=8)
    kw = loss_kwargs(CE_CASES["everything"], "mean")

    def loss_fn(local, target, weight):
        return fo.vocab_parallel_cross_entropy(local, target, None, weight, **kw)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
        loss = fn(local, y, w)
        loss.backward()
        results.append((loss.detach(), local.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    return True


def test_compiles_fullgraph(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_compiles, dist_backend, timeout=300) == [True, True]


def check_float64_and_autograd_patterns(rank, world, dist_backend):
    """float64 logits (offset by 1e3, beyond fp32's digits) on the default backend: the
    loss and gradient of F.cross_entropy in float64 to float64 rounding, for class and
    probability targets; an fp32 backend named for them is a TypeError.  A second backward
    (retain_graph=True) adds the same gradient again; create_graph=True and torch.func
    transforms are refused with a message that says so (every rank alike)."""
    device = device_for(dist_backend, rank)
    group = _subgroup(world)
    for name in ("everything", "soft"):
        case = CE_CASES[name]
        x, y, w = make_inputs(case, device, n_classes=8, dtype=torch.float64)
        x = x + 1e3
        kw = loss_kwargs(case, "mean")
        local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
        target = y.chunk(world, dim=1)[rank] if y.is_floating_point() else y
        loss = fo.vocab_parallel_cross_entropy(local, target, group, w, **kw)
        loss.backward(retain_graph=True)
        want, want_grad = reference_and_grad(x, y, w, **kw)
        mine = want_grad.chunk(world, dim=1)[rank]
        assert loss.dtype == torch.float64 and local.grad.dtype == torch.float64
        assert_close(loss, want, f"{name}: float64 loss", rtol=1e-12, atol=1e-13)
        assert_close(local.grad, mine, f"{name}: float64 grad", rtol=1e-12, atol=1e-13)
        loss.backward()
        assert_close(local.grad, 2 * mine, f"{name}: second backward", rtol=1e-12, atol=1e-13)
        with pytest.raises(RuntimeError, match="create_graph=True.*vocab-parallel"):
            torch.autograd.grad(fo.vocab_parallel_cross_entropy(local, target, group, w, **kw),
                                local, create_graph=True)
        with pytest.raises(TypeError, match="'cpu' cannot run vocab_parallel_cross_entropy "
                                            "on float64"):
            fo.vocab_parallel_cross_entropy(local, target, group, w, backend="cpu", **kw)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda t: fo.vocab_parallel_cross_entropy(t, target, group, w))(local)
    return True


def test_float64_and_autograd_patterns(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_float64_and_autograd_patterns, dist_backend) == [True, True]
