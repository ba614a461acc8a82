"""Run a test function on several torch.distributed ranks, each in its own spawned process.

    from _harness import rank_pool, run_ranks

    def check_something(rank, world_size, n):      # module level: the workers import it
        ...                                        # torch.distributed is initialised
        return value                               # picklable (tensors: move them to CPU)

    results = rank_pool(2).run(check_something, 16)   # [value of rank 0, value of rank 1]

* ``rank_pool(world_size, backend)`` returns a pool of live worker processes, started once
  and shared by every test of the session: starting a rank (importing torch and fusedopt)
  costs seconds, a call on a live pool milliseconds.  The default process group is
  initialised in each worker (``gloo`` on CPU, or ``nccl`` with one GPU per rank) and stays
  up between calls; ``fn`` must not destroy it.
* ``pool.run(fn, *args, timeout=...)`` calls ``fn(rank, world_size, *args)`` on every rank
  and returns the list of results in rank order.  If any rank raises, ``RankFailure`` carries
  every rank's traceback; if a rank does not answer within ``timeout`` seconds (a hang in a
  collective), ``RankTimeout`` is raised.  After a failure or a timeout the workers are
  killed (their collectives may be stuck) and the next ``run`` starts fresh ones.
* ``run_ranks(fn, *args, world_size, backend, timeout)`` does the same on a pool of its own,
  closed afterwards (for tests that must not share process state).

Workers run with one intra-op thread each (two ranks on a 2-core machine) and inherit the
environment (``TRITON_INTERPRET``, ``FUSEDOPT_*``) and ``sys.path`` of the test process.
``device_for(backend, rank)`` is the device a rank computes on.
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 90.0
_START_TIMEOUT = 120.0


class RankFailure(AssertionError):
    """A rank raised; the message holds the traceback of every rank that failed."""


class RankTimeout(AssertionError):
    """A rank did not answer in time (a hang, e.g. a collective some rank never reached)."""


def backend_skip_reason(backend: str, world_size: int) -> str | None:
    """Why `backend` cannot run `world_size` ranks on this machine, or None if it can."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if backend == "gloo":
        return None if dist.is_gloo_available() else "torch was built without gloo"
    if backend == "nccl":
        if not dist.is_nccl_available():
            return "torch was built without NCCL"
        if torch.cuda.device_count() < world_size:
            return (f"NCCL needs one GPU per rank: {world_size} ranks, "
                    f"{torch.cuda.device_count()} GPU(s) here")
        return None
    return f"unknown process-group backend {backend!r}"


def device_for(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _worker(rank, world_size, backend, init_file, tasks, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=300))
        import fusedopt  # noqa: F401  (imported once here, not in every task)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world_size` live worker processes with an initialised default process group."""

    def __init__(self, world_size: int = 2, backend: str = "gloo"):
        reason = backend_skip_reason(backend, world_size)
        if reason is not None:
            raise RuntimeError(f"cannot start {world_size} {backend} ranks: {reason}")
        self.world_size, self.backend = world_size, backend
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="fusedopt-dist-")
        os.close(fd)
        os.unlink(init_file)  # the FileStore creates it
        self._init_file = init_file
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world_size, self.backend, init_file, self._tasks[r],
                              self._results))
            for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect("start", _START_TIMEOUT)

    def _collect(self, what: str, timeout: float) -> list:
        """One answer per rank; kills the workers and raises on an error or a timeout."""
        deadline = time.monotonic() + timeout
        answers: dict[int, tuple[str, object]] = {}
        while len(answers) < self.world_size:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in answers]
            if left <= 0 or (dead and self._results.empty()):
                self.close()
                errors = {r: v for r, (k, v) in answers.items() if k == "error"}
                if errors:
                    raise RankFailure(_format(what, errors))
                missing = sorted(set(range(self.world_size)) - set(answers))
                why = (f"rank(s) {dead} died" if dead and left > 0
                       else f"no answer within {timeout:.0f} s")
                raise RankTimeout(f"{what}: rank(s) {missing}: {why}")
            try:
                rank, kind, value = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            answers[rank] = (kind, value)
            if kind == "error":
                # the other ranks may be stuck in a collective: give them a moment to fail too
                deadline = min(deadline, time.monotonic() + 5.0)
        errors = {r: v for r, (k, v) in answers.items() if k == "error"}
        if errors:
            self.close()
            raise RankFailure(_format(what, errors))
        return [answers[r][1] for r in range(self.world_size)]

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT) -> list:
        """[fn(rank, world_size, *args) for each rank], computed on the ranks."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args))
        return self._collect(getattr(fn, "__name__", repr(fn)), timeout)

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        if procs and os.path.exists(self._init_file):
            os.unlink(self._init_file)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _format(what: str, errors: dict) -> str:
    return "\n".join(f"{what} failed on rank {r}:\n{tb}" for r, tb in sorted(errors.items()))


_pools: dict[tuple[int, str], RankPool] = {}


def rank_pool(world_size: int = 2, backend: str = "gloo") -> RankPool:
    """The session's shared pool of `world_size` ranks on `backend` (started on first use)."""
    key = (world_size, backend)
    if key not in _pools:
        _pools[key] = RankPool(world_size, backend)
    return _pools[key]


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()


def run_ranks(fn, *args, world_size: int = 2, backend: str = "gloo",
              timeout: float = DEFAULT_TIMEOUT) -> list:
    """fn(rank, world_size, *args) on fresh ranks (a pool of its own, closed afterwards)."""
    with RankPool(world_size, backend) as pool:
        return pool.run(fn, *args, timeout=timeout)


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def ranks(request):
    """(torch.distributed backend, a pool of two live ranks) for gloo and nccl, each skipped
    with the reason where it cannot run; a test module takes it with
    ``from _harness import ranks``."""
    reason = backend_skip_reason(request.param, 2)
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    return request.param, rank_pool(2, request.param)
