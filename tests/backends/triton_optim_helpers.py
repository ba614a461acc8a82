"""Shared helpers of the Triton optimizer tests: run our entry points and torch.optim side
by side on the same gradients.

The reference is torch itself: torch.optim.Adam / AdamW / SGD on fp32 copies of the params,
torch.nn.utils.clip_grad_norm_ for clipping and an explicit multiplication by the inverse
scale for unscaling (what torch.amp.GradScaler.unscale_ does).
"""

import torch

from fusedopt.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(5,), (3, 7), (0,), (40,), (2, 1, 9)]


def zeros_like_all(tensors):
    return [torch.zeros_like(t, dtype=torch.float32) for t in tensors]


def make_grads(shapes, gen, scale=1.0):
    return [torch.randn(s, generator=gen).mul_(scale).to(DEVICE) for s in shapes]


def snapshot(tensors):
    return [t.clone() for t in tensors]


def assert_bits_equal(before, after):
    """Same bits (NaN payloads and the sign of zero included)."""
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert torch.equal(b.reshape(-1).view(torch.uint8), a.reshape(-1).view(torch.uint8))


class AdamRun:
    """Our adam_step state for a list of params, next to torch's optimizer on fp32 copies."""

    def __init__(self, shapes, dtype=torch.float32, *, decoupled=True, amsgrad=False,
                 maximize=False, weight_decay=0.0, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                 masters=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        fp32 = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        self.ref = [p.clone().requires_grad_() for p in fp32]
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        self.opt = cls(self.ref, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize)
        self.params = [p.to(dtype) for p in fp32]
        self.exp_avgs = zeros_like_all(fp32)
        self.exp_avg_sqs = zeros_like_all(fp32)
        self.max_sqs = zeros_like_all(fp32) if amsgrad else None
        self.masters = [p.clone() for p in fp32] if masters else None
        self.steps = [torch.zeros((), device=DEVICE) for _ in fp32]
        self.cache = {}
        self.kw = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize, decoupled=decoupled)

    def ours(self, grads, *, inv_scale=None, clip_coef=None, skip=None, **overrides):
        kw = dict(self.kw, **overrides)
        tb.adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_sqs,
                     self.masters, self.steps, inv_scale=inv_scale, clip_coef=clip_coef,
                     skip=skip, cache=self.cache, **kw)

    def torch_step(self, grads_fp32):
        for r, g in zip(self.ref, grads_fp32):
            r.grad = g.clone()
        self.opt.step()

    def all_tensors(self):
        return (self.params + self.exp_avgs + self.exp_avg_sqs + (self.max_sqs or [])
                + (self.masters or []) + self.steps)

    def check_states(self):
        """Moments and step counters against torch's state (fp32 rounding)."""
        for i, r in enumerate(self.ref):
            st = self.opt.state[r]
            torch.testing.assert_close(self.exp_avgs[i], st["exp_avg"])
            torch.testing.assert_close(self.exp_avg_sqs[i], st["exp_avg_sq"])
            if self.max_sqs is not None:
                torch.testing.assert_close(self.max_sqs[i], st["max_exp_avg_sq"])
            assert float(self.steps[i]) == float(st["step"])


class SgdRun:
    """Our sgd_step state next to torch.optim.SGD on fp32 copies."""

    def __init__(self, shapes, dtype=torch.float32, *, lr=0.05, momentum=0.9, dampening=0.0,
                 weight_decay=0.0, nesterov=False, maximize=False, masters=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        fp32 = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        self.ref = [p.clone().requires_grad_() for p in fp32]
        self.opt = torch.optim.SGD(self.ref, lr=lr, momentum=momentum, dampening=dampening,
                                   weight_decay=weight_decay, nesterov=nesterov,
                                   maximize=maximize)
        self.params = [p.to(dtype) for p in fp32]
        self.bufs = zeros_like_all(fp32) if momentum != 0 else None
        self.initialized = [torch.zeros((), device=DEVICE) for _ in fp32]
        self.masters = [p.clone() for p in fp32] if masters else None
        self.cache = {}
        self.kw = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                       nesterov=nesterov, maximize=maximize)

    def ours(self, grads, *, inv_scale=None, clip_coef=None, skip=None, **overrides):
        kw = dict(self.kw, **overrides)
        tb.sgd_step(self.params, grads, self.bufs, self.masters, self.initialized,
                    inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=self.cache, **kw)

    def torch_step(self, grads_fp32):
        for r, g in zip(self.ref, grads_fp32):
            r.grad = g.clone()
        self.opt.step()

    def all_tensors(self):
        return self.params + (self.bufs or []) + self.initialized + (self.masters or [])

    def check_states(self):
        if self.bufs is None:
            return
        for i, r in enumerate(self.ref):
            torch.testing.assert_close(self.bufs[i], self.opt.state[r]["momentum_buffer"])
            assert float(self.initialized[i]) == 1.0


def assert_params_close(run):
    for p, r in zip(run.params, run.ref):
        torch.testing.assert_close(p, r.detach())
