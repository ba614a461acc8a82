"""Argument checks of the fused optimizers: each error names the argument and the value.

They run at construction (and in ``add_param_group``), and in ``step()`` / ``load_state_dict``
whenever a param, gradient or state tensor is new or changed, always before any kernel;
reading a tensor hyper-parameter at construction may synchronise, ``step()`` never does.
The kernel boundary (fusedopt/backends/_optim_boundary.py) checks the same again, last.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._plain import shown
from fusedopt.optim import _distributed

# the param dtypes the optimizers train: the kernels' (fp32 states), and the wide ones that
# torch's optimizers train too, stepped by the `torch` backend with states of their dtype
PARAM_DTYPES = boundary.PARAM_DTYPES + boundary.WIDE_DTYPES
_DTYPE_NAMES = "float32, bfloat16, float16, float64, complex64 or complex128"
_FP32_MAX = torch.finfo(torch.float32).max


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def group_number(group: dict, key: str) -> float:
    """A param group's number option (``eps``, ``weight_decay``, SGD's ``momentum``, ...) as
    a float, read at every step: a value set after construction that is not a real number is
    a TypeError naming it, before anything runs."""
    value = group[key]
    if not _is_real(value):
        raise TypeError(f"{key} must be a number, got {shown(value)}")
    return in_fp32_range(float(value), key)


def in_fp32_range(v: float, name: str) -> float:
    """``v`` unless it is finite but beyond fp32: the kernels compute in fp32, where it would
    silently become inf (and make torch's own ops raise a RuntimeError)."""
    if math.isfinite(v) and abs(v) > _FP32_MAX:
        raise ValueError(f"invalid {name}: {v!r} (a finite value must be representable in "
                         f"fp32, |value| <= {_FP32_MAX:.6e})")
    return v


def readable_scalar(value, name) -> None:
    """A one-element tensor (a hyper-parameter, a scale, a flag) whose value the host or a
    copy may read: a plain strided tensor with data inside its storage (TypeError /
    ValueError otherwise: a view of a freed storage would be read out of bounds)."""
    if type(value) not in boundary.PLAIN_TYPES:
        raise TypeError(f"{name} as a tensor must be a plain torch.Tensor, got "
                        f"{type(value).__name__}")
    if value.layout != torch.strided or value.device.type == "meta":
        raise ValueError(f"{name} as a tensor must hold its value in memory, got a "
                         f"{value.layout} tensor on {value.device}")
    boundary.check_storage(value, name)


def _scalar(name, value, *, tensor_ok):
    """The float value of a number (or, when allowed, of a one-element float tensor)."""
    if torch.is_tensor(value):
        if not tensor_ok:
            raise TypeError(f"{name} must be a Python number, got {shown(value)}")
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} as a tensor must have one floating-point element, "
                            f"got shape {tuple(value.shape)} dtype {value.dtype}")
        readable_scalar(value, name)
        v = float(value.detach().reshape(()).item())
    elif not _is_real(value):
        raise TypeError(f"{name} must be a number, got {shown(value)}")
    else:
        v = float(value)
    return in_fp32_range(v, name)


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
        raise TypeError(f"betas must be a pair (beta1, beta2), got {shown(value)}")
    for i, beta in enumerate(value):
        v = _scalar(f"betas[{i}]", beta, tensor_ok=True)
        if not 0.0 <= v < 1.0:
            raise ValueError(f"invalid betas[{i}]: {v!r} (expected a value in [0, 1)); betas={shown(value)}")


def flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {shown(value)}")


def group_flag(group: dict, key: str) -> bool:
    """A param group's flag (``amsgrad``, ``maximize``, ...) read at a step: a value set
    after construction that is not a bool is a TypeError naming it (never its truth value
    read: a tensor's would read its memory)."""
    value = group[key]
    flag(key, value)
    return value


