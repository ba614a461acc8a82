"""Partitioned params and cross-rank overflow, on 2 spawned ranks: ZeroRedundancyOptimizer
and hand-sharded plain params with ``process_group=`` clip by the norm over every rank's
params, as ``clip_grad_norm_`` over the whole model (without it each rank clips by its own
part's norm: checked to differ); an overflow on one rank only makes every rank skip and keep
one scale, with ``LossScaler(process_group=...)`` (stepping our optimizers or torch's), and
on FSDP2 with LossScaler or torch's ShardedGradScaler (both of its flows)."""

import functools
import warnings

import pytest
import torch

from _harness import device_for, ranks  # noqa: F401  (ranks: a fixture)
from optim_cases import (MAX_NORM, OPTIMIZERS, STEPS, assert_close_to, batch, fsdp2_model, fused,
                         loss_of, make_model, mesh_of, optimizer_backends, reference_run,
                         rows_of)

INF = float("inf")


def _world_group():
    import torch.distributed as dist

    return dist.group.WORLD


def check_zero_matches_torch(rank, world, dist_backend, kind):
    import fusedopt as fo
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    device = device_for(dist_backend, rank)
    ref, ref_norms = reference_run(kind, device)
    backend = optimizer_backends(device, with_triton=False)[0]
    results = {}
    for group in (_world_group(), None):
        model = make_model(device)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        name, kwargs = ("FusedAdamW", dict(lr=1e-2, weight_decay=0.1)) if kind == "adamw" else \
            ("FusedSGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))
        local_class = functools.partial(getattr(fo.optim, name), process_group=group,
                                        backend=backend)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=local_class,
                                      max_grad_norm=MAX_NORM, **kwargs)
        norms = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(STEPS):
                x, y = batch(step, device)
                loss_of(ddp, rows_of(x, rank, world), rows_of(y, rank, world)).backward()
                opt.step()
                opt.zero_grad()
                norms.append(opt.optim.last_grad_norm.clone())
        warned = [w for w in caught if "clips by the norm of its own params" in str(w.message)]
        assert len(warned) == (group is None), [str(w.message) for w in caught]
        results[group is not None] = torch.stack(norms), list(model.parameters())
    norms, params = results[True]
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=0)
    assert_close_to(params, ref, f"ZeRO {kind}")
    local_norms = results[False][0]
    assert not torch.allclose(local_norms, ref_norms, rtol=1e-3)  # each rank's own part's norm
    return True


def check_hand_sharded_matches_torch(rank, world, dist_backend, kind):
    """Each rank steps every other param of the model (plain tensors), all ranks clip by
    the norm over all of them."""
    device = device_for(dist_backend, rank)
    ref, ref_norms = reference_run(kind, device)
    for backend in optimizer_backends(device, with_triton=False):
        model = make_model(device)
        params = list(model.parameters())
        mine = params[rank::world]
        opt = fused(kind, mine, backend, process_group=_world_group())
        for step in range(STEPS):
            model.zero_grad()
            loss_of(model, *batch(step, device)).backward()
            opt.step()
            torch.testing.assert_close(opt.last_grad_norm, ref_norms[step], rtol=1e-5, atol=0)
            for i, p in enumerate(params):  # the owners send their updated params
                torch.distributed.broadcast(p.data, src=i % world)
        assert_close_to(params, ref, f"hand-sharded {kind} {backend}")
    return True


def check_loss_scaler_overflow_on_one_rank(rank, world, dist_backend, kind, flow):
    """Hand-sharded params, optimizers without a group of their own (no clipping): only
    the scaler's group makes both ranks skip step 1, whose overflow only rank 1 sees."""
    import fusedopt as fo

    device = device_for(dist_backend, rank)
    ref, _ = reference_run(kind, device, skip={1}, max_norm=None)
    backend = optimizer_backends(device, with_triton=False)[0]
    out = {}
    for group in (_world_group(), None):
        model = make_model(device)
        params = list(model.parameters())
        opt = fused(kind, params[rank::world], backend, max_norm=None)
        scaler = fo.amp.LossScaler(device.type, init_scale=2.0**10, growth_interval=2,
                                   process_group=group)
        for step in range(STEPS):
            model.zero_grad()
            scaler.scale(loss_of(model, *batch(step, device))).backward()
            if step == 1 and rank == 1:
                params[1].grad[0] = INF  # a param rank 1 steps
            if flow == "unscale_":
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            for i, p in enumerate(params):
                torch.distributed.broadcast(p.data, src=i % world)
        out[group is not None] = scaler.get_scale(), int(opt.skipped_steps)
        if group is not None:
            assert_close_to(params, ref, f"LossScaler {flow} {kind}")
    return out


