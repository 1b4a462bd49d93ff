"""Build and load ``_cuda_emu``: diffcam's CUDA kernels compiled for the CPU.

The sources of the CUDA backend (``csrc/cuda/*.cu`` and its pybind11 bindings) are compiled by
the host C++ compiler against ``csrc/cuda/emu/cuda_runtime.h``, a small emulation of the CUDA
runtime (blocks run one after another, the threads of a block as fibers that switch at
``__syncthreads`` and warp shuffles).  The result is a module with the very functions of
``diffcam._cuda`` whose "device pointers" are host pointers, so ``diffcam.refine._cuda`` can
drive it with NumPy arrays (``emulated_backend``) and the GPU tests run on any machine.  What it
cannot show (timing, the device libm, true concurrency) is listed in the header.

The module is built once per source state into a cache folder (``DIFFCAM_EMU_CACHE`` or the
system temporary directory) and reused.  ``DIFFCAM_EMU_CXXFLAGS`` adds compiler flags, e.g.
``-fsanitize=address`` for an AddressSanitizer build that finds out-of-bounds accesses of the
kernels in the NumPy buffers standing in for device memory (run Python with
``LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)"``;
see ``preload``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
KERNELS = ("refine.cu", "rank_filter.cu", "metrics.cu")
BINDINGS = "bindings_cuda.cpp"
NAME = "_cuda_emu"


class Unavailable(RuntimeError):
    """The emulation cannot be built here (no sources, compiler or pybind11)."""


def _sources():
    """The emulation's sources and headers (compile_module checks they exist)."""
    files = [CUDA_SRC / f for f in KERNELS + (BINDINGS,)]
    headers = sorted(CUDA_SRC.glob("*.cuh")) + sorted(CUDA_SRC.glob("*.hpp")) + [
        CUDA_SRC / "emu" / "cuda_runtime.h"]
    return files, headers


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise Unavailable("no C++ compiler (c++ / g++) on PATH")
    return cxx


