"""Public loss functions: validate every argument, then call the op (fusedopt.ops).

Every check that needs no device data happens here, before any kernel runs, and
the error names the argument, its value and what was expected.  The one check that reads
data -- class targets outside [0, C) -- runs inside the op right before the backend (for
CPU tensors always, for CUDA tensors under FUSEDOPT_CHECK=1), so it also holds under
torch.compile.
"""

from __future__ import annotations

import math
import numbers

import torch

from fusedopt import backends, ops
from fusedopt.backends._loss_boundary import SOFTCAP_MAX, SOFTCAP_MIN
from fusedopt.backends._plain import check_storage, shown
from fusedopt.ops import _common
from fusedopt.ops._dtensor import is_dtensor

__all__ = ["cross_entropy", "focal_loss", "sigmoid_focal_loss", "linear_cross_entropy"]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOSS_DTYPES = _INPUT_DTYPES + (torch.float64,)  # float64: the torch backend, float64 math
_CLASS_TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)
_REDUCTIONS = ("none", "mean", "sum")
_FP32 = torch.finfo(torch.float32)  # the kernels use every float argument in fp32
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _check_memory(name, tensor):
    """A tensor with memory of its own lies inside its storage: a view of a storage freed by
    ``resize_(0)`` (as FSDP does between uses) would be read out of bounds by any backend,
    torch's own ops included (the (N, C, d..) -> (M, C) copy, the `torch` backend), so it
    is refused here, once for every backend.  Tensors without memory of their own
    (``__torch_dispatch__`` subclasses such as DTensor and FakeTensor, torch.func's
    grad/vmap wrappers, meta tensors) and code being traced by torch.compile (which cannot
    read storage metadata) are left to the kernel boundary."""
    if torch.compiler.is_compiling() or tensor.device.type == "meta" or \
            torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python) or \
            not torch._C._has_storage(tensor):
        return
    check_storage(tensor, name)


def _check_input(input, dtypes=_INPUT_DTYPES):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"input must be {names}, got {input.dtype}")
    _check_memory("input", input)


def _check_backend_dtype(op, input, backend):
    """A backend named here whose kernels cannot take float64 logits: TypeError now (a
    FUSEDOPT_BACKEND one is refused where the op resolves it)."""
    if input.dtype == torch.float64 and backend is not None and \
            backend not in _common.FLOAT64_BACKENDS:
        raise _common.float64_refusal(op, backend)


def _check_same_device(input, name, tensor):
    if tensor.device != input.device:
        raise ValueError(f"input and {name} must be on the same device, got input on "
                         f"{input.device} and {name} on {tensor.device}")


def _check_number(name, value, *, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {shown(value)}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    if math.isnan(value) or too_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise ValueError(f"{name} must be {' and '.join(s for s in (lo, hi) if s)}, got {shown(value)}")
    return value


def _check_fp32_range(name, value, low, high):
    """`value` (already a checked real number) within [low, high], the range where it is
    usable in fp32 (outside, it would round to 0 or inf in the kernels)."""
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be in [{low:.4g}, {high:.4g}] (the range the kernels "
                         f"compute it right in fp32), got {shown(value)}")


def _check_common(reduction, label_smoothing, backend):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCTIONS))}, "
                         f"got {shown(reduction)}")
    _check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if backend is not None and backend not in backends.NAMES:
        raise ValueError(f"unknown fusedopt backend {shown(backend)}; expected one of "
                         f"{', '.join(backends.NAMES)} or None")


