"""Marshalling shared by the compiled backends: dtype codes of csrc/include/fusedopt/dispatch.h."""

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"fusedopt kernels take float32, bfloat16 or float16 tensors, not {dtype}") from None
