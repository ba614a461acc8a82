"""Shared machinery of the fused optimizers: the step, clip/scale plumbing, hyper-parameters.

A step runs in three phases, none of which reads a device value on the host:

1. prepare (``_plan.prepare``): per param group, the params with a gradient, split into
   buckets by (device, dtype), each run by one backend (``fusedopt.backends.select``);
   every param, gradient and state tensor is checked -- against a fingerprint when nothing
   changed since the last step, in full otherwise -- and vouched for at the kernel boundary
   before anything runs or any lazy state is written;
2. norm (only when clipping, a loss scale, ``skip_nonfinite`` or ``track_grad_norm``
   needs it): one ``multi_tensor_norm`` per (device, dtype) over all groups, giving the
   global norm after unscaling and the inf/NaN flag, both device tensors;
3. update: one ``adam_step`` / ``sgd_step`` per bucket with ``inv_scale``, ``clip_coef``
   and ``skip`` as 0-dim device tensors.

State lives in ``self._fo_state`` (param -> dict of tensors, torch's keys), shown through
``optimizer.state`` (see ``_state.py`` and docs/optimizers.md, "Lazy state").

On torch.distributed (``_distributed``, docs/distributed.md) the kernels step local shards
of DTensor params, and the norm, the inf/NaN flag and a GradScaler's flag are summed over
the optimizer's ``process_group`` by one all-reduce between phases 2 and 3.
"""

from __future__ import annotations

import math
from itertools import chain
from numbers import Real

import torch
from torch.optim import Optimizer

from fusedopt import backends
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim import _checks, _distributed
from fusedopt.optim._plan import prepare
from fusedopt.optim._state import StateMixin

_F32 = torch.float32
_FP32_MAX = torch.finfo(_F32).max


def _to(value, device):
    """A one-element tensor (a flag, a scale) as a 0-dim fp32 tensor on ``device``; None
    unchanged.  A copy from the CPU to an accelerator is non-blocking (the source is
    staged at once: no wait for the device); one to the CPU waits for the source device."""
    if value is None:
        return None
    if value.dim() != 0:
        value = value.reshape(())
    if value.device != device:
        value = value.to(device, non_blocking=device.type != "cpu")
    return value if value.dtype == _F32 else value.to(_F32)


def _number(value, name):
    """A number hyper-parameter as the kernels take it (a Python float), read at each step:
    a finite value beyond fp32 (an edited ``param_groups`` entry) is refused, as at
    construction -- it would silently become inf in the fp32 kernels."""
    v = float(value)
    if abs(v) > _FP32_MAX and v == v and abs(v) != math.inf:
        raise ValueError(f"invalid {name}: {v!r} (a finite value must be representable in "
                         f"fp32, |value| <= {_FP32_MAX:.6e})")
    return v


def _hyper(value, device, name="lr"):
    """lr / a beta as a backend takes it: a Python float, or a 0-dim fp32 tensor on device.

    A CPU tensor for params on an accelerator is read on the host at each step -- a memory
    load, not a device synchronisation (what torch's fused optimizers do); a tensor on
    another accelerator is copied without blocking the host."""
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r}")
        return _number(value, name)
    if value.numel() != 1 or not value.is_floating_point() or type(value) not in boundary.PLAIN_TYPES:
        raise TypeError(f"{name} as a tensor must be a plain one-element floating-point tensor, "
                        f"got {type(value).__name__} of shape {tuple(value.shape)}, {value.dtype}")
    if value.device.type == "cpu" and device.type != "cpu":
        return float(value.reshape(()).item())
    return _to(value, device)


