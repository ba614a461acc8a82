"""Vocab-parallel cross-entropy (logits split over the classes) as an autograd Function
over torch.library custom ops.

``fusedopt::vocab_parallel_cross_entropy_fwd`` runs the backend's forward on this rank's
columns: two all-reduces of O(rows) values over the process group named ``group_name``
(the c10d functional collectives, so the op also runs inside ``torch.compile``), then the
fp32 row losses of the full rows (the same on every rank) and the gradient of the local
columns.  ``..._fwd_inplace`` writes that gradient into the logits.  Both have fake
implementations.  ``VocabParallelCrossEntropyFunction`` keeps the gradient; backward only
rescales it in place, as for the other losses.

``vocab_parallel_cross_entropy`` below is the loss for validated arguments
(``fusedopt.distributed.vocab_parallel_cross_entropy`` checks them): layout, device-side
scales computed from the targets (identical on every rank, so no communication) and the
final reduction.  The DTensor path (``fusedopt.distributed._dtensor_losses``) applies the
Function to the local shards with scales it computed on the global tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fusedopt.ops import _common

_F32 = torch.float32
_OP = "vocab_parallel_cross_entropy"


def _all_reduce(group_name: str):
    def reduce(t: Tensor, op: str) -> None:
        torch.ops._c10d_functional.all_reduce_(t, op, group_name)
        torch.ops._c10d_functional.wait_tensor(t)

    return reduce


def _run(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
         label_smoothing, z_loss, softcap, soft_target, need_grad, inplace, backend):
    impl = _common.backend_module(_OP, logits.device, backend)
    if not soft_target:
        _common.check_class_targets(target, num_classes, ignore_index)
    if logits.shape[0] == 0:  # every rank of the group holds the same rows: all return here
        return logits.new_empty(0, dtype=_F32), None
    return impl.vocab_parallel_cross_entropy_fwd(
        logits, target, weight, scales, _all_reduce(group_name), class_offset=class_offset,
        num_classes=num_classes, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, soft_target=soft_target, inplace=inplace,
        need_grad=need_grad)


@torch.library.custom_op("fusedopt::vocab_parallel_cross_entropy_fwd", mutates_args=())
def vocab_parallel_cross_entropy_fwd(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
        group_name: str, class_offset: int, num_classes: int, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: Optional[float], soft_target: bool,
        need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(row_loss fp32 (N,), grad (N, C_local) in the logits' dtype, or (0,) without need_grad)."""
    row_loss, grad = _run(logits, target, weight, scales, group_name, class_offset,
                          num_classes, ignore_index, label_smoothing, z_loss, softcap,
                          soft_target, need_grad, False, backend)
    if grad is None:
        grad = logits.new_empty(logits.shape if need_grad else (0,))
    return row_loss, grad.contiguous()


@vocab_parallel_cross_entropy_fwd.register_fake
def _(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
      label_smoothing, z_loss, softcap, soft_target, need_grad, backend):
    row_loss = logits.new_empty(logits.shape[0], dtype=_F32)
    return row_loss, logits.new_empty(logits.shape if need_grad else (0,))


@torch.library.custom_op("fusedopt::vocab_parallel_cross_entropy_fwd_inplace",
                         mutates_args=("logits",))
def vocab_parallel_cross_entropy_fwd_inplace(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
        group_name: str, class_offset: int, num_classes: int, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: Optional[float], soft_target: bool,
        backend: str) -> Tensor:
    """row_loss fp32 (N,); the gradient of the local columns overwrites `logits`."""
    row_loss, _ = _run(logits, target, weight, scales, group_name, class_offset, num_classes,
                       ignore_index, label_smoothing, z_loss, softcap, soft_target, True, True,
                       backend)
    return row_loss


@vocab_parallel_cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
      label_smoothing, z_loss, softcap, soft_target, backend):
    return logits.new_empty(logits.shape[0], dtype=_F32)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """(M, C_local) local logits -> fp32 row losses ('none') or their sum, identical on every
    rank of the group; the gradient of the local columns is stored in forward."""

    @staticmethod
    def forward(ctx, logits, target, weight, scales, group_name, class_offset, num_classes,
                ignore_index, label_smoothing, z_loss, softcap, soft_target, reduction,
                need_grad, inplace, backend):
        args = (target, weight, scales, group_name, class_offset, num_classes, ignore_index,
                label_smoothing, z_loss, softcap, soft_target)
        if need_grad and inplace:
            row_loss = torch.ops.fusedopt.vocab_parallel_cross_entropy_fwd_inplace(
                logits, *args, backend)
            # (an alias that is no autograd view: the local shard of a DTensor is the output
            # of DTensor's to_local, and autograd refuses views of it modified in place)
            grad = logits.detach()
        else:
            row_loss, grad = torch.ops.fusedopt.vocab_parallel_cross_entropy_fwd(
                logits, *args, need_grad, backend)
        # backward's in-place rescale is the cross-entropy one (scale_grad_ of the backend)
        _common.keep_grad(ctx, grad if need_grad else None, reduction == "none",
                          "cross_entropy", backend)
        return row_loss if ctx.per_row else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 15


def vocab_parallel_cross_entropy(input, target, group_name, class_offset, num_classes, weight,
                                 ignore_index, reduction, label_smoothing, z_loss, softcap,
                                 inplace_backward, backend):
    """The loss for validated arguments on plain local tensors (see
    fusedopt.distributed.vocab_parallel_cross_entropy)."""
    soft_target = target.is_floating_point()
    logits = _common.as_rows(_common.to_rows(input))
    if soft_target:
        target_rows = _common.to_rows(target).to(input.dtype).contiguous()
    else:
        target_rows = target.reshape(-1).contiguous()
    weight32 = weight.to(_F32).contiguous() if weight is not None else None

    denominator = None
    if reduction == "mean":
        if soft_target:
            denominator = torch.full((), float(logits.shape[0]), dtype=_F32, device=input.device)
            scales = _common.mean_scales(denominator, denominator)
        else:
            denominator, n_valid = _common.class_mean_denominators(
                target_rows, weight32, ignore_index, num_classes)
            scales = _common.mean_scales(denominator, n_valid)
    else:
        scales = _common.unit_scales(input.device)

    need_grad = input.requires_grad and torch.is_grad_enabled()
    out = VocabParallelCrossEntropyFunction.apply(
        logits, target_rows, weight32, scales, group_name, int(class_offset), int(num_classes),
        ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), soft_target, reduction, need_grad,
        bool(inplace_backward), backend or "")
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
        return out.reshape(shape).to(input.dtype)
    if denominator is not None:
        out = _common.nan_if_zero(out, denominator)
    return out.to(input.dtype)
