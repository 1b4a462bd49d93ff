"""The one place that decides which implementation of the kernels runs.

Backends, fastest first:

``native``  C++17 kernels of ``diffcam._core`` (compiled at install time)
``cuda``    CUDA kernels of ``diffcam._cuda``, for maps that already live on a GPU
``numba``   the Numba port (``diffcam/refine/_numba.py``), used when the compile failed
``numpy``   the float64 reference (``diffcam/refine/reference.py``): slow, always there

``DIFFCAM_DISABLE_EXTENSIONS=1`` hides the compiled extensions (as if the compile had failed).

Selection: an explicit ``backend=`` argument wins; else the environment variable
``DIFFCAM_BACKEND``; else ``cuda`` for GPU arrays and the first available of native / numba /
numpy for host arrays.  Asking for a backend that is not available raises
:class:`BackendUnavailableError` with the reason and how to get it.  When the automatic choice
falls back from the native kernels (extension missing, broken, or shadowed by a copy of the
package without it), a ``RuntimeWarning`` says why and what the fallback costs, once per process
and reason; not when ``DIFFCAM_DISABLE_EXTENSIONS`` hides them on purpose.

Example
-------
>>> import diffcam
>>> info = diffcam.backends()
>>> info["numpy"].available
True
>>> sorted(info) == ["cuda", "native", "numba", "numpy"]
True
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["BACKENDS", "Availability", "BackendUnavailableError", "backends", "get_backend",
           "resolve_backend_name"]

BACKENDS = ("native", "cuda", "numba", "numpy")
HOST_ORDER = ("native", "numba", "numpy")

_ADVICE = {
    "native": ("reinstall diffcam from source with a C++17 compiler and CMake available: "
               "`pip install --force-reinstall --no-deps .` (the build log says why the "
               "extension failed)"),
    "cuda": ("install diffcam on a machine with the CUDA toolkit (nvcc) so the CUDA kernels are "
             "compiled (DIFFCAM_CUDA=on makes a missing toolkit an error), and run on a machine "
             "with an NVIDIA GPU"),
    "numba": "`pip install numba`",
    "numpy": "",
}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested explicitly but cannot be used."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and why not."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.available


class _NumpyBackend:
    """The float64 reference behind the common contract (float32 maps out)."""

    name = "numpy"

    def __init__(self):
        from .refine import reference

        self._ref = reference

    @staticmethod
    def _f32(x):
        return np.ascontiguousarray(x, dtype=np.float32)

    def kernel_sizes(self, maps, params, threads=0):
        return self._ref.kernel_sizes(maps, params)

    def rank_gaussian_filter(self, maps, ksizes, threads=0):
        return self._f32(self._ref.rank_gaussian_filter(maps, ksizes))

    def confidence_gating(self, maps, params, threads=0):
        out, branch, tau = self._ref.confidence_gating(maps, params)
        return self._f32(out), branch, tau

    def background_attenuation(self, maps, params, threads=0):
        out, tau_bg = self._ref.background_attenuation(maps, params)
        return self._f32(out), tau_bg

    def causal_debiasing(self, maps, rep, rep_const, params, threads=0):
        out, lam, applied = self._ref.causal_debiasing(maps, rep, rep_const, params)
        return self._f32(out), lam, applied

    def refine(self, maps, rep, rep_const, params, threads=0):
        out, *rest = self._ref.refine(maps, rep, rep_const, params)
        return (self._f32(out), *rest)

    def otsu_threshold_u8(self, imgs, threads=0):
        return self._ref.otsu_threshold_u8(imgs)

    def resize_bilinear(self, maps, out_h, out_w, threads=0):
        return self._f32(self._ref.resize_bilinear(maps, out_h, out_w))

    def localization(self, maps, masks, threads=0):
        return self._ref.localization(maps, masks)


def _installed_elsewhere(ext: str) -> str | None:
    """The folder of an installed diffcam that has the compiled extension ``ext`` when the
    package imported now is another copy without it (typically the source tree, when Python
    runs in the repository's root: the current directory comes first on ``sys.path`` and
    shadows the installed package), else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from importlib import metadata

        dist = metadata.distribution("diffcam")
        files = dist.files or ()
    except Exception:
        return None
    for f in files:
        parts = f.parts
        if len(parts) == 2 and parts[0] == "diffcam" and parts[1].startswith(ext + ".") \
                and parts[1].endswith((".so", ".pyd")):
            path = os.path.abspath(str(dist.locate_file(f)))
            folder = os.path.dirname(path)
            if os.path.exists(path) and os.path.normcase(folder) != os.path.normcase(here):
                return folder
    return None