def torch_keywords(group, optimizer):
    """torch's ``foreach`` / ``fused`` / ``capturable`` choose among torch's implementations:
    accepted with torch's types, they choose nothing here (the backend runs every step fused
    and without host syncs).  ``differentiable=True`` asks for a step autograd can
    differentiate through, which no backend gives."""
    for name in ("foreach", "fused"):
        value = group.get(name)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None or a bool, got {shown(value)}")
    if "capturable" in group:
        flag("capturable", group["capturable"])
    differentiable = group.get("differentiable", False)
    flag("differentiable", differentiable)
    if differentiable:
        raise ValueError(
            f"differentiable=True is not supported by {optimizer}: its step updates params and "
            f"states in place, outside autograd; use torch.optim's optimizer with "
            f"differentiable=True to differentiate through a step")


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
                         f"got momentum={shown(momentum)}, dampening={shown(dampening)}")


def param(p):
    """A param at construction: a plain tensor or a DTensor of one (no other subclass), of a
    kernel dtype, dense (a DTensor's local shard), not Partial."""
    shard = boundary.local_tensor(p, f"a param of shape {tuple(p.shape)}")
    if shard is not p:
        _distributed.check_param_placements(p, f"a param of shape {tuple(p.shape)}")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"params must be {_DTYPE_NAMES}; got a param of shape "
                        f"{tuple(p.shape)} with dtype {p.dtype}")
    if not boundary.is_dense(shard):
        raise ValueError(f"params must be dense (no gaps or overlaps in memory); got a param "
                         f"of shape {tuple(p.shape)} with strides {shard.stride()}")


def step_param(p, where):
    """A param at a step (``p.data`` may have been replaced since construction)."""
    if p.device.type == "meta":
        raise TypeError(f"{where} is on the meta device: it has no data to step")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; params must be {_DTYPE_NAMES}")
    shard = boundary.local_tensor(p, where)
    if shard is not p:
        _distributed.check_param_placements(p, where)
    if not boundary.is_dense(shard):
        raise ValueError(f"{where} is not dense (shape {tuple(shard.shape)}, strides "
                         f"{shard.stride()})")


def grad(g, p, where, optimizer, sparse_ok=False, traced=False) -> bool:
    """The gradient of param ``p`` at a step; True when the step uses a copy of it in the
    param's layout: its strides differ from the param's, (``sparse_ok``, SGD) it is a
    sparse COO tensor, or, for a DTensor, its placements differ.  ``traced``: at the trace
    of a compiled step, where a lazily negated view cannot be asked about (the traced step
    resolves it)."""
    if g.layout != torch.strided and not (sparse_ok and g.layout == torch.sparse_coo):
        supported = " (only sparse COO gradients are)" if sparse_ok else ""
        raise TypeError(f"{optimizer} does not support {g.layout} gradients{supported} "
                        f"({where}, of shape {tuple(p.shape)})")
    dtensor_param = _distributed.is_dtensor(p)
    if not dtensor_param and _distributed.is_dtensor(g):
        raise TypeError(f"the gradient of {where} is a DTensor, but the param is a plain tensor")
    shard = boundary.local_tensor(g, f"the gradient of {where}")
    if g.dtype != p.dtype:
        raise TypeError(f"the gradient of {where} has dtype {g.dtype}, expected {p.dtype} (the "
                        f"param's dtype)")
    if g.device != p.device:
        raise ValueError(f"the gradient of {where} is on {g.device}, expected {p.device} (the "
                         f"param's device)")
    if g.shape != p.shape:
        raise ValueError(f"the gradient of {where} has shape {tuple(g.shape)}, expected "
                         f"{tuple(p.shape)} (the param's shape)")
    if g.layout == torch.sparse_coo:
        return True
    if not traced and (shard.is_neg() or shard.is_conj()):
        raise ValueError(f"the gradient of {where} is a lazily negated view")
    if not traced:  # before a gradient laid out unlike its param is copied (which reads
        # it); a traced step has fusedopt::verify_step check the storages when it runs
        boundary.check_storage(shard, f"the gradient of {where}")
    if dtensor_param:
        return _distributed.check_grad(g, p, where)
    return not boundary.same_layout(g, p)


