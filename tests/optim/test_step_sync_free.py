"""No host<->device synchronisation in step(), proven on CUDA: the steps run under
torch.cuda.set_sync_debug_mode("error"), where every synchronising CUDA call (a device value
read on the host, a blocking copy, a stream or device synchronize) raises.  Every optimizer,
on every backend that runs on CUDA, plain and with clipping, fusedopt's LossScaler, torch's
GradScaler, and tensor lr / betas on the CPU and on the device; the first step (which
creates the state) included.  After the steps, the parameters are checked against
torch.optim on the same gradients, so a test that ran nothing cannot pass.  Marked `gpu`."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fusedopt as fo
from conftest import require_op

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cuda", "torch"]
SHAPES = [(64, 33), (7,), (1,), (3, 5, 2)]
STEPS = 3
KINDS = {"adam": (fo.optim.FusedAdam, torch.optim.Adam),
         "adamw": (fo.optim.FusedAdamW, torch.optim.AdamW),
         "sgd": (fo.optim.FusedSGD, torch.optim.SGD)}
HYPER = {"adam": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01),
         "adamw": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
         "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=0.01)}
MAX_NORM = 0.5


@contextlib.contextmanager
def no_host_sync():
    """Any synchronising CUDA call inside raises RuntimeError."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def test_the_sync_debug_mode_catches_a_host_read():
    """The detector works: reading a device value on the host raises inside the block."""
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"), no_host_sync():
        x.sum().item()
    with pytest.raises(RuntimeError, match="synchroniz"), no_host_sync():
        torch.tensor(0.5).to("cuda")  # a blocking host-to-device copy synchronises too


def _params(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]


def _grads(device):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen).to(device) for s in SHAPES] for _ in range(STEPS)]


def _hyper(kind, lr_on):
    """The constructor arguments, lr (and Adam's betas) as floats or 0-dim tensors."""
    kw = dict(HYPER[kind])
    if lr_on is not None:
        kw["lr"] = torch.tensor(kw["lr"], device=lr_on)
        if "betas" in kw:
            kw["betas"] = tuple(torch.tensor(b, device=lr_on) for b in kw["betas"])
    return kw


def _reference(kind, params, grads, *, clip, scale=1.0):
    """torch.optim on copies of the params, fed the same (unscaled, clipped) gradients."""
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = KINDS[kind][1](ref, foreach=False, **HYPER[kind])
    for step_grads in grads:
        for r, g in zip(ref, step_grads):
            r.grad = g.clone() / scale
        if clip:
            torch.nn.utils.clip_grad_norm_(ref, MAX_NORM)
        opt.step()
    return ref


def _check(params, ref):
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "clip", "lr_tensor_on_cpu", "lr_tensor_on_device"])
def test_step_does_not_sync(backend, kind, variant):
    device = require_op(backend, "sgd" if kind == "sgd" else "adam")
    lr_on = {"lr_tensor_on_cpu": "cpu", "lr_tensor_on_device": device}.get(variant)
    params, grads = _params(device), _grads(device)
    clip = variant == "clip"
    extra = dict(max_grad_norm=MAX_NORM, skip_nonfinite=True) if clip else {}
    opt = KINDS[kind][0](params, backend=backend, **_hyper(kind, lr_on), **extra)
    with no_host_sync():
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    _check(params, _reference(kind, _params(device), grads, clip=clip))
    if clip:
        want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[-1]]))
        torch.testing.assert_close(opt.last_grad_norm, want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaler_kind", ["LossScaler", "GradScaler"])
def test_scaled_and_clipped_training_steps_do_not_sync(backend, kind, scaler_kind):
    """loss -> scaler.scale(loss).backward() -> scaler.step(opt) -> scaler.update(): the whole
    AMP training step, with clipping inside the optimizer."""
    device = require_op(backend, "sgd" if kind == "sgd" else "adam")
    params = _params(device)
    gen = torch.Generator().manual_seed(2)
    inputs = [[torch.randn(s, generator=gen).to(device) for s in SHAPES] for _ in range(STEPS)]
    opt = KINDS[kind][0](params, backend=backend, max_grad_norm=MAX_NORM, **HYPER[kind])
    scaler = (fo.amp.LossScaler(init_scale=1024.0) if scaler_kind == "LossScaler"
              else torch.amp.GradScaler("cuda", init_scale=1024.0))
    with no_host_sync():
        for step_inputs in inputs:
            opt.zero_grad(set_to_none=True)
            loss = sum((p * x).sum() for p, x in zip(params, step_inputs))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert scaler.get_scale() == 1024.0  # no overflow: every step was taken
    _check(params, _reference(kind, _params(device), inputs, clip=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_params_with_master_weights_do_not_sync(backend):
    device = require_op(backend, "adam")
    params = _params(device, torch.bfloat16)
    opt = fo.optim.FusedAdamW(params, backend=backend, master_weights=True,
                              max_grad_norm=MAX_NORM, **HYPER["adamw"])
    scaler = fo.amp.LossScaler(init_scale=256.0)
    before = [p.detach().clone() for p in params]
    with no_host_sync():
        for step_inputs in _grads(device):
            opt.zero_grad(set_to_none=True)
            loss = sum((p * x.to(p.dtype)).float().sum() for p, x in zip(params, step_inputs))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert all(opt.state[p]["master_param"].dtype == torch.float32 for p in params)
