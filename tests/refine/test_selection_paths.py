"""Adversarial inputs for the selection and pass-fusion paths of the host backends.

The native DACG reads the percentile of the positive pixels at shifted ranks of the whole map
(no copy), compares M > tau in float32 against the largest float <= tau, and its exact
multi-rank select sizes its histogram by the map (16..256 buckets); the native clip + min-max
hands its sums and extremes to SICD.  These tests aim at the edges of those paths: ties at the
percentile ranks, tau equal to a pixel or between two adjacent floats, all-zero / constant /
negative maps, one positive pixel, signed and denormal zeros, 1x1..3x3 maps, lengths around
every histogram-size switch, and batches that mix all of them at several thread counts.
"""

import numpy as np
import pytest

from diffcam.refine import reference as ref
from diffcam.refine.config import RefineConfig

from .mapgen import make_batch
from .test_backends import uses_threads


def tol(x):
    return 1e-6 * max(float(np.max(np.abs(x))), 1e-30) + 1e-12


def _pct_cfg(q, **kw):
    """No AKD (DACG sees the input exactly), every DACG branch at percentile q."""
    return RefineConfig.paper().replace(akd=False, pct_high_var=q, pct_high_mean=q,
                                        pct_low_mean=q, pct_default=q, **kw)


def _odd_maps(rng):
    """(name, map) pairs of awkward single maps, float32."""
    f32 = np.float32
    out = []
    tau = 0.5 * (float(f32(0.1)) + float(f32(0.2)))          # the median of {0.1, 0.2}
    t32 = f32(tau)
    near = [np.nextafter(t32, f32(0)), t32, np.nextafter(t32, f32(1))]
    out.append(("tau_between_floats", np.array([[0.1, 0.2, *near, 0.0, -0.0, 0.0]], f32)))
    # two adjacent floats: at q > 50 tau lies above the midpoint of one ulp, so float32(tau)
    # rounds up onto the upper pixel, which must still count as M > tau
    up = np.nextafter(f32(0.5), f32(1))
    out.append(("tau_within_one_ulp", np.array([[0.5, up, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], f32)))
    out.append(("tau_is_a_pixel", np.array([[0.1, 0.2, 0.9, 0.0, 0.0]], f32)))
    out.append(("one_positive", np.array([[0.0, 0.0, 0.7], [0.0, -0.3, 0.0]], f32)))
    out.append(("one_pixel", np.array([[0.25]], f32)))
    out.append(("one_pixel_zero", np.array([[0.0]], f32)))
    out.append(("one_pixel_negative", np.array([[-1.5]], f32)))
    out.append(("all_zero", np.zeros((3, 3), f32)))
    out.append(("neg_zero", np.full((2, 3), -0.0, f32)))
    out.append(("all_negative", -rng.random((3, 2)).astype(f32)))
    out.append(("constant", np.full((3, 3), 0.375, f32)))
    out.append(("denormals", np.array([[1e-45, 0.0, 1e-40, 3e-39], [1e-45, 1e-45, 0.0, 2e-45]], f32)))
    out.append(("two_values", np.array([[0.5, 1.0] * 8], f32)))
    ties = np.repeat(np.array([0.0, 0.25, 0.5, 0.75, 1.0], f32), 41)
    out.append(("ties_1d", rng.permutation(ties)[None, :]))
    out.append(("levels_27", (rng.integers(0, 4, (27, 27)) / 3.0).astype(f32)))
    spread = np.array([0.0, 1e-30, 2e-30, 1e-20, 1e-10, 1e-3, 0.5, 1.0, 1e10, 1e30], f32)
    out.append(("wide_spread", rng.permutation(np.tile(spread, 7))[None, :]))
    dense = (0.5 + rng.integers(0, 64, (20, 20)) * np.float32(2.0 ** -24)).astype(f32)
    out.append(("dense_ulps", dense))
    for n in (31, 32, 33, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2047, 2048, 2049, 5000):
        m = rng.random((1, n)).astype(f32) ** 3
        m[0, rng.random(n) < 0.3] = 0.0
        out.append((f"len_{n}", m))
    return out


PCTS = [0.0, 12.5, 50.0, 60.0, 75.0, 85.0, 90.0, 100.0]


@pytest.mark.parametrize("q", PCTS)
def test_dacg_percentile_and_gate_exact(fast_backend, q, rng):
    p = _pct_cfg(q).to_params()
    for name, m in _odd_maps(rng):
        maps = m[None]
        out, branch, tau = fast_backend.confidence_gating(maps, p)
        r_out, r_branch, r_tau = ref.confidence_gating(maps, p)
        np.testing.assert_array_equal(branch, r_branch, err_msg=name)
        # the same order statistics and the same lerp: equal up to the last bit or so
        np.testing.assert_allclose(tau, r_tau, rtol=1e-12, atol=0, err_msg=name)
        # M > tau is exact on both sides (no AKD): only the float32 blur differs
        np.testing.assert_allclose(out[0].astype(np.float64), r_out[0], rtol=0,
                                   atol=tol(maps), err_msg=name)


@pytest.mark.parametrize("bg_pct", [0.0, 50.0, 60.0, 99.0, 100.0])
def test_cba_threshold_ranks(fast_backend, bg_pct, rng):
    p = RefineConfig.paper().replace(bg_percentile=bg_pct).to_params()
    for name, m in _odd_maps(rng):
        maps = m[None]
        out, tau_bg = fast_backend.background_attenuation(maps, p)
        r_out, r_tau_bg = ref.background_attenuation(maps, p)
        np.testing.assert_allclose(tau_bg, r_tau_bg, rtol=1e-9, atol=0, err_msg=name)
        np.testing.assert_allclose(out[0].astype(np.float64), r_out[0], rtol=0,
                                   atol=tol(maps), err_msg=name)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (2, 3),
                                 (3, 3), (1, 5), (5, 2), (3, 4), (4, 9), (9, 4), (7, 6)])