def sparse_values(g, where):
    """A sparse COO gradient with every entry inside its shape, for a dense copy.

    torch does not check the indices of a sparse tensor it did not build itself, and writing
    one with an index outside the shape reaches memory out of bounds.  On the CPU such an
    entry is refused; on an accelerator it is dropped (telling would read the device)."""
    indices, values = g._indices(), g._values()
    valid = torch.ones(indices.shape[1:], dtype=torch.bool, device=g.device)
    for d, size in enumerate(g.shape[:g.sparse_dim()]):
        valid &= (indices[d] >= 0) & (indices[d] < size)
    if g.device.type == "cpu":
        if not bool(valid.all()):
            raise ValueError(f"the sparse gradient of {where} has indices outside its shape "
                             f"{tuple(g.shape)}")
        return g
    keep = valid.reshape((-1,) + (1,) * (values.dim() - 1))
    return torch.sparse_coo_tensor(torch.where(valid, indices, 0),
                                   torch.where(keep, values, 0), g.shape, check_invariants=False)


def state_tensor(value, key, p, where, traced=False):
    """``optimizer.state[p][key]`` as a step uses it: None when absent, else a tensor of the
    param's state dtype (fp32; a wide param's own dtype) with the param's device, shape and
    layout (refused otherwise, naming it)."""
    if value is None:
        return None
    what = f"optimizer.state[{where}][{key!r}]"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    if _distributed.is_dtensor(p):
        shard, p = _distributed.check_state(value, what, p), p._local_tensor
    elif _distributed.is_dtensor(value):
        raise TypeError(f"{what} is a DTensor, but its param is a plain tensor")
    else:
        shard = value
    boundary.local_tensor(shard, what)
    if shard.layout != torch.strided:
        raise TypeError(f"{what} has layout {shard.layout}, expected a strided tensor")
    expected = boundary.state_dtype(p.dtype)
    if shard.dtype != expected:
        raise TypeError(f"{what} has dtype {shard.dtype}, expected {expected} (the fused "
                        f"optimizers keep {expected} states for {p.dtype} params)")
    if shard.device != p.device:
        raise ValueError(f"{what} is on {shard.device}, expected {p.device} (the param's device)")
    if shard.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(shard.shape)}, expected {tuple(p.shape)} "
                         f"(the param's shape)")
    if not boundary.same_layout(shard, p):
        raise ValueError(f"{what} has strides {shard.stride()}, expected the param's "
                         f"{p.stride()} (create it with torch.zeros_like(param, "
                         f"dtype={expected}))")
    if not traced and (shard.is_neg() or shard.is_conj()):
        raise ValueError(f"{what} is a lazily negated view")
    return value


def step_count(value, p, what):
    """A step counter as the kernels take it: a 0-dim fp32 tensor on the param's device.

    Returns ``(tensor, converted)``; a Python number or a one-element real tensor of any
    shape, dtype or device is converted (without a host sync)."""
    if isinstance(value, torch.Tensor):
        if _distributed.is_dtensor(value):  # a replicated count: its local value
            if any(placement.is_partial() for placement in value.placements):
                raise ValueError(f"{what} is a DTensor with a Partial placement")
            shard = boundary.local_tensor(value, what)
            if shard.numel() != 1:
                raise ValueError(f"{what} must hold one number, got a DTensor of shape "
                                 f"{tuple(value.shape)}")
            readable_scalar(shard, what)  # before the conversion reads it
            value = shard.detach().reshape(()).to(p.device, torch.float32, copy=True)
            return value, True
        boundary.local_tensor(value, what)
        if value.numel() != 1 or value.layout != torch.strided:
            raise ValueError(f"{what} must hold one number, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or value.device.type == "meta":
            raise TypeError(f"{what} must be a real number on a device with data, got "
                            f"{value.dtype} on {value.device}")
        if value.dim() == 0 and value.dtype == torch.float32 and value.device == p.device:
            return value, False  # the kernel boundary checks its storage
        boundary.check_storage(value, what)  # before the conversion reads it
        value = value.detach().reshape(())
        if value.device != p.device:
            value = value.to(p.device, non_blocking=value.device.type == "cpu")
        return value.to(torch.float32, copy=True), True
    if not _is_real(value):
        raise TypeError(f"{what} must be a number or a one-element tensor, got "
                        f"{type(value).__name__}")
    return torch.full((), float(value), dtype=torch.float32, device=p.device), True
