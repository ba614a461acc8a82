"""The optimizer layer: buckets per (group, device, dtype), norm pass only when needed,
the per-bucket cache dict kept across steps and replaced when the bucket changes."""

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


def test_cache_is_kept_until_the_bucket_changes(calls):
    ps = make_params()
    opt = fo.optim.FusedAdamW(ps, max_grad_norm=1.0, backend="torch")
    grads = make_grads(steps=5)

    def step_caches(g):
        calls.clear()
        set_grads(ps, g)
        opt.step()
        return {n: c for n, _, c in calls}

    first = step_caches(grads[0])
    second = step_caches(grads[1])  # same tensors: the same cache dicts
    assert all(second[n] is first[n] for n in first)
    g = list(grads[2])
    g[0] = None
    changed = step_caches(g)  # a param without grad: a different bucket
    assert changed["adam_step"] is not first["adam_step"]
    assert changed["multi_tensor_norm"] is not first["multi_tensor_norm"]
    again = step_caches(grads[3])
    opt.load_state_dict(opt.state_dict())  # new state tensors: new cache
    assert step_caches(grads[4])["adam_step"] is not again["adam_step"]
