"""FusedAdam / FusedAdamW: multi-tensor Adam with in-kernel unscale, clipping and skip.

One step equals ``torch.optim.Adam`` (L2 weight decay added to the gradient) or
``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``) to fp32 rounding; the math is in
the backends' ``adam_step`` (docs/architecture.md).  With memory-lean states
(``state_dtype`` bf16 / int8, or ``param_rounding="stochastic"`` for bf16/fp16 params
without masters) a bucket runs the backends' ``lean_adam_step`` instead (fusedopt/optim/
_lean.py, docs/lean_states.md).
"""

from __future__ import annotations

from functools import partial

import torch

from fusedopt import backends
from fusedopt.backends import _lean_tables
from fusedopt.optim import _checks, _lean
from fusedopt.optim._base import FusedOptimizer, _hyper
from fusedopt.optim._plan import STATE_KEY, entry_of, step_state, vector_state

_F32 = torch.float32


class FusedAdam(FusedOptimizer):
    """Adam with L2 weight decay (``torch.optim.Adam``), fused; see docs/optimizers.md."""

    _OP = "adam"
    _DECOUPLED = False
    _STATE_KEYS = ("max_exp_avg_sq", "master_param")  # the moments: see _fo_load_moments
    _STEP_KEY = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None,
                 state_dtype=torch.float32, param_rounding="nearest", seed=None):
        _checks.flag("capturable", capturable)
        self.capturable = capturable  # accepted for torch parity: step() never syncs anyway
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        state_dtype=state_dtype, param_rounding=param_rounding,
                        seed=_lean.new_seed() if seed is None else seed)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend)

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])
        _lean.check_options(group)

    def _fo_visible(self, p, entry):
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            return step.numel() == 1 and bool(step.reshape(()) > 0)
        return step is not None

    def _layout(self, group):
        return (bool(group["amsgrad"]), self.master_weights, group["state_dtype"],
                group["param_rounding"])

    def _state_lists(self, b, pending):
        zeros = partial(torch.zeros_like, dtype=_F32)
        masters = self.master_weights and b.dtype != _F32
        _lean.check_options(b.group)
        if _lean.is_lean(b.group, b.dtype, masters):
            return self._lean_state_lists(b, pending, masters)
        converted = self._lean_to_fp32(b, pending)
        b.lists = {
            "exp_avgs": converted.get("exp_avg") or vector_state(self, b, "exp_avg", pending, zeros),
            "exp_avg_sqs": (converted.get("exp_avg_sq")
                            or vector_state(self, b, "exp_avg_sq", pending, zeros)),
            "max_exp_avg_sqs": (vector_state(self, b, "max_exp_avg_sq", pending, zeros)
                                if b.group["amsgrad"] else None),
            "master_params": (vector_state(self, b, "master_param", pending, _master_copy)
                              if masters else None),
            "steps": step_state(self, b, pending),
        }
        b.state_lists = tuple((STATE_KEY[name], lst) for name, lst in b.lists.items()
                              if lst is not None)

    def _boundary_lists(self, b):
        lists = b.lists
        if "streams" in lists:
            state = _lean_tables.state_code(lists["exp_avgs"])
            return (_lean_tables.boundary_lists(
                lists["exp_avgs"], lists["exp_avg_sqs"], lists["exp_avg_absmaxes"],
                lists["exp_avg_sq_absmaxes"], lists["master_params"], state),
                (("steps", lists["steps"]),))
        return ((("exp_avgs", lists["exp_avgs"]), ("exp_avg_sqs", lists["exp_avg_sqs"]),
                 ("max_exp_avg_sqs", lists["max_exp_avg_sqs"]),
                 ("master_params", lists["master_params"])), (("steps", lists["steps"]),))

    def _hyper_args(self, b):
        group, device = b.group, b.device
        beta1, beta2 = group["betas"]
        hyper = dict(lr=_hyper(group["lr"], device, "lr"), beta1=_hyper(beta1, device, "betas[0]"),
                     beta2=_hyper(beta2, device, "betas[1]"), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
                     decoupled=self._DECOUPLED)
        if "streams" in b.lists:
            _lean.check_options(group)  # the values may have been changed since construction
            hyper.update(stochastic_rounding=group["param_rounding"] == "stochastic",
                         seed=group["seed"])
        else:
            hyper["amsgrad"] = bool(group["amsgrad"])
        return hyper

    def _run_bucket(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        if "streams" in lists:
            b.backend.lean_adam_step(
                b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
                lists["exp_avg_absmaxes"], lists["exp_avg_sq_absmaxes"], lists["master_params"],
                lists["steps"], lists["streams"], **hyper, inv_scale=inv_scale,
                clip_coef=clip_coef, skip=skip, cache=b.cache)
            return
        b.backend.adam_step(
            b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"], lists["master_params"], lists["steps"], **hyper,
            inv_scale=inv_scale, clip_coef=clip_coef, skip=skip, cache=b.cache)


    # ------------------------------------------------------------ memory-lean states

    def _lean_state_lists(self, b, pending, masters):
        """The lists of a lean bucket: moments in the group's state_dtype (existing ones in
        another format converted, missing ones zero; written at commit), masters, steps,
        stream ids."""
        state_dtype = b.group["state_dtype"]
        moments = {key: [] for key in _lean.MOMENT_KEYS + _lean.ABSMAX_KEYS}
        for i, p in enumerate(b.params):
            entry = entry_of(self, b, i)
            new = _lean.converted(entry, p, state_dtype,
                                  lambda k, i=i: f"optimizer.state[{b.where(i)}][{k!r}]")
            for key in _lean.MOMENT_KEYS:
                if entry.get(key) is None:
                    new.update(_lean.zeros(p, key, state_dtype))
            for key, value in new.items():
                pending.writes.append((p, key, value))
            if new and state_dtype != torch.int8 and any(k in entry for k in _lean.ABSMAX_KEYS):
                pending.extras.append(partial(_drop_absmax, self, p))
            for key in moments:
                moments[key].append(new[key] if key in new else entry.get(key))
        quantized = state_dtype == torch.int8
        offset = sum(len(g["params"]) for g in self.param_groups[:b.gi])
        b.lists = {
            "exp_avgs": moments["exp_avg"], "exp_avg_sqs": moments["exp_avg_sq"],
            "exp_avg_absmaxes": moments["exp_avg_absmax"] if quantized else None,
            "exp_avg_sq_absmaxes": moments["exp_avg_sq_absmax"] if quantized else None,
            "master_params": (vector_state(self, b, "master_param", pending, _master_copy)
                              if masters else None),
            "steps": step_state(self, b, pending),
            "streams": [offset + j for j in b.positions],
        }
        keys = (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq"),
                ("exp_avg_absmaxes", "exp_avg_absmax"),
                ("exp_avg_sq_absmaxes", "exp_avg_sq_absmax"), ("master_params", "master_param"),
                ("steps", "step"))
        b.state_lists = tuple((key, b.lists[name]) for name, key in keys
                              if b.lists[name] is not None)
        b.backend = self._lean_backend_for(b.device)

    def _lean_to_fp32(self, b, pending) -> dict:
        """Lean moments (bf16 / 8-bit) of a bucket that now runs with fp32 states, converted
        (written at commit): {key: list over the bucket} when any was, else {}."""
        def lean(entry):
            return any(k in entry for k in _lean.ABSMAX_KEYS) or any(
                isinstance(entry.get(k), torch.Tensor) and entry[k].dtype == torch.bfloat16
                for k in _lean.MOMENT_KEYS)

        entries = [entry_of(self, b, i) for i in range(len(b.params))]
        if not any(map(lean, entries)):
            return {}
        lists = {key: [] for key in _lean.MOMENT_KEYS}
        for i, (p, entry) in enumerate(zip(b.params, entries)):
            new = _lean.converted(entry, p, _F32,
                                  lambda k, i=i: f"optimizer.state[{b.where(i)}][{k!r}]")
            for key in _lean.MOMENT_KEYS:
                if key not in new:
                    value = _checks.state_tensor(entry.get(key), key, p, b.where(i))
                    new[key] = torch.zeros_like(p, dtype=_F32) if value is None else value
                    if value is not None:
                        continue
                pending.writes.append((p, key, new[key]))
            for key in _lean.MOMENT_KEYS:
                lists[key].append(new[key])
            if any(k in entry for k in _lean.ABSMAX_KEYS):
                pending.extras.append(partial(_drop_absmax, self, p))
        return lists

    def _lean_backend_for(self, device):
        mod = self._fo_backends.get((device, "lean_adam"))
        if mod is None:
            mod = backends.select("lean_adam", device, self.backend)
            self._fo_backends[(device, "lean_adam")] = mod
        return mod

    def _fo_load_moments(self, p, index, entry, group) -> dict:
        """The moments of a loaded entry in the group's state_dtype (lean_states.md): copies
        of those already in it, conversions of the others; absent ones stay absent."""
        state_dtype = group["state_dtype"]
        out = _lean.converted(entry, p, state_dtype,
                              lambda k: f"the loaded state of param {index}, key {k!r},")
        for key in _lean.MOMENT_KEYS:
            if key in out or entry.get(key) is None:
                continue
            out[key] = entry[key].to(device=p.device, copy=True)
            absmax = _lean.ABSMAX_OF[key]
            if state_dtype == torch.int8:
                out[absmax] = entry[absmax].to(device=p.device, copy=True)
        for key in _lean.ABSMAX_KEYS:  # dropped unless they belong to 8-bit moments
            out.setdefault(key, None)
        return out


class FusedAdamW(FusedAdam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), fused; see docs/optimizers.md."""

    _DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 amsgrad=False, maximize=False, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, capturable=False, backend=None,
                 state_dtype=torch.float32, param_rounding="nearest", seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad=amsgrad, maximize=maximize,
                         max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         capturable=capturable, backend=backend, state_dtype=state_dtype,
                         param_rounding=param_rounding, seed=seed)


def _drop_absmax(opt, p):
    entry = opt._fo_state.get(p)
    for key in _lean.ABSMAX_KEYS:
        entry.pop(key, None)


def _master_copy(p):
    """The fp32 master of a low-precision param, made from it (its layout kept)."""
    return p.detach().to(_F32, copy=True)
