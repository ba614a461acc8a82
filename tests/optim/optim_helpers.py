"""Shared helpers of the optimizer tests: deterministic params and gradients, training loops
that feed the same gradients to a fused optimizer and to its torch reference."""

from __future__ import annotations

import torch

SHAPES = [(5, 7), (13,), (1,), (3, 4, 2)]


def make_params(shapes=SHAPES, *, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def make_grads(shapes=SHAPES, steps=5, *, seed=1, scale=1.0):
    """``steps`` lists of fp32 CPU gradients, one per shape."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in shapes] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)


def train(opt, params, grads_per_step, after_step=None):
    for k, grads in enumerate(grads_per_step):
        set_grads(params, grads)
        opt.step()
        if after_step is not None:
            after_step(k)


def assert_params_close(actual, expected, rtol=1e-5, atol=1e-6):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach().float().cpu(), e.detach().float().cpu(),
                                   rtol=rtol, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")


def snapshot(opt, params):
    """Bit copies of params, of every internal state tensor (hidden entries too) and of the
    SGD flags, and the number of state entries and keys."""
    out = [p.detach().clone() for p in params]
    for p in params:
        for key, value in sorted(opt._fo_state.get(p, {}).items()):
            if torch.is_tensor(value) and value.device.type != "meta":
                out.append(value.detach().clone())
    for _, flag in getattr(opt, "_fo_sgd_flags", {}).values():
        out.append(flag.clone())
    out.append(torch.tensor([len(opt._fo_state)] + [len(opt._fo_state.get(p, {})) for p in params]))
    return out


def assert_bit_identical(before, after):
    assert len(before) == len(after)
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(b.reshape(-1).view(torch.uint8), a.reshape(-1).view(torch.uint8)), \
            f"tensor {i} changed bits"
