"""The `triton` backend: Triton kernels and their launchers, one file per op.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` is set before
fusedopt is imported (that is how the test suite exercises every kernel without a GPU).
Entry points follow the contracts of docs/architecture.md.
"""

from __future__ import annotations

import os

import torch

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError as exc:
    _IMPORT_ERROR = f"triton is not installed ({exc}); `pip install triton`"
    OPS: frozenset[str] = frozenset()
else:
    _IMPORT_ERROR = ""
    from fusedopt.backends.triton import cross_entropy as _cross_entropy
    from fusedopt.backends.triton import focal as _focal
    from fusedopt.backends.triton import lean_adam as _lean_adam
    from fusedopt.backends.triton import optim as _optim
    from fusedopt.backends.triton import vocab_parallel as _vocab_parallel
    from fusedopt.backends.triton.cross_entropy import *  # noqa: F401,F403  (entry points in __all__)
    from fusedopt.backends.triton.focal import *  # noqa: F401,F403
    from fusedopt.backends.triton.lean_adam import *  # noqa: F401,F403
    from fusedopt.backends.triton.optim import *  # noqa: F401,F403
    from fusedopt.backends.triton.vocab_parallel import *  # noqa: F401,F403

    OPS = _cross_entropy.OPS | _focal.OPS | _optim.OPS | _vocab_parallel.OPS | _lean_adam.OPS

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def status() -> tuple[bool, str]:
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if not (INTERPRET or torch.cuda.is_available()):
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    return True, ""


def supports(op: str, device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu" and not INTERPRET:
        return False, "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return False, f"Triton does not run on {device.type} tensors"
    if op not in OPS:
        return False, f"{op} has no Triton kernel yet"
    return True, ""
