"""How memory-lean Adam states meet the rest of the optimizers, and what they do not cover
(docs/optimizers.md, "Memory-lean states"): lean groups with a process group or DTensor
params on one rank (the 2-rank runs are in tests/distributed), lean moments of fp64 params
refused by name with nothing changed, a traced step refusing moments it would have to
convert, stochastic rounding leaving fp32 / fp64 params to the plain Adam step, and a
checkpoint's lean moments loading into fp32 groups (fp32 / fp64 params) while its plain
moments take the loader's usual path."""

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


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    _world()
    return init_device_mesh("cpu", (1,))


def _dtensor_params(dtype=torch.float32):
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _mesh()
    return [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            for p in make_params(SHAPES, dtype=dtype)]


def _as_dtensor(x, like):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(x, like.device_mesh, like.placements, run_check=False)


# ------------------------------------------------------------------ torch.distributed
# (the 2-rank runs: tests/distributed/test_lean_distributed.py)

LEAN_OPTIONS = [dict(state_dtype=torch.bfloat16), dict(state_dtype=torch.int8),
                dict(state_dtype=torch.bfloat16, param_rounding="stochastic")]


@pytest.mark.parametrize("kwargs", LEAN_OPTIONS)
def test_a_lean_group_on_a_one_rank_process_group_steps_as_without_it(kwargs):
    """The group's all-reduce of the norm over one rank changes nothing: the same bits."""
    require_op("cpu", "lean_adam")
    dtype = torch.bfloat16 if "param_rounding" in kwargs else torch.float32
    grads = make_grads(SHAPES, steps=3)
    runs = []
    for group in (None, _world()):
        ps = make_params(SHAPES, dtype=dtype)
        opt = fo.optim.FusedAdamW(ps, lr=1e-2, max_grad_norm=0.5, seed=9, backend="cpu",
                                  process_group=group, **kwargs)
        train(opt, ps, grads)
        runs.append(snapshot(opt, ps))
    assert_bit_identical(*runs)


@pytest.mark.parametrize("kwargs", LEAN_OPTIONS)
def test_dtensor_params_on_a_one_rank_mesh_step_as_their_plain_copies(kwargs):
    """One shard per param: the local tensors step as plain params do (the same streams);
    the moments are DTensors like the params, the 8-bit absmax plain tensors."""
    from torch.distributed.tensor import DTensor

    require_op("cpu", "lean_adam")
    dtype = torch.bfloat16 if "param_rounding" in kwargs else torch.float32
    plain = make_params(SHAPES, dtype=dtype)
    dtensors = _dtensor_params(dtype)
    grads = make_grads(SHAPES, steps=3)
    a = fo.optim.FusedAdamW(plain, lr=1e-2, max_grad_norm=0.5, seed=9, backend="cpu", **kwargs)
    b = fo.optim.FusedAdamW(dtensors, lr=1e-2, max_grad_norm=0.5, seed=9, backend="cpu",
                            **kwargs)
    train(a, plain, grads)
    for g in grads:
        for q, x in zip(dtensors, g):
            q.grad = _as_dtensor(x.to(dtype), q)
        b.step()
    for p, q in zip(plain, dtensors):
        assert torch.equal(p.detach(), q.detach().to_local())
        assert set(a.state[p]) == set(b.state[q])
        for key, value in a.state[p].items():
            other = b.state[q][key]
            if key in ("exp_avg", "exp_avg_sq"):
                assert type(other) is DTensor and other.placements == q.placements
                other = other.to_local()
            else:
                assert type(other) is torch.Tensor, key
            assert torch.equal(value, other), key


def test_the_8bit_moments_of_dtensor_params_are_saved_decoded_and_load_back_exactly():
    require_op("cpu", "lean_adam")
    ps = _dtensor_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=torch.int8, backend="cpu")
    for g in make_grads(SHAPES, steps=2):
        for q, x in zip(ps, g):
            q.grad = _as_dtensor(x, q)
        opt.step()
    sd = opt.state_dict()
    for i, p in enumerate(ps):
        entry = sd["state"][i]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        codes, absmax = opt.state[p]["exp_avg_sq"].to_local(), opt.state[p]["exp_avg_sq_absmax"]
        decoded = fo.backends.lean_math.dequantize_blocks(codes.reshape(-1), absmax)
        assert entry["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(entry["exp_avg_sq"].to_local().reshape(-1), decoded)
    before = [{k: v.to_local() if hasattr(v, "to_local") else v
               for k, v in opt.state[p].items()} for p in ps]
    fresh = fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=torch.int8, backend="cpu")
    fresh.load_state_dict(sd)
    for p, want in zip(ps, before):
        got = fresh.state[p]
        assert set(got) == set(want)
        for key, value in want.items():
            other = got[key].to_local() if hasattr(got[key], "to_local") else got[key]
            assert other.dtype == value.dtype and torch.equal(other, value), key


