"""FusedAdam / FusedAdamW: multi-tensor Adam with in-kernel unscale, clipping and skip.

One step equals ``torch.optim.Adam`` (L2 weight decay added to the gradient) or
``torch.optim.AdamW`` (decoupled decay ``p *= 1 - lr·wd``, the group's
``decoupled_weight_decay``) to fp32 rounding; the math is in the backends' ``adam_step``
(docs/architecture.md).  With memory-lean states (``state_dtype`` bf16 / int8, or
``param_rounding="stochastic"`` for bf16/fp16 params without masters) a bucket runs the
backends' ``lean_adam_step`` instead (fusedopt/optim/_lean.py, docs/lean_states.md).
"""

from __future__ import annotations

from functools import partial

import torch

from fusedopt import backends
from fusedopt.backends import _lean_tables
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim import _checks, _distributed, _lean, _loading, _traced
from fusedopt.optim._base import FusedOptimizer
from fusedopt.optim._checks import group_flag as _flag
from fusedopt.optim._checks import group_number as _number
from fusedopt.optim._scalars import hyper
from fusedopt.optim._plan import (LOW_PRECISION, STATE_KEY, entry_of, master_copy, state_zeros,
                                  step_state, vector_state)

_F32 = torch.float32


class FusedAdam(FusedOptimizer):
    """Adam with L2 weight decay (``torch.optim.Adam``), fused; see docs/optimizers.md."""

    _OP = "adam"
    # exp_avg / exp_avg_sq in a lean format are loaded by _fo_load_moments first
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
    _STEP_KEY = True
    # what torch's Adam sets in a loaded group that lacks the key (its __setstate__)
    _LOAD_DEFAULTS = {"decoupled_weight_decay": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, track_grad_norm=False, skip_nonfinite=False,
                 master_weights=False, backend=None, process_group=None,
                 state_dtype=torch.float32, param_rounding="nearest", seed=None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay,
                        state_dtype=state_dtype, param_rounding=param_rounding,
                        seed=_lean.new_seed() if seed is None else seed)
        self._check_hyper_params(defaults)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend,
                         process_group=process_group)
        for gi, group in enumerate(self.param_groups):
            self._lean_refusals(gi, group)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if "skipped_steps" not in self.__dict__:
            return  # during construction, which checks every group at its end
        try:
            self._lean_refusals(len(self.param_groups) - 1, self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            self._fo_resolve_norm_group()
            raise

    def _check_hyper_params(self, group):
        _checks.lr(group["lr"])
        _checks.betas(group["betas"])
        _checks.non_negative("eps", group["eps"])
        _checks.non_negative("weight_decay", group["weight_decay"])
        _checks.flag("amsgrad", group["amsgrad"])
        _checks.flag("maximize", group["maximize"])
        _checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        _checks.torch_keywords(group, type(self).__name__)
        _lean.check_options(group)

    def _fo_visible(self, p, entry):
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            if not _readable(step):  # not a counter the optimizer made: the user's, shown
                return True
            return step.numel() == 1 and bool(step.reshape(()) > 0)
        return step is not None

    def _layout(self, group):
        return (_flag(group, "amsgrad"), self.master_weights, group["state_dtype"],
                group["param_rounding"])

    def _state_lists(self, b, pending):
        masters = self.master_weights and b.dtype in LOW_PRECISION
        _lean.check_options(b.group)
        self._lean_refusals(b.gi, b.group)
        if _lean.is_lean(b.group, b.dtype, masters):
            return self._lean_state_lists(b, pending, masters)
        converted = self._lean_to_fp32(b, pending)
        b.lists = {
            "exp_avgs": (converted.get("exp_avg")
                         or vector_state(self, b, "exp_avg", pending, state_zeros)),
            "exp_avg_sqs": (converted.get("exp_avg_sq")
                            or vector_state(self, b, "exp_avg_sq", pending, state_zeros)),
            "max_exp_avg_sqs": (vector_state(self, b, "max_exp_avg_sq", pending, state_zeros)
                                if _flag(b.group, "amsgrad") else None),
            "master_params": (vector_state(self, b, "master_param", pending, master_copy)
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
        args = dict(lr=hyper(group["lr"], device, "lr"), beta1=hyper(beta1, device, "betas[0]"),
                    beta2=hyper(beta2, device, "betas[1]"), eps=_number(group, "eps"),
                    weight_decay=_number(group, "weight_decay"),
                    maximize=_flag(group, "maximize"),
                    decoupled=_flag(group, "decoupled_weight_decay"))
        if "streams" in b.lists:
            _lean.check_options(group)  # the values may have been changed since construction
            args.update(stochastic_rounding=group["param_rounding"] == "stochastic",
                        seed=group["seed"])
        else:
            args["amsgrad"] = _flag(group, "amsgrad")
        return args

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

    def _traced_lists(self, b):
        masters = self.master_weights and b.dtype in LOW_PRECISION
        if _lean.is_lean(b.group, b.dtype, masters):
            return self._traced_lean_lists(b, masters)
        amsgrad = _flag(b.group, "amsgrad")
        lists = b.lists = {"exp_avgs": [], "exp_avg_sqs": [], "max_exp_avg_sqs": [],
                           "master_params": [], "steps": []}
        for p, where in zip(b.params, b.wheres):
            state = _traced.entry(self, p, where)
            if _lean.holds_lean(state):
                raise RuntimeError(_LEAN_TRACED.format(gi=b.gi))
            lists["exp_avgs"].append(_traced.vector(state, "exp_avg", p, where, state_zeros))
            lists["exp_avg_sqs"].append(
                _traced.vector(state, "exp_avg_sq", p, where, state_zeros))
            if amsgrad:
                lists["max_exp_avg_sqs"].append(
                    _traced.vector(state, "max_exp_avg_sq", p, where, state_zeros))
            if masters:
                lists["master_params"].append(
                    _traced.vector(state, "master_param", p, where, master_copy))
            lists["steps"].append(_traced.step_count(state, p, where))
        if not amsgrad:
            lists["max_exp_avg_sqs"] = None
        if not masters:
            lists["master_params"] = None

    def _traced_lean_lists(self, b, masters):
        """The lists of a lean bucket in a traced step: moments in the group's format read
        from ``optimizer.state`` (missing ones created as zeros), masters, steps, streams.
        Moments that the eager step would convert first (another format, a stale absmax)
        are refused: conversion is not traced."""
        group = b.group
        _lean.check_options(group)
        state_dtype = group["state_dtype"]
        quantized = state_dtype == torch.int8
        names = ("exp_avgs", "exp_avg_sqs", "exp_avg_absmaxes", "exp_avg_sq_absmaxes",
                 "master_params", "steps")
        lists = b.lists = {name: [] for name in names}
        for p, where in zip(b.params, b.wheres):
            state = _traced.entry(self, p, where)
            for key, name, absmax_name in (("exp_avg", "exp_avgs", "exp_avg_absmaxes"),
                                           ("exp_avg_sq", "exp_avg_sqs",
                                            "exp_avg_sq_absmaxes")):
                moment, absmax = _lean.traced_moment(state, key, p, where, state_dtype,
                                                     _traced.mark_static)
                lists[name].append(moment)
                lists[absmax_name].append(absmax)
            if masters:
                lists["master_params"].append(
                    _traced.vector(state, "master_param", p, where, master_copy))
            lists["steps"].append(_traced.step_count(state, p, where))
        if not quantized:
            lists["exp_avg_absmaxes"] = lists["exp_avg_sq_absmaxes"] = None
        if not masters:
            lists["master_params"] = None
        lists["streams"] = self._lean_streams(b.gi, b.positions, b.params)
        b.backend = self._lean_backend_for(b.device).NAME

    def _traced_hyper(self, b):
        group = b.group
        beta1, beta2 = group["betas"]
        common = (*_traced.scalar(group["lr"], "lr"), *_traced.scalar(beta1, "betas[0]"),
                  *_traced.scalar(beta2, "betas[1]"), _number(group, "eps"),
                  _number(group, "weight_decay"))
        if "streams" in b.lists:
            return (*common, _flag(group, "maximize"), _flag(group, "decoupled_weight_decay"),
                    group["param_rounding"] == "stochastic", group["seed"])
        return (*common, _flag(group, "amsgrad"), _flag(group, "maximize"),
                _flag(group, "decoupled_weight_decay"))

    def _traced_run(self, b, hyper, inv_scale, clip_coef, skip):
        lists = b.lists
        if "streams" in lists:
            torch.ops.fusedopt.lean_adam_step(
                b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
                lists["exp_avg_absmaxes"] or [], lists["exp_avg_sq_absmaxes"] or [],
                lists["master_params"] or [], lists["steps"], lists["streams"], *hyper,
                inv_scale, clip_coef, skip, b.backend, self._fo_store_id, b.gi, b.token)
            return
        torch.ops.fusedopt.adam_step(
            b.params, b.grads, lists["exp_avgs"], lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"] or [], lists["master_params"] or [], lists["steps"], *hyper,
            inv_scale, clip_coef, skip, b.backend, self._fo_store_id, b.gi, b.token)

    # ------------------------------------------------------------ memory-lean states

    def _lean_refusals(self, gi, group):
        """What lean states do not cover, refused by name before anything runs: lean moments
        of wide (fp64 / complex) params."""
        if not _lean.asks_lean(group):
            return
        if group["state_dtype"] != _F32:
            for j, p in enumerate(group["params"]):
                if isinstance(p, torch.Tensor) and p.dtype in boundary.WIDE_DTYPES:
                    raise TypeError(
                        f"param {j} of param group {gi} has dtype {p.dtype}; "
                        f"state_dtype={group['state_dtype']} keeps the moments of float32, "
                        f"bfloat16 and float16 params only (put {p.dtype} params in a param "
                        f"group with state_dtype=torch.float32)")

    def _lean_state_lists(self, b, pending, masters):
        """The lists of a lean bucket: moments in the group's state_dtype (existing ones in
        another format converted, missing ones zero; written at commit), masters, steps,
        stream ids.  The moments of DTensor params are DTensors like them (the plan hands
        the kernels their local tensors); absmax are plain (_lean.py)."""
        state_dtype = b.group["state_dtype"]
        moments = {key: [] for key in _lean.MOMENT_KEYS + _lean.ABSMAX_KEYS}
        for i, key_p in enumerate(b.keys):
            entry = entry_of(self, b, i)
            def name(k, i=i):
                return f"optimizer.state[{b.where(i)}][{k!r}]"
            p = _distributed.local(key_p)
            view = _lean.local_entry(entry, key_p, name)
            new = _lean.converted(view, p, state_dtype, name)
            for key in _lean.MOMENT_KEYS:
                if view.get(key) is None:
                    new.update(_lean.zeros(p, key, state_dtype))
            new = _lean.stored(key_p, new)
            for key, value in new.items():
                pending.writes.append((key_p, key, value))
            if new and state_dtype != torch.int8 and any(k in entry for k in _lean.ABSMAX_KEYS):
                pending.extras.append(partial(_drop_absmax, self, key_p))
            for key in moments:
                moments[key].append(new[key] if key in new else entry.get(key))
        quantized = state_dtype == torch.int8
        b.lists = {
            "exp_avgs": moments["exp_avg"], "exp_avg_sqs": moments["exp_avg_sq"],
            "exp_avg_absmaxes": moments["exp_avg_absmax"] if quantized else None,
            "exp_avg_sq_absmaxes": moments["exp_avg_sq_absmax"] if quantized else None,
            "master_params": (vector_state(self, b, "master_param", pending, master_copy)
                              if masters else None),
            "steps": step_state(self, b, pending),
            "streams": self._lean_streams(b.gi, b.positions, b.keys),
        }
        keys = (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq"),
                ("exp_avg_absmaxes", "exp_avg_absmax"),
                ("exp_avg_sq_absmaxes", "exp_avg_sq_absmax"), ("master_params", "master_param"),
                ("steps", "step"))
        b.state_lists = tuple((key, b.lists[name]) for name, key in keys
                              if b.lists[name] is not None)
        b.backend = self._lean_backend_for(b.device)

    def _lean_streams(self, gi, positions, params) -> list:
        """The random stream of each param of a lean bucket (``_lean.stream_id`` of its
        position over the optimizer's param groups)."""
        offset = sum(len(g["params"]) for g in self.param_groups[:gi])
        return [_lean.stream_id(offset + j, p) for j, p in zip(positions, params)]

    def _lean_to_fp32(self, b, pending) -> dict:
        """Lean moments (bf16 / 8-bit) of a bucket that now runs with fp32 states, converted
        (written at commit): {key: list over the bucket} when any was, else {}."""
        entries = [entry_of(self, b, i) for i in range(len(b.keys))]
        if not any(map(_lean.holds_lean, entries)):
            return {}
        lists = {key: [] for key in _lean.MOMENT_KEYS}
        for i, (key_p, entry) in enumerate(zip(b.keys, entries)):
            def name(k, i=i):
                return f"optimizer.state[{b.where(i)}][{k!r}]"
            view = _lean.local_entry(entry, key_p, name)
            new = _lean.stored(key_p, _lean.converted(view, _distributed.local(key_p), _F32,
                                                      name))
            for key in _lean.MOMENT_KEYS:
                if key not in new:
                    value = _checks.state_tensor(entry.get(key), key, key_p, b.where(i))
                    new[key] = state_zeros(key_p) if value is None else value
                    if value is not None:
                        continue
                pending.writes.append((key_p, key, new[key]))
            for key in _lean.MOMENT_KEYS:
                lists[key].append(new[key])
            if any(k in entry for k in _lean.ABSMAX_KEYS):
                pending.extras.append(partial(_drop_absmax, self, key_p))
        return lists

    def _lean_backend_for(self, device):
        mod = self._fo_backends.get((device, "lean_adam"))
        if mod is None:
            mod = backends.select("lean_adam", device, self.backend)
            self._fo_backends[(device, "lean_adam")] = mod
        return mod

    def state_dict(self):
        """torch's state dict, with each group's ``state_dtype`` saved as its name and the
        8-bit moments of DTensor params decoded to fp32 DTensors (without absmax keys)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            if "state_dtype" in group:
                group["state_dtype"] = _lean.saved_name(group["state_dtype"])
        params = [p for group in self.param_groups for p in group["params"]]
        state = state_dict["state"]
        for index, entry in state.items():
            p = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
            if _distributed.is_dtensor(p) and isinstance(entry, dict) \
                    and any(_lean.holds_8bit(entry, k) for k in _lean.MOMENT_KEYS):
                state[index] = _lean.decoded_entry(
                    entry, p, lambda k, i=index: f"optimizer.state[param {i}][{k!r}]")
        return state_dict

    def _fo_load_group(self, group) -> None:
        group["state_dtype"] = _lean.loaded_dtype(group["state_dtype"])

    def _fo_load_moments(self, p, index, entry, group) -> dict:
        """The lean moments of a loaded entry (lean_states.md): all moments when the group's
        state_dtype is bf16 / int8 (copies of those already in it, conversions of the
        others), else only bf16 and 8-bit ones, made fp32.  The others (fp32, a wide param's)
        are left to the loader's state tensor checks; absmax keys are dropped unless they
        belong to loaded 8-bit moments.  A DTensor param's moments are taken as the loader
        takes them (this rank's part, fp32), then put in the group's format."""
        state_dtype = group["state_dtype"]
        def name(k):
            return f"the loaded state of param {index}, key {k!r},"
        out = dict.fromkeys(_lean.ABSMAX_KEYS)
        dtensor = _distributed.is_dtensor(p)
        if dtensor or p.dtype in boundary.WIDE_DTYPES:
            for key in _lean.MOMENT_KEYS:
                if _lean.holds_8bit(entry, key):
                    why = (" (the absmax blocks follow the shard they were saved from; "
                           "state_dict() saves the 8-bit moments of DTensor params decoded)"
                           if dtensor else "")
                    raise ValueError(
                        f"{name(key)} holds 8-bit moments, which a "
                        f"{'DTensor' if dtensor else p.dtype} param cannot keep{why}; load "
                        f"fusedopt.optim.dequantize_state_dict(state_dict)")
            if dtensor and state_dtype != _F32:
                for key in _lean.MOMENT_KEYS:
                    value = entry.get(key)
                    if value is not None:
                        if type(value) in boundary.PLAIN_TYPES and value.layout == torch.strided \
                                and value.device.type != "meta":  # before anything reads it
                            boundary.check_storage(value, name(key)[:-1])
                        local = _loading.state_tensor(value, p, name(key))._local_tensor
                        out.update(_lean.stored(p, _lean.converted(
                            {key: local}, p._local_tensor, state_dtype, name)))
            return out
        keys = [k for k in _lean.MOMENT_KEYS
                if state_dtype != _F32 or _lean.holds_lean(entry, (k,))]
        picked = {k: entry.get(k) for k in keys}
        picked.update({_lean.ABSMAX_OF[k]: entry.get(_lean.ABSMAX_OF[k]) for k in keys})
        out.update(_lean.converted(picked, p, state_dtype, name))
        for key in keys:
            if out.get(key) is not None or entry.get(key) is None:
                continue
            out[key] = entry[key].to(device=p.device, copy=True)
            absmax = _lean.ABSMAX_OF[key]
            if state_dtype == torch.int8:
                out[absmax] = entry[absmax].to(device=p.device, copy=True)
        return out


_LEAN_TRACED = ("torch.compile of a fused Adam step whose param group {gi} keeps fp32 states "
                "while moments are still in a lean format (bf16, or 8-bit with an absmax) is "
                "not supported: the conversion is not traced. Run one step eagerly (e.g. "
                "under torch.compiler.disable) to convert them")


class FusedAdamW(FusedAdam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``), fused; see docs/optimizers.md.

    As torch's AdamW, it is FusedAdam with ``decoupled_weight_decay=True``, which every
    loaded or unpickled param group gets back."""

    _LOAD_DEFAULTS = {}
    _FORCED = {"decoupled_weight_decay": True}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, track_grad_norm=False,
                 skip_nonfinite=False, master_weights=False, backend=None, process_group=None,
                 state_dtype=torch.float32, param_rounding="nearest", seed=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         track_grad_norm=track_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend,
                         process_group=process_group, state_dtype=state_dtype,
                         param_rounding=param_rounding, seed=seed)


def _readable(t) -> bool:
    """Whether the host may read ``t``'s values (a step counter the user replaced may be a
    view of a freed storage)."""
    try:
        _checks.readable_scalar(t, "a step counter")
    except (TypeError, ValueError):
        return False
    return True


def _drop_absmax(opt, p):
    entry = opt._fo_state.get(p)
    for key in _lean.ABSMAX_KEYS:
        entry.pop(key, None)
