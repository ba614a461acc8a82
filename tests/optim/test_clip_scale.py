"""Global-norm clipping, last_grad_norm, inf/NaN skipping, LossScaler and torch.amp.GradScaler."""

import math

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import (assert_bit_identical, assert_params_close, clone_params, make_grads,
                           make_params, set_grads, snapshot, train)

INF, NAN = float("inf"), float("nan")


def _groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-2, "weight_decay": 0.3}]


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipping", "not_clipping"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_max_grad_norm_equals_clip_grad_norm_then_step(backend, max_norm, kind):
    device = require_op(backend, "adam" if kind == "adamw" else "sgd")
    ours = make_params(device=device)
    ref = clone_params(ours)
    if kind == "adamw":
        opt = fo.optim.FusedAdamW(_groups(ours), lr=1e-2, max_grad_norm=max_norm, backend=backend)
        ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, foreach=False)
    else:
        opt = fo.optim.FusedSGD(_groups(ours), lr=1e-1, momentum=0.9, max_grad_norm=max_norm, backend=backend)
        ref_opt = torch.optim.SGD(_groups(ref), lr=1e-1, momentum=0.9, foreach=False)
    for g in make_grads(steps=5, scale=2.0):
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), ref_norm.cpu(), rtol=1e-6, atol=0)
        assert opt.last_grad_norm.device == ours[0].device and opt.last_grad_norm.dim() == 0
        for p, gi in zip(ours, g):  # .grad untouched
            assert torch.equal(p.grad.cpu(), gi)
    assert_params_close(ours, ref)


def test_norm_spans_dtypes_and_groups(backend):
    """One global norm over fp32 and bf16 buckets of several groups."""
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ours[0] = ours[0].detach().bfloat16().requires_grad_()
    ref = clone_params(ours, torch.float32)
    opt = fo.optim.FusedAdamW(_groups(ours), lr=1e-2, max_grad_norm=1.0, master_weights=True, backend=backend)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, foreach=False)
    for g in make_grads(steps=4, scale=3.0):
        g = [x.to(p.dtype).float() for x, p in zip(g, ours)]
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), ref_norm.cpu(), rtol=1e-6, atol=0)
    masters = [opt.state[p].get("master_param", p) for p in ours]
    assert_params_close(masters, ref)


def test_track_grad_norm_without_clipping(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdam(ours, lr=1e-2, track_grad_norm=True, backend=backend)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    untracked = fo.optim.FusedAdam(clone_params(ours), backend=backend)
    for g in make_grads(steps=3, scale=5.0):
        set_grads(ours, g)
        set_grads(ref, g)
        opt.step()
        ref_opt.step()
        expected = torch.linalg.vector_norm(torch.cat([x.flatten() for x in g]))
        torch.testing.assert_close(opt.last_grad_norm.cpu(), expected, rtol=1e-6, atol=0)
    assert_params_close(ours, ref)  # tracking does not clip
    assert untracked.last_grad_norm is None


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_skip_nonfinite_leaves_everything_bit_identical(backend, kind):
    device = require_op(backend, "adam" if kind == "adamw" else "sgd")
    ours = make_params(device=device)
    ref = clone_params(ours)
    if kind == "adamw":
        opt = fo.optim.FusedAdamW(ours, lr=1e-2, amsgrad=True, skip_nonfinite=True, max_grad_norm=2.0, backend=backend)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True, foreach=False)
    else:
        opt = fo.optim.FusedSGD(ours, lr=0.1, momentum=0.9, dampening=0.1, skip_nonfinite=True,
                                max_grad_norm=2.0, backend=backend)
        ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=0.1, foreach=False)
    grads = make_grads(steps=6)
    grads[2][0][1, 3] = INF
    grads[4][3][0, 0, 1] = NAN
    for k, g in enumerate(grads):
        set_grads(ours, g)
        before = snapshot(opt, ours)
        opt.step()
        if k in (2, 4):
            assert_bit_identical(before, snapshot(opt, ours))
            assert not math.isfinite(opt.last_grad_norm.item())
            continue
        set_grads(ref, g)
        torch.nn.utils.clip_grad_norm_(ref, 2.0)
        ref_opt.step()
    assert opt.skipped_steps.item() == 2 and opt.skipped_steps.device == ours[0].device
    assert_params_close(ours, ref)
    if kind == "adamw":
        assert float(opt.state[ours[0]]["step"]) == 4.0


