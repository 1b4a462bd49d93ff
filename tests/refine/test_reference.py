"""The float64 reference checked formula by formula against hand-computed answers (method.md 2-3).

The reference is the truth for every other backend, so it is tested on its own here, against
arithmetic written out independently of its code.
"""

import math
from fractions import Fraction

import numpy as np
import pytest

from diffcam.refine import reference as ref
from diffcam.refine.config import PARAM_FIELDS, RefineConfig

P = {n: i for i, n in enumerate(PARAM_FIELDS)}


def params(**kw):
    return RefineConfig.paper().replace(**kw).to_params()


# ----------------------------------------------------------------------------- border
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_fold_matches_numpy_reflect(n):
    x = np.arange(n)
    pad = 3 * n
    padded = np.pad(x, pad, mode="reflect")     # numpy 'reflect' == OpenCV BORDER_REFLECT_101
    got = [x[ref.fold_reflect101(i, n)] for i in range(-pad, n + pad)]
    np.testing.assert_array_equal(got, padded)


def test_fold_single_pixel():
    assert all(ref.fold_reflect101(i, 1) == 0 for i in range(-5, 6))


# ----------------------------------------------------------------------------- AKD
def _half_map(h, w, a):
    """Half zeros, half ``a``: mean a/2, population std exactly a/2."""
    m = np.zeros((h, w))
    m[: h // 2] = a
    return m


@pytest.mark.parametrize("std,expected", [(0.1, 3), (0.2, 7), (0.3, 9), (0.35, 11), (0.5, 11)])
def test_kernel_size_table_at_512(std, expected):
    # H = 512: F_size = 1; S = 32: F_step = 2; k = odd(int(6 * min(5 std, 2)))
    # std 0.1 -> 3; 0.2 -> 6 -> 7; 0.3 -> 9; 0.35 -> 10.5 -> 10 -> 11; 0.5 -> 12 -> 13 -> k_max 11
    m = _half_map(512, 8, 2 * std)
    assert ref.kernel_size_2d(m, params(steps=32)) == expected


def test_kernel_size_factors():
    m = _half_map(256, 4, 0.6)                       # std 0.3: F_std = 1.5
    # F_size = 0.5, F_step = min(8/16, 2) = 0.5 -> 3 * 0.5 * 1.5 * 0.5 = 1.125 -> 1 -> clamp 3
    assert ref.kernel_size_2d(m, params(steps=8)) == 3
    # F_size capped at 1.5 for H = 1024; F_step capped at 2; F_std capped at 2 -> 18 -> 19 -> 31
    big = _half_map(1024, 2, 1.0)
    assert ref.kernel_size_2d(big, params(steps=100, k_max=31)) == 19
    assert ref.kernel_size_2d(big, params(steps=100, kernel_size=5)) == 5


@pytest.mark.parametrize("h", [27, 384, 1024])
def test_reference_preset_kernel_is_always_3(h):
    m = _half_map(h, 4, 1.0)
    assert ref.kernel_size_2d(m, RefineConfig.reference().to_params()) == 3


def test_rank_window_single_peak_by_hand():
    v = np.zeros(9); v[3] = 1.0
    mu = 1 / 9
    s = math.sqrt(1 / 9 - mu * mu)
    sr = s / mu                                          # sqrt(8)
    g = [math.exp(-((j - 4) ** 2) / (2 * sr * sr)) for j in range(9)]
    assert ref.rank_gaussian_window(v) == pytest.approx(g[8] / sum(g), rel=1e-12)


def test_rank_window_limits():
    assert ref.rank_gaussian_window(np.full(25, 0.37)) == 0.37           # constant: its value
    assert ref.rank_gaussian_window(np.zeros(9)) == 0.0                  # mu <= 0: 0
    assert ref.rank_gaussian_window(np.array([-1.0, 0.5, 0.4])) == 0.0   # mu <= 0 (noise)
    # tiny spread: sigma_r -> 0, the filter becomes a median
    v = 0.5 + 1e-9 * np.arange(9)
    assert ref.rank_gaussian_window(v[::-1]) == pytest.approx(np.median(v), abs=1e-15)
    # huge spread relative to the mean: nearly the mean
    v = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0])
    assert ref.rank_gaussian_window(v) < 0.04


