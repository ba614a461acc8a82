"""The fused optimizers on DTensor params, on 2 spawned ranks (gloo on CPU; NCCL where 2 GPUs
exist): FSDP2 (``fully_shard``, uneven shards, one rank holding an empty shard), tensor
parallelism (sharded and replicated params, a plain param left alone, a Partial gradient),
FSDP2 over tensor parallelism (two meshes) and HSDP (a replicated mesh dim) against torch.optim + ``clip_grad_norm_`` on the whole
model, with clipping at every step; states are DTensors with the params' placements."""

import pytest
import torch

from _harness import device_for, ranks  # noqa: F401  (ranks: a fixture)
from optim_cases import (EVEN, MAX_NORM, STEPS, assert_close_to, fsdp2_model, fused,
                         make_model, mesh_of, optimizer_backends, reference_run, train)

def assert_dtensor_states(opt, params):
    from torch.distributed.tensor import DTensor

    for p in params:
        state = opt.state[p]
        assert state, "no state"
        for key, value in state.items():
            if key == "step":
                assert type(value) is torch.Tensor and value.dim() == 0
            else:
                assert type(value) is DTensor and value.placements == p.placements, key
                assert value.to_local().shape == p.to_local().shape, key


def check_fsdp2_matches_torch(rank, world, dist_backend, kind, with_triton):
    device = device_for(dist_backend, rank)
    mesh = mesh_of(device, (world,))
    ref, ref_norms = reference_run(kind, device)
    ran = []
    for backend in optimizer_backends(device, with_triton):
        model = fsdp2_model(device, mesh)
        assert min(p.to_local().numel() for p in model.parameters()) == (rank == 0)
        opt = fused(kind, model.parameters(), backend)
        assert opt.process_group is mesh.get_group()
        norms = train(model, opt, rank, world, range(STEPS), device)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
        assert bool((norms > MAX_NORM).all())  # clipping acted at every step
        assert_close_to(model.parameters(), ref, f"FSDP2 {kind} {backend}")
        assert_dtensor_states(opt, model.parameters())
        ran.append(backend)
    return ran


def check_tp_and_hsdp_match_torch(rank, world, dist_backend, kind):
    """Tensor parallelism (row- and column-sharded weights, a replicated bias whose
    gradient is handed over once as Partial, a plain last layer), FSDP2 over it (params on
    a 2-D mesh and on its sub-mesh), then HSDP (replicated over a mesh dim of 2, sharded
    over one of 1): nothing is counted twice in the norm."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    from torch.distributed.fsdp import fully_shard

    device = device_for(dist_backend, rank)
    ref, ref_norms = reference_run(kind, device, widths=EVEN)
    mesh = mesh_of(device, (world,))
    model = parallelize_module(make_model(device, widths=EVEN), mesh,
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    bias = model[2].bias
    assert bias.placements == (Replicate(),) and type(model[4].weight) is torch.nn.Parameter

    def partial_bias_grad(step):
        if step == 1:  # the sum over the ranks of the halves is the gradient
            bias.grad = DTensor.from_local(bias.grad.to_local() / world, mesh, [Partial()],
                                           run_check=False)

    backend = optimizer_backends(device, with_triton=False)[0]
    opt = fused(kind, model.parameters(), backend)
    norms = train(model, opt, rank, world, range(STEPS), device, split_rows=False,
                  edit_grads=partial_bias_grad)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_close_to(model.parameters(), ref, f"TP {kind}")

    # FSDP2 over tensor parallelism: the tensor-parallel params on the 2-D mesh, the plain
    # layer's on its data-parallel sub-mesh; one group over both
    dp_tp = mesh_of(device, (world, 1), ("dp", "tp"))
    model = parallelize_module(make_model(device, widths=EVEN), dp_tp["tp"],
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=dp_tp["dp"])
    assert model[0].weight.device_mesh.ndim == 2 and model[4].weight.device_mesh.ndim == 1
    opt = fused(kind, model.parameters(), backend)
    norms = train(model, opt, rank, world, range(STEPS), device)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_close_to(model.parameters(), ref, f"FSDP2 + TP {kind}")

    ref, ref_norms = reference_run(kind, device)
    hsdp = mesh_of(device, (world, 1), ("replicate", "shard"))
    model = fully_shard(make_model(device), mesh=hsdp)
    assert model[0].weight.placements[0] == Replicate()
    opt = fused(kind, model.parameters(), backend)
    norms = train(model, opt, rank, world, range(STEPS), device)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_close_to(model.parameters(), ref, f"HSDP {kind}")
    assert_dtensor_states(opt, model.parameters())
    return True


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fsdp2_matches_torch_with_clipping(ranks, kind):
    dist_backend, pool = ranks
    with_triton = kind == "adamw"
    ran = pool.run(check_fsdp2_matches_torch, dist_backend, kind, with_triton)
    assert ran[0] == ran[1] == optimizer_backends(device_for(dist_backend, 0), with_triton)
    assert "torch" in ran[0]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_tensor_parallel_fsdp2_over_tp_and_hsdp_match_torch(ranks, kind):
    dist_backend, pool = ranks
    assert pool.run(check_tp_and_hsdp_match_torch, dist_backend, kind) == [True, True]


def check_group_of_a_sub_mesh(rank, world, dist_backend):
    """Params on a 2-D sub-mesh of one rank each (of a world x 1 x 1 mesh): each rank's
    optimizer gets a group of its own mesh's ranks, made by those ranks only."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    device = device_for(dist_backend, rank)
    sub = mesh_of(device, (world, 1, 1), ("a", "b", "c"))["b", "c"]
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, device=device), sub,
                                             [Shard(0), Replicate()]))
    opt = fused("sgd", [p], optimizer_backends(device, with_triton=False)[0])
    p.grad = distribute_tensor(torch.full((4,), 1.0 + rank, device=device), sub,
                               [Shard(0), Replicate()])
    opt.step()
    return dist.get_process_group_ranks(opt.process_group), float(opt.last_grad_norm)


def test_a_sub_mesh_gets_a_group_of_its_ranks(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_group_of_a_sub_mesh, dist_backend) == [([0], 2.0), ([1], 4.0)]
