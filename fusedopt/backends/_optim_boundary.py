"""The optimizer kernel boundary: every tensor a compiled optimizer kernel (`cpu`, `cuda`,
`triton`) will address is verified here before any kernel of the step runs.

The compiled backends walk each tensor of a param as ``numel`` elements of flat memory
from its ``data_ptr()``, so this is where a bad list would become an out-of-bounds access.
All launchers (``_optim_tables`` for cpu and cuda, ``triton/optim.py`` and
``triton/multi_tensor.py``) call `verify_update` / `verify_norm` / `scalar` first; the
optimizer layer (fusedopt/optim) has already checked everything with friendlier messages
and calls the same functions for every bucket before launching anything, so a refused step
changes nothing.

Full verification, for one bucket (see docs/architecture.md, "The kernel boundary"):
- every tensor's type is exactly ``torch.Tensor`` or ``torch.nn.Parameter`` (`local_tensor`:
  the one place that decides which tensor a kernel may address -- a DTensor's local shard,
  which the optimizers unwrap before they build the lists; every other subclass, FakeTensor
  or any ``__torch_dispatch__`` / ``__torch_function__`` one, is refused);
- strided layout, no lazy negation/conjugation, on the bucket's device (of a type the
  backend runs on), with a data pointer and a storage that covers its elements (the type
  and storage checks are `_plain`'s, shared with the loss boundary);
- params dense, fp32/bf16/fp16; grads of the params' dtype; states and masters fp32 (the
  lean states of `lean_adam`: bf16 moments, or int8 / uint8 codes); step counters / flags
  0-dim fp32 (the optimizer's buckets for the `torch` backend may also hold fp64/complex
  params with states of their dtype: ``wide``); every grad, state and master of param i
  has param i's shape and strides (a dimension of size 1 may have any stride); absmax lists
  of 8-bit moments: contiguous 1-D fp32 with one element per 256 of the param's; list
  lengths equal.

Fingerprint.  A verified bucket keeps a `Verified` record in the backend's ``cache`` dict;
at every call the tensors are compared with it and fully verified again only when it
differs.  Compared per call, with ``map`` over the tensors' C methods (docs/optimizers.md
has the measured cost): params -- identity, data pointer, strides (a param reshaped in
place shows in its gradient); grads -- type, dtype, device, sizes, strides, data pointer,
and that each still lies inside its storage (a gradient's storage may be freed under it);
states -- identity, data pointer, element count.  The record keeps the
verified state storages alive, so a state tensor whose pointer did not change still points
into memory of the verified size.  A bucket the optimizer layer verified is "vouched" for:
the launcher's call then finds a token for exactly these list objects and skips the work.
"""

from __future__ import annotations

import operator
import sys

import torch

# PLAIN_TYPES: re-exported for fusedopt.optim
from fusedopt.backends._plain import (PLAIN_TYPES, check_storage,  # noqa: F401
                                      plain, storage_span)

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the compiled kernels take
# params the optimizers also train, on the `torch` backend only (states of the param's dtype)
WIDE_DTYPES = (torch.float64, torch.complex64, torch.complex128)
_F32 = torch.float32
_TOKEN = "boundary_token"
_RECORD = "boundary"
_NORM_RECORD = "boundary_norm"

_T = torch.Tensor
_ptr, _size, _stride, _numel = _T.data_ptr, _T.size, _T.stride, _T.numel
_dtype_of, _device_of, _is_cpu = _T.dtype.__get__, _T.device.__get__, _T.is_cpu.__get__
_is = operator.is_
_offset, _storage, _nbytes = _T.storage_offset, _T.untyped_storage, torch.UntypedStorage.nbytes
_add, _mul, _gt = operator.add, operator.mul, operator.gt


def storage_spans(tensors) -> list[int]:
    """Per tensor, the elements from its storage offset to its last element (0 if empty)."""
    return [storage_span(t) // t.element_size() - t.storage_offset() if t.numel() else 0
            for t in tensors]


