"""Rank filter: adversarial lane mixes for the compile-time finish (issue 2 performance work),
and the float32 k = 3 finish of the AVX2 path (windows around its cutoffs and magnitude bounds).

One 8-pixel vector can hold windows with very different sigma_r: near-constant windows
(a = 1 / (2 sigma_r^2) huge: the weight recurrence would underflow into denormals, so a > 44
gives one-hot weights and lanes that are done are zeroed) next to sparse or tied windows (wide
weights, the recurrence runs to the window's edge).  Also the thread split of one map into
dynamic row blocks must not change a single bit, for odd heights too.
"""

import numpy as np
import pytest

from diffcam.refine import reference as ref

from ..conftest import backend_or_skip
from .mapgen import make_map
from .test_backends import assert_maps, uses_threads


def _mixed(rng, h, w):
    m = make_map(rng, h, w, "sparse").astype(np.float64)
    m[:, : w // 3] = 0.7 + 1e-4 * rng.random((h, w // 3))       # near-constant: a ~ 1e7
    m[: h // 2, w // 3: 2 * w // 3] = rng.integers(0, 3, (h // 2, w // 3 + (w % 3 > 1))) / 2.0  # ties
    m[h // 2:, 2 * w // 3:] = 0.5 + 0.05 * rng.random((h - h // 2, w - 2 * w // 3))  # a ~ 1e3
    m[::7, ::5] = 0.0                                             # zeros inside the flat part
    return m.astype(np.float32)


@pytest.mark.parametrize("k", [3, 5, 7, 9, 11])
def test_mixed_lanes_against_reference(fast_backend, k, rng):
    for m in (_mixed(rng, 37, 45)[None], np.stack([_mixed(rng, 21, 19), _mixed(rng, 21, 19)])):
        ks = np.full(len(m), k, np.int32)
        assert_maps(fast_backend.rank_gaussian_filter(m, ks), ref.rank_gaussian_filter(m, ks), m)


@pytest.mark.parametrize("k", [3, 7, 9, 11])
def test_graded_sigma_r(fast_backend, k, rng):
    # sigma_r sweeps 1e-4 .. 10 across the columns: every regime of the weight recurrence,
    # including a in (44, 708) where q = exp(-a) is normal but q^16 is not.
    h, w = 24, 64
    cv = np.geomspace(1e-4, 10.0, w)
    m = 1.0 + cv[None, :] * rng.standard_normal((h, w))
    m = np.maximum(m, 0.0)
    m = (m / m.max()).astype(np.float32)[None]
    ks = np.array([k], np.int32)
    assert_maps(fast_backend.rank_gaussian_filter(m, ks), ref.rank_gaussian_filter(m, ks), m)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_row_blocks_do_not_change_results(fast_backend, threads, rng):
    if not uses_threads(fast_backend):
        pytest.skip("the CUDA kernels take no thread count")
    for h, w, k in [(301, 129, 7), (257, 200, 11), (99, 333, 9), (64, 1030, 5)]:
        big = _mixed(rng, h, w)[None]
        ks = np.array([k], np.int32)
        np.testing.assert_array_equal(fast_backend.rank_gaussian_filter(big, ks, threads=1),
                                      fast_backend.rank_gaussian_filter(big, ks, threads=threads))
    batch = np.stack([_mixed(rng, 27, 27) for _ in range(50)])
    ks = np.array([3, 5, 7, 9, 11] * 10, np.int32)
    np.testing.assert_array_equal(fast_backend.rank_gaussian_filter(batch, ks, threads=1),
                                  fast_backend.rank_gaussian_filter(batch, ks, threads=threads))


def _relu_regions(rng, h, w):
    # A ReLU'd map: zero areas whose edges cut through the 8-pixel blocks and the row pairs
    # (all-zero windows skip the sort, all-nonpositive means skip the weights), a negative area
    # (mean <= 0 but not +0.0), -0.0 entries, and busy parts.
    m = make_map(rng, h, w, "sparse").astype(np.float64)
    m[h // 4: h // 2 + 3, :] = 0.0
    m[:, 13: 13 + w // 3] = 0.0
    m[h // 2 + 5: h // 2 + 15, w // 2: w // 2 + 21] = -0.25 * rng.random((10, 21))
    m = m.astype(np.float32)
    m[h // 3, 3: 40: 3] = -0.0
    return m


@pytest.mark.parametrize("k", [5, 7, 9, 11])
def test_big_map_bands_and_zero_areas(fast_backend, k, rng):
    # 70 x 123 x k^2 >= 2^18 and H >= 64: the banded path (each worker pads its own 16-row
    # band); odd height, so the last band ends with a single row.
    m = _relu_regions(rng, 71, 123)[None]
    ks = np.array([k], np.int32)
    got = fast_backend.rank_gaussian_filter(m, ks, threads=1)
    assert_maps(got, ref.rank_gaussian_filter(m, ks), m)
    for t in (2, 3):
        np.testing.assert_array_equal(got, fast_backend.rank_gaussian_filter(m, ks, threads=t))


# --------------------------------------------------------------------------- k = 3, AVX2
# The all-float32 finish of k = 3 (finish9 in csrc/refine/simd_ops.hpp): a = mu^2 / (2 s^2) in
# float32 (float64 only for lanes whose mean is outside [2^-50, 2^60] or whose sum of squares is
# not finite), g_1 = e^{-a}, g_2 = e^{-4a} by a float32 exponential, g_3 = g_1 g_2^2,
# g_4 = (g_2^2)^2, g_d = 0 where a d^2 > 44.  These tests put windows on every side of those
# cutoffs and use a tolerance per window (relative to the largest magnitude of that 3 x 3 map),
# tighter than the 1e-6 of the map maximum above: measured, the path stays within 2.5 * 2^-24.
# These tests need the AVX2 path: finish9 is AVX2 only (the scalar policy's k = 3 is its float64
# finish, with the magnitude fallback tested at k >= 5 below, held to the backends' 1e-6).

ULP = 2.0 ** -24
TOL = 5 * ULP                      # per 3 x 3 map, times its largest magnitude
CUTS = (44 / 16, 44 / 9, 44 / 4, 44.0)  # a at which g_4, g_3, g_2, g_1 drop to 0


@pytest.fixture
def native():
    mod = backend_or_skip("native")
    if mod.simd() != "avx2":
        pytest.skip("the float32 k = 3 finish is the AVX2 path")
    return mod


def _windows(rng, a, scale):
    """One 3 x 3 map per a: 9 values with mean `scale`, population std scale / sqrt(2 a)
    (so the centre pixel's window, the whole map, has exactly that a), in float32."""
    n = len(a)
    z = rng.standard_normal((n, 9))
    z[::3] = rng.exponential(1.0, (len(z[::3]), 9)) ** 3   # skewed windows too
    z -= z.mean(1, keepdims=True)
    z /= z.std(1, keepdims=True)
    s = 1.0 / np.sqrt(2.0 * a)
    return ((1.0 + s[:, None] * z) * scale).astype(np.float32).reshape(n, 3, 3)


def _a_grid():
    around = np.concatenate([c * (1 + np.linspace(-2e-3, 2e-3, 41)) for c in CUTS])
    return np.concatenate([np.geomspace(1e-6, 1e3, 400), around, [1e-12, 1e6, 1e12]])


def _check_per_map(got, want, maps, tol=TOL):
    scale = np.abs(maps.astype(np.float64)).reshape(len(maps), -1).max(1)
    err = np.abs(got.astype(np.float64) - want).reshape(len(maps), -1).max(1)
    bad = err > tol * scale + 2.0 ** -149
    assert not bad.any(), (f"{bad.sum()} maps off; worst relative error "
                           f"{np.max(err / np.maximum(scale, 1e-300)):.3g}")


# window magnitudes: float32's range, and both sides of the float64 fallback's bounds
SCALES = [1e-36, 1e-20, 2.0 ** -50 * 0.9, 2.0 ** -50 * 1.1, 1e-6, 1.0, 1e12,
          2.0 ** 60 * 0.9, 2.0 ** 60 * 1.1, 1e20, 1e30]


@pytest.mark.parametrize("scale", SCALES)
def test_k3_prescribed_a(native, scale, rng):
    a = _a_grid()
    m = _windows(rng, a, scale)
    keep = (m.astype(np.float64).reshape(len(m), -1).mean(1) > 0) & np.isfinite(m).reshape(len(m), -1).all(1)
    m = m[keep]
    ks = np.full(len(m), 3, np.int32)
    _check_per_map(native.rank_gaussian_filter(m, ks, threads=1), ref.rank_gaussian_filter(m, ks), m)


def _window_max(m):
    p = np.pad(np.abs(m.astype(np.float64)), 1, mode="reflect")
    h, w = m.shape
    return np.max([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def test_k3_fallback_lanes_mixed_with_fast_lanes(native, rng):
    # Columns of very different magnitude, so one 8-pixel vector mixes lanes that take the
    # float64 a (mean outside [2^-50, 2^60]) with float32 ones; each output is checked against
    # its own window's magnitude.
    h, w = 29, 61
    col_scale = np.array([1.0, 1e-30, 1e25, 2.0 ** -50, 2.0 ** 60, 1e-12, 1e19])[np.arange(w) % 7]
    base = 1.0 + rng.choice([0.02, 0.3, 2.0], (h, w)) * rng.standard_normal((h, w))
    m = (np.abs(base) * col_scale[None, :]).astype(np.float32)
    m[5:9, :] = 0.0                                   # zero windows and mu <= 0 lanes
    m[12, ::3] *= -1.0
    got = native.rank_gaussian_filter(m[None], np.array([3], np.int32), threads=1)[0]
    want = ref.rank_gaussian_filter(m[None], np.array([3], np.int32))[0]
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= TOL * _window_max(m) + 2.0 ** -149), float(np.max(err / _window_max(m)))


def test_k3_special_windows(native, rng):
    maps = []
    maps.append(np.zeros((9, 11)))                                  # all +0.0: 0
    maps.append(np.full((9, 11), 0.375))                            # constant: its value
    maps.append(0.375 + 1e-7 * rng.standard_normal((9, 11)))        # near-constant: a ~ 1e12
    maps.append(-rng.random((9, 11)))                               # mu < 0: 0
    d = rng.random((9, 11)) * 1e-39                                 # denormal inputs
    maps.append(d)
    mixed = d.copy()
    mixed[::2, ::3] = 0.5
    maps.append(mixed)
    lv = rng.integers(0, 2, (9, 11)) * 1e30                         # S = inf in float32
    maps.append(lv)
    m = np.stack(maps).astype(np.float32)
    m[2, 4, 4] = -0.0
    ks = np.full(len(m), 3, np.int32)
    got = native.rank_gaussian_filter(m, ks, threads=1)
    _check_per_map(got, ref.rank_gaussian_filter(m, ks), m)
    assert np.all(got[0] == 0.0) and np.all(got[3] == 0.0)
    assert np.all(got[1] == np.float32(0.375))
    assert np.isfinite(got).all()


def test_k3_native_row_blocks_and_threads(native, rng):
    # 301 x 129 x 9 >= 2^18 and H >= 64: the banded path; U = 4 blocks plus single tails.
    m = rng.random((301, 129)) ** 3
    m[40:90, 10:50] = 0.0
    m[100:110] = 0.7 + 1e-5 * rng.random((10, 129))
    m = m.astype(np.float32)[None]
    ks = np.array([3], np.int32)
    got = native.rank_gaussian_filter(m, ks, threads=1)
    _check_per_map(got, ref.rank_gaussian_filter(m, ks), m, tol=1e-6)
    for t in (2, 3):
        np.testing.assert_array_equal(got, native.rank_gaussian_filter(m, ks, threads=t))


# --------------------------------------------------------------------------- k >= 5, magnitudes
# The float32 mean and variance of finish_n (AVX2, k = 5..31) and OpsScalar::finish (every k
# without AVX2): a lane whose mean is below 2^-50 (squared deviations may underflow) or whose
# sum of n squared deviations is not finite (overflow: for k = 31 already at window magnitudes
# ~2e18, where each square still fits) takes a = mu^2 / (2 s^2) from float64 statistics of its
# own window.  Before that fix the outputs were off by up to 20 % of the map's maximum at 1e20
# and 6 % at 1e-25.  Both policies run these tests (the scalar one on CPUs without AVX2).

KN = [5, 7, 9, 11, 13, 31]
TOL_N = 4e-7   # per map (or window), times its largest magnitude; measured <= 1.4e-7 (AVX2), 1.9e-7 (scalar)
# both sides of 2^-50 (mean) and of the overflow of the sum of squares (k = 31: ~2e18; k = 5:
# ~1e19), float32's range at both ends
SCALES_N = [1e-36, 1e-30, 1e-20, 2.0 ** -50 * 0.9, 2.0 ** -50 * 1.1, 1e-6, 1.0, 1e12, 1e18,
            3e18, 1e19, 1e20, 1e30]


@pytest.fixture
def native_any():
    return backend_or_skip("native")


def _magnitude_batch(rng, k, scale):
    # odd heights (row pairs plus a single last row) and widths that end in a partial vector
    h, w = (29, 37) if k <= 13 else (33, 41)
    maps = [rng.random((h, w)),                                    # mean 0.5, wide weights
            rng.random((h, w)) ** 3,                               # skewed
            1.0 + 0.02 * rng.standard_normal((h, w)),              # narrow weights (a ~ 1e3)
            make_map(rng, h, w, "sparse").astype(np.float64),      # zeros, ties
            0.2 + rng.standard_normal((h, w))]                     # negative values, mu of both signs
    maps[1][h // 3: h // 2] = 0.75                                 # constant windows: s = 0
    m = np.stack(maps) / np.abs(np.stack(maps)).reshape(len(maps), -1).max(1)[:, None, None]
    return (m * scale).astype(np.float32)


def _check_maps(got, want, maps, tol):
    scale = np.abs(maps.astype(np.float64)).reshape(len(maps), -1).max(1)
    err = np.abs(got.astype(np.float64) - want).reshape(len(maps), -1).max(1)
    assert np.isfinite(got).all()
    assert np.all(err <= tol * scale + 2.0 ** -149), f"relative errors per map {err / scale}"


@pytest.mark.parametrize("k", KN)
@pytest.mark.parametrize("scale", SCALES_N)
def test_kn_magnitudes(native_any, k, scale, rng):
    m = _magnitude_batch(rng, k, scale)
    ks = np.full(len(m), k, np.int32)
    _check_maps(native_any.rank_gaussian_filter(m, ks, threads=1), ref.rank_gaussian_filter(m, ks), m, TOL_N)


def _window_max_k(m, k):
    r = k // 2
    p = np.pad(np.abs(m.astype(np.float64)), r, mode="reflect")    # reflect-101, as the filter
    return np.lib.stride_tricks.sliding_window_view(p, (k, k)).max(axis=(-2, -1))


def _mixed_magnitudes(rng, k, h, w):
    # Column blocks of k + 1 at 1, 1e-30 (mean below 2^-50: float64 a) and 1e25 (squares
    # overflow: float64 a), so every 8-pixel vector holds windows inside one block and windows
    # that straddle two (dominated by the larger one: float32 a), side by side; zero rows
    # (mu = 0), a negative row (mu < 0) and a constant row (s = 0) cut through all of them.
    block = np.arange(w) // (k + 1) % 3
    col_scale = np.array([1.0, 1e-30, 1e25])[block]
    base = 1.0 + rng.choice([0.02, 0.3, 2.0], (h, w)) * rng.standard_normal((h, w))
    m = np.abs(base)
    m[h // 4: h // 4 + 2] = 0.0
    m[h // 2] *= -1.0
    m[h // 2 + 3: h // 2 + k + 4] = 0.6
    return (m * col_scale[None, :]).astype(np.float32)


@pytest.mark.parametrize("k", KN)
def test_kn_fallback_lanes_mixed_with_fast_lanes(native_any, k, rng):
    h, w = (2 * k + 9, 6 * (k + 1) + 5)                 # odd: row pairs and a single last row
    m = _mixed_magnitudes(rng, k, h, w)
    ks = np.array([k], np.int32)
    got = native_any.rank_gaussian_filter(m[None], ks, threads=1)[0]
    want = ref.rank_gaussian_filter(m[None], ks)[0]
    assert np.isfinite(got).all()
    wmax = _window_max_k(m, k)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= TOL_N * wmax + 2.0 ** -149), float(np.max(err / np.maximum(wmax, 1e-300)))


@pytest.mark.parametrize("k", [5, 11, 13])
def test_kn_magnitudes_bands_and_threads(native_any, k, rng):
    # the banded big-map path (h w k^2 >= 2^18, h >= 64) with fallback lanes: per-window result,
    # the same for any thread count
    m = _mixed_magnitudes(rng, k, 71, 131)[None]
    ks = np.array([k], np.int32)
    got = native_any.rank_gaussian_filter(m, ks, threads=1)
    err = np.abs(got[0].astype(np.float64) - ref.rank_gaussian_filter(m, ks)[0])
    assert np.all(err <= TOL_N * _window_max_k(m[0], k) + 2.0 ** -149)
    for t in (2, 3):
        np.testing.assert_array_equal(got, native_any.rank_gaussian_filter(m, ks, threads=t))
