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
``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``).
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
    files = [CUDA_SRC / f for f in KERNELS + (BINDINGS,)]
    headers = sorted(CUDA_SRC.glob("*.cuh")) + sorted(CUDA_SRC.glob("*.hpp")) + [
        CUDA_SRC / "emu" / "cuda_runtime.h"]
    missing = [str(f) for f in files + headers if not f.is_file()]
    if missing:
        raise Unavailable(f"CUDA sources not found (not a source checkout?): {missing[:3]}")
    return files, headers


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise Unavailable("no C++ compiler (c++ / g++) on PATH")
    return cxx


def build(verbose: bool = False) -> Path:
    """Compile the emulation module (or find it in the cache); returns its path."""
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - pybind11 is in the test extras
        raise Unavailable("pybind11 is not installed") from exc
    files, headers = _sources()
    cxx = _compiler()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    h = hashlib.sha256()
    for f in files + headers:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    extra = os.environ.get("DIFFCAM_EMU_CXXFLAGS", "").split()  # e.g. -fsanitize=address
    h.update(f"{cxx}|{sys.version}|{pybind11.__version__}|{extra}".encode())
    cache = Path(os.environ.get("DIFFCAM_EMU_CACHE") or Path(tempfile.gettempdir()) / "diffcam-cuda-emu")
    out_dir = cache / h.hexdigest()[:16]
    target = out_dir / f"{NAME}{suffix}"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))
    common = [cxx, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-w",
              "-DDIFFCAM_CUDA_EMU", f"-DDIFFCAM_CUDA_MODULE={NAME}",
              f"-I{CUDA_SRC / 'emu'}", f"-I{CUDA_SRC}", f"-I{pybind11.get_include()}",
              f"-I{sysconfig.get_paths()['include']}"] + extra
    jobs, objs = [], []
    for f in files:
        obj = work / (f.name + ".o")
        lang = ["-x", "c++"] if f.suffix == ".cu" else []
        cmd = common + lang + ["-c", str(f), "-o", str(obj)]
        jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        objs.append(str(obj))
    for cmd, p in jobs:
        log = p.communicate()[0].decode(errors="replace")
        if p.returncode:
            raise RuntimeError(f"compiling the CUDA emulation failed:\n{' '.join(cmd)}\n{log}")
        if verbose and log:
            print(log)
    tmp = work / target.name
    link = [cxx, "-shared", "-o", str(tmp)] + objs + extra
    res = subprocess.run(link, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"linking the CUDA emulation failed:\n{res.stdout}{res.stderr}")
    os.replace(tmp, target)  # atomic: a concurrent build finds a complete file or none
    shutil.rmtree(work, ignore_errors=True)
    return target


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
