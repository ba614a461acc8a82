"""The losses on DTensor logits, on 2 spawned ranks (gloo on CPU; NCCL where 2 GPUs exist):
rows split over the mesh (Shard(0)), replicated, Partial, and cross-entropy with the classes
split (Shard(1): the vocab-parallel path, also under torch's loss_parallel()), against
F.cross_entropy in float64 on the full logits: loss, gradient, every flag and reduction."""

import os

import pytest
import torch
import torch.nn.functional as F

from _harness import backend_skip_reason, device_for, rank_pool, ranks  # noqa: F401  (ranks: a fixture)
from loss_cases import (CE_CASES, IGNORE, REDUCTIONS, assert_close, loss_kwargs, make_inputs,
                        random_grad_output, reference_and_grad)

_MESHES = {}


def _mesh(device, world):
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, world)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, (world,))
    return _MESHES[key]


def _loss_backends(device, op):
    """Backends with kernels of `op` on `device` (Triton, under the interpreter on CPU, only
    for the cases of _TRITON_CASES)."""
    from fusedopt import backends

    return backends.usable(op, device)


_TRITON_CASES = ("everything", "soft", "spatial")


def _placements(kind, x, y):
    """(logits placements, target placements) of a placement kind, or None to skip."""
    from torch.distributed.tensor import Replicate, Shard

    class_dim = 1 if x.dim() >= 2 else 0
    if kind == "rows":
        return None if x.dim() < 2 else ([Shard(0)], [Shard(0)])
    if kind == "replicate":
        return [Replicate()], [Replicate()]
    if kind == "classes":
        soft = y.is_floating_point()
        return [Shard(class_dim)], [Shard(class_dim)] if soft else [Replicate()]
    raise ValueError(kind)


def _distributed(kind, mesh, x, y):
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    if kind == "partial":  # two halves that add up to the logits
        dx = DTensor.from_local(x / 2, mesh, [Partial()], run_check=False)
        return dx.detach().requires_grad_(), distribute_tensor(y, mesh, [Replicate()])
    placements = _placements(kind, x, y)
    if placements is None:
        return None
    return (distribute_tensor(x, mesh, placements[0]).requires_grad_(),
            distribute_tensor(y, mesh, placements[1]))


def check_cross_entropy(rank, world, dist_backend, kind, case_names):
    import fusedopt as fo
    from torch.distributed.tensor import distribute_tensor

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)
    checked = 0
    for name in case_names:
        case = CE_CASES[name]
        op = "vocab_parallel_cross_entropy" if kind == "classes" else "cross_entropy"
        for backend in _loss_backends(device, op):
            if backend == "triton" and name not in _TRITON_CASES:
                continue
            for reduction in REDUCTIONS:
                x, y, w = make_inputs(case, device)
                pair = _distributed(kind, mesh, x.clone(), y)  # (inplace_backward overwrites)
                if pair is None:
                    continue
                dx, dy = pair
                kw = loss_kwargs(case, reduction)
                loss = fo.cross_entropy(dx, dy, w, backend=backend, **kw)
                tag = f"{kind} {name} {backend} {reduction}"
                go = None
                if reduction == "none":
                    go = random_grad_output(loss.shape).to(device)
                    loss.backward(distribute_tensor(go, mesh, loss.placements))
                else:
                    loss.backward()
                want, want_grad = reference_and_grad(x, y, w, go, **kw)
                assert_close(loss.full_tensor(), want, f"{tag}: loss")
                assert_close(dx.grad.full_tensor(), want_grad, f"{tag}: grad")
                if kw.get("inplace_backward") and x.dim() == 2 and kind != "partial":
                    # the gradient went into the logits' own local storage
                    assert torch.equal(dx.to_local(), dx.grad.to_local()), tag
                checked += 1
    return checked


@pytest.mark.parametrize("kind", ["rows", "replicate", "classes", "partial"])
def test_cross_entropy_matches_torch(ranks, kind):
    dist_backend, pool = ranks
    checked = pool.run(check_cross_entropy, dist_backend, kind, tuple(CE_CASES))
    assert checked[0] == checked[1] and checked[0] >= 2 * len(REDUCTIONS)


