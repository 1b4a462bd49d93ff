"""pytest-benchmark suite: each refinement module and the pipeline, per backend and map size.

Run: ``python -m pytest bench/ --benchmark-only`` (see bench/README.md for the options used in
bench/RESULTS.md).  Backends: ``native`` (diffcam._core), ``numba``, ``numpy`` (the float64
reference, single token-grid maps only), ``naive`` (bench/naive.py, the NumPy/SciPy code a user
would write) and ``scipy`` (scipy.ndimage.rank_filter, a speed reference point for the filter
only; it computes a plain median, not the rank-weighted filter).

Modules: ``filter`` (AKD's rank-weighted Gaussian filter with a fixed k), ``dacg``, ``cba``,
``sicd``, ``pipeline`` (``diffcam.refine`` with the config, backend and threads passed: the
public API with its input validation; for ``native`` that is the one-call path of float32 NumPy
maps, ``_core.refine_default``), ``pipeline_default`` (``diffcam.refine(maps)`` with every
default, the automatic backend and all cores; timed under ``native``, which it picks where
available) and ``pipeline_kernel`` (the backend's ``refine`` kernel called directly, with its
per-map info arrays: the cost without the API).

Threads: single token-grid maps run on one thread (threads=1: the "one map on one core"
target); every other case uses all cores (threads=0).  naive / numpy / scipy are single-threaded.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import naive
from diffcam import _backend
from diffcam.refine import (RefineConfig, background_attenuation, causal_debiasing,
                            confidence_gating, rank_gaussian_filter)
from diffcam.refine import refine as refine_api

TOKEN_SHAPES = [(14, 14), (24, 24), (27, 27), (22, 28)]
IMAGE_SHAPES = [(384, 384), (1024, 1024)]
TOKEN_BATCHES = [1, 1024]
IMAGE_KS = [3, 7, 11]
TOKEN_K = 3                       # what AKD picks on token grids (F_size = H / 512 is tiny)
BACKENDS = ["native", "numba", "numpy", "naive", "scipy"]
MODULES = ["filter", "dacg", "cba", "sicd", "pipeline", "pipeline_default", "pipeline_kernel"]

#: The paper's per-map CPU time of each module (ms).
PAPER_BUDGET_MS = {"filter": 12.7, "dacg": 6.9, "cba": 5.6, "sicd": 10.2, "pipeline": 35.4,
                   "pipeline_default": 35.4, "pipeline_kernel": 35.4}
PAPER_MODULE = {"filter": "AKD", "dacg": "DACG", "cba": "CBA", "sicd": "SICD",
                "pipeline": "total", "pipeline_default": "total", "pipeline_kernel": "total"}
CFG = RefineConfig.paper()
PARAMS = CFG.to_params()


@functools.lru_cache(maxsize=None)
def cam_maps(shape, n, seed=0):
    """Grad-CAM-like float32 maps in [0, 1]: two Gaussian blobs + noise, ReLU'd (exact zeros)."""
    h, w = shape
    rng = np.random.default_rng(seed + 7919 * h + w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    out = np.empty((n, h, w), dtype=np.float32)
    for i in range(n):
        m = rng.random((h, w), dtype=np.float32) * 0.25 - 0.05
        for _ in range(2):
            cy, cx = rng.random() * h, rng.random() * w
            s = (0.08 + 0.15 * rng.random()) * min(h, w)
            m += rng.random() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        m = np.maximum(m, 0.0)
        out[i] = m / m.max()
    return out


def _cases():
    for shape in TOKEN_SHAPES:
        for n in TOKEN_BATCHES:
            for module in MODULES:
                for b in BACKENDS:
                    yield module, b, shape, n, (TOKEN_K if module == "filter" else None)
    for shape in IMAGE_SHAPES:
        for module in MODULES:
            for k in (IMAGE_KS if module == "filter" else [None]):
                for b in BACKENDS:
                    yield module, b, shape, 1, k


def _structural_skip(module, backend, shape, n, k):
    """Combinations never timed (too slow per round, or meaningless); None when timed."""
    if backend == "scipy" and module != "filter":
        return "scipy.ndimage.rank_filter is only a reference point for the filter"
    if module == "pipeline_kernel" and backend not in ("native", "numba"):
        return "kernel-level pipeline only for the compiled backends"
    if module == "pipeline_default" and backend != "native":
        return "refine(maps) with every default picks its backend itself: timed as native"
    token = shape in TOKEN_SHAPES
    if backend == "numpy" and not (token and n == 1):
        return "the float64 reference is timed on single token-grid maps only (seconds per call)"
    if backend == "naive" and n > 1 and shape != (27, 27):
        return "naive is a Python loop over maps: per-map time = its x1 case; x1024 only on 27x27"
    if backend == "scipy" and n > 1 and shape != (27, 27):
        return "scipy loops over maps like naive; x1024 only on 27x27"
    return None


def _id(case):
    module, backend, (h, w), n, k = case
    return f"{module}-{backend}-{h}x{w}-n{n}" + (f"-k{k}" if k else "")


CASES = [c for c in _cases() if _structural_skip(*c) is None]


def _quick(case):
    module, backend, shape, n, k = case
    if module in ("pipeline", "pipeline_default", "pipeline_kernel") and shape == (27, 27):
        return True
    return module == "filter" and shape == (1024, 1024) and k == 7


def _threads(shape, n):
    return 1 if (shape in TOKEN_SHAPES and n == 1) else 0


def _threads_used(backend, threads):
    if backend not in ("native", "numba"):
        return 1
    if threads:
        return threads
    env = os.environ.get("DIFFCAM_NUM_THREADS", "").strip()
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count()


def _make_call(module, backend, maps, k, threads):
    """A zero-argument callable running one module on ``maps`` (N, H, W) with one backend."""
    n = maps.shape[0]
    x = maps[0] if n == 1 else maps           # a single map is passed as (H, W), like a user
    if backend == "naive":
        return {
            "filter": lambda: naive.rank_gaussian_filter(maps, k),
            "dacg": lambda: naive.confidence_gating(maps, CFG),
            "cba": lambda: naive.background_attenuation(maps, CFG),
            "sicd": lambda: naive.causal_debiasing(maps, CFG),
            "pipeline": lambda: naive.refine(maps, CFG),
        }[module]
    if backend == "scipy":
        return lambda: naive.scipy_rank_filter(maps, k)
    kw = {"backend": backend, "threads": threads}
    if module == "filter":
        return lambda: rank_gaussian_filter(x, k, **kw)
    if module == "dacg":
        return lambda: confidence_gating(x, CFG, **kw)
    if module == "cba":
        return lambda: background_attenuation(x, CFG, **kw)
    if module == "sicd":
        return lambda: causal_debiasing(x, CFG, **kw)
    if module == "pipeline":
        return lambda: refine_api(x, CFG, **kw)
    if module == "pipeline_default":          # every default: what most callers write
        return lambda: refine_api(x)
    if module == "pipeline_kernel":
        mod = _backend.get_backend(backend)
        data = np.ascontiguousarray(maps)
        rc = np.zeros(n, dtype=np.float64)
        return lambda: mod.refine(data, None, rc, PARAMS, threads=threads)
    raise ValueError(module)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_refine(benchmark, bench_options, bench_record, case):
    module, backend, shape, n, k = case
    if backend not in bench_options["backends"]:
        pytest.skip(f"backend {backend!r} not selected (--bench-backends)")
    if bench_options["quick"] and not _quick(case):
        pytest.skip("not part of --bench-quick")
    if backend in ("native", "numba", "numpy"):
        mod, reason = _backend._probe(backend)
        if mod is None:
            pytest.skip(f"backend {backend!r} unavailable: {reason}")
    threads = _threads(shape, n)
    maps = cam_maps(shape, n)
    # Warm-up (JIT compile, first-touch, error check) on a small crop: same dtype, same k, and
    # several maps for batches (backends may take another code path for many maps).
    small = np.ascontiguousarray(maps[:min(n, 16), :min(shape[0], 64), :min(shape[1], 64)])
    try:
        _make_call(module, backend, small, k, threads)()
    except Exception as exc:  # a backend being written may be broken: say so, time the others
        pytest.skip(f"{backend} raised on warm-up: {type(exc).__name__}: {str(exc)[:300]}")

    h, w = shape
    benchmark.group = f"{module} {h}x{w} n={n}" + (f" k={k}" if k else "")
    benchmark(_make_call(module, backend, maps, k, threads))

    used = _threads_used(backend, 0 if module == "pipeline_default" else threads)
    info = {"module": module, "paper_module": PAPER_MODULE[module], "backend": backend,
            "shape": f"{h}x{w}", "pixels": h * w, "batch": n, "k": k, "threads": used,
            "threads_arg": threads if backend in ("native", "numba") else None,
            "paper_budget_ms_per_map": PAPER_BUDGET_MS[module]}
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is None:                       # --benchmark-disable: nothing was timed
        return
    med = float(stats.stats.median)
    per_map_us = med / n * 1e6
    timing = {"median_s": med, "per_map_us": per_map_us, "maps_per_s": n / med,
              "speedup_vs_paper_budget": PAPER_BUDGET_MS[module] * 1e3 / per_map_us,
              "rounds": int(stats.stats.rounds)}
    benchmark.extra_info.update(timing)
    bench_record({**info, **timing})