def _amp_scalar(value, name):
    """``grad_scale`` / ``found_inf`` set by a GradScaler: a one-element tensor (shape []
    from torch.amp.GradScaler, [1] from the FSDP ShardedGradScaler), as 0-dim."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"optimizer.{name} must be a tensor or None, got {type(value).__name__}")
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"optimizer.{name} must be a one-element floating-point tensor, got "
                         f"shape {tuple(value.shape)} dtype {value.dtype}")
    return value.reshape(())


class FusedOptimizer(StateMixin, Optimizer):
    """Base class of FusedAdam/FusedAdamW/FusedSGD (not public)."""

    # torch.amp.GradScaler hands us `grad_scale` / `found_inf` instead of unscaling itself
    _step_supports_amp_scaling = True
    _OP = ""  # "adam" | "sgd"

    def __init__(self, params, defaults, *, max_grad_norm, track_grad_norm, skip_nonfinite,
                 master_weights, backend, process_group=None):
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
        self._fo_plans: dict = {}
        self._fo_norm_caches: dict[tuple, dict] = {}
        self._fo_epoch = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._fo_group_arg = process_group
        self._fo_norm = None
        self.process_group = None
        super().__init__(params, defaults)
        self._fo_resolve_norm_group()
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
                if p.device.type != "meta":  # materialised later (e.g. to_empty) is fine
                    self._backend_for(p.device)
            if "skipped_steps" in self.__dict__:  # added after construction
                self._fo_resolve_norm_group()
        except Exception:
            self.param_groups.pop()
            raise
        self._fo_epoch += 1

    def _fo_resolve_norm_group(self):
        """The group the norm is summed over: ``process_group``, else the DTensor params'
        mesh's, else None (see ``_distributed.resolve``)."""
        params = [p for g in self.param_groups for p in g["params"]]
        self._fo_norm = _distributed.resolve(params, self._fo_group_arg)
        self.process_group = None if self._fo_norm is None else self._fo_norm.group
        self._fo_plans = {}

    def _fo_norm_group_for(self, group):
        """The norm group at a plan build (resolved again when DTensor params appeared in a
        group without ``add_param_group``)."""
        if self._fo_norm is None:
            if any(map(_distributed.is_dtensor, group["params"])):
                self._fo_resolve_norm_group()
            elif self.max_grad_norm is not None:
                _distributed.warn_if_partitioned(self, group)
        return self._fo_norm

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
        scaler = self.__dict__.pop("_fo_scaler", None)
        amp_scale = _amp_scalar(getattr(self, "grad_scale", None), "grad_scale")
        amp_found_inf = _amp_scalar(getattr(self, "found_inf", None), "found_inf")
        try:
            buckets = prepare(self)
            self._fo_step_buckets(buckets, scaler, amp_scale, amp_found_inf)
        finally:
            self._fo_release()
        return loss

    def _fo_step_buckets(self, buckets, scaler, amp_scale, amp_found_inf):
        # a LossScaler's step: its scale (None after its unscale_), the group its flag is
        # summed over, and the flag its unscale_ found
        loss_scale, flag_group, unscaled_found = scaler if scaler is not None else (None,) * 3
        scale = loss_scale
        if amp_scale is not None:
            scale = amp_scale if scale is None else scale * _to(amp_scale, scale.device)
        if unscaled_found is not None:
            amp_found_inf = unscaled_found
        need_norm = (self.max_grad_norm is not None or self.track_grad_norm
                     or self.skip_nonfinite or loss_scale is not None)
        norm_group = self.process_group
        communicates = ((norm_group is not None and (need_norm or amp_found_inf is not None))
                        or (flag_group is not None and need_norm))
        if not buckets and not communicates:
            if scaler is not None:
                self._fo_found_inf = (torch.zeros((), dtype=_F32, device=loss_scale.device)
                                      if unscaled_found is None else unscaled_found)
            return

        hypers = [self._hyper_args(b) for b in buckets]  # a bad group value: refused before any launch
        home = (loss_scale.device if loss_scale is not None
                else unscaled_found.device if unscaled_found is not None
                else buckets[0].device if buckets else self.skipped_steps.device)
        inv_scale = None if scale is None else _to(scale.double().reciprocal().float(), home)

        clip_coef = skip = None
        norm = self._global_norm(buckets, inv_scale, home) if need_norm else None
        found = None if amp_found_inf is None else _to(amp_found_inf, home)
        if communicates:  # one small all-reduce (two when the scaler's group is another)
            norm, found = _distributed.reduce(norm, found, norm_group, flag_group)
        if need_norm:
            total = norm[0].sqrt()
            self.last_grad_norm = total
            if self.max_grad_norm is not None:
                clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            if loss_scale is not None or self.skip_nonfinite:
                skip = norm[1]
        if found is not None:
            skip = found if skip is None else torch.maximum(skip, found)
        if skip is not None:
            self.skipped_steps.add_(_to(skip, self.skipped_steps.device).gt(0).long())
        if scaler is not None:
            self._fo_found_inf = (torch.zeros((), dtype=_F32, device=home) if skip is None
                                  else _to(skip, home))

        for bucket, hyper in zip(buckets, hypers):
            dev = bucket.device
            self._run_bucket(bucket, hyper, _to(inv_scale, dev), _to(clip_coef, dev), _to(skip, dev))

    def _fo_release(self):
        """Drop the boundary tokens of this step (they hold its gradient lists)."""
        for plan in self._fo_plans.values():
            for bucket in plan.buckets:
                boundary.release(bucket.cache)
        for cache in self._fo_norm_caches.values():
            boundary.release(cache)

    def _fo_step_with_loss_scale(self, scale, args=(), kwargs=None, *, flag_group=None,
                                 found_inf=None):
        """Called by LossScaler.step: ``self.step(*args, **kwargs)`` on gradients scaled by
        ``scale`` (None after LossScaler.unscale_, which found ``found_inf``); the inf/NaN
        flag is summed over ``flag_group`` too.

        Returns (the found-inf flag: fp32 0-dim on the scaler's device, 1.0 when skipped;
        what ``step`` returned)."""
        self._fo_scaler = (scale, flag_group, found_inf)
        try:
            result = self.step(*args, **(kwargs or {}))
        finally:
            self.__dict__.pop("_fo_scaler", None)
        return self.__dict__.pop("_fo_found_inf"), result

    def _global_norm(self, buckets, inv_scale, home):
        """[Σ g², any inf/NaN] over every gradient of the step, on ``home``: fp32 (2,);
        the gradients of buckets that do not count on this rank (replicas of a DTensor
        param, ``Bucket.counted``) only add to the flag."""
        per_kind: dict[tuple, list] = {}
        for bucket in buckets:
            per_kind.setdefault((bucket.device, bucket.dtype, bucket.counted), []).append(bucket)
        total = None if per_kind else torch.zeros(2, dtype=_F32, device=home)
        for (device, dtype, counted), group in per_kind.items():
            if len(group) == 1:
                grads, numels, ptrs = group[0].grads, group[0].verified.numels, \
                    group[0].verified.grad_ptrs
            else:
                grads = list(chain.from_iterable(b.grads for b in group))
                numels = tuple(chain.from_iterable(b.verified.numels for b in group))
                ptrs = list(chain.from_iterable(b.verified.grad_ptrs for b in group))
            cache = self._fo_norm_caches.setdefault((device, dtype, counted), {})
            boundary.vouch_norm(cache, grads, numels, ptrs)
            res = self._backend_for(device).multi_tensor_norm(grads, _to(inv_scale, device), cache)
            res = res.to(home, non_blocking=home.type != "cpu")
            if not counted:
                res = torch.cat([res.new_zeros(1), res[1:]])
            total = res if total is None else torch.stack([total[0] + res[0], torch.maximum(total[1], res[1])])
        return total

    # per optimizer: the group settings that shape the state lists; the checked state lists
    # of a bucket (missing state prepared in `pending`); the lists in the boundary's form
    # ((name, list) pairs, the same objects `_run_bucket` passes); the hyper-parameters
    # (converted before anything runs); run the backend
    def _layout(self, group):
        raise NotImplementedError

    def _state_lists(self, bucket, pending):
        raise NotImplementedError

    def _boundary_lists(self, bucket):
        raise NotImplementedError

    def _hyper_args(self, bucket):  # the group's hyper-parameters as the backend takes them
        raise NotImplementedError

    def _run_bucket(self, bucket, hyper, inv_scale, clip_coef, skip):
        raise NotImplementedError