def test_bad_lean_states_of_a_dtensor_param_are_refused_by_name():
    require_op("cpu", "lean_adam")
    ps = _dtensor_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=torch.int8, backend="cpu")
    for q, x in zip(ps, make_grads(SHAPES, steps=1)[0]):
        q.grad = _as_dtensor(x, q)
    opt.step()
    before = snapshot(opt, ps)
    entry = opt.state[ps[0]]
    for key, value, error, match in (
            ("exp_avg_absmax", _as_dtensor(entry["exp_avg_absmax"], ps[0]), TypeError,
             r"\['exp_avg_absmax'\] is a DTensor; the absmax of a DTensor param's 8-bit "
             r"moments is a plain tensor"),
            ("exp_avg", entry["exp_avg"].to_local(), TypeError,
             r"\['exp_avg'\] is a Tensor; the state of a DTensor param must be a DTensor")):
        saved = entry[key]
        entry[key] = value
        with pytest.raises(error, match=match):
            opt.step()
        entry[key] = saved
        assert_bit_identical(before, snapshot(opt, ps))
    sd = opt.state_dict()
    sd["state"][0] = {k: v.to_local() if hasattr(v, "to_local") else v
                      for k, v in opt.state[ps[0]].items()}
    with pytest.raises(ValueError, match=r"param 0, key 'exp_avg', holds 8-bit moments, which "
                                         r"a DTensor param cannot keep \(the absmax blocks"):
        fo.optim.FusedAdamW(ps, lr=1e-2, state_dtype=torch.int8).load_state_dict(sd)


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

@pytest.mark.parametrize("before,after", [(torch.bfloat16, torch.int8),
                                          (torch.int8, torch.bfloat16)])
def test_a_compiled_step_refuses_moments_in_another_lean_format(before, after):
    """The eager step converts moments to a changed state_dtype; a traced one cannot, so
    it refuses them at trace time, changing nothing (the compiled step itself:
    tests/optim/test_compiled_step.py)."""
    ps = make_params(SHAPES)
    opt = fo.optim.FusedAdamW(ps, state_dtype=before, backend="torch")
    grads = make_grads(SHAPES, steps=2)
    train(opt, ps, grads[:1])
    opt.param_groups[0]["state_dtype"] = after
    set_grads(ps, grads[1])
    snap = snapshot(opt, ps)
    with pytest.raises(Exception, match=r"\['exp_avg'\] is not in the format of its group's "
                                        r"state_dtype=.*run one step eagerly"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert_bit_identical(snap, snapshot(opt, ps))


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
    with pytest.raises(Exception, match="moments are still in a lean format"):
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


# ------------------------------------------------------------------ 8-bit re-quantization

@pytest.mark.parametrize("signed", [True, False])
def test_8bit_moments_decoded_and_quantized_again_in_the_same_blocks_are_unchanged(signed):
    """What makes the decoded 8-bit moments of ``state_dict()`` (DTensor params) load back
    bit for bit: each block's largest element decodes to exactly its absmax, and every
    other decoded value lies far from the midpoints between map values.  Checked with the
    NumPy statement of the maps (tests/lean_reference.py) on blocks of many scales, with
    zeros, tiny (flushed) and non-finite blocks."""
    import numpy as np

    import lean_reference as ref

    rng = np.random.default_rng(0)
    blocks = []
    for scale in (1e-30, 1e-8, 1e-3, 1.0, 1e4, 1e30):
        x = rng.standard_normal(256 * 8) * scale
        x *= np.exp(rng.uniform(-12, 0, x.size))  # values spread over many octaves
        blocks.append(x if signed else x * x / scale)
    blocks += [np.zeros(256), np.full(256, 2.0 ** -110), np.r_[np.ones(255), np.nan],
               np.r_[np.ones(200), np.inf, np.ones(55)], rng.standard_normal(77)]
    x = np.concatenate(blocks).astype(np.float32)
    codes, absmax = ref.quantize(x, signed)
    again_codes, again_absmax = ref.quantize(ref.dequantize(codes, absmax), signed)
    np.testing.assert_array_equal(again_codes, codes)
    np.testing.assert_array_equal(again_absmax.view(np.uint32), absmax.view(np.uint32))
    assert (codes != 0).mean() > 0.5  # most elements carry a code