def check_loss_parallel(rank, world, dist_backend):
    """Under torch's loss_parallel(): class-split logits, a plain (replicated) target, as
    in torch's documentation; the result equals torch's own loss_parallel F.cross_entropy.
    (Class weights and ignored rows are checked separately: torch 2.13's loss_parallel
    backward fails on an ignored row when weights are given.)"""
    import fusedopt as fo
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)
    for reduction, case in [(r, c) for r in REDUCTIONS for c in ("weight", "ignore")]:
        x, y, w = make_inputs({case: True}, device, n_classes=10)
        ours = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
        theirs = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
        with loss_parallel():
            got = fo.cross_entropy(ours, y, w, ignore_index=IGNORE, reduction=reduction)
            want = F.cross_entropy(theirs, y, w, ignore_index=IGNORE, reduction=reduction)
            assert got.placements == want.placements, (got.placements, want.placements)
            got.sum().backward()
            want.sum().backward()
        assert_close(got.full_tensor(), want.full_tensor(), f"{reduction}: loss")
        assert ours.grad.placements == (Shard(1),)
        assert_close(ours.grad.full_tensor(), theirs.grad.full_tensor(), f"{reduction}: grad")
    return True


def test_loss_parallel_matches_torch(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_loss_parallel, dist_backend) == [True, True]


def check_class_split_never_gathers(rank, world, dist_backend):
    """Class-split logits: only all-reduces of O(rows) values, never an all-gather or
    all-to-all of the logits (CommDebugMode sees DTensor's own collectives; the op's two
    all-reduces are counted in test_vocab_parallel.py)."""
    import fusedopt as fo
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)
    x, y, w = make_inputs(CE_CASES["everything"], device, n_classes=10)
    dx = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    dy = distribute_tensor(y, mesh, [Replicate()])
    with CommDebugMode() as comm:
        loss = fo.cross_entropy(dx, dy, w, ignore_index=IGNORE, label_smoothing=0.1,
                                z_loss=0.01, softcap=3.0)
        loss.backward()
    counts = {str(op): n for op, n in comm.get_comm_counts().items() if n}
    assert all("all_reduce" in op for op in counts), counts
    return counts


def test_class_split_logits_are_never_gathered(ranks):
    dist_backend, pool = ranks
    pool.run(check_class_split_never_gathers, dist_backend)


def _grad_of(loss_fn, x, grad_output):
    x64 = x.detach().double().requires_grad_()
    loss = loss_fn(x64)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, x64, go)
    return loss.detach(), grad


def _run_and_backward(loss, mesh, device):
    from torch.distributed.tensor import distribute_tensor

    if loss.dim() == 0:
        loss.backward()
        return None
    go = random_grad_output(loss.shape).to(device)
    loss.backward(distribute_tensor(go, mesh, loss.placements))
    return go


