"""What memory-lean Adam states do not cover, and how they meet the rest of the optimizers
(docs/optimizers.md, "Memory-lean states"): lean groups on torch.distributed and lean
moments of fp64 params are refused by name with nothing changed, a traced step refuses a
lean bucket at trace time, stochastic rounding leaves fp32 / fp64 params to the plain Adam
step, and a checkpoint's lean moments load into fp32 groups (fp32 / fp64 params) while its
plain moments take the loader's usual path."""

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import (assert_bit_identical, make_grads, make_params, set_grads,
                           snapshot, train)

SHAPES = [(300,), (5, 7)]


def _world():
    """The process group of a one-rank gloo world in this process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD


def _dtensor_params():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _world()
    mesh = init_device_mesh("cpu", (1,))
    return [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            for p in make_params(SHAPES)]


# ------------------------------------------------------------------ torch.distributed

@pytest.mark.parametrize("kwargs", [dict(state_dtype=torch.bfloat16),
                                    dict(state_dtype=torch.int8),
                                    dict(param_rounding="stochastic")])
def test_a_lean_group_with_a_process_group_is_refused_at_construction(kwargs):
    with pytest.raises(ValueError, match=r"param group 0 asks for memory-lean states .* on "
                                         r"torch\.distributed \(a process_group\)"):
        fo.optim.FusedAdamW(make_params(SHAPES), process_group=_world(), **kwargs)


def test_a_lean_group_with_dtensor_params_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"on torch\.distributed \(DTensor params\)"):
        fo.optim.FusedAdamW(_dtensor_params(), state_dtype=torch.int8)


def test_a_lean_group_added_to_an_optimizer_on_a_process_group_is_refused():
    opt = fo.optim.FusedAdamW(make_params(SHAPES), process_group=_world())
    with pytest.raises(ValueError, match=r"param group 1 asks for memory-lean states"):
        opt.add_param_group({"params": make_params(SHAPES, seed=4),
                             "param_rounding": "stochastic"})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match=r"param 0 of param group 1 has dtype torch\.float64"):
        fo.optim.FusedAdamW(make_params(SHAPES), state_dtype=torch.int8).add_param_group(
            {"params": make_params(SHAPES, dtype=torch.float64)})


def test_a_lean_option_set_later_on_a_process_group_is_refused_at_the_step():
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, process_group=_world(), backend="cpu")
    grads = make_grads(SHAPES, steps=2)
    train(opt, ps, grads[:1])
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    set_grads(ps, grads[1])
    before = snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"asks for memory-lean states \(state_dtype="
                                         r"torch\.bfloat16"):
        opt.step()
    assert_bit_identical(before, snapshot(opt, ps))


# ------------------------------------------------------------------ fp64 params

def test_lean_moments_of_an_fp64_param_are_refused():
    with pytest.raises(TypeError, match=r"param 1 of param group 0 has dtype torch\.float64; "
                                        r"state_dtype=torch\.bfloat16 keeps"):
        fo.optim.FusedAdamW([make_params(SHAPES)[0], make_params(SHAPES, dtype=torch.float64)[1]],
                            state_dtype=torch.bfloat16)


def test_stochastic_rounding_leaves_fp64_and_fp32_params_to_the_adam_step():
    """Only bf16/fp16 params are rounded stochastically: fp64 and fp32 params of such a
    group step as with nearest rounding, i.e. as torch's AdamW."""
    ps = make_params(SHAPES, dtype=torch.float64) + make_params(SHAPES, seed=2)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    grads = make_grads(SHAPES + SHAPES, steps=3)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, param_rounding="stochastic")
    torch_opt = torch.optim.AdamW(ref, lr=1e-2)
    train(opt, ps, grads)
    train(torch_opt, ref, grads)
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-12 if p.dtype == torch.float64 else 1e-6,
                                   atol=1e-12 if p.dtype == torch.float64 else 1e-6)
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.float64


