"""state_dict / load_state_dict: torch's layout, fp32 states, lazy state, bit-exact resume."""

import copy
import io

import pytest
import torch

import fusedopt as fo
from conftest import require_op
from optim_helpers import assert_params_close, clone_params, make_grads, make_params, set_grads, train

PAIRS = {
    "adamw": (lambda ps, b: fo.optim.FusedAdamW(ps, lr=1e-2, amsgrad=True, backend=b),
              lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True)),
    "adam": (lambda ps, b: fo.optim.FusedAdam(ps, lr=1e-2, weight_decay=0.1, backend=b),
             lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)),
    "sgd": (lambda ps, b: fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, backend=b),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)),
}


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_torch_checkpoint_loads_into_fused_and_back(backend, kind):
    device = require_op(backend, "sgd" if kind == "sgd" else "adam")
    make_fused, make_torch = PAIRS[kind]
    grads = make_grads(steps=9)
    # torch -> fused: torch trains 3 steps, the fused optimizer resumes from its checkpoint
    ref = make_params(device=device)
    ref_opt = make_torch(ref)
    train(ref_opt, ref, grads[:3])
    ours = clone_params(ref)
    opt = make_fused(ours, backend)
    opt.load_state_dict(_saved(ref_opt.state_dict()))
    for p in ours:
        for key, value in opt.state[p].items():
            assert value.dtype == torch.float32 and value.device == p.device, key
    train(opt, ours, grads[3:6])
    train(ref_opt, ref, grads[3:6])
    assert_params_close(ours, ref)
    # fused -> torch: the fused checkpoint loads into a fresh torch optimizer, which goes on
    back = clone_params(ours)
    back_opt = make_torch(back)
    back_opt.load_state_dict(_saved(opt.state_dict()))
    assert back_opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    train(back_opt, back, grads[6:])
    train(ref_opt, ref, grads[6:])
    assert_params_close(back, ref)


@pytest.mark.parametrize("config", ["adamw_bf16_master", "adamw_fp32", "sgd"])
def test_save_load_mid_training_is_bit_identical(backend, config):
    device = require_op(backend, "sgd" if config == "sgd" else "adam")
    dtype = torch.bfloat16 if config == "adamw_bf16_master" else torch.float32

    def make(ps):
        if config == "sgd":
            return fo.optim.FusedSGD(ps, lr=0.05, momentum=0.9, dampening=0.1, max_grad_norm=1.0, backend=backend)
        return fo.optim.FusedAdamW(ps, lr=1e-2, amsgrad=True, max_grad_norm=1.0,
                                   master_weights=dtype != torch.float32, backend=backend)

    grads = make_grads(steps=6, scale=2.0)
    whole = make_params(device=device, dtype=dtype)
    split = clone_params(whole)
    train(make(whole), whole, grads)
    first = make(split)
    train(first, split, grads[:3])
    saved_params, saved_state = _saved(([p.detach() for p in split], first.state_dict()))
    resumed = [p.clone().requires_grad_() for p in saved_params]
    second = make(resumed)
    second.load_state_dict(saved_state)
    train(second, resumed, grads[3:])
    for a, b in zip(whole, resumed):
        assert torch.equal(a.detach().view(torch.int16 if dtype != torch.float32 else torch.int32),
                           b.detach().view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_low_precision_checkpoint_states_are_loaded_as_fp32(backend):
    device = require_op(backend, "adam")
    ref = make_params(device=device, dtype=torch.bfloat16)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    grads = [[g.bfloat16() for g in gs] for gs in make_grads(steps=2)]
    train(ref_opt, ref, grads)
    ours = clone_params(ref)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, master_weights=True, backend=backend)
    saved = _saved(ref_opt.state_dict())
    opt.load_state_dict(saved)
    for p, k in zip(ours, sorted(saved["state"])):
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].device == p.device
        assert torch.equal(st["exp_avg"], saved["state"][k]["exp_avg"].float().to(device))
        assert st["step"].dtype == torch.float32 and st["step"].device == p.device
        assert st["exp_avg"] is not saved["state"][k]["exp_avg"]
    train(opt, ours, grads)
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master_param"}


def test_state_is_lazy_and_layout_is_torch():
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, lr=1e-2, backend="torch")
    ref_opt = torch.optim.AdamW(clone_params(ps), lr=1e-2)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["param_groups"][0]["params"] == ref_sd["param_groups"][0]["params"]
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert sd["param_groups"][0][key] == ref_sd["param_groups"][0][key]
    set_grads(ps[:2], make_grads(steps=1)[0][:2])
    opt.step()
    assert set(opt.state) == set(ps[:2])
    assert sorted(opt.state_dict()["state"]) == [0, 1]


def test_load_state_dict_checks_the_groups():
    ps = make_params()
    opt = fo.optim.FusedAdamW([{"params": ps[:2]}, {"params": ps[2:]}], backend="torch")
    other = fo.optim.FusedAdamW(ps, backend="torch")
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(opt.state_dict())
    short = fo.optim.FusedAdamW([{"params": ps[:1]}, {"params": ps[2:]}], backend="torch")
    with pytest.raises(ValueError, match="group 0 has 2 params"):
        short.load_state_dict(opt.state_dict())


