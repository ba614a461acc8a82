"""`python -m fusedopt info | demo | bench ...`"""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: python -m fusedopt {info,demo,bench} [options]

  info    backends available here, versions, device
  demo    train a small classifier on synthetic data with fusedopt (loss curve)
  bench   side-by-side kernel benchmarks against PyTorch (see `bench --help`)
"""


def _with_note(version: str, note: str) -> str:
    return f"{version} ({note})" if note else version


def _cuda_extension_line() -> str:
    """How fusedopt._cuda was built and which driver it needs (or why it is missing)."""
    try:
        from fusedopt import _cuda
    except ImportError:
        return "not built"
    from fusedopt.backends.cuda import driver_requirement

    runtime, driver = _cuda.runtime_version(), _cuda.driver_version()
    have = (f"this driver supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver
            else "no NVIDIA driver here")
    return (f"CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime linked statically: needs "
            f"{driver_requirement(runtime)}; {have}")


def info() -> int:
    import platform

    import torch

    import fusedopt
    from fusedopt import backends
    from fusedopt._versions import support_note

    print(f"fusedopt {fusedopt.__version__} ({fusedopt.__path__[0]})")
    print(f"python   {platform.python_version()} ({platform.machine()})")
    print(f"torch    {_with_note(torch.__version__, support_note('torch', torch.__version__))}")
    try:
        import triton

        version = triton.__version__
        print(f"triton   {_with_note(version, support_note('triton', version))}")
    except ImportError:
        print("triton   not installed")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"device   {torch.cuda.get_device_name()} (sm_{major}{minor}, torch built with "
              f"CUDA {torch.version.cuda})")
    else:
        print(f"device   CPU, {torch.get_num_threads()} threads (no CUDA device)")
    print(f"_cuda    {_cuda_extension_line()}")
    print("backends:")
    for name, (ok, reason) in backends.available().items():
        print(f"  {name:<7} {'available' if ok else 'unavailable: ' + reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        argparse.ArgumentParser(prog="python -m fusedopt info").parse_args(rest)
        return info()
    if command == "demo":
        from fusedopt.demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from fusedopt.bench.cli import main as bench_main

        return bench_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
