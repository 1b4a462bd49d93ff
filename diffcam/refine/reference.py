"""The float64 NumPy reference of every refinement kernel and of the localization metrics.

Written for clarity, not speed: loops over pixels, ``np.sort`` on every window, float64
throughout.  This module is the truth every other backend (native C++, CUDA, Numba) is tested
against (docs/method.md sections 2 and 3 are the contract).  It also serves as the ``numpy``
backend, so it has the same batched function signatures as the others:

========================  =======================================================================
function                  returns
========================  =======================================================================
kernel_sizes              int32 (N,): AKD kernel size per map
rank_gaussian_filter      (N, H, W): the rank-weighted Gaussian filter with one k per map
confidence_gating         out, branch int32 (N,), tau float64 (N,)
background_attenuation    out, tau_bg float64 (N,)
causal_debiasing          out, lam float64 (N,), applied uint8 (N,)
refine                    out, k, branch, tau, tau_bg, lam, applied (the whole pipeline)
otsu_threshold_u8         int32 (N,): OpenCV's Otsu threshold of uint8 maps
resize_bilinear           (N, Hm, Wm): half-pixel-centre bilinear resize (OpenCV INTER_LINEAR)
localization              float64 (N, 3): Obj-IoU, contrast, concentration
========================  =======================================================================

Inputs are (N, H, W) arrays; ``params`` is :meth:`RefineConfig.to_params`; ``rep`` is None or
(N, H, W) (the averaged, normalised repeated-word maps of SICD) and ``rep_const`` a (N,) array
(the uniform fallback value of M_rep per map).

Example
-------
>>> import numpy as np
>>> from diffcam.refine import reference as ref
>>> m = np.zeros((1, 5, 5)); m[0, 2, 2] = 1.0
>>> out = ref.rank_gaussian_filter(m, np.array([3]))
>>> float(out[0, 2, 2]) < 1.0            # an isolated peak is pulled towards its neighbours
True
"""

from __future__ import annotations

import math

import numpy as np

from .config import PARAM_FIELDS

P = {name: i for i, name in enumerate(PARAM_FIELDS)}

BRANCH_HIGH_VAR, BRANCH_HIGH_MEAN, BRANCH_LOW_MEAN, BRANCH_DEFAULT = 0, 1, 2, 3


# --------------------------------------------------------------------------- helpers
def fold_reflect101(i: int, n: int) -> int:
    """Index ``i`` folded into [0, n) with reflect-101 (``dcb|abcd|cba``), any distance."""
    if n == 1:
        return 0
    period = 2 * n - 2
    i = i % period
    return period - i if i >= n else i


def _percentile(values: np.ndarray, q: float) -> float:
    """NumPy's default ('linear') percentile, in float64."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _odd_kernel(x: float) -> int:
    k = int(x)
    return k + 1 if k % 2 == 0 else k


# --------------------------------------------------------------------------- AKD
def kernel_size_2d(m: np.ndarray, p: np.ndarray) -> int:
    """AKD kernel size of one map (method.md 2.1)."""
    if p[P["kernel_size"]] > 0:
        return int(p[P["kernel_size"]])
    m = np.asarray(m, dtype=np.float64)
    f_step = min(p[P["steps"]] / p[P["step_div"]], p[P["step_cap"]])
    f_std = min(p[P["std_factor"]] * float(m.std()), p[P["std_cap"]])
    f_size = min(m.shape[0] / p[P["size_div"]], p[P["size_cap"]])
    k = _odd_kernel(p[P["k_base"]] * f_step * f_std * f_size)
    return int(min(max(k, 3), int(p[P["k_max"]])))


def kernel_sizes(maps, params) -> np.ndarray:
    return np.array([kernel_size_2d(m, params) for m in maps], dtype=np.int32)


def fold_indices(n: int, k: int) -> np.ndarray:
    """(n, k) table: the reflect-101 source index of window offset j around output i."""
    r = k // 2
    return np.array([[fold_reflect101(i + d, n) for d in range(-r, r + 1)] for i in range(n)],
                    dtype=np.intp)


def rank_gaussian_windows(windows: np.ndarray) -> np.ndarray:
    """The rank-weighted Gaussian average of each row of ``windows`` (..., n), n odd.

    Sort the n values; mu and s are their mean and population std; mu <= 0 gives 0, s == 0 the
    middle value; otherwise the weights exp(-(j - c)^2 / (2 sigma_r^2)), sigma_r = s / mu,
    normalised to sum 1, average the sorted values.
    """
    v = np.sort(np.asarray(windows, dtype=np.float64), axis=-1)
    n = v.shape[-1]
    c = (n - 1) // 2
    mu = v.mean(axis=-1, keepdims=True)
    s = np.sqrt(np.maximum(np.mean((v - mu) ** 2, axis=-1, keepdims=True), 0.0))
    j = np.arange(n, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        sigma_r = s / mu
        g = np.exp(-((j - c) ** 2) / (2.0 * sigma_r * sigma_r))
    g[..., c] = 1.0                      # exp(0), also when sigma_r underflows to 0
    g = np.where(np.isfinite(g), g, 0.0)
    out = np.sum(g * v, axis=-1) / np.sum(g, axis=-1)
    out = np.where(s[..., 0] == 0.0, v[..., c], out)
    return np.where(mu[..., 0] <= 0.0, 0.0, out)


def rank_gaussian_window(values: np.ndarray) -> float:
    """The rank-weighted Gaussian average of one window's values."""
    return float(rank_gaussian_windows(np.asarray(values, dtype=np.float64).ravel()[None])[0])


