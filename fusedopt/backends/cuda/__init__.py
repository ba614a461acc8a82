"""The `cuda` backend: launchers of the CUDA C++ kernels in csrc/cuda (``fusedopt._cuda``).

Tensors are marshalled into raw pointers and the current torch stream; ``cudaError_t``
codes coming back are turned into RuntimeErrors.  Entry points follow the contracts of
docs/architecture.md.
"""

from __future__ import annotations

import torch

NAME = "cuda"

try:
    from fusedopt import _cuda
except ImportError as exc:  # built without nvcc, or FUSEDOPT_BUILD_CUDA=0
    _cuda = None
    _IMPORT_ERROR = (f"fusedopt._cuda is not built ({exc}); install with nvcc on PATH or "
                     "CUDA_HOME set")
else:
    _IMPORT_ERROR = ""

if _cuda is not None:
    from fusedopt.backends.cuda import losses as _losses, optim as _optim
    from fusedopt.backends.cuda._errors import check  # noqa: F401
    from fusedopt.backends.cuda.losses import *  # noqa: F401,F403  (entry points in __all__)
    from fusedopt.backends.cuda.optim import *  # noqa: F401,F403

    OPS: frozenset[str] = _losses.OPS | _optim.OPS
else:
    OPS = frozenset()


def status() -> tuple[bool, str]:
    if _cuda is None:
        return False, _IMPORT_ERROR
    err, count = _cuda.device_count()
    if err != 0:
        return False, f"no usable CUDA driver/device ({_cuda.error_string(err)})"
    if count == 0:
        return False, "no CUDA device"
    if not torch.cuda.is_available():
        return False, "this torch build has no CUDA support"
    return True, ""


def supports(op: str, device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors, not {device.type}"
    if op not in OPS:
        return False, f"{op} has no cuda kernel yet"
    return True, ""
