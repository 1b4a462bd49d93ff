"""The naive NumPy/SciPy version of Diffusion-CAM's refinement: the baseline of the benchmarks.

This is what a user would write without diffcam: a Python loop over the maps, the rank filter
with ``sliding_window_view`` + ``np.sort`` + per-pixel Gaussian rank weights, percentiles with
``np.percentile``, the 3x3 blur with ``scipy.ndimage.correlate(mode='mirror')`` (= reflect-101),
CBA and SICD with plain NumPy.  It computes the same thing as ``diffcam/refine/reference.py``
(docs/method.md section 2; checked by tests/test_bench_naive.py) but is vectorised per map
instead of per pixel, so it is the fair "NumPy user" baseline, not the slow reference.

Two small concessions to keep it usable on 1024x1024 maps: the window values are sorted in
float32 (sorting is exact) with the statistics in float64, and the rank filter processes a few
rows at a time so the (rows, W, k*k) buffers stay around 16 MB.

Functions take (N, H, W) or (H, W) float maps and a :class:`diffcam.refine.RefineConfig`
(default ``RefineConfig.paper()``) and return float32 maps plus the per-map values the
reference returns.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from numpy.lib.stride_tricks import sliding_window_view

from diffcam.refine.config import RefineConfig

__all__ = ["kernel_size", "rank_gaussian_filter", "confidence_gating", "background_attenuation",
           "causal_debiasing", "refine", "scipy_rank_filter"]

_CHUNK_ELEMS = 1 << 21          # window values per row chunk of the rank filter (~8 MB float32)


def _batch(maps):
    a = np.asarray(maps)
    return a[None] if a.ndim == 2 else a


def _cfg(cfg):
    return RefineConfig.paper() if cfg is None else cfg


# --------------------------------------------------------------------------- AKD
def kernel_size(m, cfg=None) -> int:
    """odd(k_base * F_step * F_std * F_size) clamped to [3, k_max] (or cfg.kernel_size)."""
    cfg = _cfg(cfg)
    if cfg.kernel_size:
        return int(cfg.kernel_size)
    f_step = min(cfg.steps / cfg.step_div, cfg.step_cap)
    f_std = min(cfg.std_factor * float(np.std(m, dtype=np.float64)), cfg.std_cap)
    f_size = min(m.shape[0] / cfg.size_div, cfg.size_cap)
    k = int(cfg.k_base * f_step * f_std * f_size)
    if k % 2 == 0:
        k += 1
    return min(max(k, 3), cfg.k_max)


def _rank_weighted(v):
    """Rank-weighted Gaussian average of sorted windows v (..., n)."""
    n = v.shape[-1]
    c = (n - 1) // 2
    mu = v.mean(axis=-1, dtype=np.float64)
    s = v.std(axis=-1, dtype=np.float64)
    j = np.arange(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        sigma_r = s / mu
        g = np.exp(-((j - c) ** 2) / (2.0 * sigma_r[..., None] ** 2))
    g[..., c] = 1.0
    g[~np.isfinite(g)] = 0.0
    out = (g * v).sum(axis=-1) / g.sum(axis=-1)
    out = np.where(s == 0, v[..., c], out)
    return np.where(mu <= 0, 0.0, out)


def rank_gaussian_filter_2d(m, k: int):
    m = np.asarray(m, dtype=np.float32)
    h, w = m.shape
    r = k // 2
    padded = np.pad(m, r, mode="reflect")                 # numpy 'reflect' = reflect-101
    windows = sliding_window_view(padded, (k, k))         # (h, w, k, k), a view
    out = np.empty((h, w), dtype=np.float32)
    rows = max(1, _CHUNK_ELEMS // (w * k * k))
    for y in range(0, h, rows):
        v = np.sort(windows[y:y + rows].reshape(-1, w, k * k), axis=-1)
        out[y:y + rows] = _rank_weighted(v)
    return out


def rank_gaussian_filter(maps, k):
    """The AKD filter with a k x k window (one k, or one per map)."""
    maps = _batch(maps)
    ks = np.broadcast_to(np.asarray(k), (maps.shape[0],))
    return np.stack([rank_gaussian_filter_2d(m, int(kk)) for m, kk in zip(maps, ks)])


def scipy_rank_filter(maps, k):
    """The library baseline: scipy.ndimage.rank_filter (median of the k x k window, reflect-101).

    Not the same filter (one rank instead of all ranks weighted): a reference point for speed.
    """
    maps = _batch(maps)
    return np.stack([ndi.rank_filter(m, rank=(k * k) // 2, size=k, mode="mirror") for m in maps])


# --------------------------------------------------------------------------- DACG
def _gating_2d(m, cfg):
    m = np.asarray(m, dtype=np.float64)
    mu, sd = m.mean(), m.std()
    if sd > cfg.var_threshold:
        branch, alpha = 0, cfg.pct_high_var
    elif mu > cfg.high_mean:
        branch, alpha = 1, cfg.pct_high_mean
    elif mu < cfg.low_mean:
        branch, alpha = 2, cfg.pct_low_mean
    else:
        branch, alpha = 3, cfg.pct_default
    pos = m[m > 0]
    tau = max(float(np.percentile(pos, alpha)), cfg.tau_floor) if pos.size else cfg.tau_floor
    if not cfg.dacg:
        return m, branch, tau
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2.0 * cfg.blur_sigma ** 2))
    g /= g.sum()
    blurred = ndi.correlate(m, np.outer(g, g), mode="mirror")
    return np.where(m > tau, m, blurred), branch, tau


def confidence_gating(maps, cfg=None):
    cfg = _cfg(cfg)
    res = [_gating_2d(m, cfg) for m in _batch(maps)]
    return (np.stack([r[0] for r in res]).astype(np.float32),
            np.array([r[1] for r in res], np.int32), np.array([r[2] for r in res]))


# --------------------------------------------------------------------------- CBA
def _attenuation_2d(m, cfg):
    m = np.asarray(m, dtype=np.float64)
    pos = m[m > 0]
    if pos.size == 0:
        tau = cfg.tau_bg_floor
    else:
        tau = (cfg.bg_w_median * np.percentile(pos, 50)
               + cfg.bg_w_pct * np.percentile(m, cfg.bg_percentile)
               + cfg.bg_w_mean * pos.mean() + cfg.bg_w_max * m.max())
        tau = float(tau) if tau > 0 else cfg.tau_bg_floor
    out = np.where(m < tau, m * np.maximum(cfg.gamma, m / tau), m)
    return out, tau


def background_attenuation(maps, cfg=None):
    cfg = _cfg(cfg)
    res = [_attenuation_2d(m, cfg) for m in _batch(maps)]
    return np.stack([r[0] for r in res]).astype(np.float32), np.array([r[1] for r in res])


# --------------------------------------------------------------------------- SICD
def _minmax(m, eps):
    return (m - m.min()) / (m.max() - m.min() + eps)


def _debias_2d(m, rep_const, cfg):
    m = np.asarray(m, dtype=np.float64)
    mu, sd = m.mean(), m.std()
    if cfg.gate:
        skew = np.mean((m - mu) ** 3) / sd ** 3 if sd > 0 else 0.0
        if not (sd > cfg.gate_std or skew > cfg.gate_skew):
            return m, 0.0, 0
    inter = cfg.w_rep * rep_const + cfg.w_out * (m > mu + cfg.outlier_sigmas * sd)
    inter = np.broadcast_to(inter, m.shape)
    ii = np.sum(inter * inter)
    lam = np.sum(m * inter) / ii if ii > 0 else 0.0
    lam = float(min(max(lam, cfg.lambda_min), cfg.lambda_max))
    clean = np.maximum(m - lam * inter, 0.0)
    if cfg.range_guard > 0 and np.ptp(clean) < (1.0 - cfg.range_guard) * np.ptp(m):
        return m, lam, 0
    if cfg.final_normalize:
        clean = _minmax(clean, cfg.norm_eps)
    return clean, lam, 1


def causal_debiasing(maps, cfg=None, rep_const=0.0):
    """SICD with the uniform M_rep = rep_const (what diffcam uses without per-token maps)."""
    cfg = _cfg(cfg)
    maps = _batch(maps)
    rc = np.broadcast_to(np.asarray(rep_const, dtype=np.float64), (maps.shape[0],))
    res = [_debias_2d(m, c, cfg) for m, c in zip(maps, rc)]
    return (np.stack([r[0] for r in res]).astype(np.float32), np.array([r[1] for r in res]),
            np.array([r[2] for r in res], np.uint8))


# --------------------------------------------------------------------------- pipeline
def refine(maps, cfg=None, rep_const=0.0):
    """AKD -> DACG -> CBA -> clip [0, raw max] + min-max -> SICD, one map at a time.

    Returns out (N, H, W) float32, k, branch, tau, tau_bg, lam, applied (as reference.refine).
    """
    cfg = _cfg(cfg)
    maps = _batch(maps)
    rc = np.broadcast_to(np.asarray(rep_const, dtype=np.float64), (maps.shape[0],))
    outs, info = [], []
    for m, c in zip(maps, rc):
        raw_max = float(m.max())
        k, tau_bg, lam, applied = 0, np.nan, np.nan, 0
        if cfg.akd:
            k = kernel_size(m, cfg)
            m = rank_gaussian_filter_2d(m, k)
        m, branch, tau = _gating_2d(m, cfg)
        if cfg.cba:
            m, tau_bg = _attenuation_2d(m, cfg)
        m = _minmax(np.clip(m, 0.0, max(raw_max, 0.0)), cfg.norm_eps)
        if cfg.sicd:
            m, lam, applied = _debias_2d(m, c, cfg)
        outs.append(m)
        info.append((k, branch, tau, tau_bg, lam, applied))
    cols = list(zip(*info))
    return (np.stack(outs).astype(np.float32), np.array(cols[0], np.int32),
            np.array(cols[1], np.int32), np.array(cols[2]), np.array(cols[3]),
            np.array(cols[4]), np.array(cols[5], np.uint8))