def test_without_skip_nonfinite_inf_behaves_as_torch(backend):
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    grads = make_grads(steps=2)
    grads[1][1][4] = INF
    train(opt, ours, grads)
    train(ref_opt, ref, grads)
    for p, r in zip(ours, ref):
        assert torch.equal(p.isnan(), r.isnan())
        assert torch.equal(p.isinf(), r.isinf())
    assert opt.skipped_steps.item() == 0


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_skipped_first_step_creates_no_state(backend, kind):
    device = require_op(backend, "adam" if kind == "adamw" else "sgd")
    ours = make_params(device=device)
    ref = clone_params(ours)
    if kind == "adamw":
        opt = fo.optim.FusedAdamW(ours, lr=1e-2, skip_nonfinite=True, backend=backend)
        ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    else:
        opt = fo.optim.FusedSGD(ours, lr=0.1, momentum=0.9, dampening=0.5, skip_nonfinite=True, backend=backend)
        ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    grads = make_grads(steps=4)
    bad = [g.clone() for g in grads[0]]
    bad[2][0] = INF
    set_grads(ours, bad)
    opt.step()
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}
    for p, r in zip(ours, ref):
        assert torch.equal(p, r)
    train(opt, ours, grads[1:])  # the next step is a first step: torch's first-step rule
    train(ref_opt, ref, grads[1:])
    assert_params_close(ours, ref)
    assert len(opt.state) == len(ours)


def _regression_problem(device, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=gen).to(device).requires_grad_(),
              torch.randn(4, generator=gen).to(device).requires_grad_()]
    data = [(torch.randn(8, 3, generator=gen).to(device), torch.randn(8, 4, generator=gen).to(device))
            for _ in range(steps)]
    return params, data


def _loss(params, batch):
    w, b = params
    x, y = batch
    return ((x @ w.t() + b - y) ** 2).mean()


def test_loss_scaler_matches_grad_scaler_with_an_overflow(backend):
    device = require_op(backend, "adam")
    steps, overflow_at = 7, 2
    ours, data = _regression_problem(device, steps)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    scaler = fo.amp.LossScaler(init_scale=2.0**10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=2)
    for k in range(steps):
        for o in (opt, ref_opt):
            o.zero_grad()
        scaler.scale(_loss(ours, data[k])).backward()
        ref_scaler.scale(_loss(ref, data[k])).backward()
        if k == overflow_at:
            ours[0].grad[1, 1] = INF
            ref[0].grad[1, 1] = INF
        before = snapshot(opt, ours)
        found_inf = scaler.step(opt)
        ref_scaler.step(ref_opt)
        assert found_inf.device == device and found_inf.dim() == 0
        assert found_inf.item() == (1.0 if k == overflow_at else 0.0)
        if k == overflow_at:
            assert_bit_identical(before, snapshot(opt, ours))
        scaler.update()
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert scaler.get_growth_tracker() == ref_scaler._get_growth_tracker()
    assert_params_close(ours, ref)
    assert float(opt.state[ours[0]]["step"]) == steps - 1
    assert scaler.get_scale() == 2.0**12  # 2^10: grown, backed off, grown three times


def test_loss_scaler_with_clipping_equals_unscale_clip_step(backend):
    device = require_op(backend, "adam")
    ours, data = _regression_problem(device, 4, seed=3)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdam(ours, lr=1e-2, weight_decay=0.1, max_grad_norm=0.3, backend=backend)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    scaler = fo.amp.LossScaler(init_scale=2.0**8)
    ref_scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    for batch in data:
        for o in (opt, ref_opt):
            o.zero_grad()
        scaler.scale(_loss(ours, batch)).backward()
        ref_scaler.scale(_loss(ref, batch)).backward()
        scaled = [p.grad.clone() for p in ours]
        scaler.step(opt)
        scaler.update()
        ref_scaler.unscale_(ref_opt)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.3)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, rtol=1e-6, atol=0)
        assert all(torch.equal(p.grad, s) for p, s in zip(ours, scaled))  # grads stay scaled
    assert_params_close(ours, ref)


@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["step", "unscale_clip_step"])
def test_torch_grad_scaler_drives_fused_optimizer(backend, unscale_and_clip):
    device = require_op(backend, "adam")
    steps, overflow_at = 5, 1
    ours, data = _regression_problem(device, steps, seed=5)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**9, growth_interval=2) for _ in range(2)]
    for k in range(steps):
        for o, ps, s in ((opt, ours, scalers[0]), (ref_opt, ref, scalers[1])):
            o.zero_grad()
            s.scale(_loss(ps, data[k])).backward()
            if k == overflow_at:
                ps[1].grad[0] = NAN
            before = snapshot(opt, ours) if o is opt else None
            if unscale_and_clip:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(ps, 0.5)
            s.step(o)
            s.update()
            if before is not None and k == overflow_at:
                assert_bit_identical(before, snapshot(opt, ours))
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_params_close(ours, ref)
    assert float(opt.state[ours[0]]["step"]) == steps - 1