def check_loss_scaler_group_with_a_torch_optimizer(rank, world, dist_backend):
    """As above with torch's AdamW on each rank's params: ``unscale_`` sums the flag over
    the scaler's group, so rank 0 skips step 1 too (as the whole-model reference does)."""
    import fusedopt as fo

    device = device_for(dist_backend, rank)
    ref, _ = reference_run("adamw", device, skip={1}, max_norm=None)
    model = make_model(device)
    params = list(model.parameters())
    _, _, torch_class, kwargs = OPTIMIZERS["adamw"]
    opt = torch_class(params[rank::world], foreach=False, **kwargs)
    scaler = fo.amp.LossScaler(device.type, init_scale=2.0**10, growth_interval=2,
                               process_group=_world_group())
    for step in range(STEPS):
        model.zero_grad()
        scaler.scale(loss_of(model, *batch(step, device))).backward()
        if step == 1 and rank == 1:
            params[1].grad[0] = INF
        scaler.step(opt)
        scaler.update()
        for i, p in enumerate(params):
            torch.distributed.broadcast(p.data, src=i % world)
    assert_close_to(params, ref, "LossScaler(process_group=) with torch.optim.AdamW")
    return scaler.get_scale()


def check_fsdp2_scalers_skip_together(rank, world, dist_backend, kind, scaler_kind, flow):
    """FSDP2: an inf in rank 1's shard of a gradient; every rank skips that step and keeps
    the same scale.  ``flow`` "step": the optimizer unscales and clips; "unscale_": the
    scaler unscales, ``clip_grad_norm_`` clips, the optimizer only steps."""
    import fusedopt as fo
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    device = device_for(dist_backend, rank)
    ref, _ = reference_run(kind, device, skip={1})
    model = fsdp2_model(device, mesh_of(device, (world,)))
    backend = optimizer_backends(device, with_triton=False)[0]
    opt = fused(kind, model.parameters(), backend,
                max_norm=MAX_NORM if flow == "step" else None)
    make = fo.amp.LossScaler if scaler_kind == "LossScaler" else ShardedGradScaler
    scaler = make(device.type, init_scale=2.0**10, growth_interval=2)
    for step in range(STEPS):
        x, y = batch(step, device)
        scaler.scale(loss_of(model, rows_of(x, rank, world), rows_of(y, rank, world))).backward()
        if step == 1 and rank == 1:
            model[0].weight.grad.to_local()[0, 0] = INF
        if flow == "unscale_":
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert_close_to(model.parameters(), ref, f"FSDP2 {scaler_kind} {flow} {kind}")
    return scaler.get_scale(), int(opt.skipped_steps)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_zero_redundancy_optimizer_clips_by_the_global_norm(ranks, kind):
    dist_backend, pool = ranks
    assert pool.run(check_zero_matches_torch, dist_backend, kind) == [True, True]


def test_hand_sharded_params_clip_by_the_global_norm(ranks):
    dist_backend, pool = ranks
    assert pool.run(check_hand_sharded_matches_torch, dist_backend, "adamw") == [True, True]


@pytest.mark.parametrize("flow", ["step", "unscale_"])
def test_loss_scaler_group_makes_every_rank_skip(ranks, flow):
    dist_backend, pool = ranks
    out = pool.run(check_loss_scaler_overflow_on_one_rank, dist_backend, "adamw", flow)
    assert out[0][True] == out[1][True] and out[0][True][1] == 1  # one scale, one skip each
    assert out[0][False][1] == 0 and out[1][False][1] == 1  # without the group: rank 1 alone


def test_loss_scaler_group_with_a_torch_optimizer(ranks):
    dist_backend, pool = ranks
    scales = pool.run(check_loss_scaler_group_with_a_torch_optimizer, dist_backend)
    assert scales[0] == scales[1] == 2.0**10  # backed off once, grown once


@pytest.mark.parametrize("scaler_kind,flow", [("LossScaler", "step"), ("LossScaler", "unscale_"),
                                              ("ShardedGradScaler", "step"),
                                              ("ShardedGradScaler", "unscale_")])
def test_fsdp2_overflow_on_one_rank_skips_everywhere(ranks, scaler_kind, flow):
    dist_backend, pool = ranks
    out = pool.run(check_fsdp2_scalers_skip_together, dist_backend, "adamw", scaler_kind, flow)
    assert out[0] == out[1] and out[0][1] == 1, out


def check_rank_without_gradients_still_takes_part(rank, world, dist_backend):
    """Rank 1's only param has no gradient: its step still joins the all-reduce (rank 0
    would wait for it otherwise) and both get the same norm and clip."""
    device = device_for(dist_backend, rank)
    backend = optimizer_backends(device, with_triton=False)[0]
    p = torch.full((3,), 1.0, device=device, requires_grad=True)
    opt = fused("sgd", [p], backend, max_norm=1.0, process_group=_world_group())
    if rank == 0:
        p.grad = torch.full((3,), 4.0, device=device)  # norm sqrt(48)
    opt.step()
    return float(opt.last_grad_norm), p.detach().tolist()


def test_a_rank_without_gradients_takes_part_in_the_norm(ranks):
    dist_backend, pool = ranks
    (norm0, p0), (norm1, p1) = pool.run(check_rank_without_gradients_still_takes_part,
                                        dist_backend)
    assert norm0 == norm1 == pytest.approx(48 ** 0.5, rel=1e-6)
    d_p = 4.0 / 48 ** 0.5 + 1e-3  # the clipped gradient + weight decay; Nesterov, momentum 0.9
    assert p1 == [1.0] * 3 and p0 == pytest.approx([1.0 - 0.1 * 1.9 * d_p] * 3, rel=1e-6)
