"""FusedSGD against torch.optim.SGD over several steps, on every backend."""

import pytest
import torch

import fusedopt as fo
import lowp_reference
from conftest import require_op
from lowp_reference import assert_decay_is_visible, assert_within_one_ulp
from optim_helpers import assert_params_close, clone_params, make_grads, make_params, set_grads, train

VARIANTS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.5, maximize=True),
    dict(weight_decay=0.1, maximize=True),
    dict(lr=0.0, momentum=0.9),
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_matches_torch(backend, kwargs):
    device = require_op(backend, "sgd")
    kwargs = {"lr": 5e-2, **kwargs}
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedSGD(ours, backend=backend, **kwargs)
    ref_opt = torch.optim.SGD(ref, foreach=False, **kwargs)
    grads = make_grads(steps=6)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)
    ours_sd, ref_sd = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert ours_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        assert ours_sd[k].keys() == ref_sd[k].keys()
        torch.testing.assert_close(ours_sd[k]["momentum_buffer"].cpu(), ref_sd[k]["momentum_buffer"].cpu(),
                                   rtol=1e-5, atol=1e-6)


def test_tensor_lr_groups_and_grad_none(backend):
    device = require_op(backend, "sgd")
    ours = make_params(device=device)
    ref = clone_params(ours)
    lr = torch.tensor(0.1, device=device)
    ref_lr = torch.tensor(0.1, device=device)

    def groups(ps, lr_):
        return [{"params": ps[:2], "lr": lr_, "momentum": 0.9, "dampening": 0.1},
                {"params": [], "momentum": 0.5},
                {"params": ps[2:], "momentum": 0.0, "weight_decay": 0.1}]

    opt = fo.optim.FusedSGD(groups(ours, lr), lr=0.05, backend=backend)
    ref_opt = torch.optim.SGD(groups(ref, ref_lr), lr=0.05, foreach=False)
    for k, g in enumerate(make_grads(steps=6)):
        g = list(g)
        if k in (0, 3):
            g[1] = None
        for o, ps, lr_ in ((opt, ours, lr), (ref_opt, ref, ref_lr)):
            set_grads(ps, g)
            o.step()
            lr_.mul_(0.8)
    assert_params_close(ours, ref)
    assert set(id(p) for p in opt.state) == set(id(p) for p in ours[:2])  # momentum 0: no state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_match_the_written_reference(backend, dtype):
    """fp32 math, fp32 momentum buffers, one rounding per step: within one ulp of the
    reference written in tests/lowp_reference.py, which the run without weight decay is not."""
    device = require_op(backend, "sgd")
    base = clone_params(make_params(device=device), dtype)
    ours = clone_params(base)
    kwargs = dict(lr=5e-2, momentum=0.9, weight_decay=0.1)
    opt = fo.optim.FusedSGD(ours, backend=backend, **kwargs)
    grads = [[g.to(dtype) for g in gs] for gs in make_grads(steps=6)]
    train(opt, ours, grads)
    assert_within_one_ulp(ours, lowp_reference.sgd(base, grads, **kwargs))
    assert_decay_is_visible(ours, lowp_reference.sgd(base, grads, lr=5e-2, momentum=0.9))
    for p in ours:
        assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == torch.float32


def test_large_tensor_and_many_tensors(backend):
    device = require_op(backend, "sgd")
    shapes = [(70_000,)] + [(2 + i % 7,) for i in range(130)]
    ours = make_params(shapes, device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedSGD(ours, lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    grads = make_grads(shapes, steps=2)
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    assert_params_close(ours, ref)
