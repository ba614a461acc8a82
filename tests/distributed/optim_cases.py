"""Models, data and torch references of the distributed optimizer tests; used inside the
ranks.

Every rank builds the same model from a fixed seed and the same batches, so each can run
the reference -- torch.optim on the whole unsharded model, with ``clip_grad_norm_`` over
all its params -- next to the distributed run and compare the full params it gathers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

STEPS = 4
MAX_NORM = 0.05  # below every step's gradient norm: clipping acts at each step


UNEVEN, EVEN = (6, 5, 3, 1), (6, 4, 2, 1)


def make_model(device, seed=0, widths=UNEVEN):
    """A 3-layer MLP.  With the default widths its layers shard unevenly over 2 ranks (the
    last weight has one row, so one rank holds an empty shard of it); tensor parallelism
    takes ``EVEN``."""
    torch.manual_seed(seed)
    a, b, c, d = widths
    return torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh(), torch.nn.Linear(b, c),
                               torch.nn.Tanh(), torch.nn.Linear(c, d)).to(device)


def batch(step, device, rows=8):
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(rows, 6, generator=gen), torch.randn(rows, 1, generator=gen)
    return x.to(device), y.to(device)


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)


def rows_of(t, rank, world):
    return t.chunk(world)[rank]


OPTIMIZERS = {
    # name: (fused class name, fused kwargs, torch class, torch kwargs)
    "adamw": ("FusedAdamW", dict(lr=1e-2, weight_decay=0.1),
              torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd": ("FusedSGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
            torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
}


def fused(kind, params, backend, max_norm=MAX_NORM, **extra):
    import fusedopt as fo

    name, kwargs, _, _ = OPTIMIZERS[kind]
    return getattr(fo.optim, name)(params, backend=backend, max_grad_norm=max_norm,
                                   **kwargs, **extra)


def reference_run(kind, device, steps=range(STEPS), seed=0, skip=(), widths=UNEVEN,
                  max_norm=MAX_NORM):
    """(final params, per-step norms) of torch.optim on the whole model, full batches,
    ``clip_grad_norm_(all params, max_norm)`` before each step (when ``max_norm``); steps
    in ``skip`` are skipped (an overflow)."""
    model = make_model(device, seed, widths)
    _, _, cls, kwargs = OPTIMIZERS[kind]
    opt = cls(model.parameters(), foreach=False, **kwargs)
    norms = []
    for step in steps:
        opt.zero_grad()
        loss_of(model, *batch(step, device)).backward()
        if step in skip:
            continue
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or 1e30))
        opt.step()
    return [p.detach() for p in model.parameters()], torch.stack(norms)


_MESHES = {}


def mesh_of(device, shape, names=None):
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, shape, names)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, shape, mesh_dim_names=names)
    return _MESHES[key]


def fsdp2_model(device, mesh, dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = make_model(device).to(dtype)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model, opt, rank, world, steps, device, split_rows=True, edit_grads=None):
    """The steps of a data-parallel run (each rank its rows); the per-step norms."""
    norms = []
    for step in steps:
        x, y = batch(step, device)
        if split_rows:
            x, y = rows_of(x, rank, world), rows_of(y, rank, world)
        loss_of(model, x, y).backward()
        if edit_grads is not None:
            edit_grads(step)
        opt.step()
        opt.zero_grad()
        norms.append(opt.last_grad_norm.clone())
    return torch.stack(norms)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def assert_close_to(params, ref, what):
    """Full params equal to the reference to fp32 rounding (a few ulps of the update)."""
    for i, (p, r) in enumerate(zip(params, ref)):
        torch.testing.assert_close(full(p.detach()), r, rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{what}: param {i}: {m}")


def bits(tensors):
    return [full(t.detach()).clone() for t in tensors]


def run_state(model, opt):
    """Bit copies of a run's params and of every state tensor of the optimizer."""
    states = [v for p in model.parameters() for k, v in sorted(opt.state[p].items())]
    return bits(list(model.parameters()) + states)


def assert_same_bits(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), \
            f"{what}: tensor {i}"


def optimizer_backends(device, with_triton):
    """The optimizer backends that run on ``device`` here (Triton on CPU tensors only under
    its interpreter, which is slow: only where ``with_triton``)."""
    from fusedopt import backends

    names = backends.usable("adam", device)
    return [n for n in names if with_triton or n != "triton" or device.type == "cuda"]
