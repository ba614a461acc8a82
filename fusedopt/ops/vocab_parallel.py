"""Vocab-parallel cross-entropy (logits split over the classes) as an autograd Function
over torch.library custom ops.

``fusedopt::vocab_parallel_cross_entropy_fwd`` runs on this rank's columns: the backend's
row statistics (``vocab_parallel_row_stats``), two all-reduces of O(rows) values over the
process group named ``group_name`` (c10d functional collectives) that ``_combine`` turns
into the row losses of the full rows (fp32, float64 for float64 logits; the same on every
rank) and per-row gradient coefficients, then the backend's gradient of the local columns
(``vocab_parallel_grad``).
``..._fwd_inplace`` writes that gradient into the logits.  Both have fake implementations.
``VocabParallelCrossEntropyFunction`` keeps the gradient; backward only rescales it in
place, as for the other losses.

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

_OP = "vocab_parallel_cross_entropy"


def _all_reduce(group_name: str):
    def reduce(t: Tensor, op: str) -> None:
        torch.ops._c10d_functional.all_reduce_(t, op, group_name)
        torch.ops._c10d_functional.wait_tensor(t)

    return reduce


def _combine(stats, target, weight, local_sum_w, scales, all_reduce, num_classes,
             ignore_index, label_smoothing, z_loss, soft_target):
    """The ranks' row statistics -> (row_loss (N,), gradient coefficients (N, 5)).

    Two all-reduces: the row max M, then (the exp-sums and the gap sums, both moved from
    each rank's max m_k to M, and the target logit).  A gap sum G_k = Σ w_j (m_k - x_j) moves
    to M by adding W_k (M - m_k), W_k = Σ w_j over the rank's columns (the soft targets'
    Σ r_j, else `local_sum_w`): every term stays >= 0, so nothing cancels.  Formulas:
    docs/architecture.md."""
    eps, n_classes = label_smoothing, num_classes
    row_max = stats[:, 0].clone()
    all_reduce(row_max, "max")
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)
    local_max = stats[:, 0]
    # no finite logit here: its gap terms are inf already.  A shard whose max skipped NaN
    # logits (the compiled kernels' max ignores them) has a NaN exp-sum: not empty, so the
    # NaN reaches the row's sums
    empty = (local_max == float("-inf")) & ~torch.isnan(stats[:, 1])
    rescaled = torch.where(empty, 0.0, stats[:, 1] * torch.exp(local_max - shift))
    lift = torch.where(empty, 0.0, row_max - local_max)
    if soft_target:
        columns = [rescaled, stats[:, 2] + stats[:, 3] * lift, stats[:, 3]]
    else:
        columns = [rescaled, stats[:, 2]]
        if eps > 0:
            columns.append(stats[:, 3] + local_sum_w * lift)
    sums = torch.stack(columns, dim=1)
    all_reduce(sums, "sum")
    log_sum = torch.log(sums[:, 0])
    lse = row_max + log_sum
    s_ce, s_z = scales[0], scales[1]
    if soft_target:
        sum_r = sums[:, 2]
        ce = log_sum * sum_r + sums[:, 1]
        a = s_ce * sum_r
        b = torch.zeros_like(lse)
        c = s_ce.expand_as(lse)
        valid = torch.ones_like(lse, dtype=torch.bool)
        bad = torch.zeros_like(valid)
    else:
        y = target.long()
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= n_classes))
        w_y = weight[y.clamp(0, n_classes - 1)] if weight is not None else torch.ones_like(lse)
        sum_w = weight.sum() if weight is not None else float(n_classes)
        ce = (1.0 - eps) * w_y * ((row_max - sums[:, 1]) + log_sum)
        a = (1.0 - eps) * w_y
        if eps > 0:
            ce = ce + (eps / n_classes) * (log_sum * sum_w + sums[:, 2])
            a = a + (eps / n_classes) * sum_w
        a = s_ce * a
        b = s_ce * (1.0 - eps) * w_y
        c = (s_ce * (eps / n_classes)).expand_as(lse)
    if z_loss:
        a = a + 2.0 * s_z * z_loss * lse
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    row_loss = torch.where(valid, s_ce * ce + s_z * z_loss * lse * lse, 0.0)
    row_loss = torch.where(bad, nan, row_loss)
    coefs = torch.stack([row_max, log_sum, torch.where(bad, nan, a), b, c], dim=1)
    return row_loss, coefs


def _run(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
         label_smoothing, z_loss, softcap, soft_target, need_grad, inplace, backend):
    impl = _common.backend_module(_OP, logits.device, backend, logits.dtype)
    if not soft_target:
        _common.check_class_targets(target, num_classes, ignore_index)
    if logits.shape[0] == 0:  # every rank of the group holds the same rows: all return here
        return logits.new_empty(0, dtype=_common.accumulation_dtype(logits.dtype)), None
    n_local = logits.shape[1]
    local_weight = None if weight is None else weight[class_offset:class_offset + n_local]
    shard = dict(class_offset=class_offset, num_classes=num_classes, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, softcap=softcap, soft_target=soft_target)
    stats = impl.vocab_parallel_row_stats(logits, target, local_weight, **shard)
    local_sum_w = local_weight.sum() if local_weight is not None else float(n_local)
    row_loss, coefs = _combine(stats, target, weight, local_sum_w, scales,
                               _all_reduce(group_name), num_classes, ignore_index,
                               label_smoothing, z_loss, soft_target)
    if not need_grad:
        return row_loss, None
    return row_loss, impl.vocab_parallel_grad(logits, target, local_weight, coefs,
                                              inplace=inplace, **shard)


@torch.library.custom_op("fusedopt::vocab_parallel_cross_entropy_fwd", mutates_args=())
def vocab_parallel_cross_entropy_fwd(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
        group_name: str, class_offset: int, num_classes: int, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: Optional[float], soft_target: bool,
        need_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(row_loss (N,) in the accumulation dtype (fp32; float64 for float64 logits), grad
    (N, C_local) in the logits' dtype, or (0,) without need_grad)."""
    row_loss, grad = _run(logits, target, weight, scales, group_name, class_offset,
                          num_classes, ignore_index, label_smoothing, z_loss, softcap,
                          soft_target, need_grad, False, backend)
    if grad is None:
        grad = logits.new_empty(logits.shape if need_grad else (0,))
    return row_loss, grad.contiguous()


