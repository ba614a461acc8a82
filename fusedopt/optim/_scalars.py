"""Scalars of a fused optimizer step: flags, scales and hyper-parameters as the backends take
them (0-dim tensors on the bucket's device, or Python floats).  Used by the eager step and
by the implementations of the custom ops a compiled step calls (``_ops``)."""

from __future__ import annotations

from numbers import Real

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._plain import shown
from fusedopt.optim._checks import in_fp32_range, readable_scalar

_F32 = torch.float32


def on_device(value, device, dtype=_F32):
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


def hyper(value, device, name="lr"):
    """lr / a beta as a backend takes it: a Python float, or a 0-dim fp32 tensor on device.

    A CPU tensor for params on an accelerator is read on the host at each step -- a memory
    load, not a device synchronisation (what torch's fused optimizers do); a tensor on
    another accelerator is copied without blocking the host."""
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number or a one-element tensor, got {shown(value)}")
        return in_fp32_range(float(value), name)
    if value.numel() != 1 or not value.is_floating_point() or type(value) not in boundary.PLAIN_TYPES:
        raise TypeError(f"{name} as a tensor must be a plain one-element floating-point tensor, "
                        f"got {type(value).__name__} of shape {tuple(value.shape)}, {value.dtype}")
    readable_scalar(value, name)
    if value.device.type == "cpu" and device.type != "cpu":
        return float(value.reshape(()).item())
    return on_device(value, device)


def amp_scalar(value, name):
    """``grad_scale`` / ``found_inf`` set by a GradScaler: a one-element tensor (shape []
    from torch.amp.GradScaler, [1] from the FSDP ShardedGradScaler), as 0-dim."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"optimizer.{name} must be a tensor or None, got {type(value).__name__}")
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"optimizer.{name} must be a one-element floating-point tensor, got "
                         f"shape {tuple(value.shape)} dtype {value.dtype}")
    if not torch.compiler.is_compiling():  # (a traced step reads no address)
        readable_scalar(value, f"optimizer.{name}")
    return value.reshape(())
