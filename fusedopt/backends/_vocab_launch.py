"""Vocab-parallel cross-entropy launcher shared by the compiled backends (`cpu`:
fusedopt._cpu, `cuda`: fusedopt._cuda); contracts: docs/architecture.md, "Vocab-parallel
cross-entropy".

Both modules bind the same two functions (csrc/bindings/vocab_parallel_bindings.h):
tensors become addresses, element strides and dtype codes, and the last argument is the
backend's own (`num_threads` on cpu, the current stream on cuda).  Nothing here reads a
tensor's values and nothing synchronises.

This is where the vocab-parallel tensors become raw pointers, so every tensor is first
verified with the loss kernel boundary's checks (fusedopt/backends/_loss_boundary.py,
docs/losses.md: exact ``torch.Tensor``/``nn.Parameter`` type, strided layout, device,
storage extent, dtype, shape, the strides the kernels walk).  A rank may hold no columns:
its (N, 0) logits are checked as tensors, and no kernel runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedopt.backends import _loss_boundary as boundary
from fusedopt.backends._loss_launch import INDEX_CODES
from fusedopt.backends._ptr import dtype_code

_F32 = torch.float32
STATS_WIDTH, COEFS_WIDTH = 4, 5  # kVocabStatsWidth, kVocabCoefsWidth


def _row_stride(op: str, name: str, t: torch.Tensor) -> int:
    """The row stride to pass for rows of contiguous values; any layout of no columns."""
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be (N, C_local), got shape {tuple(t.shape)}")
    return boundary.row_layout(op, name, t) if t.shape[1] > 0 else 0


class VocabParallelLauncher:
    """The two vocab-parallel entry points over one compiled module.

    ``device_type`` ("cpu" or "cuda") is where the module's kernels run: every tensor of a
    call must be on the logits' device, one of that type.  ``extra_name`` is the name of
    the module's last argument and ``extra(tensor, option)`` its value for a call on
    ``tensor`` (``option``: the entry point's backend-specific keyword, e.g.
    ``num_threads``); ``check(status, name)`` raises for a non-zero status."""

    def __init__(self, ext, device_type: str, extra_name: str, extra: Callable,
                 check: Callable):
        self.ext = ext
        self.device_types = (device_type,)
        self.extra_name = extra_name
        self.extra = extra
        self.check = check

    def _common_args(self, op, logits, target, weight, class_offset, num_classes,
                     ignore_index, label_smoothing, softcap, soft_target, option) -> dict:
        """The arguments both kernels take, every tensor verified."""
        boundary.plain_tensor(op, "logits", logits, device_types=self.device_types)
        if logits.dtype not in boundary.LOGIT_DTYPES:
            raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got "
                            f"{logits.dtype}")
        row_stride = _row_stride(op, "logits", logits)
        n_rows, n_cols = logits.shape
        device = logits.device
        if soft_target:
            boundary.plain_tensor(op, "target", target, device)
            if target.dtype != logits.dtype or target.shape != logits.shape:
                raise ValueError(f"{op}: soft targets must have the logits' shape and dtype "
                                 f"{logits.dtype} {tuple(logits.shape)}, got {target.dtype} "
                                 f"{tuple(target.shape)}")
            index_code, target_stride = 0, _row_stride(op, "target", target)
        else:
            boundary.class_targets(op, target, n_rows, device)
            index_code, target_stride = INDEX_CODES[target.dtype], 0
        boundary.class_vector(op, "weight", weight, n_cols, device)
        if not 0 <= class_offset <= num_classes - n_cols or num_classes > boundary.INT64_MAX:
            raise ValueError(f"{op}: the local classes [{class_offset}, "
                             f"{class_offset + n_cols}) must lie in [0, {num_classes})")
        softcap = boundary.softcap(op, softcap)
        return {
            "logits": logits.data_ptr(), "logits_row_stride": row_stride,
            "target": target.data_ptr(), "target_row_stride": target_stride,
            "weight": 0 if weight is None else weight.data_ptr(), "n_rows": n_rows,
            "n_cols": n_cols, "class_offset": int(class_offset),
            "num_classes": int(num_classes),
            "ignore_index": boundary.ignore_index(op, ignore_index),
            "dtype": dtype_code(logits.dtype), "index_type": index_code,
            "label_smoothing": boundary.fp32_finite(op, "label_smoothing", label_smoothing),
            "softcap": 0.0 if softcap is None else softcap, "soft_target": bool(soft_target),
            self.extra_name: self.extra(logits, option)}

    def row_stats(self, logits, target, weight, *, class_offset, num_classes, ignore_index,
                  label_smoothing, softcap, soft_target, option=None):
        """(N, 4) fp32 row statistics of this rank's columns."""
        args = self._common_args("vocab_parallel_row_stats", logits, target, weight,
                                 class_offset, num_classes, ignore_index, label_smoothing,
                                 softcap, soft_target, option)
        n_rows, n_cols = logits.shape
        if n_rows == 0 or n_cols == 0:  # a rank without columns: (-inf, 0, 0, 0)
            stats = torch.zeros(n_rows, STATS_WIDTH, dtype=_F32, device=logits.device)
            stats[:, 0] = float("-inf")
            return stats
        # the kernel writes all four values of every row
        stats = torch.empty(n_rows, STATS_WIDTH, dtype=_F32, device=logits.device)
        self.check(self.ext.vocab_parallel_row_stats(stats=stats.data_ptr(), **args),
                   "vocab_parallel_row_stats")
        return stats

    def grad(self, logits, target, weight, coefs, *, class_offset, num_classes,
             ignore_index, label_smoothing, softcap, soft_target, inplace, option=None):
        """The gradient of this rank's columns from the combined coefficients (N, 5):
        written into the logits (and returned as them) with ``inplace``."""
        op = "vocab_parallel_grad"
        args = self._common_args(op, logits, target, weight, class_offset, num_classes,
                                 ignore_index, label_smoothing, softcap, soft_target, option)
        n_rows, n_cols = logits.shape
        boundary.plain_tensor(op, "coefs", coefs, logits.device)
        if coefs.dtype != _F32 or coefs.shape != (n_rows, COEFS_WIDTH) or \
                not coefs.is_contiguous():
            raise ValueError(f"{op}: coefs must be contiguous fp32 ({n_rows}, {COEFS_WIDTH}), "
                             f"got {coefs.dtype} {tuple(coefs.shape)}")
        grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype,
                                                  device=logits.device)
        if n_rows == 0 or n_cols == 0:
            return grad
        grad_stride = args["logits_row_stride"] if inplace else n_cols
        self.check(self.ext.vocab_parallel_grad(coefs=coefs.data_ptr(), grad=grad.data_ptr(),
                                                grad_row_stride=grad_stride, **args),
                   "vocab_parallel_grad")
        return grad
