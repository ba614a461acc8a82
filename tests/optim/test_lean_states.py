"""FusedAdam / FusedAdamW with memory-lean states (``state_dtype`` bf16 / int8,
``param_rounding="stochastic"``): the options and their errors, the state layout, the same
bits on every backend, clipping / loss scaling / skipped steps, param groups, and
checkpoints (exact resume, torch checkpoints quantized on load, the dequantize helper).
The kernels' math is tested against a NumPy reference in tests/backends/test_lean_*.py."""

import io

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import (assert_bit_identical, clone_params, make_grads, make_params,
                           set_grads, snapshot, train)

SHAPES = [(300,), (5, 7), (1,), (2, 3, 4), (600,)]
LEAN = [torch.bfloat16, torch.int8]


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _bits(tensors):
    return [t.detach().cpu().reshape(-1).view(torch.uint8).clone() for t in tensors]


def _state_bits(opt, params):
    return [_bits([v for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)])
            for p in params]


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(state_dtype=torch.float16), ValueError, "invalid state_dtype: torch.float16"),
    (dict(state_dtype="int8"), TypeError, "state_dtype must be a torch.dtype"),
    (dict(param_rounding="up"), ValueError, "invalid param_rounding: 'up'"),
    (dict(param_rounding=True), TypeError, "param_rounding must be a string"),
    (dict(seed=-1), ValueError, r"invalid seed: -1"),
    (dict(seed=2 ** 32), ValueError, "invalid seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(state_dtype=torch.int8, amsgrad=True), ValueError, "amsgrad=True needs"),
    (dict(param_rounding="stochastic", amsgrad=True), ValueError, "amsgrad=True needs"),
])
def test_bad_options_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        fo.optim.FusedAdamW(make_params(), **kwargs)


def test_group_options_are_checked_in_add_param_group_and_at_the_step():
    opt = fo.optim.FusedAdamW(make_params(), state_dtype=torch.int8)
    with pytest.raises(ValueError, match="invalid state_dtype"):
        opt.add_param_group({"params": make_params(seed=3), "state_dtype": torch.float64})
    assert len(opt.param_groups) == 1
    params = opt.param_groups[0]["params"]
    set_grads(params, make_grads(steps=1)[0])
    opt.param_groups[0]["param_rounding"] = "down"
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="invalid param_rounding"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, params))


def test_default_seed_follows_torch_manual_seed_and_is_saved():
    torch.manual_seed(7)
    a = fo.optim.FusedAdamW(make_params())
    torch.manual_seed(7)
    b = fo.optim.FusedAdamW(make_params())
    assert a.param_groups[0]["seed"] == b.param_groups[0]["seed"]
    assert a.state_dict()["param_groups"][0]["seed"] == a.param_groups[0]["seed"]
    assert fo.optim.FusedAdamW(make_params(), seed=5).param_groups[0]["seed"] == 5


# ------------------------------------------------------------------ state and backends

