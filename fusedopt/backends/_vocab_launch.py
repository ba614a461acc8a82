"""Vocab-parallel cross-entropy launcher shared by the compiled backends (`cpu`:
fusedopt._cpu, `cuda`: fusedopt._cuda); contracts: docs/architecture.md, "Vocab-parallel
cross-entropy".

Both modules bind the same two functions (csrc/bindings/vocab_parallel_bindings.h):
tensors become addresses, element strides and dtype codes, and the last argument is the
backend's own (`num_threads` on cpu, the current stream on cuda).  This is the kernel
boundary: every tensor is checked here -- exact ``torch.Tensor`` type, device, dtype,
shape and the strides the kernels walk -- before its address is taken.  Nothing here reads
a tensor's values and nothing synchronises.  An ``nn.Parameter`` is a plain tensor with a
flag and is accepted; any other subclass (DTensor, FakeTensor, wrappers whose data pointer is
not their data) is refused.
"""

from __future__ import annotations

from typing import Callable

import torch

from fusedopt.backends._loss_launch import INDEX_CODES
from fusedopt.backends._ptr import dtype_code

_F32 = torch.float32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
STATS_WIDTH, COEFS_WIDTH = 4, 5  # kVocabStatsWidth, kVocabCoefsWidth


def _rows(name: str, t: torch.Tensor, n_rows: int, n_cols: int) -> None:
    if t.shape != (n_rows, n_cols) or t.stride(1) != 1 or (
            n_rows > 1 and t.stride(0) < n_cols):
        raise ValueError(f"{name} must be ({n_rows}, {n_cols}) with stride(1) == 1 and "
                         f"stride(0) >= {n_cols}, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


class VocabParallelLauncher:
    """The two vocab-parallel entry points over one compiled module.

    ``device_type`` ("cpu" or "cuda") is where the module's kernels run: every tensor of a
    call must be a plain tensor on the logits' device.  ``extra_name`` is the name of the
    module's last argument and ``extra(tensor, option)`` its value for a call on ``tensor``
    (``option``: the entry point's backend-specific keyword, e.g. ``num_threads``);
    ``check(status, name)`` raises for a non-zero status."""

    def __init__(self, ext, device_type: str, extra_name: str, extra: Callable,
                 check: Callable):
        self.ext = ext
        self.device_type = device_type
        self.extra_name = extra_name
        self.extra = extra
        self.check = check

    def _plain(self, name: str, t, device: torch.device | None = None) -> None:
        where = "CPU" if self.device_type == "cpu" else "CUDA"
        if type(t) not in _PLAIN_TYPES or t.device.type != self.device_type:
            raise TypeError(f"{name} must be a plain {where} torch.Tensor, got "
                            f"{type(t).__name__} on {getattr(t, 'device', '?')}")
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the logits' "
                             f"device)")

    def _common_args(self, logits, target, weight, class_offset, num_classes, ignore_index,
                     label_smoothing, softcap, soft_target, option) -> dict:
        """The arguments both kernels take, every tensor checked."""
        self._plain("logits", logits)
        if logits.dtype not in _DTYPES:
            raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
        if logits.dim() != 2:
            raise ValueError(f"logits must be (N, C_local), got shape {tuple(logits.shape)}")
        n_rows, n_cols = logits.shape
        _rows("logits", logits, n_rows, n_cols)
        self._plain("target", target, logits.device)
        if soft_target:
            if target.dtype != logits.dtype:
                raise TypeError(f"soft targets must have the logits' dtype {logits.dtype}, "
                                f"got {target.dtype}")
            _rows("soft targets", target, n_rows, n_cols)
            index_code, target_stride = 0, target.stride(0)
        else:
            if target.dtype not in INDEX_CODES:
                raise TypeError(f"class targets must be int64, int32 or uint8, got "
                                f"{target.dtype}")
            if target.shape != (n_rows,) or not target.is_contiguous():
                raise ValueError(f"class targets must be contiguous of shape ({n_rows},), "
                                 f"got {tuple(target.shape)}")
            index_code, target_stride = INDEX_CODES[target.dtype], 0
        if weight is not None:
            self._plain("weight", weight, logits.device)
            if weight.dtype != _F32 or weight.shape != (n_cols,) or not weight.is_contiguous():
                raise ValueError(f"weight must be this rank's contiguous fp32 ({n_cols},) "
                                 f"slice, got {weight.dtype} {tuple(weight.shape)}")
        if not 0 <= class_offset <= num_classes - n_cols:
            raise ValueError(f"the local classes [{class_offset}, {class_offset + n_cols}) "
                             f"must lie in [0, {num_classes})")
        return {
            "logits": logits.data_ptr(), "logits_row_stride": logits.stride(0),
            "target": target.data_ptr(), "target_row_stride": target_stride,
            "weight": 0 if weight is None else weight.data_ptr(), "n_rows": n_rows,
            "n_cols": n_cols, "class_offset": int(class_offset),
            "num_classes": int(num_classes), "ignore_index": int(ignore_index),
            "dtype": dtype_code(logits.dtype), "index_type": index_code,
            "label_smoothing": float(label_smoothing),
            "softcap": float(softcap) if softcap is not None else 0.0,
            "soft_target": bool(soft_target), self.extra_name: self.extra(logits, option)}

    def row_stats(self, logits, target, weight, *, class_offset, num_classes, ignore_index,
                  label_smoothing, softcap, soft_target, option=None):
        """(N, 4) fp32 row statistics of this rank's columns."""
        args = self._common_args(logits, target, weight, class_offset, num_classes,
                                 ignore_index, label_smoothing, softcap, soft_target, option)
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
        args = self._common_args(logits, target, weight, class_offset, num_classes,
                                 ignore_index, label_smoothing, softcap, soft_target, option)
        n_rows, n_cols = logits.shape
        self._plain("coefs", coefs, logits.device)
        if coefs.dtype != _F32 or coefs.shape != (n_rows, COEFS_WIDTH) or \
                not coefs.is_contiguous():
            raise ValueError(f"coefs must be contiguous fp32 ({n_rows}, {COEFS_WIDTH}), got "
                             f"{coefs.dtype} {tuple(coefs.shape)}")
        grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype,
                                                  device=logits.device)
        if n_rows == 0 or n_cols == 0:
            return grad
        self.check(self.ext.vocab_parallel_grad(coefs=coefs.data_ptr(), grad=grad.data_ptr(),
                                                grad_row_stride=grad.stride(0), **args),
                   "vocab_parallel_grad")
        return grad
