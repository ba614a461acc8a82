"""Trust cases: odd checkpoints and edited optimizer state (run by trust_cases.py)."""

from __future__ import annotations

import copy

import torch

import fusedopt as fo
from optim_helpers import assert_bit_identical, snapshot
from trust_common import (BF16, BIG, F32, Sub, case, device_of, load_refused, raises,
                          step_refused, stepped_adam, stepped_sgd)

# ------------------------------------------------------------------ checkpoints


@case
def load_small_exp_avg(b):
    load_refused(b, stepped_adam, lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)), ValueError,
                  rf"param 0, key 'exp_avg', has shape \(3,\), expected \({BIG},\)")


@case
def load_wrong_size_momentum_buffer(b):
    load_refused(b, stepped_sgd, lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(7, 5)),
                  ValueError, r"param 1, key 'momentum_buffer', has shape \(7, 5\)")


@case
def load_wrong_size_master(b):
    load_refused(b, lambda b: stepped_adam(b, BF16, master_weights=True),
                  lambda sd: sd["state"][2].update(master_param=torch.zeros(12)), ValueError,
                  r"param 2, key 'master_param', has shape \(12,\)")


@case
def load_subclass_or_meta_or_complex_state(b):
    for value, exc, pattern in [(Sub(torch.zeros(5, 7)), TypeError, "is a Sub"),
                                (torch.zeros(5, 7, device="meta"), ValueError, "meta tensor"),
                                (torch.zeros(5, 7, dtype=torch.complex64), TypeError, "complex64"),
                                (torch.zeros(5, 7).to_sparse_csr(), TypeError, "layout"),
                                ([0.0] * 35, TypeError, "must be a tensor, got list")]:
        load_refused(b, stepped_adam, lambda sd: sd["state"][1].update(exp_avg_sq=value), exc,
                      r"param 1, key 'exp_avg_sq'.*" + pattern)


@case
def load_bad_step(b):
    for value, exc in [(torch.zeros(3), ValueError), ("3", TypeError),
                       (torch.zeros((), dtype=torch.complex64), TypeError)]:
        load_refused(b, stepped_adam, lambda sd: sd["state"][2].update(step=value), exc,
                      r"param 2, key 'step'")


@case
def load_view_of_a_freed_storage(b):
    """Found by the fuzz suite: the loader copied such a tensor (SIGSEGV on every backend)."""
    def freed(shape):
        t = torch.ones(shape)
        t.untyped_storage().resize_(0)
        return t

    for key, shape in (("exp_avg", (BIG,)), ("step", ()), ("extra", (4,))):
        load_refused(b, stepped_adam, lambda sd: sd["state"][0].update({key: freed(shape)}),
                     ValueError, rf"param 0, key '{key}' has \d+ elements but no data")


@case
def load_uint8_exp_avg_sq_is_cast_like_torch(b):
    ps, opt = stepped_adam(b)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq"] = torch.randint(0, 4, (BIG,), dtype=torch.uint8)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    ref_opt.load_state_dict(copy.deepcopy(sd))
    opt.load_state_dict(sd)
    assert opt.state[ps[0]]["exp_avg_sq"].dtype == F32
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    opt.step()
    ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ edited state


def _set(key, value_fn, index=0):
    def edit(opt, ps):
        opt.state[ps[index]][key] = value_fn(ps[index])
    return edit


@case
def state_small_exp_avg(b):
    step_refused(b, stepped_adam, _set("exp_avg", lambda p: torch.zeros(3, device=p.device)),
                  ValueError, r"state\[param 0 of param group 0\]\['exp_avg'\] has shape \(3,\)",
                  fix=_set("exp_avg", lambda p: torch.zeros_like(p)))


@case
def state_uint8_exp_avg_sq(b):
    step_refused(b, stepped_adam, _set("exp_avg_sq", lambda p: torch.zeros_like(p, dtype=torch.uint8)),
                  TypeError, r"\['exp_avg_sq'\] has dtype torch.uint8, expected torch.float32")


