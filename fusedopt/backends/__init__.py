"""Backend registry: which backends exist, whether they can run here, and which one runs an op.

Every backend is a module exposing

* ``status() -> (ok: bool, reason: str)`` -- can the backend run at all on this machine;
* ``supports(op: str, device: torch.device) -> (ok: bool, reason: str)`` -- does it run
  ``op`` on tensors of ``device``;
* the op entry points of docs/architecture.md (``cross_entropy_fwd``, ``adam_step``, ...).

``select(op, device, backend)`` resolves an explicit name, then ``FUSEDOPT_BACKEND``, then
the default order of the device type.  A backend named explicitly (argument or
environment) that cannot run raises ``RuntimeError`` naming it and the reason: there is
never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from fusedopt.backends import torch_ref as _reference

NAMES = ("triton", "cuda", "cpu", "torch")

_MODULES = {
    "triton": "fusedopt.backends.triton",
    "cuda": "fusedopt.backends.cuda",
    "cpu": "fusedopt.backends.cpu",
    "torch": "fusedopt.backends.torch_ref",
}

# Default preference per device type and op, best first (see README "Backends").
DEFAULT_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

# Every op name: the reference backend implements every op by definition, so its OPS is
# the one list (a new op is added there, not here as well).
OPS = tuple(sorted(_reference.OPS))

_loaded: dict[str, ModuleType | Exception] = {}


def _load(name: str) -> ModuleType | Exception:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # an optional dependency or the extension is missing
            _loaded[name] = exc
    return _loaded[name]


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown fusedopt backend {name!r}; expected one of {', '.join(NAMES)}")


def status(name: str) -> tuple[bool, str]:
    """(ok, reason) for one backend."""
    _check_name(name)
    mod = _load(name)
    if isinstance(mod, Exception):
        return False, f"cannot import {_MODULES[name]}: {type(mod).__name__}: {mod}"
    return mod.status()


def available() -> dict[str, tuple[bool, str]]:
    """``{name: (ok, reason)}`` for every backend, e.g. ``{"cuda": (False, "no CUDA device")}``."""
    return {name: status(name) for name in NAMES}


def get(name: str) -> ModuleType:
    """The backend module ``name``; RuntimeError when it cannot run on this machine."""
    ok, reason = status(name)
    if not ok:
        raise RuntimeError(f"fusedopt backend '{name}' is not available: {reason}")
    return _load(name)  # type: ignore[return-value]


def _usable(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    ok, reason = status(name)
    if ok:
        ok, reason = _load(name).supports(op, device)
    return ok, reason


def select(op: str, device: torch.device | str, backend: str | None = None) -> ModuleType:
    """The backend module that runs ``op`` on tensors of ``device``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    device = torch.device(device)
    forced_by_env = backend is None and bool(os.environ.get("FUSEDOPT_BACKEND"))
    name = backend if backend is not None else os.environ.get("FUSEDOPT_BACKEND") or None
    if name is not None:
        _check_name(name)
        ok, reason = _usable(name, op, device)
        if not ok:
            origin = " (forced by FUSEDOPT_BACKEND)" if forced_by_env else ""
            raise RuntimeError(
                f"fusedopt backend '{name}'{origin} cannot run {op} on {device.type} tensors: {reason}"
            )
        return _load(name)  # type: ignore[return-value]
    for candidate in DEFAULT_ORDER.get(device.type, ("torch",)):
        if _usable(candidate, op, device)[0]:
            return _load(candidate)  # type: ignore[return-value]
    return _load("torch")  # type: ignore[return-value]


def usable(op: str, device: torch.device | str) -> list[str]:
    """Names of the backends that can run ``op`` on ``device`` here (for tests and bench)."""
    device = torch.device(device)
    return [name for name in NAMES if _usable(name, op, device)[0]]