def test_dacg_blur_tails_small_maps(fast_backend, h, w, rng):
    for q in (0.0, 50.0, 100.0):
        p = _pct_cfg(q).to_params()
        maps = make_batch(rng, 8, h, w)
        out, branch, tau = fast_backend.confidence_gating(maps, p)
        r_out, r_branch, r_tau = ref.confidence_gating(maps, p)
        np.testing.assert_array_equal(branch, r_branch)
        np.testing.assert_allclose(tau, r_tau, rtol=1e-12, atol=0)
        np.testing.assert_allclose(out.astype(np.float64), r_out, rtol=0, atol=tol(maps))


@pytest.mark.parametrize("final_normalize", [False, True])
@pytest.mark.parametrize("w_out", [0.0, 0.5])
@pytest.mark.parametrize("with_rep", [False, True])
def test_clip_normalize_then_sicd(fast_backend, final_normalize, w_out, with_rep, rng):
    # no AKD / DACG / CBA: SICD gets clip + min-max of the input (the fused statistics)
    cfg = RefineConfig.paper().replace(akd=False, dacg=False, cba=False, w_out=w_out,
                                       final_normalize=final_normalize)
    p = cfg.to_params()
    for name, m in _odd_maps(rng):
        maps = m[None]
        rep = rng.random(maps.shape).astype(np.float32) if with_rep else None
        rc = np.array([0.03])
        got = fast_backend.refine(maps, rep, rc, p)
        want = ref.refine(maps, rep, rc, p)
        np.testing.assert_array_equal(got[6], want[6], err_msg=name)
        np.testing.assert_allclose(got[5], want[5], rtol=0, atol=1e-6, err_msg=name)
        if name in ("wide_spread", "dense_ulps"):
            continue        # min-max of a tiny range relative to the max: float32 rounding grows
        np.testing.assert_allclose(got[0].astype(np.float64), want[0], rtol=0,
                                   atol=tol(np.ones(1)) * (1e3 if final_normalize else 1),
                                   err_msg=name)


def test_mixed_batch_thread_invariant(fast_backend, rng):
    """A batch of awkward maps (zero-padded or tiled to one shape) gives bit-identical results at any
    thread count, and every statistic equals the one of the map refined alone."""
    maps = [m for _, m in _odd_maps(rng) if m.size <= 27 * 27]
    batch = np.zeros((len(maps) * 3, 27, 27), np.float32)
    for i, m in enumerate(maps):
        batch[i].reshape(-1)[:m.size] = m.reshape(-1)
        batch[len(maps) + i] = np.resize(m, (27, 27))
    batch[2 * len(maps):] = make_batch(rng, len(maps), 27, 27)
    rc = rng.random(len(batch)) * 0.05
    for cfg in (RefineConfig.paper(), RefineConfig.paper().replace(w_out=0.5, final_normalize=True)):
        p = cfg.to_params()
        base = fast_backend.refine(batch, None, rc, p, threads=1)
        for t in (2, 3, 8) if uses_threads(fast_backend) else ():
            got = fast_backend.refine(batch, None, rc, p, threads=t)
            for a, b in zip(base, got):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for i in (0, 5, len(batch) - 1):
            one = fast_backend.refine(batch[i:i + 1], None, rc[i:i + 1], p, threads=1)
            for a, b in zip(base, one):
                assert np.asarray(a)[i:i + 1].tobytes() == np.asarray(b).tobytes()