def test_loss_scaler_drives_a_plain_torch_optimizer():
    ours, data = _regression_problem(torch.device("cpu"), 4, seed=7)
    ref = clone_params(ours)
    opt, ref_opt = torch.optim.SGD(ours, lr=0.1), torch.optim.SGD(ref, lr=0.1)
    scaler = fo.amp.LossScaler(init_scale=2.0**6, growth_interval=1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1)
    for k, batch in enumerate(data):
        for o, ps, s in ((opt, ours, scaler), (ref_opt, ref, ref_scaler)):
            o.zero_grad()
            s.scale(_loss(ps, batch)).backward()
            if k == 1:
                ps[0].grad[0, 0] = INF
            s.step(o)
            s.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
    assert_params_close(ours, ref)


def test_loss_scaler_state_dict_round_trips_and_interchanges_with_grad_scaler():
    scaler = fo.amp.LossScaler(init_scale=2.0**5, growth_factor=4.0, backoff_factor=0.25, growth_interval=3)
    loss = scaler.scale(torch.tensor(1.5))
    assert loss.item() == 1.5 * 2**5
    scaler._found_inf = torch.tensor(0.0)
    scaler.update()
    state = scaler.state_dict()
    assert state == {"scale": 32.0, "growth_factor": 4.0, "backoff_factor": 0.25,
                     "growth_interval": 3, "_growth_tracker": 1}
    other = fo.amp.LossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state
    other.scale(torch.tensor(1.0))
    assert other.get_scale() == 32.0 and other.get_growth_tracker() == 1
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(state)
    assert ref.state_dict() == state
    back = fo.amp.LossScaler()
    back.load_state_dict(ref.state_dict())
    assert back.state_dict() == state


def test_disabled_loss_scaler_is_transparent():
    ours, data = _regression_problem(torch.device("cpu"), 2)
    opt = fo.optim.FusedSGD(ours, lr=0.1, backend="torch")
    scaler = fo.amp.LossScaler(enabled=False)
    loss = _loss(ours, data[0])
    assert scaler.scale(loss) is loss
    loss.backward()
    before = ours[0].detach().clone()
    assert scaler.step(opt) is None
    scaler.update()
    assert not torch.equal(before, ours[0])
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {}


def test_loss_scaler_backs_off_and_never_grows_to_inf():
    scaler = fo.amp.LossScaler(init_scale=2.0**127, growth_interval=1)
    scaler.scale(torch.tensor(1.0))
    scaler._found_inf = torch.tensor(0.0)
    scaler.update()
    assert scaler.get_scale() == 2.0**127 and scaler.get_growth_tracker() == 0
    scaler._found_inf = torch.tensor(1.0)
    scaler.update()
    assert scaler.get_scale() == 2.0**126


def test_grad_scaler_flags_of_shape_1_are_accepted(backend):
    """FSDP's ShardedGradScaler hands ``found_inf`` as a shape [1] tensor (GradScaler's is
    0-dim); ``grad_scale`` of shape [1] is taken too."""
    device = require_op(backend, "adam")
    ours = make_params(device=device)
    ref = clone_params(ours)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    scale = 64.0
    for k, g in enumerate(make_grads(steps=3)):
        set_grads(ours, [x * scale for x in g])
        if k == 1:
            ours[0].grad[0, 0] = INF
        opt.grad_scale = torch.full((1,), scale, device=device)
        opt.found_inf = torch.full((1,), float(k == 1), device=device)
        before = snapshot(opt, ours)
        opt.step()
        del opt.grad_scale, opt.found_inf
        if k == 1:
            assert_bit_identical(before, snapshot(opt, ours))
            continue
        set_grads(ref, g)
        ref_opt.step()
    assert_params_close(ours, ref)
    assert int(opt.skipped_steps) == 1
    for name, value, exc in [("found_inf", torch.zeros(2), ValueError),
                             ("grad_scale", torch.ones(1, 1, dtype=torch.int64), ValueError),
                             ("found_inf", 0.0, TypeError)]:
        setattr(opt, name, value)
        with pytest.raises(exc, match=f"optimizer.{name} must be"):
            opt.step()
        delattr(opt, name)
