"""DTensor sharding rules of the loss custom ops (torch.distributed.tensor.experimental.
register_sharding), registered once, on the first DTensor a loss sees.

Each rule lists, for one mesh dimension, the placements under which the op runs on the
local tensors unchanged and what its outputs are; DTensor expands them over the mesh and
redistributes inputs that match none (e.g. class-sharded logits are gathered for the focal
losses; cross_entropy takes the vocab-parallel path before reaching its op).

* cross_entropy_fwd / focal_loss_fwd: rows split (Shard(0) of logits, targets, row losses,
  gradient) or everything replicated; class vectors and scales replicated.  The scales hold
  the global 'mean' denominators, computed by the public layer with DTensor ops.
* cross_entropy_fwd_inplace: the same, restricted to the logits' current placements (an
  in-place op must not run on a redistributed copy of the tensor it overwrites).
* sigmoid_focal_loss_fwd: elementwise, any Shard(d) or replicated; the reduced loss of a
  split tensor is Partial (each rank's sum, already scaled by 1/numel of the whole tensor).
* scale_grad_: the gradient keeps its placement; grad_output is replicated, or split like
  the gradient where it is not broadcast.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_registered = False


def _first_plain_argument(op) -> int:
    for index, argument in enumerate(op._schema.arguments):
        kind = argument.type
        if isinstance(kind, torch.OptionalType):
            kind = kind.getElementType()
        if not isinstance(kind, torch.TensorType):
            return index
    return len(op._schema.arguments)


def _register(op, rule) -> None:
    """register_sharding(op)(rule), with every non-tensor argument in the sharding cache key.

    register_sharding keys its cache on the arguments from the first int one on; flags such
    as need_grad or reduce come before any int in some of our ops and change the output
    shapes, so a cached result of another call could be reused.  The key is widened to start
    at the first non-tensor argument; an op whose key cannot be widened is not registered
    (DTensor then refuses it instead of risking a wrong result)."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    register_sharding(op)(rule)
    info = getattr(propagator, "op_to_schema_info", {}).get(op)
    if info is None or not hasattr(info, "static_argnum"):
        propagator.op_strategy_funcs.pop(op, None)
        return
    info.static_argnum = _first_plain_argument(op)


def _rows_rule(n_class_vectors: int):
    """Rule of an op (logits, target, class vectors..., scales, flags...) -> (row_loss, grad)."""

    def rule(logits, target, *rest):
        vectors = rest[:n_class_vectors]
        need_grad = rest[-2]
        flags = [None] * (len(rest) - n_class_vectors - 1)
        vector_placement = [None if v is None else Replicate() for v in vectors]
        replicate = ([Replicate(), Replicate()],
                     [Replicate(), Replicate()] + vector_placement + [Replicate()] + flags)
        rows = ([Shard(0), Shard(0) if need_grad else Replicate()],
                [Shard(0), Shard(0)] + vector_placement + [Replicate()] + flags)
        return [replicate, rows]

    return rule


def _inplace_rule(logits, target, weight, scales, *flags):
    """Only the logits' own placements (per mesh dim: Shard(0) or Replicate)."""
    weight_placement = [None if weight is None else Replicate()]
    options = []
    for placement in set(logits.placements):
        if placement == Shard(0):
            options.append(([Shard(0)], [Shard(0), Shard(0)] + weight_placement
                            + [Replicate()] + [None] * len(flags)))
        elif placement == Replicate():
            options.append(([Replicate()], [Replicate(), Replicate()] + weight_placement
                            + [Replicate()] + [None] * len(flags)))
    return options


def _sigmoid_focal_rule(logits, target, scales, alpha, gamma, label_smoothing, reduce,
                        need_grad, backend):
    flags = [None] * 6
    options = [([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate()] + flags)]
    for dim in range(len(logits.shape)):
        loss = Partial() if reduce else Shard(dim)
        grad = Shard(dim) if need_grad else Replicate()
        options.append(([loss, grad], [Shard(dim), Shard(dim), Replicate()] + flags))
    return options


def _scale_grad_rule(grad, grad_output, op, backend):
    flags = [None, None]
    options = [([], [Replicate(), Replicate()] + flags)]
    grad_shape, out_shape = tuple(grad.shape), tuple(grad_output.shape)
    for dim in range(len(grad_shape)):
        if len(out_shape) == 0 or out_shape[dim] == 1:
            options.append(([], [Shard(dim), Replicate()] + flags))
        elif len(out_shape) == len(grad_shape):
            options.append(([], [Shard(dim), Shard(dim)] + flags))
    return options


def register() -> None:
    """Register the rules (idempotent)."""
    global _registered
    if _registered:
        return
    ops = torch.ops.fusedopt
    _register(ops.cross_entropy_fwd.default, _rows_rule(1))
    _register(ops.focal_loss_fwd.default, _rows_rule(1))
    _register(ops.cross_entropy_fwd_inplace.default, _inplace_rule)
    _register(ops.sigmoid_focal_loss_fwd.default, _sigmoid_focal_rule)
    _register(ops.scale_grad_.default, _scale_grad_rule)
    _registered = True