def _check_classes(input, target, ignore_index, *, allow_soft):
    """Check input/target of a class loss; returns True for a probability (soft) target."""
    _check_input(input, _LOSS_DTYPES)
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ..., dk), "
                         "got a 0-dim tensor")
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if n_classes == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_same_device(input, "target", target)
    _check_memory("target", target)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {shown(ignore_index)}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 ([{_INT64_MIN}, {_INT64_MAX}]), got "
                         f"{ignore_index}")
    class_shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size()
    if target.is_floating_point():
        if allow_soft and target.shape == input.shape:
            return True
        if target.shape == class_shape:
            raise TypeError(f"target of class indices must be int64, int32 or uint8, got "
                            f"{target.dtype} (shape {tuple(target.shape)})"
                            + ("; probability targets must have the input's shape "
                               f"{tuple(input.shape)}" if allow_soft else ""))
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}: expected {tuple(class_shape)} (class indices)"
                         + (f" or {tuple(input.shape)} (probabilities)" if allow_soft else ""))
    if target.dtype not in _CLASS_TARGET_DTYPES:
        raise TypeError(f"target of class indices must be int64, int32 or uint8, "
                        f"got {target.dtype}")
    if target.shape != class_shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}: expected {tuple(class_shape)}")
    return False


def _check_class_vector(input, name, tensor):
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.shape != (n_classes,):
        raise ValueError(f"{name} must have shape ({n_classes},) (one value per class of input "
                         f"shape {tuple(input.shape)}), got {tuple(tensor.shape)}")
    _check_same_device(input, name, tensor)
    _check_memory(name, tensor)


def _check_z_loss_softcap(z_loss, softcap):
    """The z-loss coefficient and the soft-cap of the cross-entropy losses."""
    _check_number("z_loss", z_loss, low=0.0)
    if not math.isfinite(float(z_loss)):
        raise ValueError(f"z_loss must be finite, got {shown(z_loss)}")
    _check_fp32_range("z_loss", z_loss, 0.0, _FP32.max)
    if softcap is not None:
        _check_number("softcap", softcap, low=0.0, low_open=True)
        if not math.isfinite(float(softcap)):
            raise ValueError(f"softcap must be finite or None, got {shown(softcap)}")
        _check_fp32_range("softcap", softcap, SOFTCAP_MIN, SOFTCAP_MAX)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False,
                  backend=None):
    """Softmax cross-entropy, equal to torch.nn.functional.cross_entropy (value and gradient)
    when z_loss=0 and softcap=None; z_loss, softcap, inplace_backward and float64 inputs:
    docs/losses.md."""
    _check_common(reduction, label_smoothing, backend)
    soft_target = _check_classes(input, target, ignore_index, allow_soft=True)
    _check_backend_dtype("cross_entropy", input, backend)
    if weight is not None:
        _check_class_vector(input, "weight", weight)
    _check_z_loss_softcap(z_loss, softcap)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {shown(inplace_backward)}")
    return ops.cross_entropy(input, target, weight, int(ignore_index), reduction,
                             label_smoothing, z_loss, softcap, inplace_backward, backend)


def focal_loss(input, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0, *, backend=None):
    """Softmax focal loss -Σ_c α_c q_c (1-p_c)^γ log p_c per row (docs/losses.md)."""
    _check_common(reduction, label_smoothing, backend)
    _check_classes(input, target, ignore_index, allow_soft=False)
    _check_backend_dtype("focal_loss", input, backend)
    _check_number("gamma", gamma, low=0.0)
    _check_fp32_range("gamma", gamma, 0.0, _FP32.max)
    if isinstance(alpha, torch.Tensor):
        _check_class_vector(input, "alpha", alpha)
    elif alpha is not None:
        # alpha < 0 means "no weighting" in sigmoid_focal_loss (torchvision); here it would
        # negate the loss, so it is refused: None is the way to switch the weighting off.
        _check_number("alpha", alpha)
        if float(alpha) < 0:
            raise ValueError(f"alpha must be >= 0 or None (None: no class weighting; a "
                             f"negative alpha disables weighting only in "
                             f"sigmoid_focal_loss), got {shown(alpha)}")
        _check_fp32_range("alpha", alpha, 0.0, _FP32.max)
    return ops.focal_loss(input, target, gamma, alpha, int(ignore_index), reduction,
                          label_smoothing, backend)


