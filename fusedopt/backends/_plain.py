"""Whether a compiled kernel may address a tensor's memory directly: the two checks both
kernel boundaries (_loss_boundary.py for the losses, _optim_boundary.py for the
optimizers) make on every tensor before its address is taken.

- `plain`: the type is exactly ``torch.Tensor`` or ``torch.nn.Parameter`` (a plain tensor
  with a flag).  Any other object is refused with a TypeError, tensor subclasses included:
  a subclass's ``data_ptr()`` need not be its data (DTensor's is 0, a FakeTensor has none,
  a ``__torch_dispatch__`` wrapper's is not its inner tensor's).  A boundary that learns to
  unwrap a subclass (e.g. a DTensor into its local shard) does it before calling this.
- `check_storage`: the tensor has data and every element it spans lies inside its storage
  (a storage freed by ``resize_(0)``, as FSDP does between uses, or shrunk under a view is
  refused; reading it would touch memory that is not the tensor's).

Both read metadata only: no data, no device synchronisation.
"""

from __future__ import annotations

import torch

PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain(t, name: str) -> torch.Tensor:
    """``t`` itself when its type is exactly torch.Tensor or nn.Parameter; else a TypeError
    whose message starts with ``name``."""
    if type(t) in PLAIN_TYPES:
        return t
    if isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} is a {type(t).__name__}; compiled kernels take plain torch.Tensor / "
            f"nn.Parameter tensors only (a tensor subclass such as DTensor or FakeTensor is "
            f"not memory a kernel can address: pass its local tensor)")
    raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")


def storage_span(t: torch.Tensor) -> int:
    """Bytes from the start of the storage to the end of the last element ``t`` spans
    (``t`` has at least one element, non-negative strides)."""
    last = t.storage_offset()
    for n, st in zip(t.shape, t.stride()):
        last += (n - 1) * st
    return (last + 1) * t.element_size()


def check_storage(t: torch.Tensor, name: str) -> None:
    """ValueError unless a tensor with elements has data and lies inside its storage."""
    n = t.numel()
    if n == 0:
        return
    if t.data_ptr() == 0:
        raise ValueError(f"{name} has {n} elements but no data (a meta tensor, or its storage "
                         f"was freed)")
    need, have = storage_span(t), t.untyped_storage().nbytes()
    if need > have:
        raise ValueError(f"{name} reaches past the end of its storage (needs {need} bytes for "
                         f"shape {tuple(t.shape)}, strides {t.stride()}, offset "
                         f"{t.storage_offset()}; the storage holds {have}): was the storage "
                         f"freed or resized?")


def shown(value) -> str:
    """``repr(value)`` for an error message, without reading tensor data: a tensor (also in a
    tuple or list) is described by its type, shape, dtype and device -- the repr of a view
    of a freed storage would read out of bounds."""
    if isinstance(value, torch.Tensor):
        try:
            return (f"a {type(value).__name__} of shape {tuple(value.shape)}, {value.dtype} "
                    f"on {value.device}")
        except Exception:  # a subclass whose metadata cannot be read
            return f"a {type(value).__name__}"
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        inner = ", ".join(map(shown, value))
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)