def test_rank_filter_properties(rng):
    m = rng.random((20, 17))
    out = ref.rank_gaussian_filter_2d(m, 5)
    np.testing.assert_allclose(ref.rank_gaussian_filter_2d(3.5 * m, 5), 3.5 * out, rtol=1e-12)
    np.testing.assert_allclose(ref.rank_gaussian_filter_2d(m.T, 5), out.T, rtol=1e-12)
    np.testing.assert_allclose(ref.rank_gaussian_filter_2d(m[::-1], 5), out[::-1], rtol=1e-12)
    # each output lies within its window's range
    r = 2
    for y, x in [(0, 0), (10, 8), (19, 16)]:
        win = [m[ref.fold_reflect101(y + a, 20), ref.fold_reflect101(x + b, 17)]
               for a in range(-r, r + 1) for b in range(-r, r + 1)]
        assert min(win) <= out[y, x] <= max(win)


def test_rank_filter_removes_salt_noise():
    m = np.full((9, 9), 0.5); m[4, 4] = 1.0
    out = ref.rank_gaussian_filter_2d(m, 3)
    assert out[4, 4] < 0.6 and out[0, 0] == 0.5


# ----------------------------------------------------------------------------- DACG
@pytest.mark.parametrize("mu,sd,branch", [
    (0.30, 0.22, ref.BRANCH_DEFAULT),                    # sd > 0.22 is strict
    (0.30, np.nextafter(0.22, 1), ref.BRANCH_HIGH_VAR),
    (0.90, 0.30, ref.BRANCH_HIGH_VAR),                   # variance is tested first
    (0.35, 0.10, ref.BRANCH_DEFAULT),                    # mu > 0.35 is strict
    (np.nextafter(0.35, 1), 0.10, ref.BRANCH_HIGH_MEAN),
    (0.25, 0.10, ref.BRANCH_DEFAULT),                    # mu < 0.25 is strict
    (np.nextafter(0.25, 0), 0.10, ref.BRANCH_LOW_MEAN),
])
def test_gating_branch_boundaries(mu, sd, branch):
    assert ref.gating_branch(mu, sd, params())[0] == branch


def test_gating_percentiles_by_branch():
    p = params()
    assert [ref.gating_branch(m, s, p)[1] for m, s in
            [(0.3, 0.3), (0.4, 0.1), (0.1, 0.1), (0.3, 0.1)]] == [90, 75, 80, 85]


def test_gating_by_hand():
    m = np.zeros((4, 4)); m[0, :] = [0.1, 0.2, 0.3, 0.4]; m[1, 0] = 0.05
    # mu = 1.05 / 16 < 0.25, sd = 0.121 < 0.22 -> low_mean, percentile 80 of the positives
    pos = np.sort([0.05, 0.1, 0.2, 0.3, 0.4])           # h = 4 * 0.8 = 3.2 -> 0.3 + 0.2 * 0.1
    out, branch, tau = ref.confidence_gating_2d(m, params())
    assert branch == ref.BRANCH_LOW_MEAN and tau == pytest.approx(0.32, abs=1e-12)
    g = np.exp(-1 / (2 * 0.09)); g1 = np.array([g, 1, g]) / (1 + 2 * g)
    # pixel (0, 3) = 0.4 > tau keeps its value; (0, 1) = 0.2 takes the 3x3 blur
    assert out[0, 3] == 0.4
    win = m[np.ix_([1, 0, 1], [0, 1, 2])]                # reflect-101 above row 0
    assert out[0, 1] == pytest.approx(g1 @ win @ g1, abs=1e-12)
    assert len(pos) == 5


def test_gating_no_positive_pixel_and_disabled():
    out, branch, tau = ref.confidence_gating_2d(np.zeros((3, 3)), params())
    assert tau == 1e-6 and (out == 0).all()
    m = np.random.default_rng(0).random((6, 6))
    out, _, _ = ref.confidence_gating_2d(m, RefineConfig.reference().to_params())
    np.testing.assert_array_equal(out, m)              # [ref]: DACG is an identity


# ----------------------------------------------------------------------------- CBA
def test_background_threshold_closed_form():
    m = np.array([[0.0, 0.02], [0.5, 1.0]])
    s1 = 0.5                                            # median of 0.02, 0.5, 1.0
    s2 = 0.02 + 0.8 * (0.5 - 0.02)                      # P60 of all: h = 3 * 0.6 = 1.8
    s3 = (0.02 + 0.5 + 1.0) / 3
    s4 = 1.0
    tau = 0.15 * s1 + 0.15 * s2 + 0.20 * s3 + 0.015 * s4
    assert ref.background_threshold(m, params()) == pytest.approx(tau, rel=1e-12)
    out, t = ref.background_attenuation_2d(m, params())
    assert out[0, 1] == pytest.approx(0.02 * 0.5)       # M / tau < gamma -> gamma
    assert out[1, 0] == 0.5 and out[1, 1] == 1.0         # above tau: unchanged
    m2 = np.array([[0.2, 1.0]])                          # M / tau > gamma -> M^2 / tau
    out2, t2 = ref.background_attenuation_2d(m2, params())
    assert 0.2 < t2 and out2[0, 0] == pytest.approx(0.04 / t2)


