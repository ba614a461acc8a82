"""The optimizer layer: buckets per (group, device, dtype), norm pass only when needed,
the per-bucket cache dict kept across steps, its boundary record following the tensors."""

import pytest
import torch

import fusedopt as fo
from fusedopt.backends import torch_ref
from optim_helpers import make_grads, make_params, set_grads


@pytest.fixture
def calls(monkeypatch):
    """Record the torch backend's entry point calls: (name, number of tensors, cache dict)."""
    log = []
    for name in ("adam_step", "sgd_step", "multi_tensor_norm"):
        real = getattr(torch_ref, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            cache = kwargs["cache"] if "cache" in kwargs else args[-1]
            log.append((_name, len(args[0]), cache))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch_ref, name, wrapper)
    return log


def _mixed(ps):
    ps[1] = ps[1].detach().bfloat16().requires_grad_()
    return ps


def test_one_update_per_group_and_dtype_no_norm_unless_needed(calls):
    ps = _mixed(make_params())
    opt = fo.optim.FusedAdamW([{"params": ps[:2]}, {"params": ps[2:]}], backend="torch")
    set_grads(ps, make_grads(steps=1)[0])
    opt.step()
    assert sorted((n, k) for n, k, _ in calls) == [("adam_step", 1), ("adam_step", 1), ("adam_step", 2)]
    assert opt.last_grad_norm is None


@pytest.mark.parametrize("option", ["max_grad_norm", "track_grad_norm", "skip_nonfinite", "loss_scaler"])
def test_one_norm_per_dtype_over_all_groups(calls, option):
    ps = _mixed(make_params())
    kwargs = {"max_grad_norm": {"max_grad_norm": 1.0}, "track_grad_norm": {"track_grad_norm": True},
              "skip_nonfinite": {"skip_nonfinite": True}, "loss_scaler": {}}[option]
    opt = fo.optim.FusedSGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1, backend="torch", **kwargs)
    set_grads(ps, make_grads(steps=1)[0])
    if option == "loss_scaler":
        scaler = fo.amp.LossScaler()
        scaler.scale(torch.tensor(1.0))
        scaler.step(opt)
    else:
        opt.step()
    norms = sorted(k for n, k, _ in calls if n == "multi_tensor_norm")
    assert norms == [1, 3]  # bf16: one tensor; fp32: three tensors from two groups
    assert sum(n == "sgd_step" for n, _, _ in calls) == 3


def test_cache_is_kept_and_its_boundary_record_follows_the_tensors(calls):
    """One cache dict per (group, device, dtype) across steps; the kernel boundary's record in
    it (what the backends key their tables by) is replaced exactly when a tensor changed."""
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, max_grad_norm=1.0, backend="torch")
    grads = make_grads(steps=6)

    def step_caches(g):
        calls.clear()
        set_grads(ps, g)
        opt.step()
        return {n: c for n, _, c in calls}

    first = step_caches(grads[0])
    record = first["adam_step"]["boundary"]
    second = step_caches(grads[1])  # same tensors, new gradients: same dicts, same record
    assert all(second[n] is first[n] for n in first)
    assert second["adam_step"]["boundary"] is record
    g = list(grads[2])
    g[0] = None
    changed = step_caches(g)  # a param without grad: other lists, a new record
    assert changed["adam_step"] is first["adam_step"]
    assert changed["adam_step"]["boundary"] is not record
    record = step_caches(grads[3])["adam_step"]["boundary"]
    opt.state[ps[1]]["exp_avg"] = opt.state[ps[1]]["exp_avg"].clone()  # a replaced state
    assert step_caches(grads[4])["adam_step"]["boundary"] is not record
    before = step_caches(grads[4])["adam_step"]
    opt.load_state_dict(opt.state_dict())  # new state tensors: new plans and caches
    assert step_caches(grads[5])["adam_step"] is not before
