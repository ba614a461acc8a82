"""Losses on DTensor logits, on 2 spawned ranks: float64 logits (rows split or classes
split) equal F.cross_entropy in float64 to float64 rounding; a second backward through a
retained graph adds the same gradient again; what is not supported on DTensors -- a
differentiable backward (create_graph=True), targets that require grad -- is refused with
the same clear error on every rank."""

import pytest
import torch

from _harness import backend_skip_reason, device_for, rank_pool
from loss_cases import CE_CASES, IGNORE, assert_close, loss_kwargs, make_inputs, reference_and_grad

TIGHT = dict(rtol=1e-12, atol=1e-13)


def check_dtensor_autograd(rank, world, dist_backend):
    import fusedopt as fo
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    mesh = init_device_mesh(device.type, (world,))
    case = CE_CASES["everything"]
    x, y, w = make_inputs(case, device, dtype=torch.float64)
    x = x + 1e3  # beyond fp32's digits
    kw = loss_kwargs(case, "mean")
    want, want_grad = reference_and_grad(x, y, w, **kw)
    for split in (Shard(0), Shard(1)):
        logits = distribute_tensor(x, mesh, [split]).requires_grad_()
        target = distribute_tensor(y, mesh, [Shard(0) if split == Shard(0) else Replicate()])
        loss = fo.cross_entropy(logits, target, w, **kw)
        loss.backward(retain_graph=True)
        tag = f"{split}"
        assert loss.dtype == torch.float64, tag
        assert_close(loss.full_tensor(), want, f"{tag}: float64 loss", **TIGHT)
        assert_close(logits.grad.full_tensor(), want_grad, f"{tag}: float64 grad", **TIGHT)
        loss.backward()
        assert_close(logits.grad.full_tensor(), 2 * want_grad, f"{tag}: second backward",
                     **TIGHT)
        with pytest.raises(RuntimeError, match="create_graph=True.*(DTensor|vocab-parallel)"):
            torch.autograd.grad(fo.cross_entropy(logits, target, w, **kw), logits,
                                create_graph=True)
    rows = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    q = distribute_tensor(torch.softmax(x, dim=1), mesh, [Shard(0)]).requires_grad_()
    with pytest.raises(ValueError, match="DTensor logits: a target or weight that requires "
                                         "grad"):
        fo.cross_entropy(rows, q, ignore_index=IGNORE)
    dist.barrier()
    return True


def test_dtensor_autograd():
    reason = backend_skip_reason("gloo", 2)
    if reason is not None:
        pytest.skip(f"gloo: {reason}")
    assert rank_pool(2, "gloo").run(check_dtensor_autograd, "gloo") == [True, True]
