"""CPU allocator tuning for the attribution pass (glibc ``malloc`` thresholds).

PyTorch's CPU tensors come from the C library's ``malloc``.  glibc serves a large request with a
fresh ``mmap`` once its dynamic threshold is reset, and gives the top of the heap back to the
kernel as soon as more than ``M_TRIM_THRESHOLD`` bytes are free there.  A backward pass that
creates and frees many temporaries of a few MB (the per-target attention gradients of a batched
backward: targets x heads x sequence^2 floats) then touches fresh, zero-filled pages on every
call, and the page faults can cost more than the arithmetic: on the tiny LLaVA-layout test
model a 16-target backward spent about a third of its time in them (bench/RESULTS.md,
2026-12-06, session 15).

:func:`tune_cpu_allocator` raises the two thresholds once per process (``mallopt``), so freed
memory stays in the heap for the next call.  The cost is memory the process keeps instead of
returning: at most ``trim_threshold`` of free heap (256 MiB by default), next to a model of
several GB.  It is process-wide and lasts until the process ends; ``diffcam.Explainer`` calls it
on its first CPU explanation unless ``tune_allocator=False`` or ``DIFFCAM_TUNE_MALLOC=0``.  On
anything but Linux with glibc it does nothing and says why.

>>> from diffcam._allocator import tune_cpu_allocator, allocator_state
>>> tune_cpu_allocator() in (True, False)
True
>>> sorted(allocator_state())
['mmap_threshold', 'reason', 'trim_threshold', 'tuned']
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

__all__ = ["tune_cpu_allocator", "allocator_state", "tuning_enabled", "ENV"]

#: environment variable: ``0`` / ``false`` / ``no`` / ``off`` keeps the C library's defaults
ENV = "DIFFCAM_TUNE_MALLOC"

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_state = {"tuned": False, "reason": "not tried", "mmap_threshold": None, "trim_threshold": None}


def tuning_enabled(explicit=None) -> bool:
    """``explicit`` if given (True / False), else the environment: tuning is on unless
    ``DIFFCAM_TUNE_MALLOC`` is ``0``, ``false``, ``no`` or ``off``.

    >>> tuning_enabled(False)
    False
    """
    if explicit is not None:
        return bool(explicit)
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None, f"not Linux ({sys.platform})"
    lib, _ = platform.libc_ver()
    if lib != "glibc":
        return None, f"the C library is not glibc ({lib or 'unknown'})"
    try:
        fn = ctypes.CDLL(None).mallopt          # the process's own C library, no lookup
    except (OSError, AttributeError) as e:
        return None, f"mallopt not found in the process's C library: {e}"
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn, ""


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes) once per process; True when they are set
    (now or by an earlier call).  Requests up to ``mmap_threshold`` come from the heap, and up to
    ``trim_threshold`` bytes of free heap are kept for reuse.  A no-op returning False where
    ``mallopt`` is not glibc's (:func:`allocator_state` says why).  Only the first call acts;
    later calls return its outcome (the Explainer calls this on every CPU pass)."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int (bytes), got {type(v).__name__}")
        if not 0 < v < 2 ** 31:
            raise ValueError(f"{name} must be in (0, 2**31) bytes, got {v}")
    with _lock:
        if _state["reason"] != "not tried":     # once per process, success or not: the
            return _state["tuned"]              # platform checks are not for the hot path
        fn, why = _glibc()
        if fn is None:
            _state["reason"] = why
            return False
        ok = fn(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and fn(_M_TRIM_THRESHOLD,
                                                                trim_threshold) == 1
        _state.update(tuned=ok, reason="set by mallopt" if ok else "mallopt refused the values",
                      mmap_threshold=mmap_threshold if ok else None,
                      trim_threshold=trim_threshold if ok else None)
        return ok


def allocator_state() -> dict:
    """What :func:`tune_cpu_allocator` did in this process: ``tuned``, ``reason`` and the two
    thresholds (None when not set)."""
    with _lock:
        return dict(_state)