@pytest.mark.parametrize("state_dtype", LEAN)
def test_state_layout_and_memory(state_dtype):
    params = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(params, state_dtype=state_dtype)
    train(opt, params, make_grads(SHAPES, steps=1))
    for p in params:
        st = opt.state[p]
        if state_dtype == torch.bfloat16:
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        else:
            assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype) == (torch.int8, torch.uint8)
            blocks = -(-p.numel() // 256)
            assert st["exp_avg_absmax"].shape == st["exp_avg_sq_absmax"].shape == (blocks,)
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].stride() == p.stride()
    n = sum(p.numel() for p in params)
    moment_bytes = sum(t.numel() * t.element_size() for p in params
                       for k, t in opt.state[p].items() if k != "step")
    assert moment_bytes == (4 * n if state_dtype == torch.bfloat16
                            else 2 * n + 8 * sum(-(-p.numel() // 256) for p in params))


@pytest.mark.parametrize("dtype,state_dtype,rounding", [
    (torch.float32, torch.int8, "nearest"), (torch.bfloat16, torch.bfloat16, "stochastic"),
    (torch.float16, torch.int8, "stochastic"), (torch.bfloat16, torch.float32, "stochastic")])
def test_every_backend_gives_the_torch_backends_bits(backend, dtype, state_dtype, rounding):
    """A LossScaler and weight decay on; the torch backend is the reference.  (Clipping is
    left out here: each backend's norm pass may round the global norm differently.)"""
    device = require_op(backend, "lean_adam")
    grads = make_grads(SHAPES, steps=3)
    runs = []
    for name in ("torch", backend):
        params = make_params(SHAPES, device=device, dtype=dtype)
        opt = fo.optim.FusedAdamW(params, lr=1e-2, state_dtype=state_dtype, seed=11,
                                  param_rounding=rounding, backend=name)
        scaler = fo.amp.LossScaler(init_scale=8.0)
        scaler.scale(torch.ones((), device=device))  # creates the scale
        for g in grads:
            set_grads(params, [x * 8.0 for x in g])
            scaler.step(opt)
            scaler.update()
        runs.append(_bits(params) + sum(_state_bits(opt, params), []))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", LEAN)
def test_clipping_inside_the_step_equals_clip_grad_norm_first(state_dtype):
    # gradient norms that change from step to step (Adam is blind to a constant scale)
    grads = [[g * (1.0 + 4 * k) for g in step] for k, step in enumerate(make_grads(SHAPES, steps=4))]
    clipped = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(clipped, lr=1e-2, state_dtype=state_dtype, seed=1,
                              max_grad_norm=0.5)
    manual = make_params(SHAPES)
    ref = fo.optim.FusedAdamW(manual, lr=1e-2, state_dtype=state_dtype, seed=1)
    for g in grads:
        set_grads(clipped, g)
        opt.step()
        set_grads(manual, [x.clone() for x in g])  # clipped in place below
        norm = torch.nn.utils.clip_grad_norm_(manual, 0.5)
        torch.testing.assert_close(opt.last_grad_norm, norm)
        ref.step()
    # the clip coefficient is formed once in each (same formula, its rounding may differ by
    # an ulp): params agree to a small fraction of the update size
    for a, b in zip(clipped, manual):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    unclipped = make_params(SHAPES)
    free = fo.optim.FusedAdamW(unclipped, lr=1e-2, state_dtype=state_dtype, seed=1)
    train(free, unclipped, grads)
    assert max((a - b).abs().max() for a, b in zip(clipped, unclipped)) > 1e-3


@pytest.mark.parametrize("state_dtype", LEAN)
def test_an_overflowing_step_changes_no_byte_and_creates_no_state(state_dtype):
    params = make_params(SHAPES, dtype=torch.bfloat16)
    opt = fo.optim.FusedAdamW(params, state_dtype=state_dtype, param_rounding="stochastic")
    scaler = fo.amp.LossScaler()
    scaler.scale(torch.ones(()))
    bad = [g.clone() for g in make_grads(SHAPES, steps=1)[0]]
    bad[1][0, 0] = float("inf")
    set_grads(params, bad)
    scaler.step(opt)
    scaler.update()
    assert len(opt.state) == 0 and len(opt.state_dict()["state"]) == 0
    set_grads(params, make_grads(SHAPES, steps=1)[0])
    scaler.step(opt)
    scaler.update()
    before = snapshot(opt, params)
    set_grads(params, bad)
    scaler.step(opt)
    assert_bit_identical(before, snapshot(opt, params))
    assert opt.skipped_steps.item() == 2


def test_param_groups_choose_their_own_states_and_streams_follow_positions():
    params = make_params(SHAPES)
    opt = fo.optim.FusedAdamW([{"params": params[:2], "state_dtype": torch.int8},
                               {"params": params[2:]}], state_dtype=torch.bfloat16, seed=3)
    train(opt, params, make_grads(SHAPES, steps=2))
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.int8] * 2 + [torch.bfloat16] * 3
    # the same params in one group: the same bits (stream = global position)
    flat = make_params(SHAPES)
    one = fo.optim.FusedAdamW([{"params": flat[:2], "state_dtype": torch.int8},
                               {"params": flat[2:]}], state_dtype=torch.bfloat16, seed=3)
    train(one, flat, make_grads(SHAPES, steps=2))
    assert all(torch.equal(a, b) for a, b in zip(_bits(params), _bits(flat)))


def test_changing_a_groups_state_dtype_converts_its_states():
    params = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(params, state_dtype=torch.int8)
    grads = make_grads(SHAPES, steps=3)
    train(opt, params, grads[:1])
    decoded = fo.optim.dequantize_state_dict(opt.state_dict())["state"]
    opt.param_groups[0]["state_dtype"] = torch.float32
    train(opt, params, grads[1:2])
    for i, p in enumerate(params):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    train(opt, params, grads[2:])
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    assert decoded[0]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("state_dtype,dtype", [(torch.bfloat16, torch.float32),
                                               (torch.int8, torch.bfloat16)])
def test_save_load_mid_training_is_bit_identical(backend, state_dtype, dtype):
    device = require_op(backend, "lean_adam")
    grads = make_grads(SHAPES, steps=6)

    def make(ps, seed=3):
        return fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=state_dtype, seed=seed,
                                   param_rounding="stochastic", backend=backend)

    straight = make_params(SHAPES, device=device, dtype=dtype)
    opt = make(straight)
    train(opt, straight, grads)
    resumed = make_params(SHAPES, device=device, dtype=dtype)
    first = make(resumed)
    train(first, resumed, grads[:3])
    saved = _saved(first.state_dict())
    params = clone_params(resumed)
    second = make(params, seed=99)  # the checkpoint's seed wins
    second.load_state_dict(saved)
    train(second, params, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(_bits(params), _bits(straight)))
    for ours, theirs in zip(_state_bits(second, params), _state_bits(opt, straight)):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("state_dtype", LEAN)
def test_a_torch_checkpoint_is_quantized_on_load(state_dtype):
    params = make_params(SHAPES)
    ref = torch.optim.AdamW(params, lr=1e-2)
    train(ref, params, make_grads(SHAPES, steps=2))
    ours = clone_params(params)
    opt = fo.optim.FusedAdamW(ours, state_dtype=state_dtype)
    opt.load_state_dict(_saved(ref.state_dict()))
    back = fo.optim.dequantize_state_dict(opt.state_dict())["state"]
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            stored = opt.state[ours[i]][key]
            assert stored.dtype == (torch.bfloat16 if state_dtype == torch.bfloat16
                                    else torch.int8 if key == "exp_avg" else torch.uint8)
            exact = ref.state[p][key]
            scale = exact.abs().max()
            rel = 2.0 ** -8 if state_dtype == torch.bfloat16 else 0.007
            assert (back[i][key] - exact).abs().max() <= rel * scale
    assert opt.param_groups[0]["state_dtype"] == state_dtype  # the optimizer's, not torch's


@pytest.mark.parametrize("state_dtype", LEAN)
def test_dequantized_checkpoint_loads_into_torch_adamw(state_dtype):
    params = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(params, lr=1e-2, state_dtype=state_dtype)
    grads = make_grads(SHAPES, steps=4)
    train(opt, params, grads[:2])
    sd = opt.state_dict()
    plain = fo.optim.dequantize_state_dict(sd)
    assert "state_dtype" not in plain["param_groups"][0]
    assert all(set(e) == {"step", "exp_avg", "exp_avg_sq"} for e in plain["state"].values())
    assert sd["state"][0]["exp_avg"].dtype != torch.float32  # the input is untouched
    mirror = clone_params(params)
    torch_opt = torch.optim.AdamW(mirror, lr=1e-2)
    torch_opt.load_state_dict(_saved(plain))
    train(torch_opt, mirror, grads[2:])
    train(opt, params, grads[2:])
    for a, b in zip(params, mirror):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_a_bad_lean_checkpoint_is_refused_with_nothing_changed():
    params = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(params, state_dtype=torch.int8)
    train(opt, params, make_grads(SHAPES, steps=1))
    sd = _saved(opt.state_dict())
    before = snapshot(opt, params)
    bad = _saved(sd)
    bad["state"][4]["exp_avg_absmax"] = torch.zeros(2)  # 600 elements need 3
    with pytest.raises(ValueError, match=r"param 4, key 'exp_avg_absmax'.*\(3,\)"):
        opt.load_state_dict(bad)
    bad = _saved(sd)
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].to(torch.complex64)
    with pytest.raises(TypeError, match=r"param 0, key 'exp_avg'"):
        opt.load_state_dict(bad)
    assert_bit_identical(before, snapshot(opt, params))
