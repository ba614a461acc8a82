"""``load_state_dict`` of the fused optimizers: torch's loader, every entry validated first.

What torch's loader does -- param groups matched by count, hyper-parameters replaced, state
values moved to the param's device and cast -- with two differences: states stay fp32
(torch casts them to a bf16/fp16 param's dtype), and nothing is installed before the whole
checkpoint passed these checks, each naming the param index (its position in the
checkpoint's groups) and the key:

- a known state tensor (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``master_param``,
  ``momentum_buffer``): a plain tensor (TypeError otherwise) with data (not meta), of a
  dtype that casts to the param's state dtype (float32; a float64 / complex param's own
  dtype), of the param's shape (ValueError otherwise); it is copied into a new tensor of
  the state dtype with the param's device and layout (a sparse COO one, which torch's SGD
  keeps for sparse gradients, made dense; for a DTensor param: a DTensor with its
  placements, holding this rank's part of the value -- a plain tensor is taken as the full
  value, a DTensor on another placement is redistributed);
- Adam's moments in a lean format (bf16 ``exp_avg`` / ``exp_avg_sq``, or 8-bit codes with
  their ``exp_avg_absmax`` / ``exp_avg_sq_absmax``), and every moment of a group whose
  ``state_dtype`` is bf16 / int8: checked for their format (optim/_lean.py) and copied --
  exactly when already in the group's ``state_dtype``, converted otherwise (a torch
  checkpoint into an 8-bit optimizer is quantized); absmax keys without 8-bit moments are
  dropped;
- ``step``: a number or a one-element real tensor of any shape, dtype and device, made a
  0-dim fp32 tensor on the param's device;
- any plain tensor value, and the local tensor of a DTensor state, must lie inside its
  storage (ValueError for a view of a freed or shrunk storage, before anything reads it);
- None values are dropped (torch's SGD saves ``momentum_buffer: None``); a missing key is
  created at the next step as at a first step; other keys are kept as they are;
- a group without a key the optimizer has gets its default (``decoupled_weight_decay``:
  False on FusedAdam, as torch's Adam does), and FusedAdamW sets
  ``decoupled_weight_decay=True`` in every group, as torch's AdamW does;
- the loaded hyper-parameters pass the same checks as the constructor's.
"""

from __future__ import annotations

from copy import deepcopy
from numbers import Real

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.optim import _checks, _distributed


def load(opt, state_dict):
    """(new param groups, new internal state) for ``state_dict``; raises, changing nothing."""
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict \
            or "state" not in state_dict:
        raise ValueError("a state dict must be a dict with 'state' and 'param_groups' entries")
    groups = opt.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                         f"the optimizer has {len(groups)}")
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"loaded state dict's parameter group {i} has {len(sg['params'])} "
                             f"params, the optimizer's has {len(g['params'])}")
    id_map, group_of = {}, {}
    for g, sg in zip(groups, saved_groups):
        id_map.update(zip(sg["params"], g["params"]))
        group_of.update(dict.fromkeys(sg["params"], sg))
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        for name, default in opt.defaults.items():
            sg.setdefault(name, opt._LOAD_DEFAULTS.get(name, default))
        sg.update(opt._FORCED)
        try:
            loaded_group = getattr(opt, "_fo_load_group", None)
            if loaded_group is not None:  # Adam: the saved state_dtype name (optim/_lean.py)
                loaded_group(sg)
            opt._check_hyper_params(sg)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"loaded parameter group {i}: {exc}") from None

    state = {}
    for index, entry in state_dict["state"].items():
        p = id_map.get(index)
        state[index if p is None else p] = (entry if p is None
                                             else _entry(opt, p, index, entry, group_of[index]))
    for g, sg in zip(groups, saved_groups):
        sg["params"] = g["params"]
        if "param_names" in g and "param_names" not in sg:
            sg["param_names"] = g["param_names"]
    return saved_groups, state


def _entry(opt, p, index, entry, group) -> dict:
    if not isinstance(entry, dict):
        raise TypeError(f"the loaded state of param {index} must be a dict, got "
                        f"{type(entry).__name__}")
    out = {}
    moments = getattr(opt, "_fo_load_moments", None)
    if moments is not None:  # Adam: the moments in the group's state_dtype (optim/_lean.py)
        out.update(moments(p, index, entry, group))
    for key, value in entry.items():
        what = f"the loaded state of param {index}, key {key!r},"
        if value is None or key in out:
            continue
        if isinstance(value, torch.Tensor) and type(value) in boundary.PLAIN_TYPES \
                and value.layout == torch.strided and value.device.type != "meta":
            # before anything copies it: a view of a freed or shrunk storage would be read
            # out of bounds (torch's own loader crashes on it)
            boundary.check_storage(value, what[:-1])
        if key == "step" and opt._STEP_KEY:
            out[key] = _step(value, p, what)
        elif key in opt._STATE_KEYS:
            out[key] = state_tensor(value, p, what)
        elif isinstance(value, torch.Tensor) and type(value) in boundary.PLAIN_TYPES \
                and value.device.type != "meta":
            out[key] = value.to(device=p.device, copy=True)
        else:
            out[key] = value
    return {k: v for k, v in out.items() if v is not None}


def state_tensor(value, p, what) -> torch.Tensor:
    """A loaded state tensor of ``p``: a new fp32 tensor (a wide param's own dtype) with its
    device and layout; for a DTensor param a DTensor like it holding this rank's part."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    dtensor_param = _distributed.is_dtensor(p)
    if _distributed.is_dtensor(value) and not dtensor_param:
        raise TypeError(f"{what} is a DTensor, but its param is a plain tensor")
    shard = boundary.local_tensor(value, what)
    if shard.layout not in (torch.strided, torch.sparse_coo):
        raise TypeError(f"{what} has layout {shard.layout}, expected a strided tensor")
    target = boundary.state_dtype(p.dtype)
    if shard.is_quantized or (shard.is_complex() and not target.is_complex) \
            or not torch.can_cast(shard.dtype, target):
        raise TypeError(f"{what} has dtype {shard.dtype}, which does not cast to {target}")
    if shard.device.type == "meta":
        raise ValueError(f"{what} is a meta tensor: it has no data to load")
    if shard is not value and shard.layout == torch.strided:  # a DTensor's local tensor
        boundary.check_storage(shard, what[:-1])  # (plain values: checked by `_entry`)
    if dtensor_param:  # this rank's shard of the value, in a DTensor like the param
        return _distributed.like_param(p, _distributed.shard_of(value, p, what))
    if value.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(p.shape)} "
                         f"(the param's shape)")
    if value.layout == torch.sparse_coo:  # torch's SGD keeps sparse buffers for sparse grads
        value = _checks.sparse_values(value.cpu(), what).to_dense()
    copy = torch.empty_like(p, dtype=target)
    copy.copy_(value)
    return copy


def _step(value, p, what) -> torch.Tensor:
    if not isinstance(value, (torch.Tensor, Real)) or isinstance(value, bool):
        raise TypeError(f"{what} must be a number or a one-element tensor, got "
                        f"{type(value).__name__}")
    tensor, converted = _checks.step_count(value, p, what)
    return tensor if converted else tensor.clone()
