"""Helpers of the optimizer-kernel tests of the compiled backends (cpu, and cuda on a GPU):
buckets of params + fp32 states driven through a backend's entry points directly, next to
torch.optim references fed the same gradients on the same device.  Importable without the
cpu extension (the cuda tests need only the torch parts): `optim` and `_cpu` are then None
and test_cpu_optim.py skips itself."""

from __future__ import annotations

import torch

import lowp_reference
from fusedopt import backends
from fusedopt.backends import cpu

_cpu = cpu._cpu  # None when fusedopt._cpu is not built
optim = cpu._optim if "adam" in cpu.OPS else None

F32 = torch.float32
# a zero-size tensor, odd sizes, and one spanning several 65536-element chunks
SHAPES = [(5, 7), (0,), (13,), (1,), (3, 4, 2), (65_536 * 2 + 17,)]


def make_tensors(shapes, *, seed, dtype=F32, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(device, dtype) for s in shapes]


def grad_steps(shapes, steps, *, seed=1, dtype=F32, scale=1.0, device="cpu"):
    return [make_tensors(shapes, seed=seed + k, dtype=dtype, scale=scale, device=device)
            for k in range(steps)]


ADAM_VARIANTS = [
    dict(decoupled=False),
    dict(decoupled=False, weight_decay=0.1),
    dict(decoupled=True, weight_decay=0.1),
    dict(decoupled=True, weight_decay=0.05, amsgrad=True),
    dict(decoupled=False, weight_decay=0.1, amsgrad=True, maximize=True),
    dict(decoupled=True, maximize=True, betas=(0.3, 0.9)),  # lerp weight >= 0.5
    dict(decoupled=False, eps=1e-3, betas=(0.8, 0.95), lr=0.1),
]

SGD_VARIANTS = [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.5, nesterov=True, maximize=True, lr=0.1),
]


def variant_id(v):
    return "-".join(f"{k}={v[k]}" for k in v)


def torch_adam_kwargs(v):
    """(torch.optim class, its kwargs) of an ADAM_VARIANTS entry."""
    kw = dict(lr=v.get("lr", 1e-2), betas=v.get("betas", (0.9, 0.999)), eps=v.get("eps", 1e-8),
              weight_decay=v.get("weight_decay", 0.0), amsgrad=v.get("amsgrad", False),
              maximize=v.get("maximize", False))
    return (torch.optim.AdamW if v["decoupled"] else torch.optim.Adam), kw


class AdamBucket:
    """Params + fp32 states of one bucket, stepped with ``module.adam_step`` (default: the
    cpu backend's), on the params' device."""

    def __init__(self, params, *, amsgrad=False, master=False, module=None):
        self.module = module or optim
        self.params = [p.clone() for p in params]
        self.exp_avgs = [torch.zeros_like(p, dtype=F32) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p, dtype=F32) for p in params]
        self.max_sqs = [torch.zeros_like(p, dtype=F32) for p in params] if amsgrad else None
        self.masters = [p.to(F32, copy=True) for p in params] if master else None
        self.steps = [torch.zeros((), dtype=F32, device=p.device) for p in params]
        self.amsgrad = amsgrad
        self.cache: dict = {}

    def step(self, grads, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             decoupled=False, maximize=False, inv_scale=None, clip_coef=None, skip=None):
        self.module.adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_sqs,
                              self.masters, self.steps, lr=lr, beta1=betas[0], beta2=betas[1],
                              eps=eps, weight_decay=weight_decay, amsgrad=self.amsgrad,
                              maximize=maximize, decoupled=decoupled, inv_scale=inv_scale,
                              clip_coef=clip_coef, skip=skip, cache=self.cache)

    def tensors(self):
        out = self.params + self.exp_avgs + self.exp_avg_sqs + self.steps
        return out + (self.max_sqs or []) + (self.masters or [])


