"""The native pipeline's fused passes against the native modules run one by one (bit-exact).

refine_map (csrc/refine/pipeline.hpp) does not call the module kernels as they are: the raw
min / max ride with the kernel size's sums, DACG's output pass gathers CBA's statistics
(PosStats) and the extremes of its result, and CBA's attenuation, the clip and the min-max run
as one pass whose min / max are derived beforehand from CBA's monotonicity.  None of that may
change a bit: here the module kernels are chained (rank filter -> DACG -> CBA -> clip + min-max
in NumPy float64 with the kernels' operations -> SICD) and every output and statistic must equal
the pipeline's exactly.  Parameter vectors outside the config's ranges (gamma > 1, a negative
tau_bg floor) take the unfused fallback and are checked the same way; the float64 reference
bounds every case as in test_backends.
"""

import numpy as np
import pytest

from diffcam.refine import reference as ref
from diffcam.refine.config import PARAM_FIELDS, RefineConfig

from ..conftest import backend_or_skip
from .mapgen import KINDS, make_batch
from .test_selection_paths import _odd_maps

IDX = {name: i for i, name in enumerate(PARAM_FIELDS)}

SHAPES = [(27, 27), (14, 14), (24, 24), (22, 28), (1, 1), (1, 7), (7, 1), (2, 2), (2, 9), (3, 5),
          (5, 3), (9, 2)]


@pytest.fixture(scope="module")
def native():
    return backend_or_skip("native")


def _clip_normalize(m, clip_max, eps):
    """clip_normalize_map in NumPy: the same float64 operations on the float32 map."""
    hi_clip = max(float(clip_max), 0.0)
    out = np.empty_like(m)
    for i, x in enumerate(m):
        lo = min(max(float(x.min()), 0.0), hi_clip)
        hi = min(max(float(x.max()), 0.0), hi_clip)
        den = hi - lo + eps
        v = np.minimum(np.maximum(x.astype(np.float64), 0.0), hi_clip)
        out[i] = ((v - lo) / den).astype(np.float32)
    return out


def _chain(native, maps, rc, p):
    """The pipeline as separate native module calls (no fused pass)."""
    n = len(maps)
    raw_max = maps.reshape(n, -1).max(axis=1)
    cur = maps
    k = np.zeros(n, np.int32)
    if p[IDX["akd"]] != 0:
        k = np.asarray(native.kernel_sizes(maps, p), np.int32)
        cur = native.rank_gaussian_filter(maps, k)
    out, branch, tau = native.confidence_gating(cur, p)
    tau_bg = np.full(n, np.nan)
    if p[IDX["cba"]] != 0:
        out, tau_bg = native.background_attenuation(out, p)
    out = np.stack([_clip_normalize(out[i:i + 1], raw_max[i], p[IDX["norm_eps"]])[0]
                    for i in range(n)])
    lam, app = np.full(n, np.nan), np.zeros(n, np.uint8)
    if p[IDX["sicd"]] != 0:
        out, lam, app = native.causal_debiasing(out, None, rc, p)
    return out, k, branch, tau, tau_bg, lam, app


def _params(**edits):
    raw = {key: edits.pop(key) for key in ("gamma_raw", "tau_bg_floor_raw") if key in edits}
    p = RefineConfig.paper().replace(**edits).to_params().copy()
    if "gamma_raw" in raw:
        p[IDX["gamma"]] = raw["gamma_raw"]
    if "tau_bg_floor_raw" in raw:
        p[IDX["tau_bg_floor"]] = raw["tau_bg_floor_raw"]
    return p


PARAMS = {
    "paper": _params(),
    "k5": _params(kernel_size=5),
    "no_akd": _params(akd=False),
    "no_dacg": _params(dacg=False),
    "no_cba": _params(cba=False),
    "no_dacg_no_cba": _params(dacg=False, cba=False, akd=False),
    "gamma0": _params(gamma=0.0),
    "gamma1": _params(gamma=1.0),
    "sicd_outliers": _params(w_out=0.5, final_normalize=True, gate=False),
    # tau_bg = the mean of the positives alone: its float64 sum's order shows in tau_bg
    "cba_mean_only": _params(bg_w_median=0.0, bg_w_pct=0.0, bg_w_max=0.0, bg_w_mean=1.0),
    # outside the config's ranges: CBA is not monotone -> the unfused fallback
    "gamma_gt1": _params(gamma_raw=1.5),
    "negative_floor": _params(tau_bg_floor_raw=-0.25),
}


def _check_equal(got, want, label):
    names = ("map", "k", "branch", "tau", "tau_bg", "lam", "applied")
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g), np.asarray(w)
        if name in ("k",) and not np.any(w):
            continue
        np.testing.assert_array_equal(g, w, err_msg=f"{label}: {name}")


@pytest.mark.parametrize("pname", sorted(PARAMS))
def test_pipeline_equals_module_chain(native, pname, rng):
    p = PARAMS[pname]
    for h, w in SHAPES:
        maps = make_batch(rng, 2 * len(KINDS), h, w)
        maps[len(KINDS):] -= np.float32(0.3)          # negative values too
        # magnitudes 2^-40..1 mixed: the float64 sums round, so their order shows
        mixed = rng.random((4, h, w)) * 2.0 ** rng.integers(-40, 1, (4, h, w))
        mixed[2:] *= np.where(rng.random((2, h, w)) < 0.3, -1.0, 1.0)
        maps = np.concatenate([maps, mixed.astype(np.float32)])
        rc = rng.random(len(maps)) * 0.05
        got = native.refine(maps, None, rc, p, threads=1)
        _check_equal(got, _chain(native, maps, rc, p), f"{pname} {h}x{w}")


