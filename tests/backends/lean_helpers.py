"""Buckets of the lean Adam kernel tests: params, moments (fp32 / bf16 / 8-bit codes +
absmax), masters and step counters on a backend's device, stepped through the backend's
``lean_adam_step`` entry point, next to the NumPy reference of lean_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lean_reference as ref
from conftest import require_op
from fusedopt import backends

STATES = {"fp32": torch.float32, "bf16": torch.bfloat16, "q8": torch.int8}
# a zero-size tensor, one smaller than a block, block boundaries, several blocks/chunks
SHAPES = [(300,), (0,), (5, 7), (256,), (513,), (2,)]


def lean_module(backend):
    """(backend module, device) for lean_adam on ``backend``, or a skip with the reason."""
    device = require_op(backend, "lean_adam")
    return backends.get(backend), device


def flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order."""
    if t.is_contiguous():
        return t.reshape(-1)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).reshape(-1)


def np_f32(t):
    return flat(t).detach().float().cpu().numpy().copy()


class LeanBucket:
    """One bucket of params and lean states on ``device``."""

    def __init__(self, shapes, *, state="bf16", dtype=torch.float32, master=False, seed=0,
                 device="cpu", streams=None, memory_format=None):
        gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.state = state
        self.dtype = dtype
        self.params = []
        for s in shapes:
            p = torch.randn(s, generator=gen).to(dtype)
            if memory_format is not None and p.dim() == 4:
                p = p.contiguous(memory_format=memory_format)
            self.params.append(p.to(self.device))
        sd = STATES[state]
        if state == "q8":
            self.exp_avgs = [torch.zeros_like(p, dtype=torch.int8) for p in self.params]
            self.exp_avg_sqs = [torch.zeros_like(p, dtype=torch.uint8) for p in self.params]
            self.m_absmax = [torch.zeros(-(-p.numel() // 256), device=self.device)
                             for p in self.params]
            self.v_absmax = [torch.zeros(-(-p.numel() // 256), device=self.device)
                             for p in self.params]
        else:
            self.exp_avgs = [torch.zeros_like(p, dtype=sd) for p in self.params]
            self.exp_avg_sqs = [torch.zeros_like(p, dtype=sd) for p in self.params]
            self.m_absmax = self.v_absmax = None
        self.masters = [p.float() for p in self.params] if master else None
        self.steps = [torch.zeros((), device=self.device) for _ in self.params]
        self.streams = list(range(7, 7 + len(shapes))) if streams is None else streams
        self.cache: dict = {}

    def step(self, module, grads, **hyper):
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                  decoupled=True, stochastic_rounding=False, seed=1234, inv_scale=None,
                  clip_coef=None, skip=None)
        kw.update(hyper)
        module.lean_adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs,
                              self.m_absmax, self.v_absmax, self.masters, self.steps,
                              self.streams, cache=self.cache, **kw)

    def tensors(self):
        out = self.params + self.exp_avgs + self.exp_avg_sqs + self.steps
        for extra in (self.m_absmax, self.v_absmax, self.masters):
            out += extra or []
        return out


def make_grads(shapes, steps, *, dtype=torch.float32, device="cpu", seed=1, like=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
        if like is not None:  # the params' strides
            grads = [torch.empty_like(p).copy_(g) for p, g in zip(like, grads)]
        out.append(grads)
    return out


class ReferenceBucket:
    """The NumPy reference of a LeanBucket (created from a copy of its initial values)."""

    def __init__(self, bucket: LeanBucket):
        self.state = bucket.state
        self.dtype = bucket.dtype
        self.p = [np_f32(p) for p in bucket.params]
        self.bits = [None] * len(self.p)
        self.masters = [x.copy() for x in self.p] if bucket.masters is not None else None
        n = [len(x) for x in self.p]
        if self.state == "q8":
            self.m = [(np.zeros(k, np.int8), np.zeros(-(-k // 256), np.float32)) for k in n]
            self.v = [(np.zeros(k, np.uint8), np.zeros(-(-k // 256), np.float32)) for k in n]
        else:
            self.m = [np.zeros(k, np.float32) for k in n]
            self.v = [np.zeros(k, np.float32) for k in n]
        self.t = 0
        self.streams = bucket.streams

    def _decoded(self, x, signed):
        if self.state == "q8":
            return ref.dequantize(*x)
        if self.state == "bf16" and x.dtype == np.uint16:
            return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return x

    def step(self, grads, *, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
             maximize=False, decoupled=True, stochastic_rounding=False, seed=1234,
             inv_scale=None, clip_coef=None, skip=None):
        self.t += 1
        value = lambda x: None if x is None else float(x)  # noqa: E731
        for i, g in enumerate(grads):
            master = None if self.masters is None else self.masters[i]
            p, bits, master, m, v = ref.step(
                self.t, p=self.p[i], g=np_f32(g), m=self._decoded(self.m[i], True),
                v=self._decoded(self.v[i], False), master=master, state=self.state,
                param_dtype=self.dtype, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                eps=eps, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
                inv_scale=value(inv_scale), clip_coef=value(clip_coef),
                stochastic=stochastic_rounding, seed=seed, stream=self.streams[i])
            self.bits[i] = bits
            if bits is None and self.dtype != torch.float32:  # round to nearest even
                p = torch.from_numpy(p.copy()).to(self.dtype).float().numpy()
            elif bits is not None:
                p = torch.from_numpy(bits.view(np.int16).copy()).view(self.dtype).float().numpy()
            self.p[i] = p
            if master is not None:
                self.masters[i] = master
            self.m[i], self.v[i] = m, v

    def assert_equal(self, bucket: LeanBucket):
        """Every stored bit of ``bucket`` equals the reference."""
        for i in range(len(self.p)):
            np.testing.assert_array_equal(np_f32(bucket.params[i]), self.p[i],
                                          err_msg=f"param {i}")
            if self.masters is not None:
                np.testing.assert_array_equal(np_f32(bucket.masters[i]), self.masters[i],
                                              err_msg=f"master {i}")
            for name, ours, theirs in (("exp_avg", bucket.exp_avgs[i], self.m[i]),
                                       ("exp_avg_sq", bucket.exp_avg_sqs[i], self.v[i])):
                if self.state == "q8":
                    absmax = (bucket.m_absmax if name == "exp_avg" else bucket.v_absmax)[i]
                    np.testing.assert_array_equal(flat(ours).cpu().numpy(), theirs[0],
                                                  err_msg=f"{name} codes {i}")
                    np.testing.assert_array_equal(absmax.cpu().numpy().view(np.uint32),
                                                  theirs[1].view(np.uint32),
                                                  err_msg=f"{name} absmax {i}")
                elif self.state == "bf16":
                    np.testing.assert_array_equal(flat(ours).cpu().view(torch.int16).numpy()
                                                  .view(np.uint16), theirs,
                                                  err_msg=f"{name} {i}")
                else:
                    np.testing.assert_array_equal(np_f32(ours).view(np.uint32),
                                                  theirs.view(np.uint32), err_msg=f"{name} {i}")
            assert bucket.steps[i].item() == self.t


def snapshot(tensors):
    return [t.detach().cpu().clone().reshape(-1).view(torch.uint8) for t in tensors]


def assert_unchanged(before, tensors):
    for i, (b, t) in enumerate(zip(before, snapshot(tensors))):
        assert torch.equal(b, t), f"tensor {i} changed"


__all__ = ["STATES", "SHAPES", "LeanBucket", "ReferenceBucket", "assert_unchanged",
           "lean_module", "make_grads", "np_f32", "pytest", "snapshot"]