# ------------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.int8])
def test_a_compiled_lean_step_is_refused_at_trace_time(state_dtype):
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, state_dtype=state_dtype, backend="torch")
    grads = make_grads(SHAPES, steps=2)
    train(opt, ps, grads[:1])
    set_grads(ps, grads[1])
    before = snapshot(opt, ps)
    with pytest.raises(Exception, match="memory-lean states .* is not supported"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert_bit_identical(before, snapshot(opt, ps))


def test_a_compiled_step_refuses_moments_still_in_a_lean_format():
    """A group switched back to fp32 states converts its bf16 moments at the next eager
    step; a traced step cannot, so it refuses them."""
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, state_dtype=torch.bfloat16, backend="torch")
    grads = make_grads(SHAPES, steps=2)
    train(opt, ps, grads[:1])
    opt.param_groups[0]["state_dtype"] = torch.float32
    set_grads(ps, grads[1])
    before = snapshot(opt, ps)
    with pytest.raises(Exception, match="moments still in a lean format"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert_bit_identical(before, snapshot(opt, ps))


def test_stochastic_rounding_of_fp32_params_compiles_like_eager():
    require_op("cpu", "adam")
    ps, qs = make_params(SHAPES), make_params(SHAPES)
    grads = make_grads(SHAPES, steps=3)
    eager = fo.optim.FusedAdamW(ps, lr=1e-2, param_rounding="stochastic", backend="cpu")
    traced = fo.optim.FusedAdamW(qs, lr=1e-2, param_rounding="stochastic", backend="cpu")
    step = torch.compile(traced.step, backend="eager", fullgraph=True)
    train(eager, ps, grads)
    for g in grads:
        set_grads(qs, g)
        step()
    assert_bit_identical([p.detach() for p in ps], [q.detach() for q in qs])


# ------------------------------------------------------------------ loading

def _lean_checkpoint(state_dtype):
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=state_dtype, seed=3, backend="torch")
    train(opt, ps, make_grads(SHAPES, steps=2))
    return opt.state_dict()


def test_a_bf16_checkpoint_loads_into_fp64_params_as_fp64_moments():
    sd = _lean_checkpoint(torch.bfloat16)
    ps = make_params(SHAPES, dtype=torch.float64)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2)
    opt.load_state_dict(sd)
    for i, p in enumerate(ps):
        for key in ("exp_avg", "exp_avg_sq"):
            loaded = opt.state[p][key]
            assert loaded.dtype == torch.float64
            assert torch.equal(loaded, sd["state"][i][key].double())
    assert opt.param_groups[0]["state_dtype"] == torch.bfloat16


def test_an_8bit_checkpoint_into_fp64_params_is_refused():
    sd = _lean_checkpoint(torch.int8)
    sd["param_groups"][0]["state_dtype"] = torch.float32
    ps = make_params(SHAPES, dtype=torch.float64)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2)
    with pytest.raises(ValueError, match=r"key 'exp_avg', holds 8-bit moments, which a "
                                         r"torch\.float64 param cannot keep"):
        opt.load_state_dict(sd)
    assert not opt.state


def test_an_8bit_checkpoint_loads_into_an_fp32_group_decoded():
    sd = _lean_checkpoint(torch.int8)
    plain = fo.optim.dequantize_state_dict(sd)
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2)
    sd["param_groups"][0]["state_dtype"] = torch.float32
    opt.load_state_dict(sd)
    for i, p in enumerate(ps):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], plain["state"][i][key])


def test_state_dtype_is_saved_by_name_and_loaded_back():
    """torch.distributed.checkpoint's full state dicts take no torch.dtype values: the
    checkpoint holds the name (tests/distributed/test_dtensor_checkpoints.py runs them)."""
    sd = _lean_checkpoint(torch.int8)
    assert sd["param_groups"][0]["state_dtype"] == "torch.int8"
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, lr=1e-2)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["state_dtype"] == torch.int8
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.int8
    sd["param_groups"][0]["state_dtype"] = "torch.float16"
    with pytest.raises(ValueError, match=r"loaded parameter group 0: invalid state_dtype: "
                                         r"'torch.float16'"):
        fo.optim.FusedAdamW(make_params(SHAPES)).load_state_dict(sd)


# ------------------------------------------------------------------ decoupled weight decay

@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.int8])
def test_decoupled_weight_decay_of_a_group_chooses_the_lean_decay(state_dtype):
    """The lean step decays like AdamW exactly when the group's decoupled_weight_decay is
    True: FusedAdam with the key equals FusedAdamW bit for bit, without it (L2) it differs."""
    grads = make_grads(SHAPES, steps=3)
    runs = {}
    for name, cls, kwargs in (("adamw", fo.optim.FusedAdamW, {}),
                              ("adam_decoupled", fo.optim.FusedAdam,
                               dict(decoupled_weight_decay=True)),
                              ("adam_l2", fo.optim.FusedAdam, {})):
        ps = make_params(SHAPES)
        opt = cls(ps, lr=1e-2, weight_decay=0.5, state_dtype=state_dtype, seed=5,
                  backend="torch", **kwargs)
        train(opt, ps, grads)
        runs[name] = [p.detach().clone() for p in ps]
    assert_bit_identical(runs["adamw"], runs["adam_decoupled"])
    assert not all(torch.equal(a, b) for a, b in zip(runs["adamw"], runs["adam_l2"]))
