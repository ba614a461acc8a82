"""Public vocab-parallel cross-entropy on plain local shards: argument checks, then
fusedopt.ops.vocab_parallel."""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from fusedopt import functional as _checks
from fusedopt.backends._loss_boundary import SOFTCAP_MAX, SOFTCAP_MIN
from fusedopt.backends._plain import shown
from fusedopt.ops import _dtensor, vocab_parallel as _op

__all__ = ["vocab_parallel_cross_entropy"]


def _group_name(group) -> tuple[str, int, int]:
    """(name, rank, size) of the process group `group` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed: call "
                           "torch.distributed.init_process_group first")
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this rank is not a member of the process group")
    return group.group_name, rank, dist.get_world_size(group)


def _class_range(n_local, rank, size, class_offset, num_classes) -> tuple[int, int]:
    """(class_offset, num_classes) of this rank's shard: given, or an even split."""
    if class_offset is None and num_classes is None:
        return rank * n_local, size * n_local
    if class_offset is None or num_classes is None:
        raise ValueError(f"class_offset and num_classes go together (an uneven split needs "
                         f"both), got class_offset={shown(class_offset)}, "
                         f"num_classes={shown(num_classes)}")
    for name, value in (("class_offset", class_offset), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {shown(value)}")
    if class_offset < 0 or class_offset + n_local > num_classes:
        raise ValueError(f"this rank's classes [class_offset, class_offset + C_local) = "
                         f"[{class_offset}, {class_offset + n_local}) must lie in "
                         f"[0, num_classes) = [0, {num_classes})")
    return int(class_offset), int(num_classes)


def vocab_parallel_cross_entropy(local_logits, target, group=None, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                                 z_loss=0.0, softcap=None, class_offset=None, num_classes=None,
                                 inplace_backward=False, backend=None):
    """Cross-entropy of logits whose classes are split over the ranks of `group`.

    Every rank passes its own columns of the same rows: `local_logits` is `(N, C_local)`,
    `(C_local,)` or `(N, C_local, d1..dk)`, holding the classes
    `[class_offset, class_offset + C_local)` of `num_classes` (by default an even split in
    rank order: `class_offset = rank * C_local`, `num_classes = world_size * C_local`).
    `target` is the same on every rank: global class indices (`(N,)` / `(N, d1..dk)`), or
    this rank's columns of probability targets (`local_logits`' shape).  `weight` is the
    full `(C,)` class-weight vector, the same on every rank.  The other arguments are those
    of `fusedopt.cross_entropy`.

    Returns the loss of the full logits, identical on every rank (as
    `F.cross_entropy(full_logits, target, ...)`); backward gives each rank the gradient of
    its own columns.  Communication: two all-reduces of O(N) fp32 values over `group`."""
    if _dtensor.is_dtensor(local_logits):
        raise TypeError("local_logits must be this rank's plain tensor, not a DTensor; "
                        "fusedopt.cross_entropy takes DTensor logits split over the classes")
    _checks._check_common(reduction, label_smoothing, backend)
    soft_target = _checks._check_classes(local_logits, target, ignore_index, allow_soft=True)
    _checks._check_backend_dtype("vocab_parallel_cross_entropy", local_logits, backend)
    if soft_target and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("target: probability targets that require grad are not supported "
                         "(no gradient flows to the target); pass target.detach()")
    name, rank, size = _group_name(group)
    n_local = local_logits.shape[1] if local_logits.dim() >= 2 else local_logits.shape[0]
    class_offset, num_classes = _class_range(n_local, rank, size, class_offset, num_classes)
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor or None, got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if weight.shape != (num_classes,):
            raise ValueError(f"weight must hold every class: shape ({num_classes},), got "
                             f"{tuple(weight.shape)}")
        _checks._check_same_device(local_logits, "weight", weight)
        _checks._check_memory("weight", weight)
    _checks._check_number("z_loss", z_loss, low=0.0)
    if not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be finite, got {shown(z_loss)}")
    _checks._check_fp32_range("z_loss", z_loss, 0.0, _checks._FP32.max)
    if softcap is not None:
        _checks._check_number("softcap", softcap, low=0.0, low_open=True)
        if not math.isfinite(float(softcap)):
            raise ValueError(f"softcap must be finite or None, got {shown(softcap)}")
        _checks._check_fp32_range("softcap", softcap, SOFTCAP_MIN, SOFTCAP_MAX)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {shown(inplace_backward)}")
    return _op.vocab_parallel_cross_entropy(
        local_logits, target, name, class_offset, num_classes, weight, int(ignore_index),
        reduction, label_smoothing, z_loss, softcap, inplace_backward, backend)