def check_focal_losses(rank, world, dist_backend, kind):
    """focal_loss and sigmoid_focal_loss on DTensors (their ops' sharding rules); class-split
    logits of the focal loss are redistributed by DTensor (no vocab-parallel focal)."""
    import fusedopt as fo
    from fusedopt import backends
    from loss_cases import focal_reference, sigmoid_focal_reference
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)
    logits_placement = {"rows": Shard(0), "replicate": Replicate(), "classes": Shard(1),
                        "partial": Partial()}[kind]
    target_placement = Shard(0) if kind == "rows" else Replicate()
    checked = 0
    flags = ((None, 2.0, 0.0), ("tensor", 0.5, 0.1), (0.25, 2.0, 0.2))
    for backend in backends.usable("focal_loss", device):
        # (the reductions alternate reduce=True/False of sigmoid_focal_loss_fwd on the same
        # input placements: a sharding cache keyed without `reduce` would mix them up)
        for reduction in REDUCTIONS:
            for alpha, gamma, eps in flags[:1] if backend == "triton" else flags:
                x, y, _ = make_inputs({"ignore": True}, device, seed=checked)
                if alpha == "tensor":
                    alpha = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(3))
                    alpha = alpha.to(device) + 0.2
                if kind == "partial":
                    dx = DTensor.from_local(x / 2, mesh, [Partial()], run_check=False)
                    dx = dx.detach().requires_grad_()
                else:
                    dx = distribute_tensor(x, mesh, [logits_placement]).requires_grad_()
                dy = distribute_tensor(y, mesh, [target_placement])
                loss = fo.focal_loss(dx, dy, gamma, alpha, IGNORE, reduction, eps,
                                     backend=backend)
                go = _run_and_backward(loss, mesh, device)
                want, want_grad = _grad_of(lambda x64: focal_reference(
                    x64, y, gamma=gamma, alpha=alpha, label_smoothing=eps,
                    reduction=reduction), x, go)
                tag = f"focal {kind} {backend} {reduction} alpha={alpha} gamma={gamma}"
                assert_close(loss.full_tensor(), want, f"{tag}: loss")
                assert_close(dx.grad.full_tensor(), want_grad, f"{tag}: grad")

                sig_placement = Shard(1) if kind == "classes" else logits_placement
                t = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.3)
                t = t.float().to(device)
                if kind == "partial":
                    dx = DTensor.from_local(x / 2, mesh, [Partial()], run_check=False)
                    dx, dt = dx.detach().requires_grad_(), distribute_tensor(t, mesh, [Replicate()])
                else:
                    dx = distribute_tensor(x, mesh, [sig_placement]).requires_grad_()
                    dt = distribute_tensor(t, mesh, [sig_placement])
                a = 0.25 if alpha is None else -1.0
                loss = fo.sigmoid_focal_loss(dx, dt, a, gamma, reduction, label_smoothing=eps,
                                             backend=backend)
                go = _run_and_backward(loss, mesh, device)
                want, want_grad = _grad_of(lambda x64: sigmoid_focal_reference(
                    x64, t.double(), alpha=a, gamma=gamma, label_smoothing=eps,
                    reduction=reduction), x, go)
                assert_close(loss.full_tensor(), want, f"sigmoid {tag}: loss")
                assert_close(dx.grad.full_tensor(), want_grad, f"sigmoid {tag}: grad")
                checked += 1
    return checked


@pytest.mark.parametrize("kind", ["rows", "replicate", "classes", "partial"])
def test_focal_losses_match_formulas(ranks, kind):
    dist_backend, pool = ranks
    checked = pool.run(check_focal_losses, dist_backend, kind)
    assert checked[0] == checked[1] >= 9


def check_dtensor_refusals(rank, world, dist_backend):
    """The same error on every rank, so that no rank is left waiting in a collective."""
    import fusedopt as fo
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)
    x, y, w = make_inputs(CE_CASES["weight_ignore"], device)
    rows = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    with pytest.raises(ValueError, match="plain tensor is ambiguous"):
        fo.cross_entropy(rows, y)
    bad = y.clone()
    bad[-1] = x.shape[1]  # a bad class in the last rank's rows only
    with pytest.raises(IndexError, match=f"target value {x.shape[1]} is out of range"):
        fo.cross_entropy(rows, distribute_tensor(bad, mesh, [Shard(0)]), ignore_index=IGNORE)
    classes = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run vocab_parallel"):
        fo.cross_entropy(classes, distribute_tensor(y, mesh, [Replicate()]), backend="cuda",
                         ignore_index=IGNORE)
    dist.barrier()
    return True


def test_dtensor_refusals(ranks):
    dist_backend, pool = ranks
    if dist_backend != "gloo":
        pytest.skip("the cuda backend's refusal of CPU tensors is a gloo case")
    assert pool.run(check_dtensor_refusals, dist_backend) == [True, True]


