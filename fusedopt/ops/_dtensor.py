"""The entry of DTensor inputs into the loss ops, without importing torch.distributed.tensor.

A DTensor can only exist once ``torch.distributed.tensor`` is imported, so detecting one
costs a dict lookup; everything DTensor-specific (sharding rules of the custom ops, the
vocab-parallel path) lives in ``fusedopt.distributed`` and is imported on the first
DTensor a loss sees (docs/distributed.md)."""

from __future__ import annotations

import functools
import sys


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def dtensor_aware(target_kind: str):
    """Decorate an ops-layer loss ``fn(input, target, *rest)``: with a DTensor input it runs
    through ``fusedopt.distributed._dtensor_losses.run`` (``target_kind``: "class" for class
    indices or probabilities with a class dim, "elementwise" for a target of the input's
    shape); plain tensors go straight to ``fn``."""

    def decorate(fn):
        @functools.wraps(fn)
        def loss(input, target, *rest):
            if not is_dtensor(input):
                return fn(input, target, *rest)
            from fusedopt.distributed import _dtensor_losses

            return _dtensor_losses.run(fn, target_kind, input, target, *rest)

        return loss

    return decorate


def rows_function(rows, default):
    """The autograd Function cross_entropy applies to its (M, C) rows: `default`, or for
    DTensor rows whose classes are split over the mesh the vocab-parallel one."""
    if not is_dtensor(rows):
        return default
    from fusedopt.distributed import _dtensor_losses

    return _dtensor_losses.cross_entropy_function(rows, default)
