"""The reference for bf16/fp16 params without master weights, written out: each step reads
the param as fp32, does torch.optim's math in fp32 with fp32 states, and rounds the new
param to its dtype once.  That is what the fused kernels compute, so they must agree with it
to one unit in the last place of the param's dtype -- a tolerance in which a missing
weight-decay term shows (`assert_decay_is_visible`), unlike "twice torch's own bf16 error"."""

from __future__ import annotations

import math

import torch

F32 = torch.float32


def adam(params, grads_per_step, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
         amsgrad=False, decoupled=True, maximize=False):
    """Adam / AdamW on copies of ``params`` (any dtype), rounding each new param once."""
    b1, b2 = betas
    ps = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p, dtype=F32) for p in ps]
    v = [torch.zeros_like(p, dtype=F32) for p in ps]
    vmax = [torch.zeros_like(p, dtype=F32) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        step_size = lr / (1 - b1 ** t)          # Python floats (double), as torch forms them
        bc2_sqrt = math.sqrt(1 - b2 ** t)
        for i, (p, g) in enumerate(zip(ps, grads)):
            x = p.to(F32)
            g = g.to(p.device, F32)
            g = -g if maximize else g
            if weight_decay and decoupled:
                x = x * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * x
            m[i] = m[i] + (g - m[i]) * (1 - b1)
            v[i] = v[i] * b2 + (1 - b2) * g * g
            used = v[i]
            if amsgrad:
                vmax[i] = torch.maximum(vmax[i], v[i])
                used = vmax[i]
            x = x - step_size * m[i] / (used.sqrt() / bc2_sqrt + eps)
            ps[i] = x.to(p.dtype)
    return ps


def sgd(params, grads_per_step, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
        nesterov=False, maximize=False):
    """SGD on copies of ``params`` (any dtype), rounding each new param once."""
    ps = [p.detach().clone() for p in params]
    bufs = [None] * len(ps)
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(ps, grads)):
            x = p.to(F32)
            d = g.to(p.device, F32)
            d = -d if maximize else d
            if weight_decay:  # as torch's SGD: no 0 * x term (NaN at an infinite param)
                d = d + weight_decay * x
            if momentum:
                bufs[i] = d.clone() if bufs[i] is None else bufs[i] * momentum + (1 - dampening) * d
                d = d + momentum * bufs[i] if nesterov else bufs[i]
            ps[i] = (x - lr * d).to(p.dtype)
    return ps


def ulps(actual, expected) -> torch.Tensor:
    """|actual - expected| in units in the last place of the expected value's dtype."""
    dtype = expected.dtype
    e = expected.detach().to(torch.float64)
    step = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(
        torch.finfo(dtype).tiny))))
    return (actual.detach().to(torch.float64) - e).abs() / step


def assert_within_one_ulp(actual, expected, what="param"):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, (what, i, a.dtype, e.dtype)
        if e.numel():
            worst = ulps(a.cpu(), e.cpu()).max().item()
            assert worst <= 1.0, f"{what} {i}: {worst:.2f} ulps from the written reference"


def assert_decay_is_visible(actual, without_decay, min_fraction=0.5):
    """The reference run without weight decay is more than one ulp away from ``actual`` for
    most elements: a tolerance of one ulp would not let a missing decay term pass."""
    far = total = 0
    for a, e in zip(actual, without_decay):
        far += int((ulps(a.cpu(), e.cpu()) > 1.0).sum())
        total += e.numel()
    assert far >= min_fraction * total, (far, total)
