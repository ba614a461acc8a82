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

import os
from itertools import chain

import torch
from torch.optim import Optimizer

from fusedopt import backends
from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._plain import shown
from fusedopt.optim import _checks, _distributed, _ops, _traced
from fusedopt.optim._plan import prepare
from fusedopt.optim._scalars import amp_scalar, on_device
from fusedopt.optim._state import StateMixin

_F32 = torch.float32


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
                 master_weights, backend, process_group=None):
        _checks.max_grad_norm(max_grad_norm)
        _checks.flag("track_grad_norm", track_grad_norm)
        _checks.flag("skip_nonfinite", skip_nonfinite)
        _checks.flag("master_weights", master_weights)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {shown(backend)}")
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
        self._fo_store_id, self._fo_store = _ops.new_store()  # the compiled step's caches
        # what a step writes for the caller: "last_grad_norm"; "scaler" / "found_inf" of
        # a LossScaler.step.  A dict, not attributes: a compiled step's writes to the
        # optimizer's attributes are dropped by Dynamo, its writes to a dict are kept
        self._fo_vars: dict = {"last_grad_norm": None}
        self._fo_group_arg = process_group
        self._fo_norm = None
        self.process_group = None
        super().__init__(params, defaults)
        self._fo_resolve_norm_group()
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        _traced.mark_static((self.skipped_steps,))

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
        scaler = self._fo_vars.get("scaler")
        self._fo_vars["scaler"] = None  # for this step only (not a step it calls)
        amp_scale = amp_scalar(getattr(self, "grad_scale", None), "grad_scale")
        amp_found_inf = amp_scalar(getattr(self, "found_inf", None), "found_inf")
        if torch.compiler.is_compiling():
            _traced.step(self, scaler, amp_scale, amp_found_inf)
            return loss
        try:
            buckets = prepare(self)
            # a bad group value: refused before any launch
            hypers = [self._hyper_args(b) for b in buckets]
            self._fo_step_buckets(buckets, hypers, scaler, amp_scale, amp_found_inf,
                                  self._global_norm, self._run_bucket)
        finally:
            self._fo_release()
        return loss

    def _fo_step_buckets(self, buckets, hypers, scaler, amp_scale, amp_found_inf, norm_fn,
                         run):
        """Scale, norm, clip and skip, then ``run`` each bucket: the same arithmetic for the
        eager step and the traced one (``norm_fn`` and ``run`` launch the kernels).

        ``scaler``: a LossScaler's step -- its scale (None after its unscale_), the group its
        flag is summed over, and the flag its unscale_ found -- or None."""
        loss_scale, flag_group, unscaled_found = scaler if scaler is not None else (None,) * 3
        scale = loss_scale
        if amp_scale is not None:
            scale = amp_scale if scale is None else scale * on_device(amp_scale, scale.device)
        if unscaled_found is not None:
            amp_found_inf = unscaled_found
        need_norm = (self.max_grad_norm is not None or self.track_grad_norm
                     or self.skip_nonfinite or loss_scale is not None)
        norm_group = self.process_group
        communicates = ((norm_group is not None and (need_norm or amp_found_inf is not None))
                        or (flag_group is not None and need_norm))
        if not buckets and not communicates:
            if scaler is not None:
                self._fo_vars["found_inf"] = (
                    torch.zeros((), dtype=_F32, device=loss_scale.device)
                    if unscaled_found is None else unscaled_found)
            return

        home = (loss_scale.device if loss_scale is not None
                else unscaled_found.device if unscaled_found is not None
                else buckets[0].device if buckets else self.skipped_steps.device)
        inv_scale = None if scale is None else on_device(scale.double().reciprocal().float(), home)

        clip_coef = skip = None
        norm = norm_fn(buckets, inv_scale, home) if need_norm else None
        found = None if amp_found_inf is None else on_device(amp_found_inf, home)
        if communicates:  # one small all-reduce (two when the scaler's group is another)
            norm, found = _distributed.reduce(norm, found, norm_group, flag_group)
        if need_norm:
            total = norm[0].sqrt()
            self._fo_vars["last_grad_norm"] = total
            if self.max_grad_norm is not None:
                clip_coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
            if loss_scale is not None or self.skip_nonfinite:
                skip = norm[1]
        if found is not None:
            skip = found if skip is None else torch.maximum(skip, found)
        if skip is not None:
            self.skipped_steps.add_(on_device(skip, self.skipped_steps.device).gt(0).long())
        if scaler is not None:
            self._fo_vars["found_inf"] = (torch.zeros((), dtype=_F32, device=home)
                                          if skip is None else on_device(skip, home))

        for bucket, hyper in zip(buckets, hypers):
            dev = bucket.device
            run(bucket, hyper, on_device(inv_scale, dev),
                on_device(clip_coef, dev, bucket.math_dtype), on_device(skip, dev))

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
        what ``step`` returned).  The scaler's arguments and the flag travel in
        ``self._fo_vars``, whose writes a compiled step keeps."""
        self._fo_vars["scaler"] = (scale, flag_group, found_inf)
        try:
            result = self.step(*args, **(kwargs or {}))
        finally:
            self._fo_vars["scaler"] = None
        found_inf, self._fo_vars["found_inf"] = self._fo_vars.get("found_inf"), None
        return found_inf, result

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm of the last step that measured it (a 0-dim device
        tensor, before clipping, after unscaling), or None."""
        return self._fo_vars.get("last_grad_norm")

    @last_grad_norm.setter
    def last_grad_norm(self, value):
        self._fo_vars["last_grad_norm"] = value

    def _global_norm(self, buckets, inv_scale, home):
        """[Σ g², any inf/NaN] over every gradient of the step, on ``home``: fp32 (2,), or
        fp64 when fp64 / complex128 params take part (summed in fp64, as clip_grad_norm_
        does); the gradients of buckets that do not count on this rank (replicas of a
        DTensor param, ``Bucket.counted``) only add to the flag."""
        per_kind: dict[tuple, list] = {}
        for bucket in buckets:
            per_kind.setdefault((bucket.device, bucket.dtype, bucket.counted), []).append(bucket)
        parts = []
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
            res = self._backend_for(device, dtype).multi_tensor_norm(
                grads, on_device(inv_scale, device), cache)
            res = res.to(home, non_blocking=home.type != "cpu")
            if not counted:
                res = torch.cat([res.new_zeros(1), res[1:]])
            parts.append(res)
        return _traced.combine_norms(parts) if parts else torch.zeros(2, dtype=_F32, device=home)

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

    # per optimizer, for the traced step (_traced.py): the state lists of a TracedBucket
    # read from optimizer.state (missing state created); the hyper-parameters as the custom
    # ops take them; run the custom op
    def _traced_lists(self, bucket):
        raise NotImplementedError

    def _traced_hyper(self, bucket):
        raise NotImplementedError

    def _traced_run(self, bucket, hyper, inv_scale, clip_coef, skip):
        raise NotImplementedError
