"""Losses on DTensor inputs (docs/distributed.md).

``run`` is where an ops-layer loss goes when its input is a DTensor (fusedopt.ops._dtensor):
it registers the sharding rules of the custom ops, turns plain ``target`` / ``weight`` /
``alpha`` tensors into replicated DTensors (a plain target only where it is replicated
anyway: with rows split over the mesh a plain tensor is ambiguous), runs the range check of
class targets over the whole target so that every rank raises together, and runs the loss
unchanged on the DTensors.  Device tensors the loss builds itself (scales, denominators)
are the same on every rank and join the DTensors as replicated ones.

The custom ops then run on the local tensors under their sharding rules (fusedopt.
distributed._sharding): rows split over the mesh, or replicated.  Cross-entropy logits whose
classes are split over one mesh dim take the vocab-parallel path instead
(``cross_entropy_function``): the local logits go to VocabParallelCrossEntropyFunction with
that mesh dim's process group, so only O(rows) values are communicated.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.experimental import implicit_replication

from fusedopt.distributed import _sharding
from fusedopt.ops import _common, vocab_parallel


@functools.cache
def _parameters(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _replicated(tensor, mesh):
    if isinstance(tensor, torch.Tensor) and not isinstance(tensor, DTensor):
        return DTensor.from_local(tensor, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return tensor


def _plain_target(input, target, class_dim):
    """A plain target as a replicated DTensor, where the input's rows are not split."""
    split = [p for p in input.placements if p.is_shard() and p.dim != class_dim]
    if split:
        raise ValueError(
            f"target: a plain tensor is ambiguous for an input sharded as {input.placements} "
            f"(its rows are split over the mesh); pass the target as a DTensor with the same "
            f"split of the rows (DTensor.from_local or distribute_tensor)")
    return _replicated(target, input.device_mesh)


def _check_class_targets(target, n_classes, ignore_index):
    """IndexError on every rank for a class target outside [0, C) on any rank (CPU tensors,
    or FUSEDOPT_CHECK=1; one all-reduce of a flag, where the op's own check would raise on
    the offending rank only and leave the others waiting in a collective)."""
    if target.device.type != "cpu" and os.environ.get("FUSEDOPT_CHECK", "0") != "1":
        return
    y = target.long()
    bad = ((y != ignore_index) & ((y < 0) | (y >= n_classes))).any()
    if bool(bad.full_tensor()):
        _common.check_class_targets(target.full_tensor(), n_classes, ignore_index)


def _each_rank_has_rows(placements, n_rows, mesh) -> bool:
    shards = [mesh.size(d) for d, p in enumerate(placements) if p == Shard(0)]
    return n_rows >= max(1, torch.Size(shards).numel())


def _inplace_ready(input):
    """2-D logits that cross_entropy_fwd_inplace can overwrite where they are: placements
    Shard(0) / Replicate (or the vocab-parallel split).  Anything else is redistributed
    first, and the copy is overwritten (as for the layouts copied on one device)."""
    if input.dim() != 2 or vocab_mesh_dim(input) is not None:
        return input
    keep = [p if p == Replicate() or (p == Shard(0) and _each_rank_has_rows(
        input.placements, input.shape[0], input.device_mesh)) else Replicate()
        for p in input.placements]
    if tuple(keep) == tuple(input.placements):
        return input
    return input.redistribute(input.device_mesh, keep)


def run(fn, target_kind, input, target, *rest):
    """fn(input, target, *rest) for a DTensor input (see the module docstring)."""
    _sharding.register()
    args = dict(zip(_parameters(fn), (input, target) + rest))
    mesh = input.device_mesh
    class_dim = 1 if input.dim() >= 2 else 0
    if not isinstance(target, DTensor):
        target = _plain_target(input, target, class_dim if target_kind == "class" else None)
    for name in ("weight", "alpha"):
        if name in args:
            args[name] = _replicated(args[name], mesh)
    if target_kind == "class" and not target.is_floating_point():
        _check_class_targets(target, input.shape[class_dim], args["ignore_index"])
    if args.get("inplace_backward"):
        input = _inplace_ready(input)
    args["input"], args["target"] = input, target
    with implicit_replication():
        return fn(**args)


def vocab_mesh_dim(rows):
    """The mesh dim that splits the classes of (M, C) DTensor rows when the vocab-parallel
    path applies (exactly one mesh dim with Shard(1), every other one Shard(0) or
    Replicate), else None."""
    if rows.dim() != 2:
        return None
    class_dims = [d for d, p in enumerate(rows.placements) if p.is_shard(1)]
    if len(class_dims) != 1 or type(rows.placements[class_dims[0]]) is not Shard:
        return None
    others_ok = all(p == Shard(0) or p == Replicate()
                    for d, p in enumerate(rows.placements) if d != class_dims[0])
    return class_dims[0] if others_ok else None


def cross_entropy_function(logits, default):
    """The autograd Function cross_entropy applies to its (M, C) rows: `default`, or the
    vocab-parallel one when the classes are split over a mesh dim."""
    mesh_dim = vocab_mesh_dim(logits)
    return default if mesh_dim is None else _VocabParallelRows(mesh_dim)


class _VocabParallelRows:
    """CrossEntropyFunction's `apply` for class-split DTensor rows: local shards through
    VocabParallelCrossEntropyFunction, the result wrapped back into a DTensor (row losses
    replicated over the class split, split like the rows elsewhere; a sum is Partial where
    the rows are split)."""

    def __init__(self, mesh_dim: int):
        self.mesh_dim = mesh_dim

    def apply(self, logits, target, weight, scales, ignore_index, label_smoothing, z_loss,
              softcap, soft_target, reduction, need_grad, inplace, backend, recompute=None):
        mesh, placements, tp = logits.device_mesh, logits.placements, self.mesh_dim
        row_placements = [Replicate() if d == tp else p for d, p in enumerate(placements)]
        target = _replicated(target, mesh).redistribute(
            mesh, placements if soft_target else row_placements)
        local_weight = _replicated(weight, mesh).full_tensor() if weight is not None else None
        local_scales = _replicated(scales, mesh).full_tensor()
        _, offsets = compute_local_shape_and_global_offset(logits.shape, mesh, placements)
        out = vocab_parallel.VocabParallelCrossEntropyFunction.apply(
            _common.as_rows(logits.to_local()), target.to_local().contiguous(), local_weight,
            local_scales, mesh.get_group(tp).group_name, offsets[1], logits.shape[1],
            ignore_index, label_smoothing, z_loss, softcap, soft_target, reduction, need_grad,
            inplace, backend)
        if reduction == "none":
            return DTensor.from_local(out, mesh, row_placements, run_check=False,
                                      shape=logits.shape[:1], stride=(1,))
        sum_placements = [Partial() if p == Shard(0) else Replicate() for p in row_placements]
        return DTensor.from_local(out, mesh, sum_placements, run_check=False, shape=(),
                                  stride=())
