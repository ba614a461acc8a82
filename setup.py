"""Build of the torch-free C++ extensions.

* ``fusedopt._cpu``  -- csrc/cpu/*.cpp + csrc/bindings/cpu_*.cpp, built with the host
  C++ compiler (OpenMP) everywhere.
* ``fusedopt._cuda`` -- csrc/cuda/*.cu compiled by nvcc + csrc/bindings/cuda_*.cpp,
  linked against the static CUDA runtime.  Built whenever nvcc is found (CUDA_HOME, PATH
  or /usr/local/cuda); a compile error fails the install.  ``FUSEDOPT_BUILD_CUDA=0`` skips
  it, ``FUSEDOPT_BUILD_CUDA=1`` makes a missing nvcc an error.
  ``FUSEDOPT_CUDA_ARCHS`` (default ``80;90``) picks the SASS targets; PTX of the highest
  one is embedded for newer GPUs.  The runtime linked in is the toolkit's own, so the
  extension needs a driver for that CUDA version (13.x: R580+).

``FUSEDOPT_SANITIZE=address`` builds ``fusedopt._cpu`` with AddressSanitizer (compile and
link flags below; comma-separated sanitizer names are passed to ``-fsanitize=``).  Such a
module loads into an ordinary python only with the sanitizer's runtime preloaded:
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
ASAN_OPTIONS=detect_leaks=0 python ...``
(scripts/asan_check.sh builds one into a temporary folder and runs the tests under it).

Every source file is compiled in parallel, ``FUSEDOPT_BUILD_JOBS`` (default: all CPUs)
at a time, and both extensions are built at the same time.  Neither extension includes a
torch header, so torch is not a build requirement.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
INCLUDE = ["csrc/include", pybind11.get_include()]
# -ffp-contract=off: only explicit fmaf calls fuse, so the kernels round the same way in
# every ISA clone (csrc/cpu/multi_tensor_loop.h) and wherever they are built.
# -fno-trapping-math: no code looks at floating-point exception flags, so g++ may compute
# both sides of a select (the loss math's branch-free selects, math_loss.h) and vectorise.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]


def sanitizer_flags():
    """(compile flags, link flags) for FUSEDOPT_SANITIZE (empty when unset)."""
    names = os.environ.get("FUSEDOPT_SANITIZE", "").strip()
    if not names:
        return [], []
    allowed = {"address", "undefined"}
    unknown = set(names.split(",")) - allowed
    if unknown:
        raise RuntimeError(f"FUSEDOPT_SANITIZE: unknown sanitizer(s) {sorted(unknown)}; "
                           f"expected a comma-separated subset of {sorted(allowed)}")
    # -O1 and frame pointers: exact reports with usable stacks, at a moderate slow-down
    flag = f"-fsanitize={names}"
    return [flag, "-fno-omit-frame-pointer", "-g", "-O1"], [flag]


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def find_cuda_home():
    """The CUDA toolkit directory (holding bin/nvcc and include/cuda_runtime.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def build_jobs() -> int:
    return max(1, int(os.environ.get("FUSEDOPT_BUILD_JOBS", "0") or 0) or os.cpu_count() or 1)


def cudart_static_dir(cuda_home: Path) -> Path:
    """The folder of libcudart_static.a in the toolkit (lib64, lib or targets/<arch>/lib)."""
    candidates = [cuda_home / "lib64", cuda_home / "lib",
                  *sorted((cuda_home / "targets").glob("*/lib"))]
    for folder in candidates:
        if (folder / "libcudart_static.a").exists():
            return folder
    raise RuntimeError(f"libcudart_static.a not found in the CUDA toolkit at {cuda_home} "
                       f"(looked in {', '.join(str(c) for c in candidates)})")


def want_cuda():
    flag = os.environ.get("FUSEDOPT_BUILD_CUDA", "").strip()
    if flag == "0":
        return None
    home = find_cuda_home()
    if flag == "1" and home is None:
        raise RuntimeError("FUSEDOPT_BUILD_CUDA=1 but the CUDA toolkit was not found (set CUDA_HOME)")
    return home


class BuildExt(build_ext):
    """build_ext that compiles the .cu sources of ``fusedopt._cuda`` with nvcc first."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = build_jobs()  # both extensions at once

    def build_extension(self, ext):
        if getattr(ext, "cu_sources", None):
            ext.extra_objects = self._nvcc_compile(ext) + list(ext.extra_objects or [])
        super().build_extension(ext)

    def _nvcc_compile(self, ext):
        nvcc = ext.nvcc
        archs = [a for a in os.environ.get("FUSEDOPT_CUDA_ARCHS", "80;90").split(";") if a]
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)

        # An object newer than its source and every header is reused (no nvcc run): the
        # headers are few, so "any header changed" stands in for a dependency scan.
        headers = [*(ROOT / "csrc" / "include").rglob("*.h"), *(ROOT / "csrc" / "cuda").glob("*.cuh")]
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)

        def compile_one(src):
            obj = out_dir / (Path(src).stem + ".o")
            if obj.exists() and obj.stat().st_mtime > max(newest_header, (ROOT / src).stat().st_mtime):
                return str(obj)
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC", "-Icsrc/include", "--expt-relaxed-constexpr",
                   "-lineinfo", *gencode]
            print(" ".join(cmd), flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{proc.stdout}\n{proc.stderr}")
            return str(obj)

        with ThreadPoolExecutor(build_jobs()) as pool:
            return list(pool.map(compile_one, ext.cu_sources))


def extensions():
    sanitize_compile, sanitize_link = sanitizer_flags()
    exts = [
        Extension(
            "fusedopt._cpu",
            sources=_rel((ROOT / "csrc" / "cpu").glob("*.cpp"))
            + _rel((ROOT / "csrc" / "bindings").glob("cpu_*.cpp")),
            include_dirs=INCLUDE,
            extra_compile_args=CXX_FLAGS + sanitize_compile,
            extra_link_args=["-fopenmp"] + sanitize_link,
            language="c++",
        )
    ]
    cuda_home = want_cuda()
    if cuda_home:
        lib = cudart_static_dir(cuda_home)
        ext = Extension(
            "fusedopt._cuda",
            sources=_rel((ROOT / "csrc" / "bindings").glob("cuda_*.cpp")),
            include_dirs=INCLUDE + [str(cuda_home / "include")],
            extra_compile_args=CXX_FLAGS,
            library_dirs=[str(lib)],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_link_args=["-fopenmp"],
            language="c++",
        )
        ext.cu_sources = _rel((ROOT / "csrc" / "cuda").glob("*.cu"))
        # relink when a .cu file or a header changes, not only a binding
        ext.depends = ext.cu_sources + _rel((ROOT / "csrc" / "cuda").glob("*.cuh")) + _rel(
            (ROOT / "csrc" / "include").rglob("*.h"))
        ext.nvcc = str(cuda_home / "bin" / "nvcc")
        exts.append(ext)
    else:
        print("fusedopt: nvcc not found or FUSEDOPT_BUILD_CUDA=0: skipping fusedopt._cuda",
              file=sys.stderr)
    return exts


try:  # the C++ sources of one extension in parallel (pybind11 >= 2.6)
    from pybind11.setup_helpers import ParallelCompile
except ImportError:
    pass
else:
    ParallelCompile(default=build_jobs()).install()
setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
