"""Every optimised host backend against the float64 reference (docs/kernels.md is the contract).

Tolerance for maps: 1e-6 times the largest magnitude of the input; integers, branches and Otsu
thresholds must be equal.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffcam.refine import reference as ref
from diffcam.refine.config import RefineConfig

from .mapgen import KINDS, make_batch, make_map

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)

small = st.integers(1, 40)
shape = st.one_of(st.tuples(small, small), st.tuples(st.integers(1, 256), st.integers(1, 256)))


def configs():
    base = st.sampled_from([RefineConfig.paper(), RefineConfig.reference().replace(noise=0.0)])
    edits = st.fixed_dictionaries({}, optional={
        "akd": st.booleans(), "dacg": st.booleans(), "cba": st.booleans(), "sicd": st.booleans(),
        "gate": st.booleans(), "final_normalize": st.booleans(),
        "kernel_size": st.sampled_from([None, 3, 5, 7, 9, 11, 13, 15]),
        "range_guard": st.sampled_from([0.0, 0.1, 0.5]),
        "lambda_min": st.sampled_from([0.0, -math.inf, -0.2]),
        "steps": st.sampled_from([2, 16, 32, 64]),
        "gate_std": st.sampled_from([0.0, 0.1, 0.25]),
        "w_out": st.sampled_from([0.0, 0.02, 0.5]),
    })
    return st.builds(lambda c, e: c.replace(**e), base, edits)


def tol(x):
    return 1e-6 * max(float(np.max(np.abs(x))), 1e-30) + 1e-12


def uses_threads(backend) -> bool:
    """Whether a backend module's ``threads=`` argument does anything (the CUDA kernels, here
    on the CPU emulation, take it for the common signature and ignore it)."""
    return backend.__name__ != "diffcam.refine._cuda"


def assert_maps(got, want, inp):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tol(inp))


@settings(max_examples=60, **SETTINGS)
@given(hw=shape, kind=st.sampled_from(KINDS), k=st.sampled_from([3, 5, 7, 9, 11, 13, 15]),
       seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3), negative=st.booleans())
def test_rank_filter_random(fast_backend, hw, kind, k, seed, n, negative):
    rng = np.random.default_rng(seed)
    if hw[0] * hw[1] * k * k > 2_000_000:
        k = 3
    maps = make_batch(rng, n, *hw, kinds=(kind,))
    if negative:   # the reference preset's noise makes small negative values
        maps = maps + (1e-6 * rng.standard_normal(maps.shape)).astype(np.float32)
    ks = np.full(n, k, np.int32)
    assert_maps(fast_backend.rank_gaussian_filter(maps, ks), ref.rank_gaussian_filter(maps, ks), maps)


@pytest.mark.parametrize("k", [17, 21, 25, 31])
def test_rank_filter_large_kernels(fast_backend, k, rng):
    maps = make_batch(rng, 2, 23, 37, kinds=("uniform", "sparse"))
    ks = np.full(2, k, np.int32)
    assert_maps(fast_backend.rank_gaussian_filter(maps, ks), ref.rank_gaussian_filter(maps, ks), maps)


def test_rank_filter_mixed_k_per_map(fast_backend, rng):
    maps = make_batch(rng, 6, 30, 20)
    ks = np.array([3, 5, 7, 9, 11, 3], np.int32)
    assert_maps(fast_backend.rank_gaussian_filter(maps, ks), ref.rank_gaussian_filter(maps, ks), maps)


def test_rank_filter_kernel_wider_than_map(fast_backend, rng):
    for h, w in [(1, 1), (1, 7), (2, 2), (3, 1), (4, 5)]:
        maps = make_batch(rng, 2, h, w, kinds=("uniform", "levels"))
        ks = np.array([7, 11], np.int32)
        assert_maps(fast_backend.rank_gaussian_filter(maps, ks),
                    ref.rank_gaussian_filter(maps, ks), maps)


@settings(max_examples=60, **SETTINGS)
@given(hw=shape, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), cfg=configs())
def test_kernel_sizes(fast_backend, hw, kind, seed, cfg):
    maps = make_batch(np.random.default_rng(seed), 2, *hw, kinds=(kind, "uniform"))
    p = cfg.to_params()
    np.testing.assert_array_equal(fast_backend.kernel_sizes(maps, p), ref.kernel_sizes(maps, p))


@settings(max_examples=80, **SETTINGS)
@given(hw=shape, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), cfg=configs())
def test_modules_random(fast_backend, hw, kind, seed, cfg):
    rng = np.random.default_rng(seed)
    maps = make_batch(rng, 2, *hw, kinds=(kind, "peaks"))
    p = cfg.to_params()

    out, branch, tau = fast_backend.confidence_gating(maps, p)
    r_out, r_branch, r_tau = ref.confidence_gating(maps, p)
    np.testing.assert_array_equal(branch, r_branch)
    np.testing.assert_allclose(tau, r_tau, rtol=1e-9, atol=0)
    assert_maps(out, r_out, maps)

    out, tau_bg = fast_backend.background_attenuation(maps, p)
    r_out, r_tau_bg = ref.background_attenuation(maps, p)
    np.testing.assert_allclose(tau_bg, r_tau_bg, rtol=1e-9, atol=0)
    assert_maps(out, r_out, maps)

    rep = make_batch(rng, 2, *hw, kinds=("uniform",)) if rng.random() < 0.5 else None
    rep_const = rng.random(2) * 0.05
    out, lam, applied = fast_backend.causal_debiasing(maps, rep, rep_const, p)
    r_out, r_lam, r_applied = ref.causal_debiasing(maps, rep, rep_const, p)
    np.testing.assert_array_equal(applied, r_applied)
    np.testing.assert_allclose(lam, r_lam, rtol=0, atol=1e-6)
    assert_maps(out, r_out, maps)


def dacg_near_tie(maps, p, rel=1e-5) -> bool:
    """Whether a pixel of DACG's float64 input lies within ``rel`` (of the map's max) of its
    threshold tau.  DACG is discontinuous there (M > tau keeps the pixel, else it is blurred),
    so a float32 backend may legitimately take the other side than the float64 reference."""
    if p[ref.P["dacg"]] == 0:
        return False
    for m in np.asarray(maps, np.float64):
        if p[ref.P["akd"]] != 0:
            m = ref.rank_gaussian_filter_2d(m, ref.kernel_size_2d(m, p))
        _, _, tau = ref.confidence_gating_2d(m, p)
        if np.any(np.abs(m - tau) <= rel * max(float(m.max()), 1e-30)):
            return True
    return False


def assert_refined_maps(got, want, maps, p, atol):
    """Refined maps against the reference, map by map: a map that differs by more than
    ``atol`` must have a pixel at DACG's threshold (dacg_near_tie), where the float32 backends
    may keep a pixel that the float64 reference blurs or the reverse (quantised "levels" maps
    and symmetric blobs tie pixels to tau); at most a quarter of the maps may differ."""
    bad = [i for i in range(len(maps))
           if not np.allclose(np.asarray(got[i], np.float64), want[i], rtol=0, atol=atol)]
    untied = [i for i in bad if not dacg_near_tie(maps[i:i + 1], p)]
    assert not untied, f"maps {untied} differ from the reference by more than {atol}"
    assert len(bad) <= len(maps) // 4, bad


def normalisation_gain(maps, p) -> np.ndarray:
    """Per map, how much the pipeline's min-max steps magnify an absolute error: max / range of
    the map they normalise (1 at least).  The float32 backends round the intermediate maps to
    about 1e-7 of their maximum; a min-max of a map whose range is a small part of its maximum
    scales that rounding up, so the 1e-6 tolerance is taken relative to the map's maximum
    *before* normalisation."""
    gains = []
    for m in np.asarray(maps, np.float64):
        raw_max = float(m.max())
        if p[ref.P["akd"]] != 0:
            m = ref.rank_gaussian_filter_2d(m, ref.kernel_size_2d(m, p))
        m, _, _ = ref.confidence_gating_2d(m, p)
        if p[ref.P["cba"]] != 0:
            m, _ = ref.background_attenuation_2d(m, p)
        c = np.clip(m, 0.0, max(raw_max, 0.0))
        g = max(1.0, float(c.max()) / max(float(c.max() - c.min()), 1e-30))
        if p[ref.P["sicd"]] != 0 and p[ref.P["final_normalize"]] != 0:
            clean, _, _ = ref.causal_debiasing_2d(ref.clip_normalize_2d(m, raw_max, 1e-8),
                                                  None, 0.0, p)
            g *= max(1.0, 1.0 / max(float(clean.max() - clean.min()), 1e-30))
        gains.append(min(g, 1e6))
    return np.array(gains)


def test_dacg_near_tie_detects_ties():
    # every branch takes the median: with an odd number of positive pixels tau is one of them
    p = RefineConfig.paper().replace(akd=False, pct_high_var=50.0, pct_high_mean=50.0,
                                     pct_low_mean=50.0, pct_default=50.0).to_params()
    odd = np.array([[[0.1, 0.2, 0.9]]], np.float32)
    assert dacg_near_tie(odd, p)
    even = np.array([[[0.1, 0.2, 0.8, 0.9]]], np.float32)      # tau = 0.5, far from every pixel
    assert not dacg_near_tie(even, p)
    assert not dacg_near_tie(odd, RefineConfig.paper().replace(akd=False, dacg=False).to_params())


@settings(max_examples=80, **SETTINGS)
@given(hw=shape, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), cfg=configs(),
       with_rep=st.booleans())
def test_pipeline_random(fast_backend, hw, kind, seed, cfg, with_rep):
    rng = np.random.default_rng(seed)
    if hw[0] * hw[1] > 20_000 and cfg.akd:
        cfg = cfg.replace(kernel_size=3)
    maps = make_batch(rng, 2, *hw, kinds=(kind, "peaks"))
    rep = make_batch(rng, 2, *hw, kinds=("uniform",)) if with_rep else None
    rep_const = rng.random(2) * 0.05
    p = cfg.to_params()
    # a pixel within float32 rounding of DACG's threshold may fall on either side (see
    # dacg_near_tie); such draws are rejected rather than compared
    assume(not dacg_near_tie(maps, p))
    got = fast_backend.refine(maps, rep, rep_const, p)
    want = ref.refine(maps, rep, rep_const, p)
    assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
    for i, gain in enumerate(normalisation_gain(maps, p)):   # outputs are normalised to [0, 1]
        np.testing.assert_allclose(got[0][i].astype(np.float64), want[0][i], rtol=0,
                                   atol=tol(np.ones(1)) * gain, err_msg=f"map {i}")
    for name, g, w in zip(("k", "branch", "applied"), (got[1], got[2], got[6]),
                          (want[1], want[2], want[6])):
        np.testing.assert_array_equal(g, w, err_msg=name)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-6, atol=1e-12, err_msg="tau")
    np.testing.assert_allclose(got[4], want[4], rtol=1e-6, atol=1e-12, err_msg="tau_bg")
    np.testing.assert_allclose(got[5], want[5], rtol=0, atol=1e-6, err_msg="lam")


def test_pipeline_token_grids_and_image_maps(fast_backend, rng):
    cfg = RefineConfig.paper()
    for h, w in [(14, 14), (24, 24), (27, 27), (22, 28), (128, 96)]:
        maps = make_batch(rng, len(KINDS), h, w)
        got = fast_backend.refine(maps, None, np.full(len(KINDS), 0.01), cfg.to_params())
        want = ref.refine(maps, None, np.full(len(KINDS), 0.01), cfg.to_params())
        assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
        assert_refined_maps(got[0], want[0], maps, cfg.to_params(), tol(np.ones(1)))
        np.testing.assert_array_equal(got[1], want[1])
        assert np.isfinite(got[0]).all()


def test_pipeline_large_map_adaptive_kernel(fast_backend, rng):
    m = make_map(rng, 400, 300, "peaks")[None]
    p = RefineConfig.paper().to_params()
    got = fast_backend.refine(m, None, np.zeros(1), p)
    want = ref.refine(m, None, np.zeros(1), p)
    assert got[1][0] == want[1][0] >= 5
    assert_maps(got[0], want[0], np.ones(1))


@settings(max_examples=60, **SETTINGS)
@given(hw=shape, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_otsu_exact(fast_backend, hw, kind, seed):
    rng = np.random.default_rng(seed)
    u8 = ref.to_uint8(make_batch(rng, 3, *hw, kinds=(kind, "uniform", "levels")))
    np.testing.assert_array_equal(fast_backend.otsu_threshold_u8(u8), ref.otsu_threshold_u8(u8))


@settings(max_examples=40, **SETTINGS)
@given(src=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       dst=st.tuples(st.integers(1, 90), st.integers(1, 90)), seed=st.integers(0, 2**32 - 1))
def test_resize(fast_backend, src, dst, seed):
    maps = make_batch(np.random.default_rng(seed), 2, *src, kinds=("uniform", "peaks"))
    got = fast_backend.resize_bilinear(maps, *dst)
    assert_maps(got, ref.resize_bilinear(maps, *dst), maps)


@settings(max_examples=40, **SETTINGS)
@given(hw=st.tuples(st.integers(1, 48), st.integers(1, 48)), c=st.integers(1, 4),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1))
def test_localization_same_size(fast_backend, hw, c, kind, seed):
    rng = np.random.default_rng(seed)
    maps = make_batch(rng, 2, *hw, kinds=(kind, "peaks"))
    masks = (rng.random((2, c, *hw)) < 0.3).astype(np.uint8)
    got = fast_backend.localization(maps, masks)
    want = ref.localization(maps, masks)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_localization_resized(fast_backend, rng):
    maps = make_batch(rng, 4, 24, 24, kinds=("peaks",))
    masks = np.zeros((4, 2, 96, 96), np.uint8)
    masks[:, 0, 10:40, 10:50] = 1
    masks[:, 1, 60:90, 50:80] = 1
    got = fast_backend.localization(maps, masks)
    want = ref.localization(maps, masks)
    # a uint8 bin can differ where float32 and float64 resizes straddle an integer
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_thread_count_does_not_change_results(fast_backend, threads, rng):
    if not uses_threads(fast_backend):
        pytest.skip("the CUDA kernels take no thread count")
    maps = make_batch(rng, 37, 27, 27)
    p = RefineConfig.paper().to_params()
    base = fast_backend.refine(maps, None, np.zeros(37), p, threads=1)
    got = fast_backend.refine(maps, None, np.zeros(37), p, threads=threads)
    for a, b in zip(base, got):
        np.testing.assert_array_equal(a, b)
    big = make_map(rng, 300, 257, "peaks")[None]
    ks = np.array([7], np.int32)
    np.testing.assert_array_equal(fast_backend.rank_gaussian_filter(big, ks, threads=1),
                                  fast_backend.rank_gaussian_filter(big, ks, threads=threads))
