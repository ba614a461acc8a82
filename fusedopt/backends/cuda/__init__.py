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
    from fusedopt.backends.cuda import lean as _lean, losses as _losses, optim as _optim
    from fusedopt.backends.cuda import vocab_parallel as _vocab_parallel
    from fusedopt.backends.cuda._errors import check  # noqa: F401
    from fusedopt.backends.cuda.lean import *  # noqa: F401,F403
    from fusedopt.backends.cuda.losses import *  # noqa: F401,F403  (entry points in __all__)
    from fusedopt.backends.cuda.optim import *  # noqa: F401,F403
    from fusedopt.backends.cuda.vocab_parallel import *  # noqa: F401,F403

    OPS: frozenset[str] = _losses.OPS | _optim.OPS | _vocab_parallel.OPS | _lean.OPS
else:
    OPS = frozenset()


# cudaError_t codes that mean "this driver cannot run the runtime linked into _cuda"
_INSUFFICIENT_DRIVER = 35
_NO_DEVICE = 100
# The first Linux driver branch of each CUDA major version: a driver of that branch or newer
# runs every runtime of the major version (minor-version compatibility).
_DRIVER_BRANCH = {12: "R525", 13: "R580"}


def _version(code: int) -> str:
    """A CUDA version code (e.g. 13000) as text ("13.0")."""
    return f"{code // 1000}.{code % 1000 // 10}"


def driver_requirement(runtime: int) -> str:
    """The driver the CUDA runtime version `runtime` (e.g. 13000) needs, in words."""
    branch = _DRIVER_BRANCH.get(runtime // 1000)
    return (f"an NVIDIA driver for CUDA {_version(runtime)} or newer"
            + (f" ({branch}+)" if branch else ""))


def driver_problem(err: int, runtime: int, driver: int) -> str:
    """Why cudaGetDeviceCount failed with `err`, in words."""
    if driver == 0:
        return "no NVIDIA driver is installed (libcuda not found)"
    if err == _INSUFFICIENT_DRIVER:
        return (f"the NVIDIA driver supports CUDA {_version(driver)}, but fusedopt._cuda links "
                f"the CUDA {_version(runtime)} runtime statically and needs "
                f"{driver_requirement(runtime)}; rebuild it with a CUDA toolkit the driver "
                "supports, or update the driver")
    if err == _NO_DEVICE:
        return "no CUDA device"
    return f"no usable CUDA driver/device ({_cuda.error_string(err)})"


def status() -> tuple[bool, str]:
    if _cuda is None:
        return False, _IMPORT_ERROR
    err, count = _cuda.device_count()
    if err != 0:
        return False, driver_problem(err, _cuda.runtime_version(), _cuda.driver_version())
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
