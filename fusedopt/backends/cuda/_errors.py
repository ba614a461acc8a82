"""cudaError_t codes returned by the kernels of fusedopt._cuda, as Python errors."""

from __future__ import annotations

from fusedopt import _cuda


def check(err: int, what: str) -> None:
    """Raise a RuntimeError for a non-zero cudaError_t returned by a kernel entry point."""
    if err != 0:
        raise RuntimeError(f"fusedopt cuda kernel {what} failed: {_cuda.error_string(err)} "
                           f"(cudaError_t {err})")
