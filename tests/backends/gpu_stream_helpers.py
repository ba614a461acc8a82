"""A check that GPU work runs on the current stream and not on another one: the inputs hold
NaN until a side stream -- made current, and first held up by a kernel that spins for about
a quarter of a second -- copies the real values in, then launches the work.  Work launched
on the side stream reads the real inputs; work that went to any other stream runs while the
side stream still spins, reads NaN and gives NaN results.  Comparing the results with a
reference after a synchronize therefore tells the two apart."""

from __future__ import annotations

import torch

# torch.cuda._sleep spins for this many clock cycles: ~0.25 s at 2 GHz, far longer than
# launching and running the small kernels of the tests on another stream
SPIN_CYCLES = 500_000_000


def nan_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.full_like(tensor, float("nan"))


def run_on_a_held_up_stream(fill, launch):
    """`fill()` (writes the real inputs from device tensors: a copy from the host would make
    the host wait for the spin) then `launch()` (the work under test) on a side stream that
    first spins; returns what `launch` returns once the side stream is done."""
    torch.cuda.synchronize()  # the NaN inputs are in place before the side stream starts
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN_CYCLES)
        fill()
        result = launch()
    side.synchronize()
    torch.cuda.synchronize()
    return result
