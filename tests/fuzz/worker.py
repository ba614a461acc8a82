"""The fuzz suite's worker process: every fusedopt call of a fuzz example runs here, in a
subprocess, so that a crash (SIGSEGV, abort, an AddressSanitizer report) or a hang is a
failed example -- with the spec that caused it -- instead of a dead test run.

The parent (the tests, through `Worker`) sends ``(case name, spec)``; the spec is plain
Python data (numbers, strings, tuples) from which the case builds its tensors
deterministically (cases_losses.py, cases_optim.py).  The worker answers
``("ok", result)`` with plain contiguous CPU tensors (the inputs it used and what fusedopt
returned), or ``("raised", exception type name, message)``.  Frames are 8-byte lengths
followed by a pickle.  A crashed or hung worker is replaced by a fresh one for the next
example.

    python tests/fuzz/worker.py      # serves frames on stdin/stdout (run by Worker)
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = float(os.environ.get("FUSEDOPT_FUZZ_TIMEOUT", "300"))


def _write_frame(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = struct.pack("<Q", len(data)) + data
    while payload:
        payload = payload[os.write(fd, payload):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, have = [], 0
    while have < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - have, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None):
    (n,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))


class WorkerDied(AssertionError):
    """The worker crashed or hung on an example (an assertion: the example fails)."""


class Worker:
    """The parent's handle on a worker process (started on first use, replaced after a
    crash).  The child imports the same fusedopt as this process."""

    def __init__(self):
        self.proc = None
        self.log = None

    def _start(self) -> None:
        import fusedopt

        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fusedopt.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package_parent, str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py")], cwd=HERE,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)

    def _stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:].decode(errors="replace")

    def call(self, name: str, spec):
        """Run case `name` on `spec` in the worker: ("ok", result) or ("raised", type, msg)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            _write_frame(self.proc.stdin.fileno(), (name, spec))
            return _read_frame(self.proc.stdout.fileno(), time.monotonic() + TIMEOUT_S)
        except (EOFError, BrokenPipeError, TimeoutError) as exc:
            hung = isinstance(exc, TimeoutError)
            if hung:
                self.proc.kill()
            rc = self.proc.wait()
            tail = self._stderr_tail()
            self.proc = None
            what = f"hung for {TIMEOUT_S:.0f} s" if hung else f"died with exit status {rc}"
            raise WorkerDied(f"the fuzz worker {what} running {name}{spec!r}\n{tail}") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:  # it holds nothing to save: a slow interpreter shutdown is not waited for
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def serve() -> None:
    # The protocol owns the original stdout; anything printed goes to stderr instead.
    out = os.dup(1)
    os.dup2(2, 1)
    import cases_losses
    import cases_optim

    cases = {**cases_losses.CASES, **cases_optim.CASES}
    while True:
        try:
            name, spec = _read_frame(0)
        except EOFError:
            return
        try:
            reply = ("ok", cases[name](spec))
        except Exception as exc:  # reported to the parent, which judges the type
            message = str(exc)[:2000]
            if not isinstance(exc, (TypeError, ValueError, IndexError)):
                message += "\n" + traceback.format_exc()[-3000:]
            reply = ("raised", type(exc).__name__, message)
        _write_frame(out, reply)


if __name__ == "__main__":
    serve()
