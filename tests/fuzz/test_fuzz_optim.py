"""Property-based tests of the optimizers on every backend that runs here:
- a fused optimizer with random hyper-parameters, param groups, dtypes and layouts,
  clipping, a loss scaler (LossScaler / GradScaler), skip_nonfinite and master weights
  steps like torch.optim (fp32 params; bf16/fp16 ones: torch's fp32 run with master
  weights, else the written-out fp32-math reference of tests/lowp_reference.py), and a
  skipped step leaves params and state bit-identical;
- an edit of the state, the checkpoint, a gradient, a hyper-parameter or a param's storage
  before a step (or a load) either works or is refused with TypeError/ValueError, params
  and state bit-identical -- never another exception, never a crash.
Every fusedopt call runs in the worker process (worker.py)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies_optim as strat
from conftest import require_op
from fusedopt import backends
from fuzz_setup import examples, worker  # noqa: F401  (worker: the fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowp_reference  # noqa: E402

F32 = torch.float32
# Triton runs under the interpreter here, ~20x slower per step: its properties get their
# own tests with fewer examples, so the suite stays well under a minute on 2 cores
COMPILED_OR_TORCH = [name for name in backends.NAMES if name != "triton"]
EPS32 = torch.finfo(F32).eps


def _clip(grads, max_norm):
    """clip_grad_norm_'s coefficient applied to fp32 copies (the norm in float64)."""
    if max_norm is None:
        return grads
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else 0.0
    coef = max_norm / (float(total) + 1e-6)
    coef = coef if math.isnan(coef) else min(1.0, coef)  # torch.clamp keeps a NaN coefficient
    return [g * coef for g in grads]


def _groups(spec, params):
    groups = {}
    for p, ps in zip(params, spec["params"]):
        groups.setdefault(ps["group"], []).append(p)
    return [dict({"params": groups[gi]}, **spec["group_overrides"].get(gi, {}))
            for gi in sorted(groups)]


def _torch_reference(spec, initial, grads_per_step, skipped):
    """torch.optim on fp32 copies, the gradients unscaled, clipped and fp32; skipped steps
    left out."""
    params = [torch.nn.Parameter(p.float().clone()) for p in initial]
    hyper = {k: v for k, v in spec["hyper"].items()
             if k not in ("max_grad_norm", "skip_nonfinite", "master_weights")}
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "sgd": torch.optim.SGD}[spec["optimizer"]]
    opt = cls(_groups(spec, params), foreach=False, **hyper)
    for grads, skip in zip(grads_per_step, skipped):
        if skip:
            continue
        for p, g in zip(params, _clip([g.float() for g in grads], spec["hyper"].get(
                "max_grad_norm"))):
            p.grad = g.float()
        opt.step()
    return [p.detach() for p in params]


def _lowp_reference(spec, initial, grads_per_step, skipped):
    """bf16/fp16 params without master weights: fp32 math, one rounding per step."""
    kept = [_clip([g.float() for g in grads], spec["hyper"].get("max_grad_norm"))
            for grads, skip in zip(grads_per_step, skipped) if not skip]
    out = []
    for group in _groups(spec, list(range(len(initial)))):
        idx = group["params"]
        h = dict(spec["hyper"], **{k: v for k, v in group.items() if k != "params"})
        ps = [initial[i] for i in idx]
        gs = [[step[i] for i in idx] for step in kept]
        if spec["optimizer"] == "sgd":
            res = lowp_reference.sgd(ps, gs, lr=h["lr"], momentum=h["momentum"],
                                     dampening=h["dampening"], weight_decay=h["weight_decay"],
                                     nesterov=h["nesterov"], maximize=h["maximize"])
        else:
            res = lowp_reference.adam(ps, gs, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                      weight_decay=h["weight_decay"], amsgrad=h["amsgrad"],
                                      decoupled=spec["optimizer"] == "adamw",
                                      maximize=h["maximize"])
        out.extend(zip(idx, res))
    return [p for _, p in sorted(out, key=lambda t: t[0])]


def _assert_close_params(got, want, initial, spec, what):
    steps = spec["steps"]
    for i, (g, w, p0) in enumerate(zip(got, want, initial)):
        g, w, p0 = g.double(), w.double(), p0.double()
        nan = torch.isnan(w)
        assert torch.equal(torch.isnan(g), nan), f"{what} param {i}: NaN positions differ"
        ok = ~nan & torch.isfinite(w)
        assert torch.equal(g[~ok & ~nan], w[~ok & ~nan]), f"{what} param {i}: inf differ"
        moved = (w - p0).abs().nan_to_num(0, 0, 0)
        lowp = torch.finfo(got[i].dtype).eps if got[i].dtype != F32 else 0.0
        bound = (steps * 2e-5 + lowp) * (w.abs() + (moved.max() if moved.numel() else 0.0)) \
            + steps * 1e-30
        err = (g - w).abs()
        bad = ok & (err > bound)
        assert not bad.any(), (f"{what} param {i}: {int(bad.sum())} values off, got "
                               f"{g[bad][:4].tolist()} want {w[bad][:4].tolist()} "
                               f"allowed {bound[bad][:4].tolist()}")


def _steps_like_torch(worker, backend, data):
    require_op(backend, "adam")
    spec = data.draw(strat.optim_spec(backend))
    out = worker.call("optim_run", spec)
    assert out[0] == "ok", f"{out[1]}: {out[2]}"
    res = out[1]
    assert all(res["identical"]), (
        f"a skipped step changed params or state (steps {res['identical']})")
    dtype = res["initial"][0].dtype
    masters = spec["hyper"].get("master_weights", False)
    if dtype == F32 or masters:
        want = _torch_reference(spec, res["initial"], res["grads"], res["skipped"])
        want = [w.to(dtype) for w in want]
    else:
        want = _lowp_reference(spec, res["initial"], res["grads"], res["skipped"])
    _assert_close_params(res["after"][-1], want, res["initial"], spec, "final")


def _edit_is_refused_cleanly(worker, backend, data):
    require_op(backend, "adam")
    spec = data.draw(strat.edit_spec(backend))
    out = worker.call("optim_edit", spec)
    assert out[0] == "ok", f"{spec['edit']}: {out[1]}: {out[2]}"
    res = out[1]
    if res["outcome"] == "raised":
        assert res["identical"], (f"{spec['edit']}: refused ({res['type']}: {res['message']}) "
                                  f"but params or state changed")


@pytest.mark.parametrize("backend", COMPILED_OR_TORCH)
@given(data=st.data())
@settings(max_examples=examples(25))
def test_optimizer_steps_like_torch(worker, backend, data):
    _steps_like_torch(worker, backend, data)


@given(data=st.data())
@settings(max_examples=examples(8))
def test_optimizer_steps_like_torch_triton(worker, data):
    _steps_like_torch(worker, "triton", data)


@pytest.mark.parametrize("backend", COMPILED_OR_TORCH)
@given(data=st.data())
@settings(max_examples=examples(40))
def test_edited_state_checkpoint_or_grad_is_refused_cleanly(worker, backend, data):
    _edit_is_refused_cleanly(worker, backend, data)


@given(data=st.data())
@settings(max_examples=examples(12))
def test_edited_state_checkpoint_or_grad_is_refused_cleanly_triton(worker, data):
    _edit_is_refused_cleanly(worker, "triton", data)
