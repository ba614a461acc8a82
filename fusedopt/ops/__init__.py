"""Autograd Functions and torch.library custom ops of the losses, one module per op.

Importing this package registers the ``fusedopt::*_fwd`` custom ops."""

from fusedopt.ops.cross_entropy import CrossEntropyFunction, cross_entropy
from fusedopt.ops.focal import FocalLossFunction, focal_loss
from fusedopt.ops.linear_cross_entropy import (LinearCrossEntropyFunction,
                                               linear_cross_entropy)
from fusedopt.ops.sigmoid_focal import SigmoidFocalLossFunction, sigmoid_focal_loss

__all__ = ["CrossEntropyFunction", "FocalLossFunction", "SigmoidFocalLossFunction",
           "cross_entropy", "focal_loss", "sigmoid_focal_loss",
           "LinearCrossEntropyFunction", "linear_cross_entropy"]
