"""Shared machinery of the fused optimizers: grouping, lazy state, clip/scale plumbing.

A step runs in three phases, none of which reads a device value on the host:

1. collect: per param group, the params with a gradient, split into buckets by
   (device, dtype); each bucket runs on one backend (``fusedopt.backends.select``);
2. norm (only when clipping, a loss scale, ``skip_nonfinite`` or ``track_grad_norm``
   needs it): one ``multi_tensor_norm`` per (device, dtype) over all groups, giving the
   global norm after unscaling and the inf/NaN flag, both device tensors;
3. update: one ``adam_step`` / ``sgd_step`` per bucket with ``inv_scale``, ``clip_coef``
   and ``skip`` as 0-dim device tensors.

State lives in ``self._fo_state`` (param -> dict of fp32 tensors, torch's keys).  Entries
that never completed a step are hidden from ``optimizer.state`` and ``state_dict()``
(see docs/optimizers.md, "Lazy state").
"""

from __future__ import annotations

from collections import defaultdict
import torch
from torch.optim import Optimizer

from fusedopt import backends
from fusedopt.optim import _checks
from fusedopt.optim._state import StateMixin

_F32 = torch.float32


class _Bucket:
    """The params of one param group on one (device, dtype), with their state lists."""

    __slots__ = ("key", "params", "lists", "cache", "backend")

    def __init__(self, key, params, lists, backend):
        self.key = key
        self.params = params
        self.lists = lists
        self.cache: dict = {}
        self.backend = backend


def _on(value, device):
    """A 0-dim hyper-parameter tensor as fp32 on ``device``; Python numbers unchanged."""
    if torch.is_tensor(value):
        if value.device != device or value.dtype != _F32:
            value = value.to(device=device, dtype=_F32)
        return value.reshape(())
    return value


def _grad_like_param(p, g):
    """The gradient with the param's strides (the backends walk both as flat memory)."""
    if g.stride() == p.stride():
        return g
    out = torch.empty_like(p)
    out.copy_(g)
    return out


