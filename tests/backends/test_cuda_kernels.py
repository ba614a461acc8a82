"""The `cuda` backend's kernels (csrc/cuda), called through their launchers on CUDA tensors,
against PyTorch: F.cross_entropy / the written-out focal formulas in float64 (the references
of the cpu kernel tests), torch.optim.Adam/AdamW/SGD on the same device, and
torch.linalg.vector_norm. bf16 by flash-attention's rule. Every test is marked `gpu`:
without a CUDA device they are skipped with the reason (tests/conftest.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedopt import backends
from cpu_loss_helpers import (IGNORE, assert_close, assert_lowp_rule, ce_reference,
                              focal_reference, make_ce_case, same_bits,
                              sigmoid_focal_reference)
from cpu_optim_helpers import SHAPES, grad_steps, make_tensors

pytestmark = pytest.mark.gpu

F32 = torch.float32


@pytest.fixture(scope="module")
def cuda():
    ok, reason = backends.status("cuda")
    if not ok:
        pytest.skip(f"backend 'cuda' cannot run here: {reason}")
    from fusedopt.backends import cuda as module
    return module


DEV = "cuda"


def _scales(ce=1.0, z=1.0):
    return torch.tensor([ce, z], dtype=F32, device=DEV)


def _ce(cuda, x, y, weight=None, sc=None, *, eps=0.0, z_loss=0.0, softcap=None, soft=False,
        inplace=False, need_grad=True, ignore_index=IGNORE):
    loss, grad = cuda.cross_entropy_fwd(
        x.to(DEV), y.to(DEV), None if weight is None else weight.to(DEV),
        _scales() if sc is None else sc, ignore_index=ignore_index, label_smoothing=eps,
        z_loss=z_loss, softcap=softcap, soft_target=soft, inplace=inplace, need_grad=need_grad)
    return loss.cpu(), None if grad is None else grad.cpu()


# ----------------------------------------------------------------------------- cross-entropy

FLAGS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("weighted,smooth,zloss,capped,soft", FLAGS,
                         ids=["".join("WSZCT"[i] if f else "-" for i, f in enumerate(fl))
                              for fl in FLAGS])
def test_cross_entropy_every_flag(cuda, weighted, smooth, zloss, capped, soft):
    x, y, weight = make_ce_case(6, 37, soft=soft)
    kw = dict(eps=0.1 if smooth else 0.0, z_loss=0.05 if zloss else 0.0,
              softcap=4.0 if capped else None, soft=soft)
    w = weight if weighted else None
    loss, grad = _ce(cuda, x, y, w, _scales(0.7, 1.3), **kw)
    ref_loss, ref_grad = ce_reference(x, y, w, (0.7, 1.3), **kw)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("c", [1, 3, 16, 4097, 12032, 12033, 32000, 50257, 128256])
@pytest.mark.parametrize("smooth", [False, True])
def test_cross_entropy_vocab_sizes(cuda, c, smooth):
    n = 3 if c > 5000 else 9
    x, y, weight = make_ce_case(n, c, spread=4.0, ignore_row=None)
    loss, grad = _ce(cuda, x, y, weight, eps=0.2 if smooth else 0.0, z_loss=1e-3)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.2 if smooth else 0.0, z_loss=1e-3)
    assert_close(loss, ref_loss, what="loss")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("c", [37, 4096, 20001])
def test_cross_entropy_misaligned_rows_take_the_scalar_path(cuda, c):
    base, y, _ = make_ce_case(5, c + 1, ignore_row=None)
    y = y.clamp_max(c - 1)
    x = base.to(DEV)[:, 1:]  # rows start 4 bytes past a 16-byte boundary, stride c + 1
    loss, grad = cuda.cross_entropy_fwd(x, y.to(DEV), None, _scales(), ignore_index=IGNORE,
                                        label_smoothing=0.1, z_loss=0.0, softcap=None,
                                        soft_target=False, inplace=False, need_grad=True)
    ref_loss, ref_grad = ce_reference(base[:, 1:], y, eps=0.1)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")


def test_cross_entropy_out_of_range_targets_give_nan_rows(cuda):
    x, y, weight = make_ce_case(4, 50, ignore_row=None)
    y[1], y[2] = 50, -7
    loss, grad = _ce(cuda, x, y, weight, eps=0.1)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isnan(grad[1]).all() and torch.isnan(grad[2]).all()
    ref_loss, ref_grad = ce_reference(x[[0, 3]], y[[0, 3]], weight, eps=0.1)
    assert_close(loss[[0, 3]], ref_loss, what="loss")
    assert_close(grad[[0, 3]], ref_grad, what="grad")


@pytest.mark.parametrize("c", [300, 20000])
def test_cross_entropy_inplace_and_repeat_give_the_same_bits(cuda, c):
    x, y, weight = make_ce_case(5, c)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, softcap=10.0)
    loss2, grad2 = _ce(cuda, x, y, weight, eps=0.1, softcap=10.0)
    xd = x.to(DEV)
    loss3, grad3 = cuda.cross_entropy_fwd(xd, y.to(DEV), weight.to(DEV), _scales(),
                                          ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.0,
                                          softcap=10.0, soft_target=False, inplace=True,
                                          need_grad=True)
    assert grad3.data_ptr() == xd.data_ptr()
    assert same_bits(loss, loss2) and same_bits(grad, grad2)
    assert same_bits(loss, loss3.cpu()) and same_bits(grad, grad3.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision(cuda, dtype):
    x, y, weight = make_ce_case(8, 5000, dtype=dtype, spread=4.0)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, z_loss=1e-3)
    ref_loss, ref_grad = ce_reference(x, y, weight, eps=0.1, z_loss=1e-3)
    low_loss, low_grad = ce_reference(x.to(DEV), y.to(DEV), weight.to(DEV), eps=0.1,
                                      z_loss=1e-3, dtype=dtype)
    assert grad.dtype == dtype
    assert_lowp_rule(loss, ref_loss, low_loss.cpu(), dtype, what="loss")
    assert_lowp_rule(grad, ref_grad, low_grad.cpu(), dtype, what="grad")


def test_cross_entropy_loss_only(cuda):
    x, y, weight = make_ce_case(6, 999)
    loss, grad = _ce(cuda, x, y, weight, eps=0.1, need_grad=False)
    assert grad is None
    assert_close(loss, ce_reference(x, y, weight, eps=0.1)[0], what="loss")


# ----------------------------------------------------------------------------- focal losses

@pytest.mark.parametrize("c", [1, 7, 4097, 32000])
@pytest.mark.parametrize("gamma,smooth,with_alpha", [(2.0, 0.0, False), (0.5, 0.1, True),
                                                     (0.0, 0.0, True), (2.0, 0.2, False)])
def test_focal_loss(cuda, c, gamma, smooth, with_alpha):
    n = 4 if c > 5000 else 10
    x, y, _ = make_ce_case(n, c, spread=3.0)
    y[0] = min(3, c - 1)
    alpha = torch.rand(c) + 0.25 if with_alpha else None
    loss, grad = cuda.focal_loss_fwd(
        x.to(DEV), y.to(DEV), None if alpha is None else alpha.to(DEV), _scales(0.5, 1.0),
        gamma=gamma, ignore_index=IGNORE, label_smoothing=smooth, need_grad=True)
    ref_loss, ref_grad = focal_reference(x, y, alpha, gamma, smooth, scale=0.5)
    assert_close(loss.cpu(), ref_loss, what="loss")
    assert_close(grad.cpu(), ref_grad, what="grad")


def test_focal_loss_out_of_range_and_ignored_rows(cuda):
    x, y, _ = make_ce_case(4, 20, ignore_row=None)
    y[1], y[2] = IGNORE, 20
    loss, grad = cuda.focal_loss_fwd(x.to(DEV), y.to(DEV), None, _scales(), gamma=2.0,
                                     ignore_index=IGNORE, label_smoothing=0.0, need_grad=True)
    loss, grad = loss.cpu(), grad.cpu()
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("n", [1, 4095, 4096, 3 * 4096 + 5])
def test_sigmoid_focal_loss(cuda, reduce, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 3
    t = (torch.rand(n, generator=g) < 0.3).float()
    loss, grad = cuda.sigmoid_focal_loss_fwd(x.to(DEV), t.to(DEV), _scales(0.25, 1.0),
                                             alpha=0.25, gamma=2.0, label_smoothing=0.1,
                                             reduce=reduce, need_grad=True)
    ref_loss, ref_grad = sigmoid_focal_reference(x, t, 0.25, 2.0, 0.1, scale=0.25)
    assert_close(grad.cpu(), ref_grad, what="grad")
    if reduce:
        assert loss.numel() == -(-n // cuda.SIGMOID_FOCAL_SPAN)
        assert_close(loss.sum().cpu(), ref_loss.sum(), rtol=1e-5, what="loss")
    else:
        assert_close(loss.cpu(), ref_loss, what="loss")


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_scale_grad(cuda, dtype):
    g = torch.randn(10_001, device=DEV).to(dtype)
    before = g.clone()
    cuda.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert same_bits(g, before)
    cuda.scale_grad_(g, torch.tensor(0.37, device=DEV))
    assert same_bits(g, (before.float() * 0.37).to(dtype))


# ----------------------------------------------------------------------------- optimizers

class Bucket:
    """Params and fp32 state on the GPU, stepped by the cuda backend's adam_step/sgd_step."""

    def __init__(self, params, *, amsgrad=False, master=False, momentum=0.0):
        self.params = [p.to(DEV).clone() for p in params]
        zeros = lambda: [torch.zeros_like(p, dtype=F32) for p in self.params]  # noqa: E731
        self.m, self.v = zeros(), zeros()
        self.vmax = zeros() if amsgrad else None
        self.buffers = zeros() if momentum else None
        self.masters = [p.float() for p in self.params] if master else None
        self.counters = [torch.zeros((), dtype=F32, device=DEV) for _ in params]
        self.amsgrad, self.momentum, self.cache = amsgrad, momentum, {}

    def adam(self, cuda, grads, *, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             decoupled=False, maximize=False, inv_scale=None, clip_coef=None, skip=None):
        cuda.adam_step(self.params, [g.to(DEV) for g in grads], self.m, self.v, self.vmax,
                       self.masters, self.counters, lr=lr, beta1=betas[0], beta2=betas[1],
                       eps=eps, weight_decay=weight_decay, amsgrad=self.amsgrad,
                       maximize=maximize, decoupled=decoupled, inv_scale=inv_scale,
                       clip_coef=clip_coef, skip=skip, cache=self.cache)

    def sgd(self, cuda, grads, *, lr=1e-2, dampening=0.0, weight_decay=0.0, nesterov=False,
            maximize=False, skip=None):
        cuda.sgd_step(self.params, [g.to(DEV) for g in grads], self.buffers, self.masters,
                      self.counters, lr=lr, momentum=self.momentum, dampening=dampening,
                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                      inv_scale=None, clip_coef=None, skip=skip, cache=self.cache)

    def tensors(self):
        return [t for lst in (self.params, self.m, self.v, self.vmax or [], self.buffers or [],
                              self.masters or [], self.counters) for t in lst]