@functools.lru_cache(maxsize=None)
def _probe(name: str):
    """(module or None, reason)."""
    if name in ("native", "cuda") and os.environ.get("DIFFCAM_DISABLE_EXTENSIONS", "").lower() in (
            "1", "true", "yes", "on"):
        return None, "disabled by DIFFCAM_DISABLE_EXTENSIONS"
    try:
        if name == "numpy":
            return _NumpyBackend(), ""
        if name == "native":
            return importlib.import_module("diffcam._core"), ""
        if name == "numba":
            return importlib.import_module("diffcam.refine._numba"), ""
        if name == "cuda":
            mod = importlib.import_module("diffcam.refine._cuda")
            ok, reason = mod.available()
            return (mod, "") if ok else (None, reason)
    except ImportError as exc:
        what = {"native": "the compiled extension diffcam._core is not installed",
                "numba": ("numba is not installed" if getattr(exc, "name", "") == "numba"
                          else "the Numba kernels could not be imported"),
                "cuda": "the CUDA extension diffcam._cuda is not installed"}[name]
        other = {"native": "_core", "cuda": "_cuda"}.get(name)
        other = _installed_elsewhere(other) if other else None
        if other is not None:
            here = os.path.dirname(os.path.abspath(__file__))
            return None, (f"{what} next to the diffcam imported now ({here}), which shadows the "
                          f"installed one in {other} (it has the extension): Python found this "
                          "copy first on sys.path (the current directory?); run from another "
                          "directory, or install in place with pip install -e .")
        return None, f"{what} ({exc})"
    except Exception as exc:  # a broken build must not take the package down
        return None, f"{type(exc).__name__}: {exc}"
    raise ValueError(name)


def backends() -> dict:
    """Report which backends can run here and, for the others, why not.

    >>> import diffcam
    >>> {k: v.available for k, v in diffcam.backends().items()}   # doctest: +SKIP
    {'native': True, 'cuda': False, 'numba': True, 'numpy': True}
    """
    return {name: Availability(_probe(name)[0] is not None, _probe(name)[1]) for name in BACKENDS}


def _check_name(name: str, where: str) -> str:
    key = str(name).lower()
    if key not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return key


# os.environ.get of a missing key costs ~0.7 us (a KeyError inside), a visible share of a
# token-grid map's refine(); the mapping's own dict answers in ~20 ns and is what os.environ
# reads and writes (CPython's os._Environ).  Other implementations use os.environ.get.
try:
    _ENV_DATA, _BACKEND_KEY = os.environ._data, os.environ.encodekey("DIFFCAM_BACKEND")
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _ENV_DATA = _BACKEND_KEY = None


def _env_backend() -> str:
    """The value of DIFFCAM_BACKEND now ('' when unset)."""
    if _ENV_DATA is None:  # pragma: no cover
        return os.environ.get("DIFFCAM_BACKEND", "")
    v = _ENV_DATA.get(_BACKEND_KEY)
    return "" if v is None else os.environ.decodevalue(v)


def auto_native():
    """The native module when the automatic choice of a backend for host maps is the native one
    right now (DIFFCAM_BACKEND unset, ``auto`` or ``native``, and the extension available), else
    None.  ``diffcam.refine(maps)``'s shortcut asks this on every call: about 0.1 us, against
    0.3 us for ``resolve_backend_name()`` followed by ``_probe``.

    >>> auto_native() is _probe("native")[0] or auto_native() is None
    True
    """
    env = _env_backend()
    if env and env.strip().lower() not in ("auto", "native"):
        return None
    return _probe("native")[0]


def resolve_backend_name(backend: str | None = None, on_gpu: bool = False) -> str:
    """The backend name a call with these arguments will use (see the module docstring)."""
    if backend is None:
        env = _env_backend().strip()
        if env and env.lower() != "auto":
            backend = _check_name(env, "DIFFCAM_BACKEND")
            if on_gpu and backend != "cuda":
                raise BackendUnavailableError(
                    f"DIFFCAM_BACKEND={env!r} but the maps live on a GPU; unset it or move the "
                    "maps to the host (tensor.cpu())")
            if not on_gpu and backend == "cuda":
                return "cuda"
            return backend
        if on_gpu:
            return "cuda"
        why = None
        for name in HOST_ORDER:
            mod, reason = _probe(name)
            if mod is not None:
                if why is not None:
                    _warn_fallback(name, why)
                return name
            if name == "native":
                why = reason
        return "numpy"  # pragma: no cover - numpy is always there
    name = _check_name(backend, "backend")
    if on_gpu and name != "cuda":
        raise BackendUnavailableError(
            f"backend={backend!r} runs on the host but the maps live on a GPU; use "
            "backend='cuda' or move the maps to the host (tensor.cpu())")
    return name


_WARNED: set = set()


def _warn_fallback(name: str, why: str) -> None:
    """Say once per process and reason that the automatic choice fell back from the native
    kernels (not when the user hid them with DIFFCAM_DISABLE_EXTENSIONS)."""
    if why.startswith("disabled by") or why in _WARNED:
        return
    _WARNED.add(why)
    jit = (" Its first call of each kernel compiles it (up to ~20 s; cached on disk "
           "afterwards)." if name == "numba" else "")
    warnings.warn(f"diffcam: the native kernels cannot be used ({why}); using the {name} "
                  f"backend, which is slower.{jit} Set DIFFCAM_BACKEND={name} to choose it "
                  "explicitly (and silence this).", RuntimeWarning, stacklevel=4)


def get_backend(backend: str | None = None, on_gpu: bool = False):
    """The kernel module for a backend name (None: the automatic choice).

    >>> get_backend("numpy").name
    'numpy'
    """
    name = resolve_backend_name(backend, on_gpu)
    mod, reason = _probe(name)
    if mod is None:
        advice = _ADVICE[name]
        raise BackendUnavailableError(
            f"diffcam backend {name!r} is not available: {reason}."
            + (f" To get it: {advice}." if advice else ""))
    if name == "cuda" and not on_gpu:
        raise BackendUnavailableError(
            "backend='cuda' needs maps on a GPU (a torch CUDA tensor or a CuPy array); got host "
            "memory. Move them with tensor.cuda(), or use a host backend")
    return mod