@case
def state_wrong_size_momentum_buffer(b):
    step_refused(b, stepped_sgd, _set("momentum_buffer", lambda p: torch.zeros(2, device=p.device), 1),
                  ValueError, r"\['momentum_buffer'\] has shape \(2,\)")


@case
def state_wrong_size_master(b):
    def make(b):
        return stepped_adam(b, BF16, master_weights=True)
    step_refused(b, make, _set("master_param", lambda p: torch.zeros(4, device=p.device)),
                  ValueError, r"\['master_param'\] has shape \(4,\)")


@case
def state_transposed_or_meta_or_subclass(b):
    for value_fn, exc, pattern in [
            (lambda p: torch.zeros(7, 5, device=p.device).t(), ValueError, "strides"),
            (lambda p: torch.zeros(5, 7, device="meta"), ValueError, "on meta"),
            (lambda p: Sub(torch.zeros_like(p)), TypeError, "is a Sub"),
            (lambda p: 0.0, TypeError, "must be a tensor")]:
        step_refused(b, stepped_adam, _set("exp_avg", value_fn, 1), exc, pattern)


@case
def state_resized_or_data_swapped_in_place(b):
    def resize(opt, ps):
        opt.state[ps[0]]["exp_avg"].resize_(3)

    def swap(opt, ps):
        opt.state[ps[0]]["exp_avg_sq"].data = torch.zeros(3, device=ps[0].device)

    def step_swap(opt, ps):
        opt.state[ps[1]]["step"].data = torch.zeros(4, device=ps[1].device)

    step_refused(b, stepped_adam, resize, ValueError, r"\['exp_avg'\] has shape \(3,\)")
    step_refused(b, stepped_adam, swap, ValueError, r"\['exp_avg_sq'\] has shape \(3,\)")
    step_refused(b, stepped_adam, step_swap, ValueError, r"\['step'\] must hold one number")


@case
def hyper_parameter_beyond_fp32_edited_in_a_group(b):
    """Found by the fuzz suite: a finite value that is inf in fp32 made the torch backend's
    ops raise a RuntimeError (the compiled kernels would run with inf)."""
    def edit(key):
        def apply(opt, ps):
            opt.param_groups[0][key] = 1e300
        return apply

    def fix(key, value):
        def apply(opt, ps):
            opt.param_groups[0][key] = value
        return apply

    for make, key in ((stepped_adam, "lr"), (stepped_adam, "eps"), (stepped_adam, "weight_decay"),
                      (stepped_sgd, "momentum"), (stepped_sgd, "dampening")):
        value = make(b)[1].param_groups[0][key]
        step_refused(b, make, edit(key), ValueError, rf"invalid {key}: 1e\+300 \(a finite value",
                     fix=fix(key, value))


def _freed_like(t):
    """A tensor of ``t``'s shape and dtype viewing a storage that was then freed (as the
    fuzz suite's edits make them: the view's address is not null)."""
    big = torch.zeros(t.numel() + 4, dtype=t.dtype, device=t.device)
    view = big[4:].view(t.shape)
    big.untyped_storage().resize_(0)
    return view


@case
def step_counter_in_a_freed_storage_while_its_entry_is_hidden(b):
    """Found by the fuzz suite: ``param in optimizer.state`` read the step counter of an
    entry created at the last step (to learn whether that step completed), here one the
    user replaced with a view of a freed storage (SIGSEGV).  Such a counter is not the
    optimizer's: the entry shows, and the next step refuses it."""
    ps, opt = stepped_adam(b)
    assert ps[0] in opt._fo_hidden  # nothing asked yet whether the last step completed
    entry = opt._fo_state[ps[0]]
    good = entry["step"]
    before = snapshot(opt, ps)
    entry["step"] = _freed_like(good)
    assert ps[0] in opt.state and len(opt.state) == len(ps)
    raises(opt.step, ValueError, r"\['step'\] reaches past the end of its storage")
    entry["step"] = good
    assert_bit_identical(before, snapshot(opt, ps))


