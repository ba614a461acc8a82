"""LossScaler: dynamic loss scaling that lives on the device, with torch.amp.GradScaler's
interface.

    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()

    scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_(...)
    scaler.step(opt); scaler.update()

``step`` hands the scale (an fp32 0-dim tensor on the loss's device) to a fused optimizer,
which divides the gradients by it, detects inf/NaN and clips inside its own norm and
update kernels: there is no separate unscale or inf-check pass, and no host sync.  If any
gradient is inf/NaN the optimizer skips the whole step and ``step`` returns 1.0 in the
found-inf flag.  ``unscale_`` divides the gradients in place (for code that clips or
inspects them itself); the step that follows applies no second unscale and skips on the
flag ``unscale_`` found, still without a host sync.  ``update`` then backs the scale off,
or grows it after ``growth_interval`` clean steps, with device ops only (the rule of
torch.amp.GradScaler).

``process_group``: the inf/NaN flag is summed over it (one small all-reduce, no host
sync), so every rank skips the same steps and keeps the same scale.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from fusedopt.backends._plain import PLAIN_TYPES, check_storage, shown
from fusedopt.optim._checks import readable_scalar
from fusedopt.optim._distributed import all_reduce_sum, local

_F32 = torch.float32
_UNSCALED, _STEPPED = "unscaled", "stepped"


def _number(name, value, *, low, high=None, low_open=True):
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"invalid {name}: {shown(value)} (expected a finite number)")
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value >= high):
        bounds = f"> {low}" if high is None else f"in ({low}, {high})"
        raise ValueError(f"invalid {name}: {value!r} (expected a value {bounds})")


def _interval(value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid growth_interval: {shown(value)} (expected an int >= 1)")


_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _loaded(key, value):
    """A loaded state dict value as a Python number: a number, or a one-element real tensor
    whose value may be read (checked: no view of a freed storage, no meta tensor)."""
    if isinstance(value, torch.Tensor):
        if type(value) not in PLAIN_TYPES or value.numel() != 1 or value.is_complex() \
                or value.layout != torch.strided or value.device.type == "meta":
            raise TypeError(f"LossScaler state {key!r} must be a number or a plain "
                            f"one-element real tensor, got {type(value).__name__} of shape "
                            f"{tuple(value.shape)} on {value.device}")
        readable_scalar(value, f"LossScaler state {key!r}")
        value = value.detach().reshape(()).item()
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"LossScaler state {key!r} must be a number, got {shown(value)}")
    if not math.isfinite(value):
        raise ValueError(f"invalid {key}: {value!r} (expected a finite number)")
    return value


class LossScaler:
    """Device-side dynamic loss scaler for the fused optimizers (see docs/optimizers.md).

    The arguments are torch.amp.GradScaler's, in its order, so that
    ``LossScaler("cuda", init_scale=...)`` replaces ``GradScaler("cuda", init_scale=...)``;
    ``device`` is accepted and not needed: the scale lives on the device of the first loss
    it scales.  A number as the first argument is the ``init_scale``."""

    def __init__(self, device=None, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True, *, process_group=None):
        if isinstance(device, Real) and not isinstance(device, bool):  # LossScaler(2.0**10)
            device, init_scale = None, device
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a device name, a torch.device or None, got {shown(device)}")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {shown(enabled)}")
        _number("init_scale", init_scale, low=0.0)
        _number("growth_factor", growth_factor, low=1.0)
        _number("backoff_factor", backoff_factor, low=0.0, high=1.0)
        _interval(growth_interval)
        if process_group is not None:
            import torch.distributed as dist

            if not isinstance(process_group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed ProcessGroup or "
                                f"None, got {type(process_group).__name__}")
        self.process_group = process_group
        self._enabled = enabled
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._scale: torch.Tensor | None = None
        self._growth_tracker: torch.Tensor | None = None
        self._found_inf: torch.Tensor | None = None  # max over the flags since update()
        self._stages: dict[int, str] = {}  # id(optimizer) -> unscaled / stepped
        self._unscaled: dict[int, torch.Tensor] = {}  # id(optimizer) -> flag of unscale_

    def is_enabled(self) -> bool:
        return self._enabled

    def _lazy_init(self, device):
        self._scale = torch.full((), self._init_scale, dtype=_F32, device=device)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)

    def _require_scale(self, what):
        if self._scale is None:
            raise RuntimeError(f"LossScaler.{what} called before LossScaler.scale(loss): "
                               f"there is no scale yet")

    def scale(self, outputs):
        """``outputs * scale`` (a tensor, or a list/tuple of tensors); the scale is created on
        the device of the first tensor scaled."""
        if not self._enabled:
            return outputs
        if torch.is_tensor(outputs):
            if type(outputs) in PLAIN_TYPES and outputs.layout == torch.strided \
                    and not torch.compiler.is_compiling():  # (traced: no addresses)
                check_storage(outputs, "the tensor to scale")  # (a freed one: not read)
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale.to(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"outputs must be a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def _record(self, flag):
        self._found_inf = flag if self._found_inf is None else torch.maximum(self._found_inf, flag)

    def unscale_(self, optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale in place and note whether any is
        inf/NaN (a device flag, summed over ``process_group``: no host sync).  The next
        ``step(optimizer)`` applies no second unscale and skips on that flag."""
        if not self._enabled:
            return
        self._require_scale("unscale_()")
        stage = self._stages.get(id(optimizer))
        if stage == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since "
                               "the last update().")
        if stage == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        found = self._unscale_grads(optimizer)
        if self.process_group is not None:
            found = found.reshape(1)
            all_reduce_sum(found, self.process_group)
            found = found.reshape(()).clamp(max=1.0)
        self._stages[id(optimizer)] = _UNSCALED
        self._unscaled[id(optimizer)] = found
        self._record(found)

    def _unscale_grads(self, optimizer) -> torch.Tensor:
        """GradScaler's in-place unscale of every gradient; the inf/NaN flag (0-dim fp32 on
        the scale's device)."""
        inv_scale = self._scale.double().reciprocal().float()
        found = torch.zeros((), dtype=_F32, device=self._scale.device)
        per_kind: dict[tuple, list] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    if p.grad.dtype == torch.float16:  # coalesce has no fp16 kernel
                        p.grad = p.grad.float().coalesce().half()
                    elif not p.grad.is_coalesced():
                        p.grad = p.grad.coalesce()
                    grad = p.grad._values()
                else:
                    grad = local(p.grad)  # a DTensor's: what this rank holds
                per_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), grads in per_kind.items():
            found_here = torch.zeros(1, dtype=_F32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_here, inv_scale.to(device))
            found = torch.maximum(found, found_here.to(found.device).reshape(()))
        return found

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step(*args, **kwargs)`` on the scaled gradients, skipped on inf/NaN;
        returns the found-inf flag (0-dim fp32 device tensor, 1.0 = skipped).

        A fused optimizer unscales and checks inside its kernels, without a sync (after
        ``unscale_`` it only checks).  Any other torch optimizer is served as
        torch.amp.GradScaler does: its gradients are unscaled in place and the step is skipped
        on overflow, which reads the flag on the host (a sync).  With ``enabled=False`` this
        is ``optimizer.step(*args, **kwargs)`` and returns what it returns.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not supported by LossScaler.step (nor by "
                               "torch.amp.GradScaler): compute the loss before stepping")
        self._require_scale("step()")
        key = id(optimizer)
        stage = self._stages.get(key)
        if stage == _STEPPED:
            raise RuntimeError("step() has already been called on this optimizer since the "
                               "last update().")
        if hasattr(optimizer, "_fo_step_with_loss_scale"):
            if stage == _UNSCALED:
                found_inf, _ = optimizer._fo_step_with_loss_scale(
                    None, args, kwargs, found_inf=self._unscaled[key])
            else:
                found_inf, _ = optimizer._fo_step_with_loss_scale(
                    self._scale, args, kwargs, flag_group=self.process_group)
        else:
            if stage != _UNSCALED:
                self.unscale_(optimizer)
            found_inf = self._unscaled[key]
            if not found_inf.item():
                optimizer.step(*args, **kwargs)
        found_inf = found_inf.to(self._scale.device)
        self._stages[key] = _STEPPED
        self._record(found_inf)
        return found_inf

    def update(self, new_scale=None):
        """Back off after an overflow, grow after ``growth_interval`` clean steps (device ops).

        ``new_scale`` (a float or a one-element tensor) sets the scale directly instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._require_scale("update(new_scale)")
            if torch.is_tensor(new_scale):
                if new_scale.numel() != 1 or not new_scale.is_floating_point():
                    raise ValueError(f"new_scale must be a float or a one-element floating-"
                                     f"point tensor, got shape {tuple(new_scale.shape)} "
                                     f"{new_scale.dtype}")
                self._scale.copy_(new_scale.detach().reshape(()))
            else:
                _number("new_scale", new_scale, low=0.0)
                self._scale.fill_(float(new_scale))
            self._reset_iteration()
            return
        if self._found_inf is None:
            raise RuntimeError("LossScaler.update() called without a LossScaler.step() since the "
                               "last update: no inf/NaN check was recorded")
        found = self._found_inf > 0
        counted = self._growth_tracker + 1
        grow = (~found) & (counted >= self._growth_interval)
        grown = self._scale * self._growth_factor
        new = torch.where(found, self._scale * self._backoff_factor,
                          torch.where(grow & torch.isfinite(grown), grown, self._scale))
        self._scale.copy_(new)
        self._growth_tracker.copy_(torch.where(found | grow, torch.zeros_like(counted), counted))
        self._reset_iteration()

    def _reset_iteration(self):
        self._found_inf = None
        self._stages.clear()
        self._unscaled.clear()

    def get_scale(self) -> float:
        """The current scale as a Python float (reads the device: for logging)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def get_growth_tracker(self) -> int:
        if self._growth_tracker is None:
            return self._init_growth_tracker
        return int(self._growth_tracker.item())

    _get_growth_tracker = get_growth_tracker  # GradScaler's name

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        _number("growth_factor", new_factor, low=1.0)
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        _number("backoff_factor", new_factor, low=0.0, high=1.0)
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        _interval(new_interval)
        self._growth_interval = new_interval

    def state_dict(self) -> dict:
        """torch.amp.GradScaler's layout, so either scaler's checkpoint loads into the other."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self.get_growth_tracker()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Like GradScaler's: a no-op on a disabled scaler."""
        if not self._enabled:
            return
        if not isinstance(state_dict, dict):
            raise TypeError(f"a LossScaler state dict must be a dict, got "
                            f"{type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("LossScaler.load_state_dict() got an empty state dict: it was "
                               "saved from a disabled scaler")
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"LossScaler.load_state_dict(): the state dict lacks {missing} "
                             f"(GradScaler's keys: {list(_STATE_KEYS)})")
        # every value checked before anything is set: a refused load changes nothing
        values = {key: _loaded(key, state_dict[key]) for key in _STATE_KEYS}
        _number("scale", values["scale"], low=0.0)
        _number("growth_factor", values["growth_factor"], low=1.0)
        _number("backoff_factor", values["backoff_factor"], low=0.0, high=1.0)
        for key in ("growth_interval", "_growth_tracker"):
            if float(values[key]) != int(values[key]):
                raise ValueError(f"invalid {key}: {values[key]!r} (expected an integer)")
            values[key] = int(values[key])
        _interval(values["growth_interval"])
        if values["_growth_tracker"] < 0:
            raise ValueError(f"invalid _growth_tracker: {values['_growth_tracker']} (expected "
                             f"an int >= 0)")
        self._init_scale = float(values["scale"])
        self._growth_factor = float(values["growth_factor"])
        self._backoff_factor = float(values["backoff_factor"])
        self._growth_interval = values["growth_interval"]
        self._init_growth_tracker = values["_growth_tracker"]
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
        self._reset_iteration()

    def __getstate__(self):
        """Like GradScaler's: the scale as numbers, no per-iteration records; the process
        group does not pickle and is dropped."""
        state = self.__dict__.copy()
        if self._enabled:
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self.get_growth_tracker()
            state["_scale"] = state["_growth_tracker"] = state["_found_inf"] = None
            state["_stages"], state["_unscaled"] = {}, {}
        state["process_group"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