def check_two_dim_mesh(rank, world, dist_backend):
    """A 2 x 2 mesh (data parallel x tensor parallel): rows split over "dp", classes over
    "tp" (the vocab-parallel path over the tp groups; sums Partial over dp), and rows-only
    or classes-only splits; 'mean' divides by the global denominators."""
    import fusedopt as fo
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    mesh = _MESHES.get("2d") or init_device_mesh(device.type, (2, 2), mesh_dim_names=("dp", "tp"))
    _MESHES["2d"] = mesh
    checked = 0
    layouts = ([Shard(0), Shard(1)], [Shard(0), Replicate()], [Replicate(), Shard(1)])
    for logits_placements in layouts:
        for name in ("everything", "soft"):
            case = CE_CASES[name]
            for reduction in REDUCTIONS:
                x, y, w = make_inputs(case, device, n_rows=6)
                soft = y.is_floating_point()
                target_placements = [p if soft or p != Shard(1) else Replicate()
                                     for p in logits_placements]
                dx = distribute_tensor(x, mesh, logits_placements).requires_grad_()
                dy = distribute_tensor(y, mesh, target_placements)
                kw = loss_kwargs(case, reduction)
                loss = fo.cross_entropy(dx, dy, w, **kw)
                go = _run_and_backward(loss, mesh, device)
                want, want_grad = reference_and_grad(x, y, w, go, **kw)
                tag = f"{logits_placements} {name} {reduction}"
                assert_close(loss.full_tensor(), want, f"{tag}: loss")
                assert_close(dx.grad.full_tensor(), want_grad, f"{tag}: grad")
                checked += 1
    return checked


def test_two_dim_mesh():
    reason = backend_skip_reason("gloo", 4)
    if reason is not None:
        pytest.skip(reason)
    checked = rank_pool(4, "gloo").run(check_two_dim_mesh, "gloo")
    assert checked == [3 * 2 * len(REDUCTIONS)] * 4


def check_edge_cases(rank, world, dist_backend):
    """Plain soft targets of class-split logits, a rank without rows or without classes,
    no rows at all, a target split unlike the logits, and (N, C, d) logits split over the
    classes (still the vocab-parallel path: no logits gathered)."""
    import fusedopt as fo
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    device = device_for(dist_backend, rank)
    mesh = _mesh(device, world)

    def check(tag, x, y, w, logits_placement, target=None, **kw):
        kw.setdefault("reduction", "mean")
        dx = distribute_tensor(x, mesh, [logits_placement]).requires_grad_()
        with CommDebugMode() as comm:
            loss = fo.cross_entropy(dx, y if target is None else target, w, **kw)
            loss.sum().backward()
        want, want_grad = reference_and_grad(x, y, w, torch.ones(loss.shape, device=device),
                                             **kw)
        assert_close(loss.full_tensor(), want, f"{tag}: loss")
        assert_close(dx.grad.full_tensor(), want_grad, f"{tag}: grad")
        return {str(op) for op, n in comm.get_comm_counts().items() if n}

    x, y, w = make_inputs(CE_CASES["soft"], device)
    check("plain soft target", x, y, w, Shard(1), label_smoothing=0.1)
    x, y, w = make_inputs(CE_CASES["weight_ignore"], device, n_rows=1)
    check("one row on two ranks", x, y, w, Shard(0), distribute_tensor(y, mesh, [Shard(0)]),
          ignore_index=IGNORE)
    x, y, w = make_inputs(CE_CASES["plain"], device, n_classes=1)
    check("one class on two ranks", x, y, w, Shard(1), label_smoothing=0.2, z_loss=0.1)
    x, y, w = make_inputs(CE_CASES["plain"], device, n_rows=0)
    for reduction in REDUCTIONS:
        check(f"no rows {reduction}", x, y, w, Shard(1), reduction=reduction)
    x, y, w = make_inputs(CE_CASES["weight_ignore"], device)
    check("target replicated, logits split by rows", x, y, w, Shard(0),
          distribute_tensor(y, mesh, [Replicate()]), ignore_index=IGNORE)
    x, y, w = make_inputs(CE_CASES["spatial"], device)
    ops = check("(N, C, d) split over the classes", x, y, w, Shard(1), ignore_index=IGNORE,
                label_smoothing=0.1)
    assert all("all_reduce" in op for op in ops), ops
    return True


def test_edge_cases(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_edge_cases, dist_backend) == [True, True]
