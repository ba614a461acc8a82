"""The `torch` backend: pure-PyTorch reference implementations of every op.

Always available, on every device.  It is the fallback and the readable statement of the
math; the kernels of the other backends are tested against PyTorch itself and against it.
Entry points follow the contracts of docs/architecture.md.
"""

from __future__ import annotations

import torch

NAME = "torch"


def status() -> tuple[bool, str]:
    return True, ""


def supports(op: str, device: torch.device) -> tuple[bool, str]:
    return True, ""


from fusedopt.backends.torch_losses import *  # noqa: E402,F401,F403  (entry points in __all__)
from fusedopt.backends.torch_optim import *  # noqa: E402,F401,F403
from fusedopt.backends.torch_vocab_parallel import *  # noqa: E402,F401,F403
from fusedopt.backends.torch_lean import *  # noqa: E402,F401,F403
from fusedopt.backends import torch_losses as _losses, torch_optim as _optim  # noqa: E402
from fusedopt.backends import torch_vocab_parallel as _vocab_parallel  # noqa: E402
from fusedopt.backends import torch_lean as _lean  # noqa: E402

OPS: frozenset[str] = _losses.OPS | _optim.OPS | _vocab_parallel.OPS | _lean.OPS
