"""Rank filter: adversarial lane mixes for the compile-time finish (issue 2 performance work).

One 8-pixel vector can hold windows with very different sigma_r: near-constant windows
(a = 1 / (2 sigma_r^2) huge: the weight recurrence would underflow into denormals, so a > 44
gives one-hot weights and lanes that are done are zeroed) next to sparse or tied windows (wide
weights, the recurrence runs to the window's edge).  Also the thread split of one map into
dynamic row blocks must not change a single bit, for odd heights too.
"""

import numpy as np
import pytest

from diffcam.refine import reference as ref

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
