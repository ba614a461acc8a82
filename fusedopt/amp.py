"""LossScaler: dynamic loss scaling that lives on the device.

    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()

``step`` hands the scale (an fp32 0-dim tensor on the loss's device) to a fused optimizer,
which divides the gradients by it, detects inf/NaN and clips inside its own norm and
update kernels: there is no separate unscale or inf-check pass, and no host sync.  If any
gradient is inf/NaN the optimizer skips the whole step and ``step`` returns 1.0 in the
found-inf flag.  ``update`` then backs the scale off, or grows it after
``growth_interval`` clean steps, with device ops only (the rule of torch.amp.GradScaler).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

_F32 = torch.float32


def _number(name, value, *, low, high=None, low_open=True):
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"invalid {name}: {value!r} (expected a finite number)")
    bad = value <= low if low_open else value < low
    if bad or (high is not None and value >= high):
        bounds = f"> {low}" if high is None else f"in ({low}, {high})"
        raise ValueError(f"invalid {name}: {value!r} (expected a value {bounds})")


class LossScaler:
    """Device-side dynamic loss scaler for the fused optimizers (see docs/optimizers.md)."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        _number("init_scale", init_scale, low=0.0)
        _number("growth_factor", growth_factor, low=1.0)
        _number("backoff_factor", backoff_factor, low=0.0, high=1.0)
        if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
            raise ValueError(f"invalid growth_interval: {growth_interval!r} (expected an int >= 1)")
        self._enabled = enabled
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._scale: torch.Tensor | None = None
        self._growth_tracker: torch.Tensor | None = None
        self._found_inf: torch.Tensor | None = None  # max over the steps since update()

    def is_enabled(self) -> bool:
        return self._enabled

    def _lazy_init(self, device):
        self._scale = torch.full((), self._init_scale, dtype=_F32, device=device)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)

    def scale(self, outputs):
        """``outputs * scale`` (a tensor, or a list/tuple of tensors); the scale is created on
        the device of the first tensor scaled."""
        if not self._enabled:
            return outputs
        if torch.is_tensor(outputs):
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale.to(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"outputs must be a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def step(self, optimizer):
        """Step ``optimizer`` on the scaled gradients; returns the found-inf flag (device tensor).

        A fused optimizer unscales and checks inside its kernels, without a sync.  Any other
        torch optimizer is served as torch.amp.GradScaler does: the gradients are unscaled in
        place and the step is skipped on overflow, which reads the flag on the host (a sync).
        With ``enabled=False`` this is ``optimizer.step()`` and returns None.
        """
        if not self._enabled:
            optimizer.step()
            return None
        if self._scale is None:
            raise RuntimeError("LossScaler.step() called before LossScaler.scale(loss): "
                               "there is no scale yet")
        if hasattr(optimizer, "_fo_step_with_loss_scale"):
            found_inf = optimizer._fo_step_with_loss_scale(self._scale)
        else:
            found_inf = self._unscale_and_step(optimizer)
        found_inf = found_inf.to(self._scale.device)
        self._found_inf = found_inf if self._found_inf is None else torch.maximum(self._found_inf, found_inf)
        return found_inf

    def _unscale_and_step(self, optimizer):
        inv_scale = self._scale.double().reciprocal().float()
        found = torch.zeros((), dtype=_F32, device=self._scale.device)
        per_kind: dict[tuple, list] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    per_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in per_kind.items():
            found_here = torch.zeros(1, dtype=_F32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_here, inv_scale.to(device))
            found = torch.maximum(found, found_here.to(found.device).reshape(()))
        if not found.item():
            optimizer.step()
        return found

    def update(self, new_scale=None):
        """Back off after an overflow, grow after ``growth_interval`` clean steps (device ops).

        ``new_scale`` (a float or a 0-dim tensor) sets the scale directly instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            if self._scale is None:
                raise RuntimeError("LossScaler.update(new_scale) called before LossScaler.scale(loss)")
            if torch.is_tensor(new_scale):
                self._scale.copy_(new_scale.reshape(()))
            else:
                _number("new_scale", new_scale, low=0.0)
                self._scale.fill_(float(new_scale))
            self._growth_tracker.zero_()
            self._found_inf = None
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
        self._found_inf = None

    def get_scale(self) -> float:
        """The current scale as a Python float (reads the device: for logging)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def get_growth_tracker(self) -> int:
        if self._growth_tracker is None:
            return self._init_growth_tracker
        return int(self._growth_tracker.item())

    def state_dict(self) -> dict:
        """torch.amp.GradScaler's layout, so either scaler's checkpoint loads into the other."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self.get_growth_tracker()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            raise RuntimeError("LossScaler.load_state_dict() on a disabled LossScaler")
        if len(state_dict) == 0:
            raise RuntimeError("LossScaler.load_state_dict() got an empty state dict: it was "
                               "saved from a disabled scaler")
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
            self._growth_tracker.fill_(self._init_growth_tracker)
        self._found_inf = None