@vocab_parallel_cross_entropy_fwd.register_fake
def _(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
      label_smoothing, z_loss, softcap, soft_target, need_grad, backend):
    row_loss = logits.new_empty(logits.shape[0], dtype=_common.accumulation_dtype(logits.dtype))
    return row_loss, logits.new_empty(logits.shape if need_grad else (0,))


@torch.library.custom_op("fusedopt::vocab_parallel_cross_entropy_fwd_inplace",
                         mutates_args=("logits",))
def vocab_parallel_cross_entropy_fwd_inplace(
        logits: Tensor, target: Tensor, weight: Optional[Tensor], scales: Tensor,
        group_name: str, class_offset: int, num_classes: int, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: Optional[float], soft_target: bool,
        backend: str) -> Tensor:
    """row_loss (N,) in the accumulation dtype; the gradient of the local columns overwrites
    `logits`."""
    row_loss, _ = _run(logits, target, weight, scales, group_name, class_offset, num_classes,
                       ignore_index, label_smoothing, z_loss, softcap, soft_target, True, True,
                       backend)
    return row_loss


@vocab_parallel_cross_entropy_fwd_inplace.register_fake
def _(logits, target, weight, scales, group_name, class_offset, num_classes, ignore_index,
      label_smoothing, z_loss, softcap, soft_target, backend):
    return logits.new_empty(logits.shape[0], dtype=_common.accumulation_dtype(logits.dtype))


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """(M, C_local) local logits -> row losses ('none') or their sum in the accumulation
    dtype, identical on every rank of the group; the gradient of the local columns is
    stored in forward.  A second backward (retain_graph=True) works; a differentiable one
    (create_graph=True) is refused: its formula would need collectives in backward."""

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
                          "cross_entropy", backend,
                          no_recompute="for vocab-parallel cross-entropy (logits split over "
                                       "the classes)")
        return row_loss if ctx.per_row else row_loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        return (_common.rescale(ctx, grad_output),) + (None,) * 15


def vocab_parallel_cross_entropy(input, target, group_name, class_offset, num_classes, weight,
                                 ignore_index, reduction, label_smoothing, z_loss, softcap,
                                 inplace_backward, backend):
    """The loss for validated arguments on plain local tensors (see
    fusedopt.distributed.vocab_parallel_cross_entropy)."""
    if _common.needs_formula(input):
        raise RuntimeError("vocab_parallel_cross_entropy does not run inside torch.func "
                           "transforms (grad, vmap, jacrev, jvp, ...) or with forward-mode AD "
                           "tangents")
    soft_target = target.is_floating_point()
    acc = _common.accumulation_dtype(input.dtype)
    logits = _common.as_rows(_common.to_rows(input))
    if soft_target:
        target_rows = _common.to_rows(target).to(input.dtype).contiguous()
    else:
        target_rows = target.reshape(-1).contiguous()
    weight_acc = weight.to(acc).contiguous() if weight is not None else None

    denominator = None
    if reduction == "mean":
        if soft_target:
            denominator = torch.full((), float(logits.shape[0]), dtype=acc, device=input.device)
            scales = _common.mean_scales(denominator, denominator, dtype=acc)
        else:
            denominator, n_valid = _common.class_mean_denominators(
                target_rows, weight_acc, ignore_index, num_classes, acc)
            scales = _common.mean_scales(denominator, n_valid, dtype=acc)
    else:
        scales = _common.unit_scales(input.device, acc)

    need_grad = input.requires_grad and torch.is_grad_enabled()
    out = VocabParallelCrossEntropyFunction.apply(
        logits, target_rows, weight_acc, scales, group_name, int(class_offset), int(num_classes),
        ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), soft_target, reduction, need_grad,
        bool(inplace_backward), backend or "")
    if reduction == "none":
        shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
        return out.reshape(shape).to(input.dtype)
    if denominator is not None:
        out = _common.nan_if_zero(out, denominator)
    return out.to(input.dtype)
