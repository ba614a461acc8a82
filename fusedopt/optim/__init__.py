"""Fused multi-tensor optimizers: drop-in ``torch.optim.Optimizer`` subclasses.

``FusedAdam``, ``FusedAdamW`` and ``FusedSGD`` equal torch's Adam / AdamW / SGD and add
in-kernel loss-scale unscaling, inf/NaN step skipping and global-norm clipping, without
any host synchronisation in ``step()``.  FusedAdam/FusedAdamW also keep memory-lean states
(``state_dtype=torch.bfloat16 | torch.int8``, ``param_rounding="stochastic"``);
``dequantize_state_dict`` turns such a checkpoint into one torch.optim loads.  See
docs/optimizers.md.
"""

from fusedopt.optim._lean import dequantize_state_dict
from fusedopt.optim.adam import FusedAdam, FusedAdamW
from fusedopt.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "dequantize_state_dict"]
