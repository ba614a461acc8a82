"""The loss kernel boundary: every tensor (and every scalar the kernels would misread)
handed to a compiled loss kernel is verified here, before the kernel runs.

The compiled backends take raw addresses, element strides and dtype codes, so the step
from tensors to pointers is where a bad input would become an out-of-bounds access or a
crash.  It happens in exactly two places -- ``LossLauncher`` (fusedopt/backends/
_loss_launch.py) for `cpu` and `cuda`, and the launchers of fusedopt/backends/triton/ --
and both call these functions first.  The public layer (fusedopt.functional) has already
checked the arguments with friendlier messages; this is the last line, which a direct call
of a backend entry point cannot get around.  Each check reads tensor metadata only (no
data, no device sync): a few microseconds per call.

What is verified, for every tensor:
- its type is exactly ``torch.Tensor`` or ``torch.nn.Parameter`` (a plain tensor with a
  flag); any other subclass -- DTensor, FakeTensor, a wrapper subclass whose data pointer
  is not its data -- is refused with a TypeError (`_plain.plain`, shared with the
  optimizer boundary);
- a strided, non-negated layout on the device the kernel runs on (the same for all the
  tensors of a call), every element it spans inside its storage (`_plain.check_storage`:
  a storage resized to 0 or shrunk under a view is refused);
- its dtype, shape, and the strides the kernel walks.  A dimension of size 1 may have any
  stride (it is never stepped over): such tensors are passed with the stride the kernel
  would use for a contiguous one.
The functions return the element strides to pass.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from fusedopt.backends._plain import check_storage, plain, shown

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
FP32_MAX = torch.finfo(torch.float32).max
# softcap s is used in fp32.  Below 2^-126 it is subnormal, 0 or worse in fp32 (the capping
# would be skipped or give NaN); above 2^64, x / s is subnormal for |x| < 2^-62, which a
# GPU may flush to 0, and the capping changes no logit below 1e18 an fp32 loss could see
# (pass None instead).  In between, s * tanh(x / s) is computed to fp32 accuracy.
SOFTCAP_MIN = 2.0 ** -126
SOFTCAP_MAX = 2.0 ** 64


def plain_tensor(op: str, name: str, t, device: torch.device | None = None,
                 device_types: tuple[str, ...] = ()) -> torch.Tensor:
    """`t` is a plain strided tensor whose memory the kernel may address directly: on
    `device` when given, else on a device of one of `device_types` when given."""
    what = f"{op}: {name}"
    plain(t, what)
    if t.layout != torch.strided:
        raise ValueError(f"{what} must be a strided (dense) tensor, got layout {t.layout}")
    if t.is_neg():
        raise ValueError(f"{what} is a lazily negated view; pass {name}.resolve_neg()")
    if device is not None and t.device != device:
        raise ValueError(f"{what} is on {t.device}, expected {device} (the logits' device)")
    if device_types and t.device.type not in device_types:
        raise ValueError(f"{what} is on {t.device}; this backend runs on "
                         f"{' or '.join(device_types)} tensors")
    check_storage(t, what)
    return t


def _dtype(op: str, name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")


def rows(op: str, logits, device_types: tuple[str, ...]) -> int:
    """(N, C) logits of fp32/bf16/fp16 on a device of `device_types`, the class dim
    contiguous and the rows at least C apart; returns the row stride to pass."""
    plain_tensor(op, "logits", logits, device_types=device_types)
    _dtype(op, "logits", logits, LOGIT_DTYPES)
    return row_layout(op, "logits", logits)


def row_layout(op: str, name: str, t: torch.Tensor) -> int:
    """The row stride of a 2-D tensor walked as rows of contiguous values at a stride of
    at least C (any stride for a dimension of size 1)."""
    if t.dim() != 2 or t.shape[1] < 1:
        raise ValueError(f"{op}: {name} must be (N, C) with C >= 1, got shape "
                         f"{tuple(t.shape)}")
    n_rows, n_cols = t.shape
    col_ok = n_cols == 1 or t.stride(1) == 1
    row_ok = n_rows <= 1 or t.stride(0) >= n_cols
    if not (col_ok and row_ok):
        raise ValueError(f"{op}: {name} must have stride(1) == 1 and stride(0) >= C (rows "
                         f"of contiguous values), got shape {tuple(t.shape)} strides "
                         f"{t.stride()}")
    return t.stride(0) if n_rows > 1 else n_cols


def class_targets(op: str, target, n_rows: int, device: torch.device) -> None:
    """(N,) class indices, int64/int32/uint8, contiguous."""
    plain_tensor(op, "target", target, device)
    _dtype(op, "target", target, INDEX_DTYPES)
    if target.shape != (n_rows,) or (n_rows > 1 and target.stride(0) != 1):
        raise ValueError(f"{op}: class targets must be contiguous of shape ({n_rows},), got "
                         f"shape {tuple(target.shape)} strides {target.stride()}")


def soft_targets(op: str, target, logits: torch.Tensor) -> int:
    """Probability targets of the logits' shape and dtype, rows of contiguous values;
    returns their row stride."""
    plain_tensor(op, "target", target, logits.device)
    if target.dtype != logits.dtype or target.shape != logits.shape:
        raise ValueError(f"{op}: soft targets must have the logits' shape and dtype "
                         f"{logits.dtype} {tuple(logits.shape)}, got {target.dtype} "
                         f"{tuple(target.shape)}")
    return row_layout(op, "target", target)


def class_vector(op: str, name: str, t, n_cols: int, device: torch.device):
    """None, or a contiguous fp32 vector of `n_cols` values (class weights, alpha)."""
    if t is None:
        return None
    plain_tensor(op, name, t, device)
    if t.dtype != torch.float32 or t.shape != (n_cols,) or (n_cols > 1 and t.stride(0) != 1):
        raise ValueError(f"{op}: {name} must be a contiguous fp32 tensor of shape ({n_cols},), "
                         f"got {t.dtype} shape {tuple(t.shape)} strides {t.stride()}")
    return t


def scales(op: str, t, device: torch.device) -> torch.Tensor:
    """The (2,) fp32 `scales` the kernels read: [ce_scale, z_scale]."""
    plain_tensor(op, "scales", t, device)
    if t.dtype != torch.float32 or t.shape != (2,) or t.stride(0) != 1:
        raise ValueError(f"{op}: scales must be a contiguous fp32 tensor of shape (2,), got "
                         f"{t.dtype} shape {tuple(t.shape)}")
    return t


def ignore_index(op: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {shown(value)}")
    if not INT64_MIN <= int(value) <= INT64_MAX:
        raise ValueError(f"{op}: ignore_index must fit in int64 ([{INT64_MIN}, {INT64_MAX}]), "
                         f"got {value}")
    return int(value)


def softcap(op: str, value) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not SOFTCAP_MIN <= value <= SOFTCAP_MAX:
        raise ValueError(f"{op}: softcap must be None or in [2**-126, 2**64] "
                         f"([{SOFTCAP_MIN:.4g}, {SOFTCAP_MAX:.4g}]), got {shown(value)}")
    return value


def fp32_finite(op: str, name: str, value) -> float:
    """A float scalar the kernels use in fp32: finite there (NaN refused too)."""
    value = float(value)
    if math.isnan(value) or abs(value) > FP32_MAX:
        raise ValueError(f"{op}: {name} must be finite in fp32 (|{name}| <= {FP32_MAX:g}), "
                         f"got {shown(value)}")
    return value


def elementwise(op: str, logits, target, device_types: tuple[str, ...]) -> None:
    """Logits and targets of the sigmoid focal loss: contiguous, same shape and dtype."""
    plain_tensor(op, "logits", logits, device_types=device_types)
    _dtype(op, "logits", logits, LOGIT_DTYPES)
    plain_tensor(op, "target", target, logits.device)
    if not (logits.is_contiguous() and target.is_contiguous()) or \
            target.shape != logits.shape or target.dtype != logits.dtype:
        raise ValueError(f"{op}: logits and target must be contiguous with the same shape and "
                         f"dtype, got {logits.dtype} {tuple(logits.shape)} and {target.dtype} "
                         f"{tuple(target.shape)}")


def scaled_grad(op: str, grad, scale, device_types: tuple[str, ...]) -> None:
    """A contiguous loss gradient and a one-value fp32 scale on its device."""
    plain_tensor(op, "grad", grad, device_types=device_types)
    _dtype(op, "grad", grad, LOGIT_DTYPES)
    if not grad.is_contiguous():
        raise ValueError(f"{op}: grad must be contiguous, got strides {grad.stride()}")
    plain_tensor(op, "scale", scale, grad.device)
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(f"{op}: scale must be one fp32 value, got {scale.dtype} shape "
                         f"{tuple(scale.shape)}")


_ignore_index_arg, _softcap_arg = ignore_index, softcap  # (shadowed by vocab_shard's keywords)


class VocabShard(NamedTuple):
    """What a vocab-parallel kernel is told about one verified call (strides in elements)."""

    n_rows: int
    n_cols: int
    row_stride: int  # of the logits (and of the gradient with ``inplace``)
    target_stride: int  # the row stride of probability targets, 0 for class indices
    class_offset: int
    num_classes: int
    ignore_index: int
    label_smoothing: float
    softcap: float | None


def vocab_shard(op: str, logits, target, weight, coefs=None, *, class_offset, num_classes,
                ignore_index, label_smoothing, softcap, soft_target,
                device_types: tuple[str, ...]) -> VocabShard:
    """Every tensor and number of one call of a vocab-parallel entry point
    (``vocab_parallel_row_stats``, or ``vocab_parallel_grad`` when ``coefs`` is given), for
    any compiled backend: (N, C_local) logits as for `rows` (C_local may be 0), class
    targets or probability targets of the logits' layout, this rank's (C_local,) fp32
    weight slice or None, (N, 5) contiguous fp32 coefficients, the local classes inside
    [0, num_classes), and the scalars in the ranges the kernels compute right."""
    plain_tensor(op, "logits", logits, device_types=device_types)
    _dtype(op, "logits", logits, LOGIT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (N, C_local), got shape {tuple(logits.shape)}")
    n_rows, n_cols = logits.shape
    row_stride = row_layout(op, "logits", logits) if n_cols else 0
    device = logits.device
    if soft_target:
        plain_tensor(op, "target", target, device)
        if target.dtype != logits.dtype or target.shape != logits.shape:
            raise ValueError(f"{op}: soft targets must have the logits' shape and dtype "
                             f"{logits.dtype} {tuple(logits.shape)}, got {target.dtype} "
                             f"{tuple(target.shape)}")
        target_stride = row_layout(op, "target", target) if n_cols else 0
    else:
        class_targets(op, target, n_rows, device)
        target_stride = 0
    class_vector(op, "weight", weight, n_cols, device)
    if coefs is not None:
        plain_tensor(op, "coefs", coefs, device)
        if coefs.dtype != torch.float32 or coefs.shape != (n_rows, 5) or \
                not coefs.is_contiguous():
            raise ValueError(f"{op}: coefs must be contiguous fp32 ({n_rows}, 5), got "
                             f"{coefs.dtype} shape {tuple(coefs.shape)} strides "
                             f"{coefs.stride()}")
    for name, value in (("class_offset", class_offset), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{op}: {name} must be an int, got {shown(value)}")
    if not (0 <= class_offset and class_offset + n_cols <= num_classes <= INT64_MAX
            and num_classes >= 1):
        raise ValueError(f"{op}: the local classes [class_offset, class_offset + C_local) = "
                         f"[{class_offset}, {class_offset + n_cols}) must lie in "
                         f"[0, num_classes) = [0, {num_classes})")
    return VocabShard(n_rows, n_cols, row_stride, target_stride, int(class_offset),
                      int(num_classes), _ignore_index_arg(op, ignore_index),
                      fp32_finite(op, "label_smoothing", label_smoothing),
                      _softcap_arg(op, softcap))
