"""Memory-lean Adam states in the optimizer layer (docs/optimizers.md, "Memory-lean states";
the math: docs/lean_states.md): the group options, the state tensors of each format, the
conversions between formats and the dequantize helper for torch.optim.

Formats of ``exp_avg`` / ``exp_avg_sq`` in ``optimizer.state[p]``:
- ``torch.float32``: fp32 tensors with the param's layout (torch's format);
- ``torch.bfloat16``: bf16 tensors with the param's layout;
- ``torch.int8``: int8 / uint8 codes with the param's layout, plus ``exp_avg_absmax`` /
  ``exp_avg_sq_absmax``: contiguous fp32 tensors of ceil(numel / 256) elements (blocks of
  256 elements in memory order).
A state in another format than its group's ``state_dtype`` (a checkpoint, a changed group
option) is converted: decoded to fp32, then rounded to nearest (bf16) or quantized (8-bit).

DTensor params (FSDP2, tensor parallelism): the moments are DTensors with the param's mesh
and placements (8-bit codes included) and the kernels step the local shards; the absmax of
8-bit moments are plain tensors, the blocks of this rank's shard (`local_entry`, `stored`).
Each shard draws its own random bits (`stream_id`); ``state_dict()`` holds the 8-bit moments
of DTensor params decoded to fp32 DTensors (`decoded_entry`), which a checkpoint can reshard.
"""

from __future__ import annotations

import torch

from fusedopt.backends import _optim_boundary as boundary
from fusedopt.backends._plain import shown
from fusedopt.backends import lean_math as lm
from fusedopt.optim import _distributed

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
ROUNDINGS = ("nearest", "stochastic")
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")
GROUP_KEYS = ("state_dtype", "param_rounding", "seed")
ABSMAX_OF = dict(zip(MOMENT_KEYS, ABSMAX_KEYS))
_F32, _BF16 = torch.float32, torch.bfloat16
_ROUNDED = (torch.bfloat16, torch.float16)  # the param dtypes stochastic rounding applies to
# the dtypes of (exp_avg, exp_avg_sq) per format
MOMENT_DTYPES = {_F32: (_F32, _F32), _BF16: (_BF16, _BF16), torch.int8: (torch.int8, torch.uint8)}