def test_background_threshold_empty():
    assert ref.background_threshold(np.zeros((2, 2)), params()) == 1e-6


# ----------------------------------------------------------------------------- SICD
def test_sicd_lambda_closed_form_and_clipping():
    m = np.zeros((4, 4)); m[1:3, 1:3] = 1.0; m[0, 0] = 0.2
    p = params(gate=False, w_rep=1.0, w_out=0.0)
    rep = np.full((4, 4), 0.1)
    out, lam, applied = ref.causal_debiasing_2d(m, rep, 0.0, p)
    ls = (m * rep).sum() / (rep * rep).sum()             # 4.2 * 0.1 / 0.16 = 2.625 -> clip 0.5
    assert ls > 0.5 and lam == 0.5 and applied == 1
    np.testing.assert_allclose(out, np.maximum(m - 0.5 * rep, 0))
    p = params(gate=False, w_rep=1.0, w_out=0.0, lambda_max=5.0)
    _, lam, _ = ref.causal_debiasing_2d(m, rep, 0.0, p)
    assert lam == pytest.approx(2.625)
    _, lam, _ = ref.causal_debiasing_2d(m, None, 0.0, p)  # I = 0 -> lambda 0
    assert lam == 0.0


def test_sicd_outlier_term():
    m = np.zeros((10, 10)); m[5, 5] = 1.0                 # one outlier above mu + 2 sigma
    p = params(gate=False, w_rep=0.0, w_out=0.5)
    out, lam, _ = ref.causal_debiasing_2d(m, None, 0.0, p)
    assert lam == 0.5 and out[5, 5] == pytest.approx(0.75)


def test_sicd_gate():
    flat = np.full((5, 5), 0.5); flat[0, 0] = 0.4          # low std, negative skew
    p = params(gate=True, gate_std=0.25, gate_skew=1.0)
    out, lam, applied = ref.causal_debiasing_2d(flat, None, 0.05, p)
    assert applied == 0 and (out == flat).all()
    spike = np.zeros((5, 5)); spike[2, 2] = 1.0            # skewness 4.8 > 1
    _, _, applied = ref.causal_debiasing_2d(spike, None, 0.05, p)
    assert applied == 1


def test_reference_sicd_uniform_constant_and_range_guard():
    from diffcam.refine._common import repeated_token_ratio

    assert repeated_token_ratio([1, 2, 1, 3, 3, 0, 0, 0]) == 3 / 8
    p = RefineConfig.reference().to_params()
    m = np.random.default_rng(3).random((8, 8))
    out, lam, applied = ref.causal_debiasing_2d(m, None, 0.05 * 3 / 8, p)
    inter = 0.05 * 3 / 8 + 0.02 * (m > m.mean() + 2 * m.std())
    ls = (m * inter).sum() / (inter * inter).sum()
    assert lam == pytest.approx(min(ls, 0.5))
    # range guard: subtracting a large uniform part of a narrow-range map shrinks its range
    narrow = 0.8 + 0.2 * m
    out, lam, applied = ref.causal_debiasing_2d(narrow, np.ones((8, 8)), 0.0,
                                                params(gate=False, range_guard=0.1, w_out=0.0,
                                                       w_rep=1.0, lambda_max=0.9))
    clean = np.maximum(narrow - lam, 0)
    shrank = np.ptp(clean) < 0.9 * np.ptp(narrow)
    assert applied == (0 if shrank else 1)


# ----------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("cfg", [RefineConfig.paper(), RefineConfig.reference().replace(noise=0.0)])
@pytest.mark.parametrize("value", [0.0, 0.4, 1.0])
def test_pipeline_constant_maps_are_finite(cfg, value):
    out, *_ = ref.refine_2d(np.full((7, 9), value), None, 0.01, cfg.to_params())
    assert np.isfinite(out).all() and (out == 0).all()


def test_pipeline_keeps_a_clean_blob(rng):
    yy, xx = np.mgrid[0:27, 0:27]
    m = np.exp(-((yy - 8) ** 2 + (xx - 18) ** 2) / 20.0) + 0.05 * rng.random((27, 27))
    m /= m.max()
    out, k, *_ = ref.refine_2d(m, None, 0.0, params())
    assert k == 3 and np.unravel_index(out.argmax(), out.shape) == pytest.approx((8, 18), abs=1)
    assert out.min() >= 0 and out.max() <= 1


