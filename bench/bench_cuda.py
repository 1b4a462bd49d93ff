"""Benchmarks of the CUDA backend (pytest-benchmark; skipped without a GPU).

    pytest bench/bench_cuda.py --benchmark-only

Targets on an H100 (docs: performance.md section 6.3): the whole refinement pipeline on
100,000 maps of 27x27 in <= 5 ms; the rank filter on one 1024x1024 map with k = 7 in <= 80 us.
Every timed function synchronises the device, so the numbers are end-to-end GPU times of the
enqueued work (plus the Python glue and launch overhead).
"""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.refine.config import RefineConfig

_cuda = pytest.importorskip("diffcam.refine._cuda")
pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def torch():
    ok, reason = _cuda.available()
    if not ok:
        pytest.skip(f"CUDA backend unavailable: {reason}")
    import torch as _torch
    if not _torch.cuda.is_available():
        pytest.skip("torch with CUDA support is not installed")
    return _torch


def _warm(fn, n=3):
    for _ in range(n):
        fn()


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_bench_refine_100k_27x27(benchmark, torch, preset):
    g = torch.Generator(device="cuda").manual_seed(0)
    maps = torch.rand((100_000, 27, 27), device="cuda", generator=g) ** 3
    p = getattr(RefineConfig, preset)().to_params()
    rc = torch.full((100_000,), 0.05, device="cuda", dtype=torch.float64)

    def run():
        out = _cuda.refine(maps, None, rc, p)
        torch.cuda.synchronize()
        return out

    _warm(run)
    benchmark.pedantic(run, rounds=20, iterations=1)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [3, 7, 11])
def test_bench_rank_filter_1024(benchmark, torch, k):
    g = torch.Generator(device="cuda").manual_seed(1)
    maps = torch.rand((1, 1024, 1024), device="cuda", generator=g)
    ks = np.full(1, k, np.int32)  # host sizes: only the K-kernel is launched

    def run():
        out = _cuda.rank_gaussian_filter(maps, ks)
        torch.cuda.synchronize()
        return out

    _warm(run)
    benchmark.pedantic(run, rounds=50, iterations=1)


@pytest.mark.cuda
def test_bench_rank_filter_100k_27x27_k3(benchmark, torch):
    maps = torch.rand((100_000, 27, 27), device="cuda")
    ks = torch.full((100_000,), 3, device="cuda", dtype=torch.int32)

    def run():
        out = _cuda.rank_gaussian_filter(maps, ks)
        torch.cuda.synchronize()
        return out

    _warm(run)
    benchmark.pedantic(run, rounds=20, iterations=1)