def new_seed() -> int:
    """A seed drawn from torch's default generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2 ** 32, (), dtype=torch.int64))


def check_options(group) -> None:
    """The lean options of a param group (constructor defaults or a group's overrides)."""
    state_dtype = group["state_dtype"]
    if not isinstance(state_dtype, torch.dtype):
        raise TypeError(f"state_dtype must be a torch.dtype, got {shown(state_dtype)}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"invalid state_dtype: {state_dtype} (expected torch.float32, "
                         f"torch.bfloat16 or torch.int8)")
    rounding = group["param_rounding"]
    if not isinstance(rounding, str):
        raise TypeError(f"param_rounding must be a string, got {shown(rounding)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"invalid param_rounding: {rounding!r} (expected 'nearest' or "
                         f"'stochastic')")
    seed = group["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {shown(seed)}")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"invalid seed: {seed} (expected an integer in [0, 2**32))")
    if group["amsgrad"] is True and (state_dtype != _F32 or rounding == "stochastic"):
        raise ValueError(f"amsgrad=True needs state_dtype=torch.float32 and "
                         f"param_rounding='nearest' (got state_dtype={state_dtype}, "
                         f"param_rounding={rounding!r})")


def asks_lean(group) -> bool:
    """Whether a param group sets a lean option (lean moments or stochastic rounding)."""
    return group["state_dtype"] != _F32 or group["param_rounding"] == "stochastic"


def saved_name(state_dtype):
    """``state_dtype`` as ``state_dict()`` saves it: its name ("torch.bfloat16"), since
    torch.distributed.checkpoint's full state dicts take no torch.dtype values."""
    return str(state_dtype) if isinstance(state_dtype, torch.dtype) else state_dtype


def loaded_dtype(value):
    """A loaded group's ``state_dtype``: a saved name made the dtype again (anything else
    is left for `check_options` to judge)."""
    if isinstance(value, str):
        for dtype in STATE_DTYPES:
            if value in (str(dtype), str(dtype).removeprefix("torch.")):
                return dtype
        raise ValueError(f"invalid state_dtype: {value!r} (expected 'torch.float32', "
                         f"'torch.bfloat16' or 'torch.int8' in a checkpoint)")
    return value


def is_lean(group, dtype: torch.dtype, masters: bool) -> bool:
    """Whether a bucket of params of ``dtype`` runs the lean kernel: lean moments, or
    stochastic rounding of bf16/fp16 params without masters."""
    return group["state_dtype"] != _F32 or (
        group["param_rounding"] == "stochastic" and dtype in _ROUNDED and not masters)


def holds_8bit(entry: dict, key: str) -> bool:
    """Whether moment ``key`` of a state entry is 8-bit codes with their absmax."""
    value = entry.get(key)
    return (isinstance(value, torch.Tensor) and entry.get(ABSMAX_OF[key]) is not None
            and value.dtype == MOMENT_DTYPES[torch.int8][MOMENT_KEYS.index(key)])


def holds_lean(entry: dict, keys=MOMENT_KEYS) -> bool:
    """Whether a state entry keeps one of the moments ``keys`` in a lean format (bf16, or
    with an absmax key: 8-bit codes, or a stale one to drop)."""
    return any(ABSMAX_OF[k] in entry or (isinstance(entry.get(k), torch.Tensor)
                                         and entry[k].dtype == _BF16) for k in keys)


# ---------------------------------------------------------------- formats

def _encode(key: str, x: torch.Tensor, state_dtype: torch.dtype, p: torch.Tensor) -> dict:
    """{key: stored moment (, absmax key: absmax)} of the fp32 moment ``x`` (param layout)."""
    if state_dtype == _F32:
        return {key: x}
    if state_dtype == _BF16:
        return {key: x.to(_BF16)}
    codes, absmax = lm.quantize_blocks(lm.flat_memory(x), key == "exp_avg")
    stored = torch.empty_like(p, dtype=codes.dtype)
    lm.flat_memory(stored).copy_(codes)
    return {key: stored, ABSMAX_OF[key]: absmax}


def zeros(p: torch.Tensor, key: str, state_dtype: torch.dtype) -> dict:
    """A moment of a param's first step, in ``state_dtype``."""
    dtype = MOMENT_DTYPES[state_dtype][MOMENT_KEYS.index(key)]
    out = {key: torch.zeros_like(p, dtype=dtype)}
    if state_dtype == torch.int8:
        out[ABSMAX_OF[key]] = torch.zeros(lm.num_blocks(p.numel()), dtype=_F32, device=p.device)
    return out


def _tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    boundary.local_tensor(value, what)
    if value.layout != torch.strided:
        raise TypeError(f"{what} has layout {value.layout}, expected a strided tensor")
    if value.device.type == "meta":
        raise ValueError(f"{what} is a meta tensor: it has no data")
    if value.is_neg() or value.is_conj():
        raise ValueError(f"{what} is a lazily negated view")
    boundary.check_storage(value, what)  # before a conversion reads it
    return value


def stored_moment(entry: dict, key: str, p: torch.Tensor, name):
    """(format, tensors) of moment ``key`` of ``entry``: (None, ()) when absent; ("8bit",
    (codes, absmax)) for codes of the 8-bit format (int8 exp_avg / uint8 exp_avg_sq with
    their absmax key); (torch.bfloat16 or torch.float32, (tensor,)) for a real tensor of the
    param's shape (any dtype that casts to float32, as torch's loader).  Raises TypeError /
    ValueError with ``name(key)`` naming the value."""
    value = entry.get(key)
    if value is None:
        return None, ()
    what = name(key)
    value = _tensor(value, what)
    if value.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, expected {tuple(p.shape)} "
                         f"(the param's shape)")
    absmax = entry.get(ABSMAX_OF[key])
    code_dtype = MOMENT_DTYPES[torch.int8][MOMENT_KEYS.index(key)]
    if absmax is not None and value.dtype == code_dtype:
        absmax_what = name(ABSMAX_OF[key])
        absmax = _tensor(absmax, absmax_what)
        blocks = lm.num_blocks(p.numel())
        if absmax.dtype != _F32 or absmax.shape != (blocks,):
            raise ValueError(f"{absmax_what} must be a float32 tensor of shape ({blocks},) (one "
                             f"absmax per 256 elements), got {absmax.dtype} "
                             f"{tuple(absmax.shape)}")
        return "8bit", (value, absmax)
    if value.is_quantized or value.is_complex() or not torch.can_cast(value.dtype, _F32):
        raise TypeError(f"{what} has dtype {value.dtype}, which does not cast to torch.float32")
    return (_BF16 if value.dtype == _BF16 else _F32), (value,)


def decoded(fmt, tensors, p: torch.Tensor) -> torch.Tensor:
    """The fp32 moment (the param's layout, on its device) of a stored one of any format."""
    value = _decode_in_place(*tensors) if fmt == "8bit" else tensors[0]
    copy = torch.empty_like(p, dtype=_F32)
    copy.copy_(value)
    return copy


def _decode_in_place(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """fp32 values of 8-bit codes, in the codes' own layout (their blocks follow the codes'
    memory order; a non-dense codes tensor is read in logical order)."""
    dense = codes if boundary.is_dense(codes) else codes.contiguous()
    out = torch.empty_like(dense, dtype=_F32)
    lm.flat_memory(out).copy_(lm.dequantize_blocks(lm.flat_memory(dense),
                                                   absmax.to(dense.device)))
    return out


def _in_place_already(fmt, tensors, key, p, state_dtype) -> bool:
    value = tensors[0]
    target = MOMENT_DTYPES[state_dtype][MOMENT_KEYS.index(key)]
    if value.dtype != target or value.device != p.device or not boundary.same_layout(value, p):
        return False
    if state_dtype == torch.int8:
        return fmt == "8bit" and tensors[1].device == p.device and tensors[1].is_contiguous()
    return fmt != "8bit"


def converted(entry: dict, p: torch.Tensor, state_dtype: torch.dtype, name) -> dict:
    """The moments of ``entry`` that are not in ``state_dtype`` with the param's device and
    layout, converted: {key: new tensor}, absmax keys included for 8-bit (empty when nothing
    needs converting; absent moments are left absent).  ``name(key)`` names a value in
    errors."""
    out = {}
    for key in MOMENT_KEYS:
        fmt, tensors = stored_moment(entry, key, p, name)
        if fmt is None or _in_place_already(fmt, tensors, key, p, state_dtype):
            continue
        out.update(_encode(key, decoded(fmt, tensors, p), state_dtype, p))
    return out


# ---------------------------------------------------------------- traced steps

def traced_moment(state: dict, key: str, p, where: str, state_dtype, mark_static):
    """(moment, absmax or None) of ``state[key]`` for a step traced by torch.compile: a
    missing moment is created (zeros in ``state_dtype``, marked static); one in another
    format, or with an absmax that does not belong to it, is refused (RuntimeError: the
    eager step converts it, a traced one cannot); a wrong type, shape or device as at an
    eager step."""
    absmax_key = ABSMAX_OF[key]
    value, absmax = state.get(key), state.get(absmax_key)
    quantized = state_dtype == torch.int8
    if value is None and absmax is None:
        new = zeros(p, key, state_dtype)
        state.update(new)
        mark_static(new.values())
        return new[key], new.get(absmax_key)
    what = f"optimizer.state[{where}][{key!r}]"
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    if value is not None:
        boundary.local_tensor(value, what)
        if value.shape != p.shape:
            raise ValueError(f"{what} has shape {tuple(value.shape)}, expected "
                             f"{tuple(p.shape)} (the param's shape)")
        if value.device != p.device:
            raise ValueError(f"{what} is on {value.device}, expected {p.device} (the param's "
                             f"device)")
    expected = MOMENT_DTYPES[state_dtype][MOMENT_KEYS.index(key)]
    in_format = (value is not None and value.dtype == expected
                 and value.layout == torch.strided and boundary.same_layout(value, p)
                 and (absmax is not None) == quantized
                 and (absmax is None or (isinstance(absmax, torch.Tensor)
                                         and absmax.device == p.device)))
    if not in_format:
        raise RuntimeError(
            f"{what} is not in the format of its group's state_dtype={state_dtype} (a "
            f"changed option or a tensor stored by hand; a compiled step does not convert "
            f"moments, the eager step does): run one step eagerly (e.g. under "
            f"torch.compiler.disable)")
    return value, absmax


# ---------------------------------------------------------------- DTensor params

_SHARD_STRIDE = 0x9E3779B9  # odd (2^32 / golden ratio): shard s of param k -> k + s * it


def stream_id(index: int, p) -> int:
    """The random stream of the param at ``index`` (its position over the optimizer's param
    groups): the index itself for a plain param; for a DTensor param, mixed with the linear
    index of this rank's shard over the mesh dims that shard it, so that shards draw
    different bits and replicas of one shard the same."""
    return (index + shard_index(p) * _SHARD_STRIDE) & 0xFFFFFFFF if _distributed.is_dtensor(p) \
        else index


def shard_index(p) -> int:
    """The linear index (row-major over the mesh dims whose placement is a Shard) of this
    rank's shard of DTensor ``p``; 0 when no mesh dim shards it or this rank is not in its
    mesh."""
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:
        return 0
    index = 0
    for size, c, placement in zip(p.device_mesh.shape, coordinate, p.placements):
        if placement.is_shard():
            index = index * size + c
    return index


def local_entry(entry: dict, p, name) -> dict:
    """The moments and absmax of ``entry`` as the kernels see them (absent keys absent): for
    a DTensor param the local tensors of its moments, which must be DTensors with the
    param's mesh, placements and shape, and its absmax, which must be plain tensors; for a
    plain param the values themselves."""
    keys = [k for k in MOMENT_KEYS + ABSMAX_KEYS if entry.get(k) is not None]
    if not _distributed.is_dtensor(p):
        return {k: entry[k] for k in keys}
    out = {}
    for key in keys:
        value = entry[key]
        if key in ABSMAX_KEYS:
            if _distributed.is_dtensor(value):
                raise TypeError(f"{name(key)} is a DTensor; the absmax of a DTensor param's "
                                f"8-bit moments is a plain tensor (the blocks of this rank's "
                                f"shard)")
            out[key] = value
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"{name(key)} must be a tensor, got {type(value).__name__}")
        else:
            out[key] = _distributed.check_state(value, name(key), p)
    return out


def stored(p, tensors: dict) -> dict:
    """``tensors`` (local moments and absmax) as ``optimizer.state`` keeps them: for a
    DTensor param its moments made DTensors like the param (absmax stay plain)."""
    if not _distributed.is_dtensor(p):
        return tensors
    return {k: v if k in ABSMAX_KEYS else _distributed.like_param(p, v)
            for k, v in tensors.items()}


def decoded_entry(entry: dict, p, name) -> dict:
    """A copy of the state entry of DTensor param ``p`` with its 8-bit moments decoded to
    fp32 DTensors like the param and without absmax keys (what ``state_dict()`` holds: a
    checkpoint can reshard it, which per-shard blocks could not be)."""
    out = {k: v for k, v in entry.items() if k not in ABSMAX_KEYS}
    view, local = local_entry(entry, p, name), p._local_tensor
    for key in MOMENT_KEYS:
        fmt, tensors = stored_moment(view, key, local, name)
        if fmt == "8bit":
            out[key] = _distributed.like_param(p, decoded(fmt, tensors, local))
    return out


# ---------------------------------------------------------------- checkpoints

def dequantize_state_dict(state_dict: dict) -> dict:
    """A copy of a fused Adam checkpoint with fp32 moments and no lean keys, loadable into
    ``torch.optim.Adam`` / ``AdamW`` (and into a fused optimizer of any state_dtype).

    bf16 moments are widened, 8-bit ones decoded (codes times their block's absmax, blocks
    of 256 elements in the codes' memory order); ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
    and the groups' ``state_dtype`` / ``param_rounding`` / ``seed`` are dropped.  The input
    is not modified."""
    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise ValueError("a state dict must be a dict with 'state' and 'param_groups' entries")
    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["param_groups"] = [{k: v for k, v in g.items() if k not in GROUP_KEYS}
                           for g in state_dict["param_groups"]]
    out["state"] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(entry, dict):
            out["state"][index] = entry
            continue
        new = {k: v for k, v in entry.items() if k not in ABSMAX_KEYS}
        for key in MOMENT_KEYS:
            value = entry.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            fmt, tensors = stored_moment(entry, key, value,
                                         lambda k, i=index: f"state[{i}][{k!r}]")
            new[key] = _decode_in_place(*tensors) if fmt == "8bit" else value.float()
        out["state"][index] = new
    return out
