"""The `cpu` backend: launchers of the C++ kernels in csrc/cpu (module ``fusedopt._cpu``).

Tensors are marshalled into raw pointers here; the compiled module never sees torch.
Entry points follow the contracts of docs/architecture.md.
"""

from __future__ import annotations

import torch

NAME = "cpu"

try:
    from fusedopt import _cpu
except ImportError as exc:  # not built
    _cpu = None
    _IMPORT_ERROR = f"fusedopt._cpu is not built ({exc}); reinstall with `pip install .`"
else:
    _IMPORT_ERROR = ""

if _cpu is not None:
    from fusedopt.backends.cpu import lean as _lean, losses as _losses, optim as _optim
    from fusedopt.backends.cpu import vocab_parallel as _vocab_parallel
    from fusedopt.backends.cpu.lean import *  # noqa: F401,F403
    from fusedopt.backends.cpu.losses import *  # noqa: F401,F403  (entry points in __all__)
    from fusedopt.backends.cpu.optim import *  # noqa: F401,F403
    from fusedopt.backends.cpu.vocab_parallel import *  # noqa: F401,F403

    OPS: frozenset[str] = _losses.OPS | _optim.OPS | _vocab_parallel.OPS | _lean.OPS
else:
    OPS = frozenset()


def status() -> tuple[bool, str]:
    return (_cpu is not None), _IMPORT_ERROR


def supports(op: str, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if op not in OPS:
        return False, f"{op} has no cpu kernel"
    return True, ""