def compile_module(name: str, sources, headers, flags, per_source=None, cache_tag="",
                   verbose: bool = False) -> Path:
    """Compile `sources` (C++; ``.cu`` files as C++) into the Python extension `name` with the
    host compiler, pybind11 and Python headers on the include path, in parallel, into a cache
    folder keyed by the sources, headers, flags and toolchain; returns the module's path.
    `per_source` maps a file name to extra flags for that file."""
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - pybind11 is in the test extras
        raise Unavailable("pybind11 is not installed") from exc
    missing = [str(f) for f in list(sources) + list(headers) if not Path(f).is_file()]
    if missing:
        raise Unavailable(f"sources not found (not a source checkout?): {missing[:3]}")
    cxx = _compiler()
    per_source = per_source or {}
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    h = hashlib.sha256()
    for f in list(sources) + list(headers):
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    h.update(f"{name}|{cxx}|{sys.version}|{pybind11.__version__}|{flags}|{per_source}".encode())
    cache = Path(os.environ.get("DIFFCAM_EMU_CACHE") or Path(tempfile.gettempdir()) / "diffcam-cuda-emu")
    out_dir = cache / f"{cache_tag}{h.hexdigest()[:16]}"
    target = out_dir / f"{name}{suffix}"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))
    common = [cxx, "-std=c++17", "-fPIC", "-fvisibility=hidden", "-w",
              f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"] + list(flags)
    jobs, objs = [], []
    for f in sources:
        f = Path(f)
        obj = work / (f.name + ".o")
        lang = ["-x", "c++"] if f.suffix == ".cu" else []
        cmd = common + per_source.get(f.name, []) + lang + ["-c", str(f), "-o", str(obj)]
        jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        objs.append(str(obj))
    for cmd, p in jobs:
        log = p.communicate()[0].decode(errors="replace")
        if p.returncode:
            raise RuntimeError(f"compiling {name} failed:\n{' '.join(cmd)}\n{log}")
        if verbose and log:
            print(log)
    tmp = work / target.name
    link = [cxx, "-shared", "-o", str(tmp)] + objs + [f for f in flags if f.startswith("-fsan")]
    res = subprocess.run(link + ["-pthread"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"linking {name} failed:\n{res.stdout}{res.stderr}")
    os.replace(tmp, target)  # atomic: a concurrent build finds a complete file or none
    shutil.rmtree(work, ignore_errors=True)
    return target


def build(verbose: bool = False) -> Path:
    """Compile the emulation module (or find it in the cache); returns its path."""
    files, headers = _sources()
    extra = os.environ.get("DIFFCAM_EMU_CXXFLAGS", "").split()  # e.g. -fsanitize=address
    flags = ["-O2", "-DDIFFCAM_CUDA_EMU", f"-DDIFFCAM_CUDA_MODULE={NAME}",
             f"-I{CUDA_SRC / 'emu'}", f"-I{CUDA_SRC}"] + extra
    return compile_module(NAME, files, headers, flags, verbose=verbose)


ASAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
              "-fno-omit-frame-pointer"]


def build_native(sanitize_flags, tag="asan") -> Path:
    """diffcam._core (csrc/bindings.cpp and the two rank-filter translation units, with the
    flags of cmake/core.cmake) built with the given sanitizer flags; returns the module's path."""
    import platform

    src = ROOT / "csrc"
    sources = [src / "bindings.cpp", src / "refine" / "simd_scalar.cpp",
               src / "refine" / "simd_avx2.cpp"]
    headers = sorted((src / "refine").glob("*.hpp"))
    flags = ["-O1", "-ffp-contract=off", "-fno-math-errno", f"-I{src}", "-pthread"] + list(sanitize_flags)
    avx = ["-mavx2", "-mfma"] if platform.machine().lower() in ("x86_64", "amd64") else []
    return compile_module("_core", sources, headers, flags, {"simd_avx2.cpp": avx},
                          cache_tag=f"core-{tag}-")


# the emulation's thread mode under ThreadSanitizer (csrc/cuda/emu/cuda_runtime.h)
TSAN_FLAGS = ["-fsanitize=thread", "-DDCEMU_THREADS", "-g"]


def _runtime(name):
    try:
        cxx = _compiler()
    except Unavailable:
        return None
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True,
                          text=True).stdout.strip()
    return path if path.startswith("/") and Path(path).exists() else None


def libasan():
    """Path of the compiler's AddressSanitizer runtime (to LD_PRELOAD), or None."""
    return _runtime("libasan.so")


def libtsan():
    """Path of the compiler's ThreadSanitizer runtime (to LD_PRELOAD), or None."""
    return _runtime("libtsan.so")


def preload(runtime: str) -> str:
    """LD_PRELOAD for a sanitizer runtime: the runtime, then the compiler's libstdc++.

    A sanitizer preloaded into a Python that has not loaded libstdc++ yet finds no real
    ``__cxa_throw`` to forward its interceptor to, and the first C++ exception (a kernel's
    ValueError for a bad argument) aborts the process with "CHECK failed ... real___cxa_throw";
    loading libstdc++ right behind the runtime gives it one."""
    cxx = _runtime("libstdc++.so")
    return f"{runtime} {cxx}" if cxx else runtime


def load():
    """The emulation module (built on first use)."""
    path = build()
    spec = importlib.util.spec_from_file_location(NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def emulated_backend(ext):
    """Make ``diffcam.refine._cuda`` run on the emulation: ``ext`` replaces ``diffcam._cuda``
    and NumPy arrays count as device arrays (allocated, converted and returned as NumPy)."""
    from diffcam.refine import _cuda

    saved = _cuda._ext, _cuda._adopt
    orig_adopt = _cuda._adopt

    def adopt(x):
        if isinstance(x, np.ndarray):
            return x, _cuda._Lib("numpy", 0)
        return orig_adopt(x)

    _cuda._ext, _cuda._adopt = ext, adopt
    try:
        yield _cuda
    finally:
        _cuda._ext, _cuda._adopt = saved
