"""Argument checks of the fused optimizers: each error names the argument and the value.

They run at construction (and in ``add_param_group``), before any kernel; reading a tensor
hyper-parameter here may synchronise, ``step()`` never does.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _scalar(name, value, *, tensor_ok):
    """The float value of a number (or, when allowed, of a one-element float tensor)."""
    if torch.is_tensor(value):
        if not tensor_ok:
            raise TypeError(f"{name} must be a Python number, got a tensor {value!r}")
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} as a tensor must have one floating-point element, "
                            f"got shape {tuple(value.shape)} dtype {value.dtype}")
        return float(value.detach().reshape(()).item())
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def lr(value, name="lr"):
    v = _scalar(name, value, tensor_ok=True)
    if not v >= 0.0:
        raise ValueError(f"invalid {name}: {v!r} (expected a value >= 0)")


def non_negative(name, value):
    v = _scalar(name, value, tensor_ok=False)
    if not v >= 0.0:
        raise ValueError(f"invalid {name}: {v!r} (expected a value >= 0)")


def real(name, value):
    v = _scalar(name, value, tensor_ok=False)
    if not math.isfinite(v):
        raise ValueError(f"invalid {name}: {v!r} (expected a finite number)")


def betas(value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}")
    for i, beta in enumerate(value):
        v = _scalar(f"betas[{i}]", beta, tensor_ok=True)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"invalid betas[{i}]: {v!r} (expected a value in [0, 1)); betas={value!r}")


def flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def max_grad_norm(value):
    if value is None:
        return
    v = _scalar("max_grad_norm", value, tensor_ok=False)
    if not v > 0.0:
        raise ValueError(f"invalid max_grad_norm: {v!r} (expected None or a value > 0)")


def nesterov(nesterov_flag, momentum, dampening):
    flag("nesterov", nesterov_flag)
    if nesterov_flag and (momentum <= 0 or dampening != 0):
        raise ValueError(f"nesterov=True requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum!r}, dampening={dampening!r}")


def _is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill their memory span exactly (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def param(p):
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"params must be float32, bfloat16 or float16; got a param of shape "
                        f"{tuple(p.shape)} with dtype {p.dtype}")
    if not _is_dense(p):
        raise ValueError(f"params must be dense (no gaps or overlaps in memory); got a param "
                         f"of shape {tuple(p.shape)} with strides {p.stride()}")
