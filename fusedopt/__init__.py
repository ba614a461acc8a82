"""fusedopt: fused Triton and CUDA C++ kernels for the PyTorch training step.

Losses (``cross_entropy``, ``focal_loss``, ``sigmoid_focal_loss``, the fused LM-head
``linear_cross_entropy`` and their ``nn`` modules),
multi-tensor optimizers (``optim.FusedAdam``, ``FusedAdamW``, ``FusedSGD``) and a
device-side loss scaler (``amp.LossScaler``), each with ``triton``, ``cuda``, ``cpu`` and
``torch`` backends.
"""

__version__ = "0.1.0"

from fusedopt import backends  # noqa: E402
from fusedopt import amp, optim  # noqa: E402
from fusedopt.functional import cross_entropy, focal_loss, sigmoid_focal_loss  # noqa: E402
from fusedopt.functional import linear_cross_entropy  # noqa: E402
from fusedopt import nn  # noqa: E402
from fusedopt.distributed import vocab_parallel_cross_entropy  # noqa: E402
