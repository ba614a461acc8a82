"""Measurement: interleaved medians, the device's copy bandwidth and peak memory.

Every candidate of a case is timed round-robin (round r starts at candidate r mod n), so a
slow drift of the machine (clock, thermal, a neighbour process) hits all candidates alike.
A *sample* is `runs` back-to-back calls of one candidate; `runs` is calibrated per candidate
so that a sample lasts about `Settings.target_sample_s`, and a sample's time is divided by
`runs`. The reported time is the median over the samples.

Clocks:
* ``device_time`` on CUDA: ``torch.cuda.Event`` pairs around the sample, then synchronize;
* ``device_time`` on CPU: ``time.perf_counter`` (CPU kernels run synchronously);
* ``host_time``: ``time.perf_counter`` around the calls only; on CUDA the device is
  synchronized before and after the sample, outside the timed region. This is the time the
  Python call takes to return (launch and bookkeeping cost), e.g. of ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

DEVICE_TIME = "device_time"
HOST_TIME = "host_time"


@dataclass(frozen=True)
class Settings:
    warmup: int = 3             # untimed calls per candidate (fewer once they take budget_s / 2)
    rounds: int = 20            # at most this many round-robin rounds
    min_rounds: int = 3         # at least this many, whatever the budget
    budget_s: float = 20.0      # stop adding rounds once a case has run this long
    target_sample_s: float = 0.02
    max_runs_per_sample: int = 1000


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    samples: int
    runs_per_sample: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], object], runs: int, device: torch.device, metric: str) -> float:
    """Seconds per call, averaged over one sample of ``runs`` calls."""
    if device.type == "cuda" and metric == DEVICE_TIME:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / runs
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    elapsed = time.perf_counter() - t0
    synchronize(device)
    return elapsed / runs


def _calibrate(fn: Callable[[], object], device: torch.device, metric: str,
               settings: Settings) -> int:
    once = max(_sample(fn, 1, device, metric), 1e-9)
    runs = math.ceil(settings.target_sample_s / once)
    return int(min(max(runs, 1), settings.max_runs_per_sample))


def measure(candidates: dict[str, Callable[[], object]], device: torch.device, *,
            metric: str = DEVICE_TIME, settings: Settings = Settings(),
            on_round: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Median seconds per call of every candidate, measured round-robin.

    Exceptions raised by a candidate propagate: the caller runs each candidate once
    before (see `first_call`) so that a broken candidate is reported, not timed."""
    names = list(candidates)
    warmup_budget = settings.budget_s / (2 * len(names))
    for name in names:  # fewer warm-up calls than asked when calls are slow
        t0 = time.perf_counter()
        for _ in range(settings.warmup):
            candidates[name]()
            synchronize(device)
            if time.perf_counter() - t0 > warmup_budget:
                break
    runs = {name: _calibrate(candidates[name], device, metric, settings) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    t_start = time.perf_counter()
    for rnd in range(settings.rounds):
        for k in range(len(names)):
            name = names[(rnd + k) % len(names)]
            samples[name].append(_sample(candidates[name], runs[name], device, metric))
        if on_round is not None:
            on_round(rnd + 1)
        if rnd + 1 >= settings.min_rounds and time.perf_counter() - t_start > settings.budget_s:
            break
    return {name: Timing(statistics.median(s), min(s), max(s), len(s), runs[name])
            for name, s in samples.items()}


def copy_bandwidth(device: torch.device, nbytes: int, settings: Settings = Settings()) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` for fp32 tensors of ``nbytes``
    each, counting one read and one write of every byte."""
    numel = max(nbytes // 4, 1)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, device, settings=settings)["copy"]
    return 2 * numel * 4 / timing.median_s


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated by one call of ``fn`` above what was allocated before it: CUDA
    caching-allocator statistics on CUDA, the profiler's record of every CPU allocation on
    CPU (`cpu_peak_memory`); None when it cannot be measured."""
    if device.type == "cpu":
        return cpu_peak_memory(fn)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0)


def _allocations(events):
    for event in events:
        if isinstance(event.extra_fields, _AllocationFields):
            yield event
        yield from _allocations(event.children)


try:
    from torch._C._profiler import _ExtraFields_Allocation as _AllocationFields
except ImportError:  # a torch without the profiler's allocation records
    _AllocationFields = None


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints a start and a stop line on stderr for every session;
    they would fill the bench's output, so file descriptor 2 goes to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_memory(fn: Callable[[], object]) -> int | None:
    """Peak bytes held by CPU tensors allocated during one call of ``fn``, above what was
    held when it started: torch's profiler records every allocation and free of the CPU
    allocator with the running total, in order; the peak of that total is the answer.
    (Allocations outside torch's allocator, e.g. a BLAS library's own scratch, are not
    seen.)  None when this torch cannot record allocations."""
    if _AllocationFields is None:
        return None
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        fn()
    events = sorted((e for e in _allocations(
        prof.profiler.kineto_results.experimental_event_tree())
        if e.extra_fields.device.type == "cpu"), key=lambda e: e.start_time_ns)
    if not events:
        return 0
    first = events[0].extra_fields
    start = first.total_allocated - first.alloc_size
    return max(max(e.extra_fields.total_allocated for e in events) - start, 0)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
