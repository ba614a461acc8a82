"""Memory-lean Adam states (bf16 / 8-bit moments, bf16 params rounded stochastically) on
torch.distributed, on 2 spawned ranks: FSDP2 (uneven shards, one rank holding an empty
shard), tensor parallelism, HSDP, hand-sharded params and ZeroRedundancyOptimizer with a
``process_group``.  Every step is checked bit for bit against the NumPy statement of the
lean step on this rank's part of each param, with the clipping coefficient of the global
norm (lean_cases.py); the first step's norm against ``clip_grad_norm_`` over the whole
model; the final params against torch's fp32 AdamW; replicas of a shard stay identical.
Checkpoints: resume from DCP, full and flattened state dicts and ``state_dict()`` is bit
exact; 8-bit moments are saved decoded, so a checkpoint reshards onto another mesh."""

import functools

import pytest
import torch

from _harness import device_for, ranks  # noqa: F401  (ranks: a fixture)
from lean_cases import (CASES, LR, SEED, WEIGHT_DECAY, StepCheck, flat_np, lean_optimizer,
                        lean_train, local)
from optim_cases import (EVEN, MAX_NORM, STEPS, assert_same_bits, batch, fsdp2_model, loss_of,
                         make_model, mesh_of, optimizer_backends, reference_run, rows_of,
                         run_state)

# How far 4 lean steps may take the params from torch's fp32 AdamW (lr 1e-2, updates of
# about lr per step): bf16 moments (2^-9 relative) move an update by ~1.5 * 2^-9 * lr, 8-bit
# ones (up to 7/1024 of a block's absmax, relatively more for small elements) by a few % of
# lr; bf16 params also carry their own rounding (up to 2^-8 of a value near 1 per step,
# stochastic).  Measured here: 1.0e-4, 6.5e-4 and 3.7e-3.
QUALITY_ATOL = {"bf16": 2e-4, "int8": 2e-3, "bf16 params, stochastic": 2e-2}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_near_torch(params, ref, case, what):
    for i, (p, r) in enumerate(zip(params, ref)):
        got = _full(p.detach()).float()
        torch.testing.assert_close(got, r, rtol=0, atol=QUALITY_ATOL[case],
                                   msg=lambda m, i=i: f"{what}: param {i}: {m}")


def check_fsdp2_steps_match_the_reference(rank, world, dist_backend, case, with_triton):
    device = device_for(dist_backend, rank)
    mesh = mesh_of(device, (world,))
    ref, ref_norms = reference_run("adamw", device)
    dtype = CASES[case][2]
    ran = []
    for backend in optimizer_backends(device, with_triton):
        model = fsdp2_model(device, mesh, dtype)
        assert min(local(p).numel() for p in model.parameters()) == (rank == 0)
        opt = lean_optimizer(case, model.parameters(), backend, MAX_NORM)
        norms = lean_train(model, opt, StepCheck(opt, case, MAX_NORM), rank, world,
                           range(STEPS), device, f"FSDP2 {case} {backend}")
        if dtype == torch.float32:  # the first step's gradients are torch's
            torch.testing.assert_close(norms[0], ref_norms[0], rtol=1e-5, atol=0)
        assert bool((norms > MAX_NORM).all())  # clipping acted at every step
        _assert_near_torch(model.parameters(), ref, case, f"FSDP2 {case} {backend}")
        _assert_dtensor_moments(opt, model.parameters(), case)
        ran.append(backend)
    return ran