def test_loaded_hyper_parameters_replace_the_groups():
    ps = make_params()
    ref_opt = torch.optim.AdamW(clone_params(ps), lr=0.123, betas=(0.5, 0.6), weight_decay=0.7)
    opt = fo.optim.FusedAdamW(ps, backend="torch")
    opt.load_state_dict(ref_opt.state_dict())
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.123, (0.5, 0.6), 0.7)
    assert group["params"] == ps


def test_deepcopy_keeps_the_full_state():
    ps = make_params()
    opt = fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend="torch")
    train(opt, ps, make_grads(steps=2))
    ps2, opt2 = copy.deepcopy((ps, opt))
    train(opt, ps, make_grads(steps=2, seed=5))
    train(opt2, ps2, make_grads(steps=2, seed=5))
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


STEPS = [3, 3.0, torch.tensor(3.0), torch.tensor([3]), torch.tensor([[3.0]], dtype=torch.float64)]


@pytest.mark.parametrize("step", STEPS, ids=["int", "float", "tensor", "int64_1", "float64_1x1"])
def test_checkpoint_step_of_any_form_loads(backend, step):
    device = require_op(backend, "adam")
    grads = make_grads(steps=5)
    ref = make_params(device=device)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    train(ref_opt, ref, grads[:3])
    sd = _saved(ref_opt.state_dict())
    for entry in sd["state"].values():
        entry["step"] = step
    ours = clone_params(ref)
    opt = fo.optim.FusedAdamW(ours, lr=1e-2, backend=backend)
    opt.load_state_dict(sd)
    for p in ours:
        s = opt.state[p]["step"]
        assert s.shape == () and s.dtype == torch.float32 and s.device == p.device and float(s) == 3
    train(opt, ours, grads[3:])
    train(ref_opt, ref, grads[3:])
    assert_params_close(ours, ref)


def test_castable_missing_extra_and_none_entries_load(backend):
    """float64 / bf16 / uint8 moments are cast to fp32 (like torch's loader), a missing key
    is created as at a first step, extra keys and unknown params are kept, None dropped."""
    device = require_op(backend, "adam")
    grads = make_grads(steps=4)
    ref = make_params(device=device)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, weight_decay=0.1)
    train(ref_opt, ref, grads[:2])
    sd = _saved(ref_opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].double()
    sd["state"][1]["exp_avg_sq"] = sd["state"][1]["exp_avg_sq"].bfloat16()
    sd["state"][2]["exp_avg_sq"] = torch.zeros_like(sd["state"][2]["exp_avg_sq"], dtype=torch.uint8)
    del sd["state"][3]["exp_avg_sq"]
    sd["state"][3]["note"] = "kept"
    sd["state"][3]["max_exp_avg_sq"] = None
    sd["state"][99] = {"foreign": 1}
    ref_opt.load_state_dict(sd | {"state": {k: dict(v, exp_avg_sq=torch.zeros_like(ref[3]))
                                            if k == 3 else v for k, v in sd["state"].items()}})
    ours = clone_params(ref)
    opt = fo.optim.FusedAdam(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    opt.load_state_dict(sd)
    st = opt.state
    assert all(st[p][k].dtype == torch.float32 for p in ours for k in ("exp_avg", "exp_avg_sq")
               if k in st[p])
    assert "exp_avg_sq" not in st[ours[3]] and st[ours[3]]["note"] == "kept"
    assert "max_exp_avg_sq" not in st[ours[3]]
    train(opt, ours, grads[2:])
    train(ref_opt, ref, grads[2:])
    assert_params_close(ours, ref)
    assert opt.state_dict()["state"][99] == {"foreign": 1}


def test_refused_checkpoint_changes_nothing():
    ps = make_params()
    opt = fo.optim.FusedSGD(ps, lr=0.1, momentum=0.9, backend="torch")
    train(opt, ps, make_grads(steps=2))
    good = opt.state_dict()
    before = copy.deepcopy((good, [p.detach().clone() for p in ps]))
    for edit, exc, match in [
            (lambda sd: sd["state"].__setitem__(1, [1.0]), TypeError, "state of param 1 must be a dict"),
            (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), ValueError,
             r"loaded parameter group 0: invalid lr: -1\.0"),
            (lambda sd: sd["param_groups"][0].__setitem__("momentum", "x"), TypeError,
             "loaded parameter group 0: momentum must be a number"),
            (lambda sd: sd["state"][2].__setitem__("momentum_buffer", torch.zeros(3, 3)), ValueError,
             r"param 2, key 'momentum_buffer', has shape \(3, 3\), expected \(1,\)"),
            (lambda sd: sd.pop("state"), ValueError, "'state' and 'param_groups'")]:
        bad = copy.deepcopy(good)
        edit(bad)
        with pytest.raises(exc, match=match):
            opt.load_state_dict(bad)
        sd = opt.state_dict()
        assert sd["param_groups"] == before[0]["param_groups"]
        for k, entry in before[0]["state"].items():
            assert torch.equal(sd["state"][k]["momentum_buffer"], entry["momentum_buffer"])
        assert all(torch.equal(p, q) for p, q in zip(ps, before[1]))
