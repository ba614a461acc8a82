"""Fused multi-tensor optimizers: drop-in ``torch.optim.Optimizer`` subclasses.

``FusedAdam``, ``FusedAdamW`` and ``FusedSGD`` equal torch's Adam / AdamW / SGD and add
in-kernel loss-scale unscaling, inf/NaN step skipping and global-norm clipping, without
any host synchronisation in ``step()``.  See docs/optimizers.md.
"""

from fusedopt.optim.adam import FusedAdam, FusedAdamW
from fusedopt.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD"]
