"""Memory-lean Adam states on torch.distributed: the per-shard reference of a step, used
inside the ranks.

Every lean step of a distributed run is checked bit for bit against the NumPy statement of
the lean step (tests/lean_reference.py) applied to this rank's part of each param: its local
shard, its local gradient, the moments stored before the step, the clipping coefficient of
the global norm, and the random stream written out here (`expected_stream`)."""

from __future__ import annotations

import numpy as np
import torch

import lean_reference as ref

LR, BETAS, EPS, WEIGHT_DECAY = 1e-2, (0.9, 0.999), 1e-8, 0.1
SEED = 1234

# name: (FusedAdamW keywords, the reference's state format, param dtype)
CASES = {
    "bf16": (dict(state_dtype=torch.bfloat16), "bf16", torch.float32),
    "int8": (dict(state_dtype=torch.int8), "q8", torch.float32),
    "bf16 params, stochastic": (dict(state_dtype=torch.bfloat16, param_rounding="stochastic"),
                                "bf16", torch.bfloat16),
}


def lean_optimizer(case, params, backend, max_norm, **extra):
    import fusedopt as fo

    kwargs = CASES[case][0]
    return fo.optim.FusedAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                               max_grad_norm=max_norm, backend=backend, seed=SEED,
                               **kwargs, **extra)


def local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def flat_np(t) -> np.ndarray:
    """This rank's elements of ``t`` in memory order (the local shards here are dense and
    row-major), as a NumPy array of the tensor's dtype (bf16 as uint16 bits)."""
    t = local(t).detach().contiguous().reshape(-1).cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    return t.numpy().copy()


def expected_stream(index: int, p) -> int:
    """The random stream of param ``index`` (its position over the optimizer's param
    groups): for a DTensor param, plus 0x9E3779B9 times the linear index of this rank's
    shard over the mesh dims that shard it (row-major), modulo 2^32."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return index
    shard = 0
    for size, c, placement in zip(p.device_mesh.shape, p.device_mesh.get_coordinate(),
                                  p.placements):
        if placement.is_shard():
            shard = shard * size + c
    return (index + shard * 0x9E3779B9) % 2 ** 32


def _moment(entry, key, fmt, n):
    """The fp32 value of a stored moment (zeros before the first step)."""
    if key not in entry:
        return np.zeros(n, np.float32)
    if fmt == "q8":
        return ref.dequantize(flat_np(entry[key]), flat_np(entry[key + "_absmax"]))
    bits = flat_np(entry[key])
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class StepCheck:
    """What one optimizer step must do to every param with a gradient on this rank,
    computed from the state before it (`before`) and checked after it (`after`)."""

    def __init__(self, opt, case, max_norm):
        self.opt, self.max_norm = opt, max_norm
        self.fmt, self.param_dtype = CASES[case][1], CASES[case][2]
        self.stochastic = CASES[case][0].get("param_rounding") == "stochastic"
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def before(self):
        self.inputs = []
        for index, p in enumerate(self.params):
            if p.grad is None:
                continue
            entry = self.opt.state[p] if p in self.opt.state else {}
            n = local(p).numel()
            p32 = local(p).detach().float().contiguous().reshape(-1).cpu().numpy().copy()
            g32 = local(p.grad).detach().float().contiguous().reshape(-1).cpu().numpy().copy()
            t = int(entry["step"]) + 1 if "step" in entry else 1
            self.inputs.append((index, p, t, p32, g32, _moment(entry, "exp_avg", self.fmt, n),
                                _moment(entry, "exp_avg_sq", self.fmt, n)))

    def after(self, what):
        total = self.opt.last_grad_norm
        coef = (self.max_norm / (total + 1e-6)).clamp(max=1.0) if self.max_norm else None
        for index, p, t, p32, g32, m, v in self.inputs:
            want_p, bits, _, want_m, want_v = ref.step(
                t, p=p32, g=g32, m=m, v=v, master=None, state=self.fmt,
                param_dtype=self.param_dtype, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                weight_decay=WEIGHT_DECAY, decoupled=True,
                clip_coef=None if coef is None else float(coef),
                stochastic=self.stochastic, seed=SEED, stream=expected_stream(index, p))
            entry = self.opt.state[p]
            label = f"{what}: param {index} (step {t})"
            got = flat_np(p)
            if bits is not None:
                np.testing.assert_array_equal(got, bits, err_msg=f"{label}: param bits")
            else:
                np.testing.assert_array_equal(got.view(np.uint32), want_p.view(np.uint32),
                                              err_msg=f"{label}: param")
            for key, want in (("exp_avg", want_m), ("exp_avg_sq", want_v)):
                if self.fmt == "q8":
                    np.testing.assert_array_equal(flat_np(entry[key]), want[0],
                                                  err_msg=f"{label}: {key} codes")
                    np.testing.assert_array_equal(flat_np(entry[key + "_absmax"]).view(np.uint32),
                                                  want[1].view(np.uint32),
                                                  err_msg=f"{label}: {key} absmax")
                else:
                    np.testing.assert_array_equal(flat_np(entry[key]), want,
                                                  err_msg=f"{label}: {key}")
            assert float(entry["step"]) == t, label
        return len(self.inputs)


def lean_train(model, opt, check, rank, world, steps, device, what, split_rows=True):
    """Data-parallel steps, each checked against the reference; the per-step norms."""
    from optim_cases import batch, loss_of, rows_of

    norms = []
    dtype = check.param_dtype
    for step in steps:
        x, y = batch(step, device)
        if split_rows:
            x, y = rows_of(x, rank, world), rows_of(y, rank, world)
        loss_of(model, x.to(dtype), y.to(dtype)).float().backward()
        check.before()
        opt.step()
        assert check.after(f"{what}, step {step}") > 0
        opt.zero_grad()
        norms.append(opt.last_grad_norm.clone())
    return torch.stack(norms)
