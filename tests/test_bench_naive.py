"""The benchmark baseline bench/naive.py computes what the float64 reference computes."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from diffcam.refine import reference as ref
from diffcam.refine.config import RefineConfig

_NAIVE = Path(__file__).resolve().parents[1] / "bench" / "naive.py"


@pytest.fixture(scope="module")
def naive():
    if not _NAIVE.exists():
        pytest.skip("bench/naive.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("diffcam_bench_naive", _NAIVE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _maps(shape, n=3, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.random((n, *shape)).astype(np.float32)
    m[:, : shape[0] // 3] *= 0.2                     # skewed maps: every DACG/SICD path
    m[m < 0.05] = 0.0                                # exact zeros, as after Grad-CAM's ReLU
    return m


CONFIGS = [RefineConfig.paper(), RefineConfig.paper().replace(steps=64, k_max=7, gate=False),
           RefineConfig.reference().replace(noise=0.0)]


@pytest.mark.parametrize("shape", [(14, 14), (27, 27), (22, 28), (40, 33)])
@pytest.mark.parametrize("k", [3, 5, 7, 11])
def test_rank_filter(naive, shape, k):
    m = _maps(shape)
    np.testing.assert_allclose(naive.rank_gaussian_filter(m, k), ref.rank_gaussian_filter(m, [k] * 3),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["paper", "custom", "reference"])
@pytest.mark.parametrize("shape", [(14, 14), (27, 27), (22, 28)])
def test_modules_and_pipeline(naive, cfg, shape):
    m = _maps(shape, seed=shape[1])
    p = cfg.to_params()
    rc = np.array([0.0, 0.02, 0.05])
    for got, want in [
        (naive.confidence_gating(m, cfg), ref.confidence_gating(m, p)),
        (naive.background_attenuation(m, cfg), ref.background_attenuation(m, p)),
        (naive.causal_debiasing(m, cfg, rc), ref.causal_debiasing(m, None, rc, p)),
        (naive.refine(m, cfg, rc), ref.refine(m, None, rc, p)),
    ]:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                       atol=1e-5, rtol=1e-6, equal_nan=True)


def test_kernel_size(naive):
    cfg = RefineConfig.paper()
    for shape in [(27, 27), (384, 384), (600, 200)]:
        m = _maps(shape, n=1)[0]
        assert naive.kernel_size(m, cfg) == ref.kernel_size_2d(m, cfg.to_params())
