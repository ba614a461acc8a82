"""Checkpoints of the fused optimizers on FSDP2 (DTensor params), on 2 spawned ranks and each
backend that runs here (Triton only on GPUs: its interpreter is slow).  A run resumed from
``torch.distributed.checkpoint`` into a fresh model and optimizer (through ``get_state_dict``
/ ``set_state_dict``, whose first call steps the fresh optimizer on zero gradients) continues
bit for bit like the uninterrupted run; so do a full (gathered) state dict, the optimizer's
own ``state_dict()``, and ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(flattened; full, offloaded to the CPU and broadcast from rank 0) loaded into fresh
optimizers."""

import copy

import pytest
import torch

from _harness import device_for, ranks  # noqa: F401  (ranks: a fixture)
from optim_cases import (assert_same_bits, bits, fsdp2_model, fused, mesh_of,
                         optimizer_backends, run_state, train)


def check_resume_is_bit_exact(rank, world, dist_backend, kind, backend, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict,
                                                         get_state_dict,
                                                         set_optimizer_state_dict,
                                                         set_state_dict)

    device = device_for(dist_backend, rank)
    mesh = mesh_of(device, (world,))

    def build():
        model = fsdp2_model(device, mesh)
        return model, fused(kind, model.parameters(), backend)

    def fresh_loaded(state, options=None):
        model, opt = build()
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
        return model, opt

    model, opt = build()
    train(model, opt, rank, world, range(3), device)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    full = StateDictOptions(full_state_dict=True)
    gathered = copy.deepcopy(dict(zip(("model", "optim"), get_state_dict(model, opt, options=full))))
    own = copy.deepcopy(opt.state_dict())
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    offload = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 keeps it
    saved = {what: copy.deepcopy(get_optimizer_state_dict(model, opt, options=how))
             for what, how in (("flattened", flat), ("full on rank 0", offload))}
    train(model, opt, rank, world, range(3, 6), device)
    want = run_state(model, opt)

    # DCP into a fresh model and optimizer; get_state_dict first steps the fresh optimizer
    # on zero gradients with lr 0 (to create its state), which must change no param
    model, opt = build()
    initial = bits(model.parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    assert_same_bits(initial, bits(model.parameters()), "the zero-gradient init step")
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    runs = {"dcp": (model, opt), "full state dict": fresh_loaded(gathered, full)}
    model, opt = build()
    model.load_state_dict(runs["dcp"][0].state_dict())
    opt.load_state_dict(own)  # DTensor states of the same placements
    runs["optimizer.state_dict()"] = (model, opt)
    broadcast = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                 broadcast_from_rank0=True)
    for what, how in (("flattened", flat), ("full on rank 0", broadcast)):
        model, opt = build()
        model.load_state_dict(runs["dcp"][0].state_dict())
        set_optimizer_state_dict(model, opt, saved[what], options=how)
        runs[f"get/set_optimizer_state_dict, {what}"] = (model, opt)
    for what, (model, opt) in runs.items():
        train(model, opt, rank, world, range(3, 6), device)
        assert_same_bits(want, run_state(model, opt), f"{kind} resumed from {what}")
    return sorted(runs)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resume_from_checkpoints_is_bit_exact(ranks, kind, tmp_path):
    dist_backend, pool = ranks
    for backend in optimizer_backends(device_for(dist_backend, 0), with_triton=False):
        done = pool.run(check_resume_is_bit_exact, dist_backend, kind, backend,
                        str(tmp_path / f"ckpt-{backend}"))
        assert done[0] == done[1] and len(done[0]) == 5, backend
