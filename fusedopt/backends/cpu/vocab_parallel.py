"""Vocab-parallel cross-entropy entry points of the `cpu` backend (contracts:
docs/architecture.md, "Vocab-parallel cross-entropy"): tensors checked and turned into
addresses for the C++ kernels of csrc/cpu/vocab_parallel.cpp, which run without the GIL on
OpenMP threads.  Nothing here reads a tensor's values.

Both entry points take ``num_threads=None`` (default ``torch.get_num_threads()``), like the
other cpu loss entry points; results do not depend on it.
"""

from __future__ import annotations

import torch

from fusedopt import _cpu
from fusedopt.backends._loss_launch import INDEX_CODES
from fusedopt.backends._ptr import dtype_code

__all__ = ["vocab_parallel_row_stats", "vocab_parallel_grad"]

OPS: frozenset[str] = frozenset({"vocab_parallel_cross_entropy"})

_F32 = torch.float32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATUS = {1: "unsupported dtype code", 2: "unsupported target index type", 3: "invalid shape"}


def _plain_cpu(name: str, t: torch.Tensor) -> None:
    if type(t) is not torch.Tensor or t.device.type != "cpu":
        raise TypeError(f"{name} must be a plain CPU torch.Tensor, got {type(t).__name__} "
                        f"on {getattr(t, 'device', '?')}")


def _rows(name: str, t: torch.Tensor, n_rows: int, n_cols: int) -> None:
    if t.shape != (n_rows, n_cols) or t.stride(1) != 1 or (
            n_rows > 1 and t.stride(0) < n_cols):
        raise ValueError(f"{name} must be ({n_rows}, {n_cols}) with stride(1) == 1 and "
                         f"stride(0) >= {n_cols}, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _common_args(logits, target, weight, class_offset, num_classes, ignore_index,
                 label_smoothing, softcap, soft_target):
    """The argument list shared by both kernels, every tensor checked."""
    _plain_cpu("logits", logits)
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    n_rows, n_cols = logits.shape
    _rows("logits", logits, n_rows, n_cols)
    _plain_cpu("target", target)
    if soft_target:
        if target.dtype != logits.dtype:
            raise TypeError(f"soft targets must have the logits' dtype {logits.dtype}, got "
                            f"{target.dtype}")
        _rows("soft targets", target, n_rows, n_cols)
        index_code, target_stride = 0, target.stride(0)
    else:
        if target.dtype not in INDEX_CODES:
            raise TypeError(f"class targets must be int64, int32 or uint8, got {target.dtype}")
        if target.shape != (n_rows,) or not target.is_contiguous():
            raise ValueError(f"class targets must be contiguous of shape ({n_rows},), got "
                             f"{tuple(target.shape)}")
        index_code, target_stride = INDEX_CODES[target.dtype], 0
    if weight is not None:
        _plain_cpu("weight", weight)
        if weight.dtype != _F32 or weight.shape != (n_cols,) or not weight.is_contiguous():
            raise ValueError(f"weight must be this rank's contiguous fp32 ({n_cols},) slice, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
    if not 0 <= class_offset <= num_classes - n_cols:
        raise ValueError(f"the local classes [{class_offset}, {class_offset + n_cols}) must "
                         f"lie in [0, {num_classes})")
    return dict(
        logits=logits.data_ptr(), logits_row_stride=logits.stride(0),
        target=target.data_ptr(), target_row_stride=target_stride,
        weight=0 if weight is None else weight.data_ptr(), n_rows=n_rows, n_cols=n_cols,
        class_offset=int(class_offset), num_classes=int(num_classes),
        ignore_index=int(ignore_index), dtype=dtype_code(logits.dtype), index_type=index_code,
        label_smoothing=float(label_smoothing),
        softcap=float(softcap) if softcap is not None else 0.0, soft_target=bool(soft_target))


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"fusedopt cpu kernel {name} failed: "
                           f"{_STATUS.get(status, 'error')} (status {status})")


def _threads(num_threads) -> int:
    return int(num_threads) if num_threads else torch.get_num_threads()


def vocab_parallel_row_stats(logits, target, weight, *, class_offset, num_classes, ignore_index,
                             label_smoothing, softcap, soft_target, num_threads=None):
    """(N, 4) fp32 row statistics of this rank's columns."""
    stats = torch.zeros(logits.shape[0], 4, dtype=_F32)
    if logits.shape[1] == 0 or logits.shape[0] == 0:
        stats[:, 0] = float("-inf")
        return stats
    args = _common_args(logits, target, weight, class_offset, num_classes, ignore_index,
                        label_smoothing, softcap, soft_target)
    _check(_cpu.vocab_parallel_row_stats(stats=stats.data_ptr(), **args,
                                         num_threads=_threads(num_threads)),
           "vocab_parallel_row_stats")
    return stats


def vocab_parallel_grad(logits, target, weight, coefs, *, class_offset, num_classes,
                        ignore_index, label_smoothing, softcap, soft_target, inplace,
                        num_threads=None):
    """The gradient of this rank's columns from the combined coefficients (N, 5)."""
    n_rows, n_cols = logits.shape
    grad = logits if inplace else torch.empty((n_rows, n_cols), dtype=logits.dtype)
    if n_rows == 0 or n_cols == 0:
        return grad
    args = _common_args(logits, target, weight, class_offset, num_classes, ignore_index,
                        label_smoothing, softcap, soft_target)
    _plain_cpu("coefs", coefs)
    if coefs.dtype != _F32 or coefs.shape != (n_rows, 5) or not coefs.is_contiguous():
        raise ValueError(f"coefs must be contiguous fp32 ({n_rows}, 5), got {coefs.dtype} "
                         f"{tuple(coefs.shape)}")
    _check(_cpu.vocab_parallel_grad(coefs=coefs.data_ptr(), grad=grad.data_ptr(),
                                    grad_row_stride=grad.stride(0), **args,
                                    num_threads=_threads(num_threads)),
           "vocab_parallel_grad")
    return grad
