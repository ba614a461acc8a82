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
"""

from __future__ import annotations

import os
from itertools import chain
from numbers import Real

import torch
from torch.optim import Optimizer

from fusedopt import backends
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim import _checks
from fusedopt.optim._plan import prepare
from fusedopt.optim._state import StateMixin

_F32 = torch.float32


def _to(value, device, dtype=_F32):
    """A one-element tensor (a flag, a scale) as a 0-dim ``dtype`` tensor on ``device``; None
    unchanged.  A copy from the CPU to an accelerator is non-blocking (the source is
    staged at once: no wait for the device); one to the CPU waits for the source device."""
    if value is None:
        return None
    if value.dim() != 0:
        value = value.reshape(())
    if value.device != device:
        value = value.to(device, non_blocking=device.type != "cpu")
    return value if value.dtype == dtype else value.to(dtype)


def _hyper(value, device, name="lr"):
    """lr / a beta as a backend takes it: a Python float, or a 0-dim fp32 tensor on device.

    A CPU tensor for params on an accelerator is read on the host at each step -- a memory
    load, not a device synchronisation (what torch's fused optimizers do); a tensor on
    another accelerator is copied without blocking the host."""
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r}")
        return float(value)
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


def _wide_backend(op, device, dtype, backend, what):
    """The `torch` backend for params the compiled kernels do not take (fp64, complex); a
    TypeError when another backend was named (argument or FUSEDOPT_BACKEND)."""
    forced = backend is None and bool(os.environ.get("FUSEDOPT_BACKEND"))
    name = backend if backend is not None else os.environ.get("FUSEDOPT_BACKEND") or "torch"
    if name != "torch":
        origin = " (forced by FUSEDOPT_BACKEND)" if forced else ""
        raise TypeError(
            f"{what or 'a param'} has dtype {dtype}, which fusedopt backend {name!r}{origin} "
            f"cannot step: its kernels take float32, bfloat16 and float16 params; "
            f"backend=None (or 'torch') steps {dtype} params with torch's math")
    return backends.select(op, device, "torch")


class FusedOptimizer(StateMixin, Optimizer):
    """Base class of FusedAdam/FusedAdamW/FusedSGD (not public)."""

    # torch.amp.GradScaler hands us `grad_scale` / `found_inf` instead of unscaling itself
    _step_supports_amp_scaling = True
    _OP = ""  # "adam" | "sgd"
    # loading a param group that lacks a key sets _LOAD_DEFAULTS[key] (else the default);
    # _FORCED is set in every loaded or unpickled group (torch's AdamW: decoupled decay)
    _LOAD_DEFAULTS: dict = {}
    _FORCED: dict = {}
    _SPARSE_GRADS = False  # sparse COO gradients are stepped (made dense), as torch's SGD does

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
        self._fo_plans: dict = {}
        self._fo_norm_caches: dict[tuple, dict] = {}
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
                if p.device.type != "meta":  # materialised later (e.g. to_empty) is fine
                    self._backend_for(p.device, p.dtype, f"a param of shape {tuple(p.shape)}")
        except Exception:
            self.param_groups.pop()
            raise
        self._fo_epoch += 1

    def _check_hyper_params(self, group):  # per optimizer
        raise NotImplementedError

    def _backend_for(self, device, dtype=_F32, what=None):
        """The backend of the params of (device, dtype); ``what`` names a param in errors."""
        mod = self._fo_backends.get((device, dtype))
        if mod is None:
            if dtype in boundary.WIDE_DTYPES:
                mod = _wide_backend(self._OP, device, dtype, self.backend, what)
            else:
                mod = backends.select(self._OP, device, self.backend)
            self._fo_backends[(device, dtype)] = mod
        return mod

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        loss_scale = self.__dict__.pop("_fo_loss_scale", None)
        amp_scale = _amp_scalar(getattr(self, "grad_scale", None), "grad_scale")
        amp_found_inf = _amp_scalar(getattr(self, "found_inf", None), "found_inf")
        try:
            buckets = prepare(self)
            self._fo_step_buckets(buckets, loss_scale, amp_scale, amp_found_inf)
        finally:
            self._fo_release()
        return loss

    def _fo_step_buckets(self, buckets, loss_scale, amp_scale, amp_found_inf):
        scale = loss_scale
        if amp_scale is not None:
            scale = amp_scale if scale is None else scale * _to(amp_scale, scale.device)
        if not buckets:
            if loss_scale is not None:
                self._fo_found_inf = torch.zeros((), dtype=_F32, device=loss_scale.device)
            return

        hypers = [self._hyper_args(b) for b in buckets]  # a bad group value: refused before any launch
        home = loss_scale.device if loss_scale is not None else buckets[0].device
        inv_scale = None if scale is None else _to(scale.double().reciprocal().float(), home)

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
            found = _to(amp_found_inf, home)
            skip = found if skip is None else torch.maximum(skip, found)
        if skip is not None:
            self.skipped_steps.add_(_to(skip, self.skipped_steps.device).gt(0).long())
        if loss_scale is not None:
            self._fo_found_inf = _to(skip, loss_scale.device)

        for bucket, hyper in zip(buckets, hypers):
            dev = bucket.device
            self._run_bucket(bucket, hyper, _to(inv_scale, dev),
                             _to(clip_coef, dev, bucket.math_dtype), _to(skip, dev))

    def _fo_release(self):
        """Drop the boundary tokens of this step (they hold its gradient lists)."""
        for plan in self._fo_plans.values():
            for bucket in plan.buckets:
                boundary.release(bucket.cache)
        for cache in self._fo_norm_caches.values():
            boundary.release(cache)

    def _fo_step_with_loss_scale(self, scale):
        """Called by LossScaler.step: one step whose gradients are scaled by ``scale``.

        Returns the found-inf flag (fp32 0-dim on the scale's device, 1.0 when skipped)."""
        self._fo_loss_scale = scale
        try:
            self.step()
        finally:
            self.__dict__.pop("_fo_loss_scale", None)
        return self.__dict__.pop("_fo_found_inf")

    def _global_norm(self, buckets, inv_scale, home):
        """(Σ g², any inf/NaN) over every gradient of the step, on ``home``: fp32, or fp64
        when fp64 / complex128 params take part (summed in fp64, as clip_grad_norm_ does)."""
        per_kind: dict[tuple, list] = {}
        for bucket in buckets:
            per_kind.setdefault((bucket.device, bucket.dtype), []).append(bucket)
        parts = []
        for (device, dtype), group in per_kind.items():
            if len(group) == 1:
                grads, numels, ptrs = group[0].grads, group[0].verified.numels, \
                    group[0].verified.grad_ptrs
            else:
                grads = list(chain.from_iterable(b.grads for b in group))
                numels = tuple(chain.from_iterable(b.verified.numels for b in group))
                ptrs = list(chain.from_iterable(b.verified.grad_ptrs for b in group))
            cache = self._fo_norm_caches.setdefault((device, dtype), {})
            boundary.vouch_norm(cache, grads, numels, ptrs)
            res = self._backend_for(device, dtype).multi_tensor_norm(
                grads, _to(inv_scale, device), cache)
            parts.append(res.to(home, non_blocking=home.type != "cpu"))
        if any(res.dtype == torch.float64 for res in parts):
            parts = [res.to(torch.float64) for res in parts]
        total = parts[0]
        for res in parts[1:]:
            total = torch.stack([total[0] + res[0], torch.maximum(total[1], res[1])])
        return total[0], total[1]

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