def sigmoid_focal_loss(input, target, alpha=0.25, gamma=2.0, reduction="none", *,
                       label_smoothing=0.0, backend=None):
    """torchvision.ops.sigmoid_focal_loss (RetinaNet), with optional label smoothing."""
    _check_common(reduction, label_smoothing, backend)
    _check_input(input, _LOSS_DTYPES)
    _check_backend_dtype("sigmoid_focal_loss", input, backend)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_same_device(input, "target", target)
    _check_memory("target", target)
    if target.shape != input.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal input shape "
                         f"{tuple(input.shape)}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor of 0/1 labels or "
                        f"probabilities, got {target.dtype}")
    _check_number("gamma", gamma, low=0.0)
    _check_fp32_range("gamma", gamma, 0.0, _FP32.max)
    _check_number("alpha", alpha)
    _check_fp32_range("alpha", alpha, -_FP32.max, _FP32.max)
    return ops.sigmoid_focal_loss(input, target, alpha, gamma, reduction, label_smoothing,
                                  backend)


def _check_linear_operand(input, name, tensor, shape):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {tensor.dtype}")
    if tensor.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} for input shape "
                         f"{tuple(input.shape)}, got {tuple(tensor.shape)}")
    _check_same_device(input, name, tensor)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, chunk_size=None, backend=None):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without
    materialising the logits: the rows are processed in chunks (docs/linear_cross_entropy.md).

    input (..., H), linear_weight (V, H), linear_bias (V,), class-index target (...);
    arguments as torch.nn.functional.linear_cross_entropy (``ignore_index=None`` means
    -100), plus z_loss, softcap and ``chunk_size`` (rows per chunk, None = sized from
    N, V, H).  Probability targets are refused."""
    _check_common(reduction, label_smoothing, backend)
    _check_input(input)
    for name, tensor in (("input", input), ("linear_weight", linear_weight),
                         ("linear_bias", linear_bias), ("target", target)):
        if is_dtensor(tensor):
            raise TypeError(f"{name}: linear_cross_entropy does not take DTensors; pass the "
                            "local tensors, or compute the logits and call cross_entropy, "
                            "which handles sharded logits")
    if input.dim() == 0:
        raise ValueError("input must have shape (H,) or (..., H), got a 0-dim tensor")
    if not isinstance(linear_weight, torch.Tensor):
        raise TypeError(f"linear_weight must be a torch.Tensor, got "
                        f"{type(linear_weight).__name__}")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must have shape (V, H), got "
                         f"{tuple(linear_weight.shape)}")
    hidden, n_classes = input.shape[-1], linear_weight.shape[0]
    _check_linear_operand(input, "linear_weight", linear_weight, (n_classes, hidden))
    if n_classes == 0:
        raise ValueError("linear_weight must have at least one row (class), got shape "
                         f"{tuple(linear_weight.shape)}")
    if linear_bias is not None:
        _check_linear_operand(input, "linear_bias", linear_bias, (n_classes,))
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_same_device(input, "target", target)
    class_shape = input.shape[:-1]
    if target.is_floating_point():
        if target.shape == class_shape + (n_classes,):
            raise ValueError("target: probability (soft) targets are not supported by "
                             "linear_cross_entropy; pass class indices, or compute the logits "
                             "and call fusedopt.cross_entropy")
        raise TypeError(f"target of class indices must be int64, int32 or uint8, got "
                        f"{target.dtype} (shape {tuple(target.shape)})")
    if target.dtype not in _CLASS_TARGET_DTYPES:
        raise TypeError(f"target of class indices must be int64, int32 or uint8, "
                        f"got {target.dtype}")
    if target.shape != class_shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}: expected {tuple(class_shape)}")
    if ignore_index is None:
        ignore_index = -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None, got {shown(ignore_index)}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if weight.shape != (n_classes,):
            raise ValueError(f"weight must have shape ({n_classes},) (one value per row of "
                             f"linear_weight), got {tuple(weight.shape)}")
        _check_same_device(input, "weight", weight)
    _check_z_loss_softcap(z_loss, softcap)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int (rows per chunk) or None, "
                            f"got {shown(chunk_size)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (rows per chunk), got {shown(chunk_size)}")
    return ops.linear_cross_entropy(input, linear_weight, target, linear_bias, weight,
                                    int(ignore_index), reduction, label_smoothing, z_loss,
                                    softcap, chunk_size, backend)
