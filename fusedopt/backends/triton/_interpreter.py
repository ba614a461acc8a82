"""What the Triton kernels need to run the same under TRITON_INTERPRET=1 on every Triton we
support (3.6 to 3.9), with no effect on the compiled code.

Loop bounds.  The interpreter runs a kernel as Python: `range(0, n, BLOCK)` converts `n`, a
scalar it holds as a 1-element NumPy array, with `int()`.  Triton 3.6's interpreter does
`int(array)`, which NumPy 2.4 refuses for an array of one dimension ("only 0-dimensional
arrays can be converted to Python scalars"); later interpreters squeeze the array first.
`loop_bound(n)` hands the interpreter a Python int; compiled, it is `n` itself, so the loop
stays an `scf.for` that Triton can pipeline.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def loop_bound(n):
    """`n` (a scalar computed in the kernel or passed to it) as the bound of a Python range:
    under the interpreter the Python int its 1-element array holds, compiled `n` itself."""
    if INTERPRETED:
        return n.handle.data.item()
    return n
