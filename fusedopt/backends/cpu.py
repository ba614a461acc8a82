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

# ops whose kernels are bound in fusedopt._cpu
OPS: frozenset[str] = frozenset()


def status() -> tuple[bool, str]:
    return (_cpu is not None), _IMPORT_ERROR


def supports(op: str, device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the cpu backend runs on CPU tensors, not {device.type}"
    if op not in OPS:
        return False, f"{op} has no cpu kernel"
    return True, ""