@case
def lean_moment_to_convert_in_a_freed_storage(b):
    """A moment the next step converts to its group's new state_dtype (bf16 -> 8-bit), and
    a moment ``dequantize_state_dict`` decodes, are checked before anything reads them."""
    ps, opt = stepped_adam(b, state_dtype=torch.bfloat16)
    entry = opt._fo_state[ps[1]]
    good = entry["exp_avg"]
    before = snapshot(opt, ps)
    opt.param_groups[0]["state_dtype"] = torch.int8
    entry["exp_avg"] = _freed_like(good)
    raises(opt.step, ValueError, r"\['exp_avg'\] reaches past the end of its storage")
    entry["exp_avg"] = good
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    assert_bit_identical(before, snapshot(opt, ps))
    sd = opt.state_dict()
    sd["state"][1] = dict(sd["state"][1], exp_avg=_freed_like(good))
    raises(lambda: fo.optim.dequantize_state_dict(sd), ValueError,
            r"state\[1\]\['exp_avg'\] reaches past the end of its storage")


@case
def values_read_on_the_host_in_a_freed_storage(b):
    """Found by the fuzz suite: values the step reads or converts before the kernel
    boundary sees them -- a tensor lr or beta (checked and moved to the params' device), a
    step counter of another dtype (converted to fp32), GradScaler's grad_scale, a group
    flag or number whose truth or value was tested, an error message's repr of it -- as
    views of a freed storage were read (SIGSEGV).  Each is refused, nothing changed."""
    ps, opt = stepped_adam(b)
    group = opt.param_groups[0]
    for key, value in (("lr", torch.tensor(1e-2, dtype=torch.float64)),
                       ("betas", torch.tensor(0.9))):
        good = group[key]
        group[key] = (_freed_like(value), good[1]) if key == "betas" else _freed_like(value)
        raises(opt.step, ValueError, r"(lr|betas\[0\]) reaches past the end of its storage")
        group[key] = good
    try:
        fo.optim.FusedAdamW(ps, lr=_freed_like(torch.tensor(1e-2)), backend=b)
    except ValueError as e:
        assert "lr reaches past the end of its storage" in str(e), e
    else:
        raise AssertionError("a freed lr tensor was taken")
    before = snapshot(opt, ps)
    entry = opt._fo_state[ps[2]]
    good = entry["step"]
    entry["step"] = _freed_like(good.double())
    raises(opt.step, ValueError, r"\['step'\] reaches past the end of its storage")
    entry["step"] = good
    opt.grad_scale = _freed_like(torch.tensor(1.0, device=ps[0].device))
    raises(opt.step, ValueError, r"optimizer.grad_scale reaches past the end of its storage")
    del opt.grad_scale
    for key in ("amsgrad", "maximize", "decoupled_weight_decay", "eps"):  # never truth-tested
        good = group[key]
        group[key] = _freed_like(torch.tensor(1.0))
        raises(opt.step, TypeError, rf"{key} must be a (bool|number), got a Tensor of shape")
        group[key] = good
    assert_bit_identical(before, snapshot(opt, ps))
    opt.step()
    ps, opt = stepped_sgd(b)
    before = snapshot(opt, ps)
    for key in ("momentum", "nesterov", "dampening"):
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = _freed_like(torch.tensor(0.5))
        raises(opt.step, TypeError, rf"{key} must be a (bool|number), got a Tensor of shape")
        opt.param_groups[0][key] = good
    assert_bit_identical(before, snapshot(opt, ps))


@case
def loss_scaler_values_in_a_freed_storage(b):
    """A loss to scale and a LossScaler state dict value that view a freed storage are
    refused before anything reads them (``loss * scale`` on such a view crashes torch)."""
    dev = device_of(b)
    scaler = fo.amp.LossScaler(init_scale=4.0)
    raises(lambda: scaler.scale(_freed_like(torch.ones((), device=dev))), ValueError,
            "the tensor to scale reaches past the end of its storage")
    loss = scaler.scale(torch.ones((), device=dev))
    assert float(loss) == 4.0
    sd = scaler.state_dict()
    raises(lambda: scaler.load_state_dict(dict(sd, scale=_freed_like(torch.ones(())))),
            ValueError, "LossScaler state 'scale' reaches past the end of its storage")
    assert scaler.state_dict() == sd