def _torch_run(cls, params, grads_per_step, **kw):
    ref = [p.to(DEV).clone().requires_grad_() for p in params]
    opt = cls(ref, foreach=False, **kw)
    for grads in grads_per_step:
        for r, g in zip(ref, grads):
            r.grad = g.to(DEV, r.dtype).clone()
        opt.step()
    return ref


def _close(ours, ref, rtol=2e-6, atol=1e-7):
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a.float().cpu(), b.detach().float().cpu(), rtol=rtol,
                                   atol=atol, msg=lambda m, i=i: f"tensor {i}: {m}")


ADAM = [dict(decoupled=False), dict(decoupled=False, weight_decay=0.1),
        dict(decoupled=True, weight_decay=0.1), dict(decoupled=True, amsgrad=True),
        dict(decoupled=False, amsgrad=True, maximize=True, weight_decay=0.1),
        dict(decoupled=True, maximize=True, betas=(0.3, 0.9))]


@pytest.mark.parametrize("v", ADAM, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_adam_matches_torch(cuda, v):
    params, grads = make_tensors(SHAPES, seed=0), grad_steps(SHAPES, 5)
    kw = dict(lr=1e-2, betas=v.get("betas", (0.9, 0.999)), weight_decay=v.get("weight_decay", 0.0),
              amsgrad=v.get("amsgrad", False), maximize=v.get("maximize", False))
    ref = _torch_run(torch.optim.AdamW if v["decoupled"] else torch.optim.Adam, params, grads, **kw)
    ours = Bucket(params, amsgrad=kw.pop("amsgrad"))
    for g in grads:
        ours.adam(cuda, g, decoupled=v["decoupled"], **kw)
    _close(ours.params, ref)
    assert all(c.item() == 5 for c in ours.counters)


def test_adam_small_plans_give_the_same_bits(cuda, monkeypatch):
    params, grads = make_tensors(SHAPES, seed=3), grad_steps(SHAPES, 3, seed=4)
    results = []
    for limits in [cuda.optim.PLAN_LIMITS, (1000, 3, 5), (7, 1, 1)]:
        monkeypatch.setattr(cuda.optim, "PLAN_LIMITS", limits)
        b = Bucket(params, amsgrad=True)
        for g in grads:
            b.adam(cuda, g, decoupled=True, weight_decay=0.1)
        results.append([t.cpu() for t in b.tensors()])
    for other in results[1:]:
        assert all(same_bits(a, b) for a, b in zip(results[0], other))


def test_adam_low_precision_params_with_masters(cuda):
    params = make_tensors(SHAPES, seed=5)
    grads = [[g.bfloat16() for g in step] for step in grad_steps(SHAPES, 3, seed=6)]
    # fp32 AdamW on the same (bf16-valued) gradients is what the fp32 masters must follow
    ref = _torch_run(torch.optim.AdamW, params, [[g.float() for g in step] for step in grads],
                     lr=1e-2, weight_decay=0.1)
    ours = Bucket([p.bfloat16() for p in params], master=True)
    ours.masters = [p.to(DEV).float() for p in params]
    for g in grads:
        ours.adam(cuda, g, decoupled=True, weight_decay=0.1)
    _close(ours.masters, ref)
    for p, m in zip(ours.params, ours.masters):
        assert same_bits(p, m.bfloat16())


def test_skipped_step_and_tensor_hyperparameters(cuda):
    params, grads = make_tensors(SHAPES, seed=7), grad_steps(SHAPES, 2, seed=8)
    lr, beta1 = 2.0 ** -7, 0.875  # exact in fp32: a 0-dim fp32 tensor holds the same value
    b = Bucket(params, amsgrad=True)
    b.adam(cuda, grads[0], lr=lr, betas=(beta1, 0.999))
    before = [t.clone() for t in b.tensors()]
    b.adam(cuda, grads[1], skip=torch.tensor(1.0, device=DEV),
           inv_scale=torch.tensor(0.5, device=DEV))
    assert all(same_bits(x, y) for x, y in zip(before, b.tensors()))
    c = Bucket(params, amsgrad=True)
    c.adam(cuda, grads[0], lr=torch.tensor(lr, device=DEV),
           betas=(torch.tensor(beta1, device=DEV), 0.999))
    assert all(same_bits(x, y) for x, y in zip(before, c.tensors()))


SGD = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
       dict(momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True)]


@pytest.mark.parametrize("v", SGD, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_sgd_matches_torch(cuda, v):
    params, grads = make_tensors(SHAPES, seed=9), grad_steps(SHAPES, 4, seed=10)
    ref = _torch_run(torch.optim.SGD, params, grads, lr=1e-2, **v)
    ours = Bucket(params, momentum=v["momentum"])
    for g in grads:
        ours.sgd(cuda, g, **{k: x for k, x in v.items() if k != "momentum"})
    _close(ours.params, ref)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_norm_matches_torch_and_is_deterministic(cuda, dtype):
    tensors = [t.to(DEV, dtype) for t in make_tensors(SHAPES + [(300_000,)], seed=11)]
    inv = torch.tensor(0.25, device=DEV)
    out = cuda.multi_tensor_norm(tensors, inv, {})
    ref = sum((t.double() * 0.25).pow(2).sum() for t in tensors)
    torch.testing.assert_close(out[0].double().cpu(), ref.cpu(), rtol=1e-6, atol=0)
    assert out[1].item() == 0
    assert same_bits(out, cuda.multi_tensor_norm(tensors, inv, {}))
    tensors[2][5] = float("nan")
    assert cuda.multi_tensor_norm(tensors, None, {})[1].item() == 1