def _assert_dtensor_moments(opt, params, case):
    from torch.distributed.tensor import DTensor

    want = {"bf16": (torch.bfloat16,) * 2, "int8": (torch.int8, torch.uint8),
            "bf16 params, stochastic": (torch.bfloat16,) * 2}[case]
    for p in params:
        state = opt.state[p]
        for key, dtype in zip(("exp_avg", "exp_avg_sq"), want):
            value = state[key]
            assert type(value) is DTensor and value.placements == p.placements, key
            assert value.dtype == dtype and value.shape == p.shape, key
            assert value.to_local().shape == p.to_local().shape, key
        if case == "int8":  # the blocks of this rank's shard
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                assert type(state[key]) is torch.Tensor
                assert state[key].shape == (-(-p.to_local().numel() // 256),)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_lean_steps_match_the_reference(ranks, case):
    dist_backend, pool = ranks
    with_triton = case == "int8"  # the interpreter is slow: one case
    ran = pool.run(check_fsdp2_steps_match_the_reference, dist_backend, case, with_triton)
    assert ran[0] == ran[1] == optimizer_backends(device_for(dist_backend, 0), with_triton)


def check_tp_and_hsdp(rank, world, dist_backend, case):
    """Tensor parallelism (row- and column-sharded weights: each rank's shard draws its own
    bits), then HSDP (replicated over a mesh dim of 2): the replicas stay identical."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    device = device_for(dist_backend, rank)
    backend = optimizer_backends(device, with_triton=False)[0]
    dtype = CASES[case][2]
    mesh = mesh_of(device, (world,))
    model = parallelize_module(make_model(device, widths=EVEN).to(dtype), mesh,
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = lean_optimizer(case, model.parameters(), backend, MAX_NORM)
    lean_train(model, opt, StepCheck(opt, case, MAX_NORM), rank, world, range(STEPS), device,
               f"TP {case}", split_rows=False)
    ref, _ = reference_run("adamw", device, widths=EVEN)
    _assert_near_torch(model.parameters(), ref, case, f"TP {case}")

    hsdp = mesh_of(device, (world, 1), ("replicate", "shard"))
    model = fully_shard(make_model(device).to(dtype), mesh=hsdp)
    opt = lean_optimizer(case, model.parameters(), backend, MAX_NORM)
    lean_train(model, opt, StepCheck(opt, case, MAX_NORM), rank, world, range(STEPS), device,
               f"HSDP {case}")
    mine = [flat_np(t) for p in model.parameters()
            for t in [p] + [v for _, v in sorted(opt.state[p].items())]]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    for other in everyone[1:]:
        for a, b in zip(everyone[0], other):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), "replicas differ"
    return True


@pytest.mark.parametrize("case", ["bf16 params, stochastic", "int8"])
def test_tensor_parallel_and_hsdp_lean_steps(ranks, case):
    dist_backend, pool = ranks
    assert pool.run(check_tp_and_hsdp, dist_backend, case) == [True, True]


def check_partitioned_lean_steps(rank, world, dist_backend, case):
    """Plain params split over the ranks with ``process_group``: by hand (each rank every
    other param) and by ZeroRedundancyOptimizer; streams are the positions in each rank's
    optimizer; clipping by the norm over every rank's params."""
    import fusedopt as fo
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    device = device_for(dist_backend, rank)
    group = torch.distributed.group.WORLD
    ref, ref_norms = reference_run("adamw", device)
    for backend in optimizer_backends(device, with_triton=False):
        model = make_model(device)
        params = list(model.parameters())
        opt = lean_optimizer(case, params[rank::world], backend, MAX_NORM, process_group=group)
        check = StepCheck(opt, case, MAX_NORM)
        for step in range(STEPS):
            model.zero_grad()
            loss_of(model, *batch(step, device)).backward()
            check.before()
            opt.step()
            assert check.after(f"hand-sharded {case} {backend}, step {step}") > 0
            if step == 0:
                torch.testing.assert_close(opt.last_grad_norm, ref_norms[0], rtol=1e-5, atol=0)
            for i, p in enumerate(params):  # the owners send their updated params
                torch.distributed.broadcast(p.data, src=i % world)
        _assert_near_torch(params, ref, case, f"hand-sharded {case} {backend}")

    model = make_model(device)
    ddp = DistributedDataParallel(model)
    local_class = functools.partial(fo.optim.FusedAdamW, process_group=group, backend=backend,
                                    seed=SEED, **CASES[case][0])
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=local_class, lr=LR,
                                  weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_NORM)
    check = StepCheck(opt.optim, case, MAX_NORM)
    for step in range(STEPS):
        x, y = batch(step, device)
        loss_of(ddp, rows_of(x, rank, world), rows_of(y, rank, world)).backward()
        check.before()
        opt.step()
        assert check.after(f"ZeRO {case}, step {step}") > 0
        opt.zero_grad()
    _assert_near_torch(model.parameters(), ref, case, f"ZeRO {case}")
    return True


@pytest.mark.parametrize("case", ["bf16", "int8"])
def test_partitioned_lean_steps_with_a_process_group(ranks, case):
    dist_backend, pool = ranks
    assert pool.run(check_partitioned_lean_steps, dist_backend, case) == [True, True]


def check_resume_is_bit_exact(rank, world, dist_backend, case, backend, path):
    import copy

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_optimizer_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_state_dict)

    device = device_for(dist_backend, rank)
    mesh = mesh_of(device, (world,))
    dtype = CASES[case][2]

    def build():
        model = fsdp2_model(device, mesh, dtype)
        return model, lean_optimizer(case, model.parameters(), backend, MAX_NORM)

    def steps(model, opt, which):
        for step in which:
            x, y = batch(step, device)
            loss_of(model, rows_of(x, rank, world).to(dtype),
                    rows_of(y, rank, world).to(dtype)).float().backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    steps(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    full = StateDictOptions(full_state_dict=True)
    gathered = copy.deepcopy(dict(zip(("model", "optim"),
                                      get_state_dict(model, opt, options=full))))
    own = copy.deepcopy(opt.state_dict())
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    flattened = copy.deepcopy(get_optimizer_state_dict(model, opt, options=flat))
    steps(model, opt, range(3, 6))
    want = run_state(model, opt)

    runs = {}
    model, opt = build()
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    runs["dcp"] = model, opt
    model, opt = build()
    set_state_dict(model, opt, model_state_dict=gathered["model"],
                   optim_state_dict=gathered["optim"], options=full)
    runs["full state dict"] = model, opt
    for what, load in (("optimizer.state_dict()", lambda o, m: o.load_state_dict(own)),
                       ("flattened", lambda o, m: set_optimizer_state_dict(
                           m, o, flattened, options=flat))):
        model, opt = build()
        model.load_state_dict(runs["dcp"][0].state_dict())
        load(opt, model)
        runs[what] = model, opt
    for what, (model, opt) in runs.items():
        steps(model, opt, range(3, 6))
        assert_same_bits(want, run_state(model, opt), f"{case} resumed from {what}")
    return sorted(runs)


@pytest.mark.parametrize("case", list(CASES))
def test_lean_resume_from_checkpoints_is_bit_exact(ranks, case, tmp_path):
    dist_backend, pool = ranks
    backend = optimizer_backends(device_for(dist_backend, 0), with_triton=False)[-1]
    done = pool.run(check_resume_is_bit_exact, dist_backend, case, backend,
                    str(tmp_path / "ckpt"))
    assert done[0] == done[1] and len(done[0]) == 4


def check_checkpoint_reshards(rank, world, dist_backend, case, path):
    """A DCP checkpoint of FSDP2 over 2 ranks loaded into HSDP (every rank the whole
    params): bf16 moments exactly, 8-bit ones quantized again in the new blocks (within
    the map's spacing of their saved values); the resumed run steps on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.fsdp import fully_shard

    device = device_for(dist_backend, rank)
    backend = optimizer_backends(device, with_triton=False)[-1]
    model = fsdp2_model(device, mesh_of(device, (world,)))
    opt = lean_optimizer(case, model.parameters(), backend, MAX_NORM)
    for step in range(3):
        x, y = batch(step, device)
        loss_of(model, rows_of(x, rank, world), rows_of(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))[1]

    hsdp = mesh_of(device, (world, 1), ("replicate", "shard"))
    model = fully_shard(make_model(device), mesh=hsdp)
    opt = lean_optimizer(case, model.parameters(), backend, MAX_NORM)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))[1]
    for name, entry in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            want, got = entry[key].float(), loaded["state"][name][key].float()
            if case == "bf16":
                assert torch.equal(got, want), (name, key)
            else:  # the map's largest spacing is 7/512 of the absmax
                torch.testing.assert_close(got, want, rtol=0,
                                           atol=float(want.abs().max()) * 7 / 1024 + 1e-30)
        assert float(loaded["state"][name]["step"]) == 3
    x, y = batch(3, device)
    loss_of(model, x, y).backward()
    opt.step()
    return True


@pytest.mark.parametrize("case", ["bf16", "int8"])
def test_a_lean_checkpoint_reshards_onto_another_mesh(ranks, case, tmp_path):
    dist_backend, pool = ranks
    assert pool.run(check_checkpoint_reshards, dist_backend, case,
                    str(tmp_path / "ckpt")) == [True, True]