@pytest.mark.parametrize("pname", ["paper", "no_akd", "no_dacg", "gamma0", "gamma1", "gamma_gt1",
                                   "negative_floor", "no_cba"])
def test_pipeline_odd_maps_equal_module_chain(native, pname, rng):
    p = PARAMS[pname]
    for name, m in _odd_maps(rng):
        for scale in (1.0, 1e-30, 1e20, -1.0):
            with np.errstate(over="ignore"):
                maps = (m * np.float32(scale))[None].astype(np.float32)
            if not np.isfinite(maps).all():
                continue
            rc = np.array([0.03])
            got = native.refine(maps, None, rc, p, threads=1)
            _check_equal(got, _chain(native, maps, rc, p), f"{pname} {name} x{scale}")


@pytest.mark.parametrize("pname", ["paper", "gamma0", "gamma1", "gamma_gt1", "negative_floor",
                                   "no_dacg"])
def test_pipeline_against_reference(native, pname, rng):
    p = PARAMS[pname]
    for h, w in [(27, 27), (22, 28), (1, 5), (5, 1), (2, 3)]:
        maps = make_batch(rng, 2 * len(KINDS), h, w)
        maps[len(KINDS):] -= np.float32(0.3)
        rc = rng.random(len(maps)) * 0.05
        got = native.refine(maps, None, rc, p, threads=1)
        want = ref.refine(maps, None, rc, p)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_allclose(got[3], want[3], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(got[4], want[4], rtol=1e-6, atol=1e-12)
        # the gate can flip a pixel at DACG's threshold between float32 and float64 filters
        bad = [i for i in range(len(maps))
               if not np.allclose(got[0][i].astype(np.float64), want[0][i], rtol=0, atol=1e-5)]
        assert len(bad) <= 1, f"maps {bad} differ from the reference"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 47, 48, 49, 50, 63, 64, 65,
                               95, 96, 97, 200, 729])
def test_small_select_percentiles(native, n, rng):
    """Lengths around the rank-counting select (<= 48 values) and its use for the buckets of the
    histogram select: DACG's tau (percentile of the positives) equals NumPy's."""
    for q in (0.0, 10.0, 50.0, 60.0, 85.0, 90.0, 100.0):
        p = RefineConfig.paper().replace(akd=False, pct_high_var=q, pct_high_mean=q,
                                         pct_low_mean=q, pct_default=q).to_params()
        for kind in range(5):
            if kind == 0:
                m = rng.random(n)
            elif kind == 1:                                  # heavy ties
                m = rng.integers(0, 3, n) / 2.0
            elif kind == 2:                                  # negatives, zeros, ties
                m = rng.integers(-2, 3, n) * 0.25
            elif kind == 3:                                  # clustered: deep recursion
                m = 0.5 + rng.integers(0, 40, n) * 2.0 ** -24
            else:                                            # signed zeros and one positive
                m = np.where(rng.random(n) < 0.5, -0.0, 0.0)
                m[rng.integers(0, n)] = 0.7
            maps = m.astype(np.float32)[None, None, :]
            _, _, tau = native.confidence_gating(maps, p)
            _, _, r_tau = ref.confidence_gating(maps, p)
            np.testing.assert_allclose(tau, r_tau, rtol=1e-12, atol=0, err_msg=f"{kind} q={q}")
            _, tau_bg = native.background_attenuation(maps, p)
            _, r_tau_bg = ref.background_attenuation(maps, p)
            np.testing.assert_allclose(tau_bg, r_tau_bg, rtol=1e-9, atol=0, err_msg=f"{kind} q={q}")


@pytest.mark.parametrize("n", [1, 3, 4, 7, 64, 129, 729])
def test_cba_positive_sum_order(native, n, rng):
    """The float64 sum of the positives (CBA's S3; PosStats in stats.hpp) has a fixed order:
    element i to accumulator i mod 2 in increasing i, then ps0 + ps1.  With magnitudes 1e-25..1
    the order shows in the last bits; tau_bg = S3 alone must equal it exactly."""
    p = PARAMS["cba_mean_only"]
    for _ in range(20):
        m = rng.random(n) * 2.0 ** rng.integers(-40, 1, n)
        m = np.where(rng.random(n) < 0.3, -m, m).astype(np.float32)
        if not (m > 0).any():
            continue
        ps = [0.0, 0.0]
        for i, x in enumerate(m.tolist()):
            if x > 0:
                ps[i & 1] += x
        want = (ps[0] + ps[1]) / int((m > 0).sum())
        _, tau_bg = native.background_attenuation(m[None, None, :], p)
        assert tau_bg[0] == want
        # the pipeline's fused statistics (DACG's output pass) in the same order
        q = p.copy()
        q[IDX["akd"]] = 0
        q[IDX["dacg"]] = 0
        got = native.refine(m[None, None, :], None, np.zeros(1), q, threads=1)
        assert got[4][0] == want