def inside_storages(tensors, spans, item_sizes) -> bool:
    """Every tensor still lies inside its storage: (offset + span) * item size <= nbytes.
    Read per call for the gradients (new tensors every step, whose storage may have been
    freed or shrunk under them): about 0.1 us per tensor, C methods through map."""
    need = map(_mul, map(_add, map(_offset, tensors), spans), item_sizes)
    return not any(map(_gt, need, map(_nbytes, map(_storage, tensors))))


def local_tensor(t, what: str) -> torch.Tensor:
    """The tensor whose memory a kernel may address, for the value ``what`` names.

    That is ``t`` itself when its type is exactly ``torch.Tensor`` or ``torch.nn.Parameter``,
    and the local shard of a DTensor (itself such a tensor); every other object, other
    tensor subclasses included, is refused with a TypeError (a subclass's ``data_ptr()``
    need not be its data: DTensor's is 0)."""
    if type(t) in PLAIN_TYPES:
        return t
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and type(t) is getattr(dtensor, "DTensor", None):
        shard = t._local_tensor
        if type(shard) in PLAIN_TYPES:
            return shard
        t, what = shard, f"the local tensor of {what}"
    if isinstance(t, torch.Tensor):
        raise TypeError(
            f"{what} is a {type(t).__name__}; fusedopt optimizers take plain torch.Tensor / "
            f"nn.Parameter tensors and DTensors of them only (other tensor subclasses such as "
            f"FakeTensor are not supported)")
    raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")


def _addressed(t, what: str) -> torch.Tensor:
    """``t`` when a kernel may address it as it is: a DTensor in a backend's lists is refused
    (the optimizers hand the backends local shards; a direct call must do the same)."""
    shard = local_tensor(t, what)
    if shard is not t:
        raise TypeError(f"{what} is a DTensor; the kernels take local tensors (the fused "
                        f"optimizers unwrap DTensor params; a direct backend call must pass "
                        f"DTensor.to_local())")
    return t


