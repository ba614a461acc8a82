"""nn.Module wrappers of the losses of fusedopt.functional (default reduction 'mean').
Tensor weights (`weight`, `alpha`) are registered as buffers, so they follow `.to()`."""

from __future__ import annotations

import torch

from fusedopt import functional

__all__ = ["CrossEntropyLoss", "FocalLoss", "SigmoidFocalLoss", "LinearCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.Module):
    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                 z_loss=0.0, softcap=None, backend=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend

    def forward(self, input, target):
        return functional.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, backend=self.backend)


class FocalLoss(torch.nn.Module):
    def __init__(self, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, *, backend=None):
        super().__init__()
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, input, target):
        return functional.focal_loss(input, target, self.gamma, self.alpha, self.ignore_index,
                                     self.reduction, self.label_smoothing, backend=self.backend)


class SigmoidFocalLoss(torch.nn.Module):
    def __init__(self, alpha=0.25, gamma=2.0, reduction="mean", *, label_smoothing=0.0,
                 backend=None):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, input, target):
        return functional.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction,
                                             label_smoothing=self.label_smoothing,
                                             backend=self.backend)


class LinearCrossEntropyLoss(torch.nn.Module):
    """A Linear layer (``self.linear``, no bias by default) scored by cross-entropy, fused:
    ``forward(input, target)`` is ``functional.linear_cross_entropy(input,
    self.linear.weight, target, linear_bias=self.linear.bias, ...)``.  Same constructor and
    state_dict keys as torch.nn.LinearCrossEntropyLoss (without ``out_features`` and
    ``options``), plus z_loss, softcap, chunk_size and backend."""

    def __init__(self, in_features, num_classes, *, bias=False, device=None, dtype=None,
                 weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, chunk_size=None, backend=None):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, input, target):
        return functional.linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            chunk_size=self.chunk_size, backend=self.backend)