# ----------------------------------------------------------------------------- metrics
def _otsu_exact(img):
    """Otsu by its definition, in exact rational arithmetic: the first t maximising
    q1 q2 (mu1 - mu2)^2 over the splits where both classes are non-empty; 0 if none."""
    h = np.bincount(img.ravel(), minlength=256)
    n = int(h.sum())
    best, best_t = Fraction(0), 0
    for t in range(256):
        n1 = int(h[: t + 1].sum()); n2 = n - n1
        if n1 == 0 or n2 == 0:
            continue
        s1 = sum(i * int(h[i]) for i in range(t + 1)); s2 = sum(i * int(h[i]) for i in range(t + 1, 256))
        q1, q2 = Fraction(n1, n), Fraction(n2, n)
        var = q1 * q2 * (Fraction(s1, n1) - Fraction(s2, n2)) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def test_otsu_against_definition(rng):
    for trial in range(60):
        size = rng.integers(2, 400)
        if trial % 3 == 0:
            img = rng.integers(0, 256, size).astype(np.uint8)
        elif trial % 3 == 1:     # bimodal
            img = np.concatenate([rng.normal(60, 15, size), rng.normal(180, 20, size)])
            img = np.clip(img, 0, 255).astype(np.uint8)
        else:
            img = (rng.random(size) ** 3 * 255).astype(np.uint8)
        assert ref.otsu_threshold_u8_2d(img.reshape(1, -1)) == _otsu_exact(img)


def test_otsu_hand_cases():
    assert ref.otsu_threshold_u8_2d(np.array([[10, 200]], np.uint8)) == 10
    assert ref.otsu_threshold_u8_2d(np.full((3, 3), 77, np.uint8)) == 0     # constant image
    assert ref.otsu_threshold_u8_2d(np.array([[0, 0, 0, 255]], np.uint8)) == 0


def test_otsu_matches_opencv_when_installed(rng):
    cv2 = pytest.importorskip("cv2")
    for _ in range(50):
        img = (rng.random((17, 23)) ** rng.uniform(0.5, 4) * 255).astype(np.uint8)
        t, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert ref.otsu_threshold_u8_2d(img) == int(t)


def test_to_uint8_truncates():
    np.testing.assert_array_equal(ref.to_uint8(np.array([0.0, 0.999, 1 / 255 - 1e-7, 1.0])),
                                  [0, 254, 0, 255])


def test_resize_identity_and_known_values():
    m = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(ref.resize_bilinear_2d(m, 2, 3), m)
    up = ref.resize_bilinear_2d(np.array([[0.0, 1.0]]), 1, 4)
    # half-pixel centres: x_src = (x + 0.5) / 2 - 0.5 -> -0.25, 0.25, 0.75, 1.25 (clamped)
    np.testing.assert_allclose(up, [[0.0, 0.25, 0.75, 1.0]])


def test_localization_by_hand():
    m = np.zeros((4, 4)); m[0:2, 0:2] = 1.0; m[3, 3] = 0.2
    masks = np.zeros((2, 4, 4), bool); masks[0, 0:2, 0:3] = True; masks[1, 3, 3] = True
    iou, contrast, conc = ref.localization_2d(m, masks)
    # Otsu on {255 x4, 51 x1, 0 x11} puts the threshold below 255 and at/above 51 -> P = 2x2 block
    assert iou == pytest.approx(4 / 6)
    fg = masks.any(0)
    assert contrast == pytest.approx(m[fg].mean() / (m[~fg].mean() + 1e-8))
    assert conc == pytest.approx(4.2 / (4.2 + 1e-8))


def test_f3():
    assert ref.f3_score(0.3, 2.6, 0.5) == pytest.approx(3 / (1 / 0.3 + 1 / 0.13 + 1 / 0.5))
    assert ref.f3_score(0.0, 3.0, 0.5) == 0.0
    assert ref.f3_score(0.5, 40.0, 0.5) == pytest.approx(3 / (2 + 1 + 2))


def test_resize_matches_opencv_when_installed(rng):
    cv2 = pytest.importorskip("cv2")
    for (h, w), (oh, ow) in [((24, 24), (96, 96)), ((27, 27), (384, 384)), ((14, 20), (33, 17)),
                             ((64, 48), (32, 24)), ((5, 7), (5, 7)), ((1, 6), (4, 9))]:
        m = rng.random((h, w)).astype(np.float32)
        want = cv2.resize(m, (ow, oh), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ref.resize_bilinear_2d(m, oh, ow), want, atol=1e-5)