class FusedOptimizer(StateMixin, Optimizer):
    """Base class of FusedAdam/FusedAdamW/FusedSGD (not public)."""

    # torch.amp.GradScaler hands us `grad_scale` / `found_inf` instead of unscaling itself
    _step_supports_amp_scaling = True
    _OP = ""  # "adam" | "sgd"

    def __init__(self, params, defaults, *, max_grad_norm, track_grad_norm, skip_nonfinite,
                 master_weights, backend):
        _checks.max_grad_norm(max_grad_norm)
        _checks.flag("track_grad_norm", track_grad_norm)
        _checks.flag("skip_nonfinite", skip_nonfinite)
        _checks.flag("master_weights", master_weights)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {backend!r}")
        if backend is not None and backend not in backends.NAMES:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(backends.NAMES)}")
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.track_grad_norm = track_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.master_weights = master_weights
        self.backend = backend
        self._fo_backends: dict[torch.device, object] = {}
        self._fo_buckets: dict[tuple, _Bucket] = {}
        self._fo_norm_caches: dict[tuple, tuple] = {}
        self._fo_epoch = 0
        self.last_grad_norm: torch.Tensor | None = None
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    # ---------------------------------------------------------------- param groups

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_hyper_params(merged)
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                _checks.param(p)
                self._backend_for(p.device)
        except Exception:
            self.param_groups.pop()
            raise
        self._fo_epoch += 1

    def _check_hyper_params(self, group):  # per optimizer
        raise NotImplementedError

    def _backend_for(self, device):
        mod = self._fo_backends.get(device)
        if mod is None:
            mod = backends.select(self._OP, device, self.backend)
            self._fo_backends[device] = mod
        return mod

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_scale = self.__dict__.pop("_fo_loss_scale", None)
        amp_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler.step
        amp_found_inf = getattr(self, "found_inf", None)

        buckets = self._collect()
        scale = loss_scale
        if amp_scale is not None:
            scale = amp_scale if scale is None else scale * amp_scale.to(scale.device)
        if not buckets:
            if loss_scale is not None:
                self._fo_found_inf = torch.zeros((), dtype=_F32, device=loss_scale.device)
            return loss

        home = loss_scale.device if loss_scale is not None else buckets[0].params[0].device
        inv_scale = None if scale is None else scale.double().reciprocal().float().to(home)

        need_norm = (self.max_grad_norm is not None or self.track_grad_norm
                     or self.skip_nonfinite or loss_scale is not None)
        clip_coef = skip = None
        if need_norm:
            sumsq, nonfinite = self._global_norm(buckets, inv_scale, home)
            total = sumsq.sqrt()
            self.last_grad_norm = total
            if self.max_grad_norm is not None:
                clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            if loss_scale is not None or self.skip_nonfinite:
                skip = nonfinite
        if amp_found_inf is not None:
            found = amp_found_inf.to(home, _F32)
            skip = found if skip is None else torch.maximum(skip, found)
        if skip is not None:
            self.skipped_steps.add_((skip > 0).to(self.skipped_steps.device, torch.int64))
        if loss_scale is not None:
            self._fo_found_inf = skip.to(loss_scale.device)

        for bucket in buckets:
            dev = bucket.params[0].device
            self._run_bucket(bucket, _on(inv_scale, dev), _on(clip_coef, dev), _on(skip, dev))
        return loss

    def _fo_step_with_loss_scale(self, scale):
        """Called by LossScaler.step: one step whose gradients are scaled by ``scale``.

        Returns the found-inf flag (fp32 0-dim on the scale's device, 1.0 when skipped)."""
        self._fo_loss_scale = scale
        try:
            self.step()
        finally:
            self.__dict__.pop("_fo_loss_scale", None)
        return self.__dict__.pop("_fo_found_inf")

    def _collect(self):
        """Buckets of this step (params with a gradient), grads refreshed; no device reads."""
        out = []
        for gi, group in enumerate(self.param_groups):
            split: dict[tuple, list] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(param of shape {tuple(p.shape)} in param group {gi} has a "
                        f"{g.layout} gradient)")
                split.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in split.items():
                bkey = (gi, device, dtype)
                key = (self._fo_epoch, self._layout(group),
                       tuple((id(p), p.data_ptr()) for p in params))
                bucket = self._fo_buckets.get(bkey)
                if bucket is None or bucket.key != key:
                    lists = self._state_lists(group, params)
                    bucket = _Bucket(key, params, lists, self._backend_for(device))
                    self._fo_buckets[bkey] = bucket
                bucket.lists["grads"] = [_grad_like_param(p, p.grad) for p in params]
                bucket.lists["group"] = group
                out.append(bucket)
        return out

    def _global_norm(self, buckets, inv_scale, home):
        """(Σ g², any inf/NaN) over every gradient of the step, on ``home``."""
        per_kind: dict[tuple, list] = defaultdict(list)
        for bucket in buckets:
            p0 = bucket.params[0]
            per_kind[(p0.device, p0.dtype)].extend(bucket.lists["grads"])
        total = None
        for (device, dtype), grads in per_kind.items():
            key = tuple(b.key for b in buckets if b.params[0].device == device and b.params[0].dtype == dtype)
            cached = self._fo_norm_caches.get((device, dtype))
            if cached is None or cached[0] != key:
                cached = (key, {})
                self._fo_norm_caches[(device, dtype)] = cached
            res = self._backend_for(device).multi_tensor_norm(grads, _on(inv_scale, device), cached[1])
            res = res.to(home)
            total = res if total is None else torch.stack([total[0] + res[0], torch.maximum(total[1], res[1])])
        return total[0], total[1]

    # per optimizer: the group settings that shape the state lists, create lazy state and
    # build the lists for the backend, run the backend
    def _layout(self, group):
        raise NotImplementedError

    def _state_lists(self, group, params):
        raise NotImplementedError

    def _run_bucket(self, bucket, inv_scale, clip_coef, skip):
        raise NotImplementedError

    def _master_for(self, p, state):
        """The fp32 master copy of a low-precision param (created on first use), or None."""
        if not self.master_weights or p.dtype == _F32:
            return None
        master = state.get("master_param")
        if master is None:
            master = p.detach().to(_F32, copy=True)
            state["master_param"] = master
        return master