def same_layout(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Same shape and, on every dimension of size > 1, the same stride as ``p``."""
    if t.shape != p.shape:
        return False
    return all(a == b for a, b, n in zip(t.stride(), p.stride(), p.shape) if n > 1)


def is_dense(t: torch.Tensor) -> bool:
    """The elements fill their memory span exactly (in some dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the states (and the math) of a param of ``dtype``: fp32 for the kernel
    dtypes, the param's own dtype for the wide ones (as torch keeps them)."""
    return _F32 if dtype in PARAM_DTYPES else dtype


_MATH_DTYPES = {torch.float32: _F32, torch.bfloat16: _F32, torch.float16: _F32,
                torch.float64: torch.float64, torch.complex64: _F32,
                torch.complex128: torch.float64}


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the math of a param of ``dtype`` runs in (a complex param's: that of
    its real view)."""
    return _MATH_DTYPES[dtype]


def _name(describe, lst: str, i: int) -> str:
    return describe(lst, i) if describe is not None else f"{lst}[{i}]"


def _check(t, what: str, device: torch.device, dtypes) -> torch.Tensor:
    """A plain strided tensor on ``device`` with a dtype of ``dtypes``, whose storage holds
    all its elements."""
    t = _addressed(t, what)
    if t.layout != torch.strided:
        raise TypeError(f"{what} has layout {t.layout}; the kernels take strided (dense) tensors")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{what} has dtype {t.dtype}, expected {expected}")
    if t.is_neg() or t.is_conj():
        raise ValueError(f"{what} is a lazily negated view; pass a resolved tensor")
    check_storage(t, what)
    return t


def _check_like(t, what: str, p: torch.Tensor, pwhat: str) -> None:
    if t.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(p.shape)}, the "
                         f"shape of {pwhat}")
    if not same_layout(t, p):
        raise ValueError(f"{what} has strides {t.stride()}, expected {p.stride()} like "
                         f"{pwhat} (the kernels walk every tensor of a param as flat memory)")


class Verified:
    """A verified bucket: its fingerprint, the held state storages, and the launch data
    (``numels``, ``ptr_key`` -- one tuple of addresses per list, None for an absent one --
    and ``grad_ptrs``, refreshed at every call)."""

    __slots__ = ("n", "params", "sizes", "strides", "grad_types", "dtypes", "devices", "on_cpu",
                 "numels", "states", "state_numels", "ptr_key", "grad_ptrs", "storages",
                 "empty", "grad_spans", "item_sizes")

    def __init__(self, params, grads, vectors, scalars):
        n = self.n = len(params)
        states = list(vectors) + list(scalars)
        self.params = tuple(params)
        self.sizes = list(map(_size, params))
        self.strides = list(map(_stride, params))
        self.grad_types = list(map(type, grads))
        self.dtypes = [params[0].dtype] * n if n else []
        self.devices = [params[0].device] * n if n else []
        self.on_cpu = bool(n) and params[0].device.type == "cpu"
        self.numels = tuple(map(_numel, params))
        self.empty = {i for i, k in enumerate(self.numels) if k == 0}
        self.states = tuple(None if lst is None else tuple(lst) for lst in states)
        # element counts are compared for the numel-sized lists (a resized state), not for
        # the 0-dim ones, of which a kernel reads one element
        self.state_numels = tuple(None if lst is None else list(map(_numel, lst))
                                  for lst in vectors) + (None,) * len(scalars)
        self.ptr_key = (tuple(map(_ptr, params)),) + tuple(
            None if lst is None else tuple(map(_ptr, lst)) for lst in states)
        self.grad_ptrs = list(map(_ptr, grads))
        self.grad_spans = storage_spans(grads)
        self.item_sizes = [params[0].element_size()] * n if n else []
        self.storages = [t.untyped_storage() for lst in states if lst is not None for t in lst]

    def matches(self, params, grads, states) -> bool:
        """The tensors are the verified ones, unchanged (grads: the same metadata).

        Params are compared by identity, address and strides: a param whose shape changed
        at the same address shows in its gradient, which must have the verified shape."""
        n = self.n
        if len(params) != n or len(grads) != n or len(states) != len(self.states):
            return False
        if (not all(map(_is, params, self.params)) or tuple(map(_ptr, params)) != self.ptr_key[0]
                or list(map(_stride, params)) != self.strides):
            return False
        if (list(map(type, grads)) != self.grad_types
                or list(map(_dtype_of, grads)) != self.dtypes
                or not (all(map(_is_cpu, grads)) if self.on_cpu
                        else list(map(_device_of, grads)) == self.devices)
                or list(map(_size, grads)) != self.sizes
                or list(map(_stride, grads)) != self.strides):
            return False
        grad_ptrs = list(map(_ptr, grads))
        if 0 in grad_ptrs and any(a == 0 and i not in self.empty for i, a in enumerate(grad_ptrs)):
            return False
        if not inside_storages(grads, self.grad_spans, self.item_sizes):
            return False
        for lst, refs, numels, ptrs in zip(states, self.states, self.state_numels, self.ptr_key[1:]):
            if lst is None or refs is None:
                if lst is not refs:
                    return False
                continue
            if (len(lst) != n or not all(map(_is, lst, refs)) or tuple(map(_ptr, lst)) != ptrs
                    or (numels is not None and list(map(_numel, lst)) != numels)):
                return False
        self.grad_ptrs = grad_ptrs
        return True


BLOCKS = "blocks"  # the spec of an absmax list (one fp32 per 256 elements of the param)
QUANT_BLOCK = 256


def _check_blocks(t, what: str, p: torch.Tensor, pwhat: str) -> None:
    blocks = -(-p.numel() // QUANT_BLOCK)
    if t.dim() != 1 or t.numel() != blocks or (blocks > 1 and t.stride(0) != 1):
        raise ValueError(f"{what} has shape {tuple(t.shape)} and strides {t.stride()}, expected "
                         f"a contiguous ({blocks},) tensor (one absmax per 256 elements of "
                         f"{pwhat})")


def _verify_full(params, grads, vectors, scalars, device_types, describe, wide) -> Verified:
    n = len(params)
    for name, lst, *_ in (("grads", grads),) + vectors + scalars:
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, expected {n} (one per param)")
    if n == 0:
        return Verified(params, grads, [v[1] for v in vectors], [lst for _, lst in scalars])
    p0 = _addressed(params[0], _name(describe, "params", 0))
    device, dtype = p0.device, p0.dtype
    if device_types is not None and device.type not in device_types:
        raise ValueError(f"{_name(describe, 'params', 0)} is on {device}; this backend runs on "
                         f"{' or '.join(device_types)} tensors")
    if dtype not in PARAM_DTYPES and not (wide and dtype in WIDE_DTYPES):
        raise TypeError(f"{_name(describe, 'params', 0)} has dtype {dtype}, expected "
                        f"torch.float32, torch.bfloat16 or torch.float16")
    states = (state_dtype(dtype),)
    for i, p in enumerate(params):
        what = _name(describe, "params", i)
        _check(p, what, device, (dtype,))
        if not is_dense(p):
            raise ValueError(f"{what} is not dense (strides {p.stride()} for shape "
                             f"{tuple(p.shape)}): the kernels walk it as flat memory")
    for i, (g, p) in enumerate(zip(grads, params)):
        what = _name(describe, "grads", i)
        _check(g, what, device, (dtype,))
        _check_like(g, what, p, _name(describe, "params", i))
    for name, lst, *spec in vectors:
        spec = spec[0] if spec else states
        for i, (t, p) in enumerate(zip(lst or (), params)):
            what = _name(describe, name, i)
            if spec == BLOCKS:
                _check(t, what, device, (_F32,))
                _check_blocks(t, what, p, _name(describe, "params", i))
            else:
                _check(t, what, device, spec)
                _check_like(t, what, p, _name(describe, "params", i))
    for name, lst in scalars:
        for i, t in enumerate(lst or ()):
            what = _name(describe, name, i)
            _check(t, what, device, (_F32,))
            if t.dim() != 0:
                raise ValueError(f"{what} has shape {tuple(t.shape)}, expected a 0-dim tensor")
    return Verified(params, grads, [v[1] for v in vectors], [lst for _, lst in scalars])


def verify_update(cache: dict, params, grads, vectors, scalars, *, device_types=None,
                  describe=None, vouch: bool = False, fingerprint_only: bool = False,
                  wide: bool = False):
    """Verify one update bucket (fingerprint first, in full when it changed); raise
    TypeError/ValueError naming the tensor otherwise.  With ``fingerprint_only`` a changed
    fingerprint returns None instead (the optimizer layer then rebuilds its plan).

    ``vectors``/``scalars``: tuples of (name, list or None) -- lists of numel-sized fp32
    tensors and of 0-dim fp32 tensors.  A vector entry may carry a third item: the tuple of
    dtypes its tensors may have (instead of fp32; the lean moments), or `BLOCKS` for an
    absmax list.  ``describe(list_name, index)`` names a tensor in
    the messages.  With ``vouch`` the result is left as a token for the launcher's call on
    exactly these list objects (see `release`).  ``wide`` also admits params of
    `WIDE_DTYPES` with states of their dtype: only for the `torch` backend, whose entry
    points take no addresses (no compiled launcher passes it)."""
    lists = (params, grads) + tuple(entry[1] for entry in vectors + scalars)
    token = cache.pop(_TOKEN, None)
    if token is not None and len(token[0]) == len(lists) and all(map(_is, token[0], lists)):
        return token[1]
    states = lists[2:]
    record = cache.get(_RECORD)
    try:
        fresh = record is None or not record.matches(params, grads, states)
    except Exception:  # a tensor whose metadata cannot be read: verify it in full
        fresh = True
    if fresh:
        if fingerprint_only:
            return None
        record = _verify_full(params, grads, vectors, scalars, device_types, describe, wide)
        cache[_RECORD] = record
    if vouch:
        cache[_TOKEN] = (lists, record)
    return record


def vouch_norm(cache: dict, tensors, numels: tuple, ptrs: list) -> None:
    """Called by the optimizer layer for a norm over gradients it verified in their buckets."""
    cache[_TOKEN] = ((tensors,), (numels, ptrs))


def release(cache: dict) -> None:
    """Drop an unused token (it holds this step's lists)."""
    cache.pop(_TOKEN, None)


class _NormRecord:
    """The fingerprint of a verified norm list (no references to the tensors)."""

    __slots__ = ("types", "dtypes", "devices", "sizes", "strides", "numels", "empty", "spans",
                 "item_sizes")

    def __init__(self, tensors):
        self.types = list(map(type, tensors))
        self.dtypes = list(map(_dtype_of, tensors))
        self.devices = list(map(_device_of, tensors))
        self.sizes = list(map(_size, tensors))
        self.strides = list(map(_stride, tensors))
        self.numels = tuple(map(_numel, tensors))
        self.empty = {i for i, k in enumerate(self.numels) if k == 0}
        self.spans = storage_spans(tensors)
        self.item_sizes = [t.element_size() for t in tensors]

    def pointers(self, tensors):
        """The data pointers when the tensors have the verified metadata, else None."""
        if (list(map(type, tensors)) != self.types or list(map(_dtype_of, tensors)) != self.dtypes
                or list(map(_device_of, tensors)) != self.devices
                or list(map(_size, tensors)) != self.sizes
                or list(map(_stride, tensors)) != self.strides):
            return None
        ptrs = list(map(_ptr, tensors))
        if 0 in ptrs and any(a == 0 and i not in self.empty for i, a in enumerate(ptrs)):
            return None
        if not inside_storages(tensors, self.spans, self.item_sizes):
            return None
        return ptrs


def verify_norm(cache: dict, tensors, *, device_types=None) -> tuple[tuple, list]:
    """(numels, data pointers) of the tensors of a norm: plain, dense, one device and one
    dtype of fp32/bf16/fp16.  Fingerprinted like `verify_update`."""
    token = cache.pop(_TOKEN, None)
    if token is not None and token[0][0] is tensors:
        return token[1]
    record = cache.get(_NORM_RECORD)
    if record is not None:
        try:
            ptrs = record.pointers(tensors)
        except Exception:  # metadata that cannot be read: verify in full
            ptrs = None
        if ptrs is not None:
            return record.numels, ptrs
    if not tensors:
        raise ValueError("multi_tensor_norm needs at least one tensor")
    t0 = _addressed(tensors[0], "tensors[0]")
    if device_types is not None and t0.device.type not in device_types:
        raise ValueError(f"tensors[0] is on {t0.device}; this backend runs on "
                         f"{' or '.join(device_types)} tensors")
    if t0.dtype not in PARAM_DTYPES:
        raise TypeError(f"tensors[0] has dtype {t0.dtype}, expected torch.float32, "
                        f"torch.bfloat16 or torch.float16")
    for i, t in enumerate(tensors):
        _check(t, f"tensors[{i}]", t0.device, (t0.dtype,))
        if not is_dense(t):
            raise ValueError(f"tensors[{i}] is not dense (strides {t.stride()} for shape "
                             f"{tuple(t.shape)})")
    record = _NormRecord(tensors)
    cache[_NORM_RECORD] = record
    return record.numels, list(map(_ptr, tensors))


def scalar(value, what: str, device: torch.device):
    """A hyper-parameter or step scalar for a kernel: a Python number (returned as float),
    None (returned as is), or a one-element fp32 tensor on ``device`` (returned as is)."""
    if value is None or not isinstance(value, torch.Tensor):
        return value if value is None else float(value)
    _addressed(value, what)
    if value.layout != torch.strided or value.device != device or value.dtype != _F32 \
            or value.numel() != 1 or value.data_ptr() == 0:
        raise ValueError(f"{what} must be a one-element float32 tensor on {device}, got "
                         f"shape {tuple(value.shape)}, dtype {value.dtype} on {value.device}")
    return value
