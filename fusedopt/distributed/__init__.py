"""torch.distributed support (docs/distributed.md).

* ``vocab_parallel_cross_entropy``: cross-entropy of logits whose classes are split over the
  ranks of a process group (tensor parallelism), on plain local shards.
* Losses on DTensor inputs need nothing from here: ``fusedopt.cross_entropy`` and the other
  losses accept DTensors (rows split over the mesh, or replicated; cross-entropy also with
  the classes split over one mesh dim); the DTensor machinery (``_sharding``,
  ``_dtensor_losses``) is imported on the first DTensor a loss sees.
"""

from fusedopt.distributed.losses import vocab_parallel_cross_entropy

__all__ = ["vocab_parallel_cross_entropy"]