def rank_gaussian_filter_2d(m: np.ndarray, k: int) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    iy, ix = fold_indices(h, k), fold_indices(w, k)
    # windows[y, x, a, b] = m[fold(y + a - r), fold(x + b - r)]
    windows = m[iy[:, None, :, None], ix[None, :, None, :]]
    return rank_gaussian_windows(windows.reshape(h, w, k * k))


def rank_gaussian_filter(maps, ksizes) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float64)
    ks = np.broadcast_to(np.asarray(ksizes), (maps.shape[0],))
    return np.stack([rank_gaussian_filter_2d(m, int(k)) for m, k in zip(maps, ks)])


# --------------------------------------------------------------------------- DACG
def gaussian_kernel3(sigma: float) -> np.ndarray:
    """The 3-tap Gaussian (OpenCV getGaussianKernel(3, sigma) for sigma > 0)."""
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2.0 * sigma * sigma))
    return g / g.sum()


def gaussian_blur3_2d(m: np.ndarray, sigma: float) -> np.ndarray:
    """3x3 Gaussian blur with reflect-101 borders."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    g = gaussian_kernel3(sigma)
    iy, ix = fold_indices(h, 3), fold_indices(w, 3)
    windows = m[iy[:, None, :, None], ix[None, :, None, :]]       # (h, w, 3, 3)
    return np.einsum("yxab,a,b->yx", windows, g, g)


def gating_branch(mu: float, sd: float, p: np.ndarray) -> tuple[int, float]:
    if sd > p[P["var_threshold"]]:
        return BRANCH_HIGH_VAR, p[P["pct_high_var"]]
    if mu > p[P["high_mean"]]:
        return BRANCH_HIGH_MEAN, p[P["pct_high_mean"]]
    if mu < p[P["low_mean"]]:
        return BRANCH_LOW_MEAN, p[P["pct_low_mean"]]
    return BRANCH_DEFAULT, p[P["pct_default"]]


def confidence_gating_2d(m: np.ndarray, p: np.ndarray):
    m = np.asarray(m, dtype=np.float64)
    branch, alpha = gating_branch(float(m.mean()), float(m.std()), p)
    pos = m[m > 0]
    tau = max(_percentile(pos, alpha), p[P["tau_floor"]]) if pos.size else p[P["tau_floor"]]
    if p[P["dacg"]] == 0:
        return m.copy(), branch, tau
    blurred = gaussian_blur3_2d(m, p[P["blur_sigma"]])
    return np.where(m > tau, m, blurred), branch, tau


def confidence_gating(maps, params):
    res = [confidence_gating_2d(m, params) for m in np.asarray(maps, dtype=np.float64)]
    return (np.stack([r[0] for r in res]), np.array([r[1] for r in res], dtype=np.int32),
            np.array([r[2] for r in res], dtype=np.float64))


# --------------------------------------------------------------------------- CBA
def background_threshold(m: np.ndarray, p: np.ndarray) -> float:
    m = np.asarray(m, dtype=np.float64)
    pos = m[m > 0]
    if pos.size == 0:
        return float(p[P["tau_bg_floor"]])
    tau = (p[P["bg_w_median"]] * _percentile(pos, 50.0)
           + p[P["bg_w_pct"]] * _percentile(m, p[P["bg_percentile"]])
           + p[P["bg_w_mean"]] * float(pos.mean())
           + p[P["bg_w_max"]] * float(m.max()))
    return float(tau) if tau > 0 else float(p[P["tau_bg_floor"]])


def background_attenuation_2d(m: np.ndarray, p: np.ndarray):
    m = np.asarray(m, dtype=np.float64)
    tau = background_threshold(m, p)
    factor = np.maximum(p[P["gamma"]], m / tau)
    return np.where(m < tau, m * factor, m), tau


def background_attenuation(maps, params):
    res = [background_attenuation_2d(m, params) for m in np.asarray(maps, dtype=np.float64)]
    return np.stack([r[0] for r in res]), np.array([r[1] for r in res], dtype=np.float64)


# --------------------------------------------------------------------------- normalisation
def clip_normalize_2d(m: np.ndarray, clip_max: float, eps: float) -> np.ndarray:
    m = np.clip(np.asarray(m, dtype=np.float64), 0.0, max(clip_max, 0.0))
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo + eps)


def minmax_2d(m: np.ndarray, eps: float) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo + eps)


# --------------------------------------------------------------------------- SICD
def causal_debiasing_2d(m: np.ndarray, rep, rep_const: float, p: np.ndarray):
    m = np.asarray(m, dtype=np.float64)
    mu, sd = float(m.mean()), float(m.std())
    if p[P["gate"]] != 0:
        sd3 = sd * sd * sd
        skew = float(np.mean((m - mu) ** 3)) / sd3 if sd3 > 0 else 0.0   # 0 when it underflows
        if not (sd > p[P["gate_std"]] or skew > p[P["gate_skew"]]):
            return m.copy(), 0.0, 0
    m_rep = np.full_like(m, rep_const) if rep is None else np.asarray(rep, dtype=np.float64)
    m_out = (m > mu + p[P["outlier_sigmas"]] * sd).astype(np.float64)
    inter = p[P["w_rep"]] * m_rep + p[P["w_out"]] * m_out
    ii = float(np.sum(inter * inter))
    lam = float(np.sum(m * inter)) / ii if ii > 0 else 0.0
    lam = min(max(lam, p[P["lambda_min"]]), p[P["lambda_max"]])
    clean = np.maximum(m - lam * inter, 0.0)
    guard = p[P["range_guard"]]
    if guard > 0 and (clean.max() - clean.min()) < (1.0 - guard) * (m.max() - m.min()):
        return m.copy(), lam, 0
    if p[P["final_normalize"]] != 0:
        clean = minmax_2d(clean, p[P["norm_eps"]])
    return clean, lam, 1


def causal_debiasing(maps, rep, rep_const, params):
    maps = np.asarray(maps, dtype=np.float64)
    rc = np.broadcast_to(np.asarray(rep_const, dtype=np.float64), (maps.shape[0],))
    res = [causal_debiasing_2d(m, None if rep is None else rep[i], rc[i], params)
           for i, m in enumerate(maps)]
    return (np.stack([r[0] for r in res]), np.array([r[1] for r in res], dtype=np.float64),
            np.array([r[2] for r in res], dtype=np.uint8))


# --------------------------------------------------------------------------- pipeline
def refine_2d(m: np.ndarray, rep, rep_const: float, p: np.ndarray):
    """AKD -> DACG -> CBA -> clip to [0, raw max] and min-max -> SICD, on one map."""
    m = np.asarray(m, dtype=np.float64)
    raw_max = float(m.max())
    k, tau_bg, lam, applied = 0, math.nan, math.nan, 0
    if p[P["akd"]] != 0:
        k = kernel_size_2d(m, p)
        m = rank_gaussian_filter_2d(m, k)
    m, branch, tau = confidence_gating_2d(m, p)
    if p[P["cba"]] != 0:
        m, tau_bg = background_attenuation_2d(m, p)
    m = clip_normalize_2d(m, raw_max, p[P["norm_eps"]])
    if p[P["sicd"]] != 0:
        m, lam, applied = causal_debiasing_2d(m, rep, rep_const, p)
    return m, k, branch, tau, tau_bg, lam, applied


def refine(maps, rep, rep_const, params):
    maps = np.asarray(maps, dtype=np.float64)
    rc = np.broadcast_to(np.asarray(rep_const, dtype=np.float64), (maps.shape[0],))
    res = [refine_2d(m, None if rep is None else rep[i], rc[i], params)
           for i, m in enumerate(maps)]
    cols = list(zip(*res))
    return (np.stack(cols[0]), np.array(cols[1], dtype=np.int32),
            np.array(cols[2], dtype=np.int32), np.array(cols[3], dtype=np.float64),
            np.array(cols[4], dtype=np.float64), np.array(cols[5], dtype=np.float64),
            np.array(cols[6], dtype=np.uint8))


# --------------------------------------------------------------------------- metrics
def to_uint8(m: np.ndarray) -> np.ndarray:
    """Scale a [0, 1] map to uint8 by truncation, in float32 arithmetic (as every backend)."""
    v = np.asarray(m, dtype=np.float32) * np.float32(255.0)
    return np.floor(np.clip(v, 0.0, 255.0)).astype(np.uint8)


def otsu_threshold_u8_2d(img: np.ndarray) -> int:
    """OpenCV's Otsu threshold (THRESH_OTSU) of a uint8 image; foreground is ``img > t``.

    Between-class variance q1 q2 (mu1 - mu2)^2 maximised over t with the first maximum kept;
    thresholds where one class is empty (weight below FLT_EPSILON) are skipped; 0 when every
    threshold is skipped (a constant image).
    """
    img = np.asarray(img)
    hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    scale = 1.0 / img.size
    mu = sum(i * hist[i] for i in range(256)) * scale
    flt_eps = float(np.finfo(np.float32).eps)
    q1 = mu1 = 0.0
    best_sigma, best_t = 0.0, 0
    for i in range(256):
        p_i = hist[i] * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < flt_eps or max(q1, q2) > 1.0 - flt_eps:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > best_sigma:
            best_sigma, best_t = sigma, i
    return best_t


def otsu_threshold_u8(imgs) -> np.ndarray:
    return np.array([otsu_threshold_u8_2d(i) for i in np.asarray(imgs)], dtype=np.int32)


def resize_bilinear_2d(m: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and edge clamping (OpenCV INTER_LINEAR)."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape

    def taps(n_out, n_in):
        res = []
        for d in range(n_out):
            s = (d + 0.5) * (n_in / n_out) - 0.5
            i0 = math.floor(s)
            t = s - i0
            a, b = min(max(i0, 0), n_in - 1), min(max(i0 + 1, 0), n_in - 1)
            res.append((a, b, t))
        return res

    ty, tx = taps(out_h, h), taps(out_w, w)
    out = np.empty((out_h, out_w))
    for y, (y0, y1, fy) in enumerate(ty):
        for x, (x0, x1, fx) in enumerate(tx):
            top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
            bot = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bot * fy
    return out


def resize_bilinear(maps, out_h: int, out_w: int) -> np.ndarray:
    return np.stack([resize_bilinear_2d(m, out_h, out_w) for m in np.asarray(maps)])


def localization_2d(m: np.ndarray, masks: np.ndarray) -> tuple[float, float, float]:
    """Obj-IoU, contrast and concentration of one map against its class masks (C, Hm, Wm)."""
    masks = np.asarray(masks).astype(bool)
    hm, wm = masks.shape[-2:]
    r = resize_bilinear_2d(m, hm, wm) if m.shape != (hm, wm) else np.asarray(m, np.float64)
    u8 = to_uint8(r)
    pred = u8 > otsu_threshold_u8_2d(u8)
    iou = 0.0
    for g in masks:
        union = np.count_nonzero(pred | g)
        if union:
            iou = max(iou, np.count_nonzero(pred & g) / union)
    fg = masks.any(axis=0)
    mean_fg = float(r[fg].mean()) if fg.any() else 0.0
    mean_bg = float(r[~fg].mean()) if (~fg).any() else 0.0
    contrast = mean_fg / (mean_bg + 1e-8)
    concentration = float(r[fg].sum()) / (float(r.sum()) + 1e-8)
    return iou, contrast, concentration


def localization(maps, masks) -> np.ndarray:
    return np.array([localization_2d(m, k) for m, k in zip(maps, masks)], dtype=np.float64)


def f3_score(iou: float, contrast: float, concentration: float) -> float:
    """F3 = 3 / (1/Obj-IoU + 1/min(R_c/20, 1) + 1/C_t); 0 when any term is 0."""
    terms = (iou, min(contrast / 20.0, 1.0), concentration)
    if any(t <= 0 for t in terms):
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)