class SgdBucket:
    """Params + momentum buffers + initialized flags, stepped with ``module.sgd_step``."""

    def __init__(self, params, *, momentum=0.0, master=False, module=None):
        self.module = module or optim
        self.params = [p.clone() for p in params]
        self.buffers = [torch.zeros_like(p, dtype=F32) for p in params] if momentum else None
        self.masters = [p.to(F32, copy=True) for p in params] if master else None
        self.flags = [torch.zeros((), dtype=F32, device=p.device) for p in params]
        self.momentum = momentum
        self.cache: dict = {}

    def step(self, grads, *, lr=1e-2, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, inv_scale=None, clip_coef=None, skip=None):
        self.module.sgd_step(self.params, grads, self.buffers, self.masters, self.flags, lr=lr,
                             momentum=self.momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                             inv_scale=inv_scale, clip_coef=clip_coef, skip=skip,
                             cache=self.cache)

    def tensors(self):
        return self.params + (self.buffers or []) + (self.masters or []) + self.flags


LOW_PRECISION = ("adamw", "adam_amsgrad", "sgd")


def low_precision_case(which, params, *, master, module=None):
    """One low-precision test case: (bucket, its step kwargs, the torch.optim class and
    kwargs of the fp32 run, the written reference (tests/lowp_reference.py) and its
    kwargs).  Weight decay is large enough to show within one ulp of the param dtype; eps
    is representable in fp16."""
    if which == "adamw":
        hyper = dict(lr=1e-2, eps=1e-4, weight_decay=0.5)
        return (AdamBucket(params, master=master, module=module),
                dict(decoupled=True, eps=1e-4, weight_decay=0.5), torch.optim.AdamW, hyper,
                lowp_reference.adam, dict(hyper, decoupled=True))
    if which == "adam_amsgrad":
        hyper = dict(lr=1e-2, eps=1e-4, weight_decay=0.5, amsgrad=True)
        return (AdamBucket(params, master=master, amsgrad=True, module=module),
                dict(eps=1e-4, weight_decay=0.5), torch.optim.Adam, hyper,
                lowp_reference.adam, dict(hyper, decoupled=False))
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    return (SgdBucket(params, momentum=0.9, master=master, module=module),
            dict(lr=0.05, weight_decay=0.1), torch.optim.SGD, hyper, lowp_reference.sgd, hyper)


def torch_run(cls, params, grads_per_step, *, before_step=None, **kwargs):
    """torch.optim ``cls`` (single-tensor path) on copies of ``params``, on their device."""
    ref = [p.clone().requires_grad_() for p in params]
    opt = cls(ref, foreach=False, **kwargs)
    for grads in grads_per_step:
        for r, g in zip(ref, grads):
            r.grad = g.to(r.dtype).clone()
        if before_step is not None:
            before_step(ref)
        opt.step()
    return ref, opt


def assert_close_list(actual, expected, *, rtol=2e-6, atol=1e-7, what="tensor"):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.float().cpu(), e.detach().float().cpu(), rtol=rtol,
                                   atol=atol, msg=lambda m, i=i: f"{what} {i}: {m}")


def bits(tensors):
    return [t.detach().cpu().clone().reshape(-1).view(torch.uint8) for t in tensors]


def assert_same_bits(before, after):
    for i, (b, a) in enumerate(zip(before, bits(after))):
        assert torch.equal(b, a), f"tensor {i} changed"


def scalar(value):
    return torch.tensor(value, dtype=F32)


def with_threads(n, fn):
    """Runs ``fn()`` with ``n`` OpenMP threads in the kernels, restoring the count after."""
    before = _cpu.get_num_threads()
    _cpu.set_num_threads(n)
    try:
        return fn()
    finally:
        _cpu.set_num_threads(before)


__all__ = ["ADAM_VARIANTS", "F32", "LOW_PRECISION", "SGD_VARIANTS", "SHAPES", "AdamBucket",
           "SgdBucket", "low_precision_case",
           "assert_close_list", "assert_same_bits", "backends", "bits", "cpu", "grad_steps",
           "make_tensors", "optim", "scalar", "torch_adam_kwargs", "torch_run", "variant_id",
           "with_threads", "_cpu"]
