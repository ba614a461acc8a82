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
STATS_WIDTH = 4  # kVocabStatsWidth (the coefficients' width, 5, is checked by vocab_shard)


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

    def _common_args(self, op, logits, target, weight, coefs, class_offset, num_classes,
                     ignore_index, label_smoothing, softcap, soft_target, option) -> dict:
        """The arguments both kernels take, every tensor verified (the loss boundary's
        `vocab_shard`, as for the Triton kernels)."""
        shard = boundary.vocab_shard(
            op, logits, target, weight, coefs, class_offset=class_offset,
            num_classes=num_classes, ignore_index=ignore_index,
            label_smoothing=label_smoothing, softcap=softcap, soft_target=soft_target,
            device_types=self.device_types)
        return {
            "logits": logits.data_ptr(), "logits_row_stride": shard.row_stride,
            "target": target.data_ptr(), "target_row_stride": shard.target_stride,
            "weight": 0 if weight is None else weight.data_ptr(), "n_rows": shard.n_rows,
            "n_cols": shard.n_cols, "class_offset": shard.class_offset,
            "num_classes": shard.num_classes, "ignore_index": shard.ignore_index,
            "dtype": dtype_code(logits.dtype),
            "index_type": 0 if soft_target else INDEX_CODES[target.dtype],
            "label_smoothing": shard.label_smoothing,
            "softcap": 0.0 if shard.softcap is None else shard.softcap,
            "soft_target": bool(soft_target), self.extra_name: self.extra(logits, option)}

    def row_stats(self, logits, target, weight, *, class_offset, num_classes, ignore_index,
                  label_smoothing, softcap, soft_target, option=None):
        """(N, 4) fp32 row statistics of this rank's columns."""
        args = self._common_args("vocab_parallel_row_stats", logits, target, weight, None,
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
        if coefs is None:
            raise TypeError(f"{op}: coefs must be a tensor, got None")
        args = self._common_args(op, logits, target, weight, coefs, class_offset, num_classes,
                                 ignore_index, label_smoothing, softcap, soft_target, option)
        n_rows, n_cols = logits.shape
        grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype,
                                                  device=logits.device)
        if n_rows == 0 or n_cols == 0:
            return grad
        grad_stride = args["logits_row_stride"] if inplace else n_cols
        self.check(self.ext.vocab_parallel_grad(coefs=coefs.data_ptr(), grad=grad.data_ptr(),
                                                grad_row_stride=grad_stride, **args),
                   "vocab_parallel_grad")
        return grad
