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

import math
import statistics
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
    """Bytes allocated by one call of ``fn`` above what was allocated before it (CUDA
    caching-allocator statistics); None on CPU, where no reliable per-call measure exists."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
