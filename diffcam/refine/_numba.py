"""The Numba backend of the refinement kernels and of the localization metrics.

Same functions, signatures and numerics as every backend (docs/kernels.md); the float64 NumPy
reference (``reference.py``) is the truth.  Inputs are C-contiguous float32 ``(N, H, W)`` maps
(the public API converts before calling); every function takes a trailing ``threads=0``
(0: ``DIFFCAM_NUM_THREADS`` or all cores) and its result does not depend on it.

Design:

* The rank-weighted Gaussian filter lives in the generated ``_numba_nets.py`` (see
  ``_numba_netgen.py``): straight-line Batcher networks for k = 3, 5, 7, 9 vectorized across x,
  a per-pixel sort for larger k.  Tasks are (map, band of rows) pairs run with ``prange``.
* Map statistics reproduce NumPy's pairwise summation exactly (``_pw``), so means, std,
  percentiles and therefore kernel sizes, DACG branches and thresholds match the reference
  bit for bit; these kernels are compiled without fastmath.
* Nothing compiles at import: every function compiles on its first call and is cached on disk
  (``cache=True``; Numba falls back to ``NUMBA_CACHE_DIR`` or the user cache directory when
  the package directory is read-only).

Raises ImportError at import when Numba is missing.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the numba backend needs the 'numba' package") from exc

from .config import PARAM_FIELDS

__all__ = ["kernel_sizes", "rank_gaussian_filter", "confidence_gating", "background_attenuation",
           "causal_debiasing", "refine", "otsu_threshold_u8", "resize_bilinear", "localization"]

_P = {name: i for i, name in enumerate(PARAM_FIELDS)}
# parameter positions, as compile-time constants of the kernels
AKD, K_BASE, K_MAX, STEPS, STEP_DIV, STEP_CAP = (_P[n] for n in (
    "akd", "k_base", "k_max", "steps", "step_div", "step_cap"))
STD_FACTOR, STD_CAP, SIZE_DIV, SIZE_CAP, KERNEL_SIZE = (_P[n] for n in (
    "std_factor", "std_cap", "size_div", "size_cap", "kernel_size"))
DACG, VAR_T, HIGH_MEAN, LOW_MEAN, PCT_HV, PCT_HM, PCT_LM, PCT_DEF, TAU_FLOOR, BLUR_SIGMA = (
    _P[n] for n in ("dacg", "var_threshold", "high_mean", "low_mean", "pct_high_var",
                    "pct_high_mean", "pct_low_mean", "pct_default", "tau_floor", "blur_sigma"))
CBA, BG_W_MED, BG_W_PCT, BG_W_MEAN, BG_W_MAX, BG_PCT, GAMMA, TAU_BG_FLOOR = (
    _P[n] for n in ("cba", "bg_w_median", "bg_w_pct", "bg_w_mean", "bg_w_max", "bg_percentile",
                    "gamma", "tau_bg_floor"))
SICD, W_REP, W_OUT, OUT_SIG, LAM_MIN, LAM_MAX, GATE, GATE_STD, GATE_SKEW, RANGE_GUARD = (
    _P[n] for n in ("sicd", "w_rep", "w_out", "outlier_sigmas", "lambda_min", "lambda_max",
                    "gate", "gate_std", "gate_skew", "range_guard"))
NORM_EPS, FINAL_NORM = _P["norm_eps"], _P["final_normalize"]

_FLT_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- threads
def _max_threads() -> int:
    return int(numba.config.NUMBA_NUM_THREADS)


def _resolve_threads(threads: int) -> int:
    n = int(threads or 0)
    if n <= 0:
        env = os.environ.get("DIFFCAM_NUM_THREADS", "")
        n = int(env) if env.strip().isdigit() and int(env) > 0 else _max_threads()
    return max(1, min(n, _max_threads()))


# Below this much work (pixels x window size) one thread is faster than waking the pool.
_SERIAL_WORK = 1 << 18


@contextmanager
def _threads(threads: int, work: int | None = None):
    """Run numba's parallel kernels on ``n`` threads, then restore numba's and torch's counts.

    numba's OpenMP threading layer and a CPU torch build share libgomp, so starting numba's
    pool (its first parallel launch) resets the OpenMP thread count torch reads: a caller who
    had set ``torch.set_num_threads(1)`` got torch back on every core after one refine call.
    """
    n = _resolve_threads(threads)
    if work is not None and work < _SERIAL_WORK:
        n = 1
    torch = sys.modules.get("torch")
    t_old = torch.get_num_threads() if torch is not None else None
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(old)
        if t_old is not None and torch.get_num_threads() != t_old:
            torch.set_num_threads(t_old)


def _f32(maps) -> np.ndarray:
    a = np.asarray(maps)
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"expected (N, H, W) maps, got shape {a.shape}")
    return a


def _params(params) -> np.ndarray:
    p = np.ascontiguousarray(params, dtype=np.float64)
    if p.ndim != 1 or p.size < len(PARAM_FIELDS):
        raise ValueError(f"params must be a ({len(PARAM_FIELDS)},) float64 vector")
    return p


# --------------------------------------------------------------------------- statistics
@njit(cache=True, nogil=True, boundscheck=False)
def _pw_leaf(a, lo, n):
    """One leaf (n <= 128) of NumPy's pairwise summation."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    if n <= 128:
        r0 = a[lo]
        r1 = a[lo + 1]
        r2 = a[lo + 2]
        r3 = a[lo + 3]
        r4 = a[lo + 4]
        r5 = a[lo + 5]
        r6 = a[lo + 6]
        r7 = a[lo + 7]
        i = 8
        nn = n - (n % 8)
        while i < nn:
            r0 += a[lo + i]
            r1 += a[lo + i + 1]
            r2 += a[lo + i + 2]
            r3 += a[lo + i + 3]
            r4 += a[lo + i + 4]
            r5 += a[lo + i + 5]
            r6 += a[lo + i + 6]
            r7 += a[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i]
            i += 1
        return res
    return 0.0


@njit(cache=True, nogil=True, boundscheck=False)
def _pw(a, lo, n):
    """NumPy's pairwise sum of a[lo:lo + n] (bit-identical to np.sum on contiguous float64).

    NumPy recurses on halves (rounded down to a multiple of 8) down to blocks of <= 128; the
    recursion is unrolled onto explicit stacks (recursive functions do not cache reliably)."""
    if n <= 128:
        return _pw_leaf(a, lo, n)
    s_lo = np.empty(128, np.int64)
    s_n = np.empty(128, np.int64)
    s_st = np.empty(128, np.int64)
    vals = np.empty(128, np.float64)
    sp = 1
    vp = 0
    s_lo[0] = lo
    s_n[0] = n
    s_st[0] = 0
    while sp > 0:
        t = sp - 1
        m = s_n[t]
        if m <= 128:
            vals[vp] = _pw_leaf(a, s_lo[t], m)
            vp += 1
            sp -= 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        if s_st[t] == 0:
            s_st[t] = 1
            s_lo[sp] = s_lo[t]
            s_n[sp] = n2
            s_st[sp] = 0
            sp += 1
        elif s_st[t] == 1:
            s_st[t] = 2
            s_lo[sp] = s_lo[t] + n2
            s_n[sp] = m - n2
            s_st[sp] = 0
            sp += 1
        else:
            vals[vp - 2] = vals[vp - 2] + vals[vp - 1]
            vp -= 1
            sp -= 1
    return vals[0]


@njit(cache=True, nogil=True, boundscheck=False)
def _sum(a):
    return 0.0 + _pw(a, 0, a.size)


@njit(cache=True, nogil=True, boundscheck=False)
def _mean_std(a):
    """np.mean(a), np.std(a) of a flat float64 array, bit-identical to NumPy."""
    n = a.size
    mu = _sum(a) / n
    d = np.empty(n, np.float64)
    for i in range(n):
        x = a[i] - mu
        d[i] = x * x
    return mu, math.sqrt(_sum(d) / n)


@njit(cache=True, nogil=True, boundscheck=False)
def _percentile(v, q):
    """np.percentile(v, q) (linear method) of a non-empty flat float64 array."""
    n = v.size
    h = (n - 1) * (q / 100.0)
    if h >= n - 1:
        return v.max()
    if h < 0:
        h = 0.0
    lo = int(math.floor(h))
    part = np.partition(v, lo)
    a = part[lo]
    b = part[lo + 1]
    for i in range(lo + 2, n):
        if part[i] < b:
            b = part[i]
    t = h - lo
    diff = b - a
    if t >= 0.5:
        return b - diff * (1.0 - t)
    return a + diff * t


@njit(cache=True, nogil=True, boundscheck=False)
def _positives(a):
    cnt = 0
    for i in range(a.size):
        if a[i] > 0:
            cnt += 1
    pos = np.empty(cnt, np.float64)
    j = 0
    for i in range(a.size):
        if a[i] > 0:
            pos[j] = a[i]
            j += 1
    return pos


# --------------------------------------------------------------------------- AKD
@njit(cache=True, nogil=True, boundscheck=False)
def _kernel_size_map(m, p):
    if p[KERNEL_SIZE] > 0:
        return int(p[KERNEL_SIZE])
    a = m.ravel().astype(np.float64)
    _, sd = _mean_std(a)
    f_step = min(p[STEPS] / p[STEP_DIV], p[STEP_CAP])
    f_std = min(p[STD_FACTOR] * sd, p[STD_CAP])
    f_size = min(m.shape[0] / p[SIZE_DIV], p[SIZE_CAP])
    k = int(p[K_BASE] * f_step * f_std * f_size)
    if k % 2 == 0:
        k += 1
    return min(max(k, 3), int(p[K_MAX]))


@njit(parallel=True, cache=True, boundscheck=False)
def _kernel_sizes_nb(maps, p, out):
    for i in prange(maps.shape[0]):
        out[i] = _kernel_size_map(maps[i], p)


@njit(cache=True, nogil=True, boundscheck=False)
def _kernel_sizes_serial(maps, p, out):
    for i in range(maps.shape[0]):
        out[i] = _kernel_size_map(maps[i], p)


def kernel_sizes(maps, params, *, threads=0) -> np.ndarray:
    """AKD kernel size of every map: int32 (N,)."""
    maps, p = _f32(maps), _params(params)
    out = np.zeros(maps.shape[0], np.int32)
    if maps.shape[0]:
        with _threads(threads, maps.size) as nt:
            (_kernel_sizes_nb if nt > 1 else _kernel_sizes_serial)(maps, p, out)
    return out


# --------------------------------------------------------------------------- rank filter
def _bands(n_maps: int, height: int, nthreads: int) -> int:
    """Row bands per map, so that small batches of big maps still use every thread."""
    if nthreads <= 1 or n_maps >= 4 * nthreads:
        return 1
    return max(1, min(height, -(-4 * nthreads // n_maps)))


def _filter_group(maps: np.ndarray, k: int, nthreads: int) -> np.ndarray:
    from . import _numba_nets as nets

    out = np.empty(maps.shape, np.float64)
    nb = _bands(maps.shape[0], maps.shape[1], nthreads)
    if nthreads <= 1:
        kern = nets.SERIAL_KERNELS.get(k)
        if kern is not None:
            kern(maps, out)
        else:
            nets.rgf_generic_serial(maps, out, k)
        return out
    kern = nets.NETWORK_KERNELS.get(k)
    if kern is not None:
        kern(maps, out, nb)
    else:
        nets.rgf_generic(maps, out, k, nb)
    return out


def _filter_all(maps: np.ndarray, ks: np.ndarray, nthreads: int) -> np.ndarray:
    """Filter each map with its own k (maps grouped by k), as float64 (the sum is float64
    in the kernels; the pipeline keeps it); k <= 0 leaves a map unchanged."""
    if maps.shape[0] == 0 or maps.shape[1] == 0 or maps.shape[2] == 0:
        return maps.astype(np.float64)
    uniq = np.unique(ks)
    if uniq.size == 1:
        k = int(uniq[0])
        return _filter_group(maps, k, nthreads) if k > 0 else maps.astype(np.float64)
    out = maps.astype(np.float64)
    for k in uniq:
        k = int(k)
        if k <= 0:
            continue
        idx = np.nonzero(ks == k)[0]
        out[idx] = _filter_group(np.ascontiguousarray(maps[idx]), k, nthreads)
    return out


def rank_gaussian_filter(maps, ksizes, *, threads=0) -> np.ndarray:
    """Rank-weighted Gaussian filter, one odd k (3..31) per map: float32 (N, H, W)."""
    maps = _f32(maps)
    ks = np.broadcast_to(np.asarray(ksizes).astype(np.int64), (maps.shape[0],))
    for k in np.unique(ks):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel size must be odd and >= 1, got {k}")
    with _threads(threads, maps.size * int(ks.max(initial=1)) ** 2) as nt:
        return _filter_all(maps, ks, nt).astype(np.float32)


# --------------------------------------------------------------------------- DACG
@njit(cache=True, nogil=True, boundscheck=False)
def _fold(i, n):
    if n == 1:
        return 0
    period = 2 * n - 2
    i = i % period
    return period - i if i >= n else i


@njit(cache=True, nogil=True, boundscheck=False)
def _dacg_map(m, p, out):
    """DACG of one float64 (H, W) map into out; returns (branch, tau)."""
    H, W = m.shape
    a = m.ravel()
    mu, sd = _mean_std(a)
    if sd > p[VAR_T]:
        branch, alpha = 0, p[PCT_HV]
    elif mu > p[HIGH_MEAN]:
        branch, alpha = 1, p[PCT_HM]
    elif mu < p[LOW_MEAN]:
        branch, alpha = 2, p[PCT_LM]
    else:
        branch, alpha = 3, p[PCT_DEF]
    pos = _positives(a)
    tau = p[TAU_FLOOR]
    if pos.size > 0:
        tau = max(_percentile(pos, alpha), p[TAU_FLOOR])
    if p[DACG] == 0:
        out[:, :] = m
        return branch, tau
    sig = p[BLUR_SIGMA]
    e = math.exp(-1.0 / (2.0 * sig * sig))
    gs = ((0.0 + e) + 1.0) + e
    g0 = e / gs
    g1 = 1.0 / gs
    xl = np.empty(W, np.int64)
    xr = np.empty(W, np.int64)
    for x in range(W):
        xl[x] = _fold(x - 1, W)
        xr[x] = _fold(x + 1, W)
    for y in range(H):
        r0 = m[_fold(y - 1, H)]
        r1 = m[y]
        r2 = m[_fold(y + 1, H)]
        for x in range(W):
            v = r1[x]
            if v > tau:
                out[y, x] = v
                continue
            a, b = xl[x], xr[x]
            # the reference's order: sum over dy, dx of (g[dy] * g[dx]) * m
            acc = 0.0
            acc += g0 * g0 * r0[a]
            acc += g0 * g1 * r0[x]
            acc += g0 * g0 * r0[b]
            acc += g1 * g0 * r1[a]
            acc += g1 * g1 * r1[x]
            acc += g1 * g0 * r1[b]
            acc += g0 * g0 * r2[a]
            acc += g0 * g1 * r2[x]
            acc += g0 * g0 * r2[b]
            out[y, x] = acc
    return branch, tau


@njit(parallel=True, cache=True, boundscheck=False)
def _dacg_nb(maps, p, out, branch, tau):
    for i in prange(maps.shape[0]):
        m = maps[i].astype(np.float64)
        o = np.empty_like(m)
        b, t = _dacg_map(m, p, o)
        branch[i] = b
        tau[i] = t
        out[i] = o.astype(np.float32)


def confidence_gating(maps, params, *, threads=0):
    """DACG: out float32 (N, H, W), branch int32 (N,), tau float64 (N,)."""
    maps, p = _f32(maps), _params(params)
    n = maps.shape[0]
    out = np.empty_like(maps)
    branch = np.zeros(n, np.int32)
    tau = np.zeros(n, np.float64)
    if n and maps.size:
        with _threads(threads, 4 * maps.size):
            _dacg_nb(maps, p, out, branch, tau)
    return out, branch, tau


# --------------------------------------------------------------------------- CBA
@njit(cache=True, nogil=True, boundscheck=False)
def _cba_map(a, p, out):
    """CBA of one flat float64 map into out (may alias a); returns tau_bg."""
    pos = _positives(a)
    if pos.size == 0:
        tau = p[TAU_BG_FLOOR]
    else:
        s1 = _percentile(pos, 50.0)
        s2 = _percentile(a.copy(), p[BG_PCT])
        s3 = _sum(pos) / pos.size
        s4 = a.max()
        tau = p[BG_W_MED] * s1 + p[BG_W_PCT] * s2 + p[BG_W_MEAN] * s3 + p[BG_W_MAX] * s4
        if not tau > 0:
            tau = p[TAU_BG_FLOOR]
    gamma = p[GAMMA]
    for i in range(a.size):
        v = a[i]
        if v < tau:
            f = v / tau
            out[i] = v * (gamma if gamma >= f else f)
        else:
            out[i] = v
    return tau


@njit(parallel=True, cache=True, boundscheck=False)
def _cba_nb(maps, p, out, tau):
    for i in prange(maps.shape[0]):
        a = maps[i].ravel().astype(np.float64)
        tau[i] = _cba_map(a, p, a)
        out[i] = a.reshape(maps.shape[1], maps.shape[2]).astype(np.float32)


def background_attenuation(maps, params, *, threads=0):
    """CBA: out float32 (N, H, W), tau_bg float64 (N,)."""
    maps, p = _f32(maps), _params(params)
    out = np.empty_like(maps)
    tau = np.zeros(maps.shape[0], np.float64)
    if maps.shape[0] and maps.size:
        with _threads(threads, 4 * maps.size):
            _cba_nb(maps, p, out, tau)
    return out, tau


# --------------------------------------------------------------------------- SICD
@njit(cache=True, nogil=True, boundscheck=False)
def _minmax_inplace(a, eps):
    lo = a.min()
    hi = a.max()
    den = hi - lo + eps
    for i in range(a.size):
        a[i] = (a[i] - lo) / den


@njit(cache=True, nogil=True, boundscheck=False)
def _sicd_map(a, rep, has_rep, rep_const, p):
    """SICD of one flat float64 map, in place; returns (lam, applied)."""
    n = a.size
    mu, sd = _mean_std(a)
    if p[GATE] != 0:
        skew = 0.0
        if sd > 0:
            d = np.empty(n, np.float64)
            for i in range(n):
                d[i] = math.pow(a[i] - mu, 3.0)
            m3 = _sum(d) / n
            s3 = math.pow(sd, 3.0)
            if s3 > 0.0:
                skew = m3 / s3
            elif m3 != 0.0:  # sd**3 underflows (the reference raises ZeroDivisionError)
                skew = math.copysign(math.inf, m3)
        if not (sd > p[GATE_STD] or skew > p[GATE_SKEW]):
            return 0.0, 0
    thr = mu + p[OUT_SIG] * sd
    w_rep = p[W_REP]
    w_out = p[W_OUT]
    inter = np.empty(n, np.float64)
    for i in range(n):
        mr = rep[i] if has_rep else rep_const
        mo = 1.0 if a[i] > thr else 0.0
        inter[i] = w_rep * mr + w_out * mo
    t = np.empty(n, np.float64)
    for i in range(n):
        t[i] = inter[i] * inter[i]
    ii = _sum(t)
    lam = 0.0
    if ii > 0:
        for i in range(n):
            t[i] = a[i] * inter[i]
        lam = _sum(t) / ii
    lam = min(max(lam, p[LAM_MIN]), p[LAM_MAX])
    for i in range(n):
        c = a[i] - lam * inter[i]
        t[i] = c if c > 0.0 else 0.0
    guard = p[RANGE_GUARD]
    if guard > 0 and (t.max() - t.min()) < (1.0 - guard) * (a.max() - a.min()):
        return lam, 0
    if p[FINAL_NORM] != 0:
        _minmax_inplace(t, p[NORM_EPS])
    a[:] = t
    return lam, 1


@njit(parallel=True, cache=True, boundscheck=False)
def _sicd_nb(maps, rep, rep_idx, has_rep, rep_const, p, out, lam, applied):
    for i in prange(maps.shape[0]):
        a = maps[i].ravel().astype(np.float64)
        r = rep[rep_idx[i]].ravel().astype(np.float64)
        l, ap = _sicd_map(a, r, has_rep, rep_const[i], p)
        lam[i] = l
        applied[i] = ap
        out[i] = a.reshape(maps.shape[1], maps.shape[2]).astype(np.float32)


def _rep_args(rep, rep_const, maps):
    n = maps.shape[0]
    rc = np.ascontiguousarray(np.broadcast_to(np.asarray(rep_const, np.float64), (n,)))
    if rep is None:
        return np.zeros((1, 1, 1), np.float32), False, rc
    rep = _f32(rep)
    if rep.shape != maps.shape:
        raise ValueError(f"rep shape {rep.shape} != maps shape {maps.shape}")
    return rep, True, rc


def _rep_idx(has_rep: bool, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if has_rep else np.zeros(n, np.int64)


def causal_debiasing(maps, rep, rep_const, params, *, threads=0):
    """SICD: out float32 (N, H, W), lam float64 (N,), applied uint8 (N,)."""
    maps, p = _f32(maps), _params(params)
    rep_a, has_rep, rc = _rep_args(rep, rep_const, maps)
    n = maps.shape[0]
    out = np.empty_like(maps)
    lam = np.zeros(n, np.float64)
    applied = np.zeros(n, np.uint8)
    if n and maps.size:
        with _threads(threads, 4 * maps.size):
            _sicd_nb(maps, rep_a, _rep_idx(has_rep, n), has_rep, rc, p, out, lam,
                     applied)
    return out, lam, applied


# --------------------------------------------------------------------------- pipeline
@njit(cache=True, nogil=True, boundscheck=False)
def _post_one(i, raw, filt, rep, rep_idx, has_rep, rep_const, p, out, branch, tau, tau_bg, lam,
              applied):
    """DACG -> CBA -> clip and min-max -> SICD of map i (filt: the float64 AKD output)."""
    N, H, W = filt.shape
    raw_max = raw[i].max()
    m = filt[i]
    o = np.empty_like(m)
    b, t = _dacg_map(m, p, o)
    branch[i] = b
    tau[i] = t
    a = o.ravel()
    if p[CBA] != 0:
        tau_bg[i] = _cba_map(a, p, a)
    else:
        tau_bg[i] = np.nan
    cmax = max(np.float64(raw_max), 0.0)
    for j in range(a.size):
        v = a[j]
        a[j] = 0.0 if v < 0.0 else (cmax if v > cmax else v)
    _minmax_inplace(a, p[NORM_EPS])
    if p[SICD] != 0:
        r = rep[rep_idx[i]].ravel().astype(np.float64)
        l, ap = _sicd_map(a, r, has_rep, rep_const[i], p)
        lam[i] = l
        applied[i] = ap
    else:
        lam[i] = np.nan
        applied[i] = 0
    out[i] = a.reshape(H, W).astype(np.float32)


@njit(parallel=True, cache=True, boundscheck=False)
def _post_nb(raw, filt, rep, rep_idx, has_rep, rep_const, p, out, branch, tau, tau_bg, lam,
             applied):
    for i in prange(filt.shape[0]):
        _post_one(i, raw, filt, rep, rep_idx, has_rep, rep_const, p, out, branch, tau, tau_bg,
                  lam, applied)


@njit(cache=True, nogil=True, boundscheck=False)
def _post_serial(raw, filt, rep, rep_idx, has_rep, rep_const, p, out, branch, tau, tau_bg, lam,
                 applied):
    for i in range(filt.shape[0]):
        _post_one(i, raw, filt, rep, rep_idx, has_rep, rep_const, p, out, branch, tau, tau_bg,
                  lam, applied)


def refine(maps, rep, rep_const, params, *, threads=0):
    """The whole pipeline: out, k, branch, tau, tau_bg, lam, applied (see docs/kernels.md)."""
    maps, p = _f32(maps), _params(params)
    rep_a, has_rep, rc = _rep_args(rep, rep_const, maps)
    n = maps.shape[0]
    out = np.empty_like(maps)
    ks = np.zeros(n, np.int32)
    branch = np.zeros(n, np.int32)
    tau = np.zeros(n, np.float64)
    tau_bg = np.zeros(n, np.float64)
    lam = np.zeros(n, np.float64)
    applied = np.zeros(n, np.uint8)
    if n == 0 or maps.size == 0:
        return out, ks, branch, tau, tau_bg, lam, applied
    with _threads(threads, 16 * maps.size) as nt:
        if p[AKD] != 0:
            (_kernel_sizes_nb if nt > 1 else _kernel_sizes_serial)(maps, p, ks)
            filt = _filter_all(maps, ks, nt)
        else:
            filt = maps.astype(np.float64)
        post = _post_nb if nt > 1 else _post_serial
        post(maps, filt, rep_a, _rep_idx(has_rep, n), has_rep, rc, p, out, branch, tau, tau_bg,
             lam, applied)
    return out, ks, branch, tau, tau_bg, lam, applied


# --------------------------------------------------------------------------- metrics
@njit(cache=True, nogil=True, boundscheck=False)
def _otsu_map(img):
    hist = np.zeros(256, np.float64)
    flat = img.ravel()
    for i in range(flat.size):
        hist[flat[i]] += 1.0
    scale = 1.0 / flat.size
    mu = 0.0
    for i in range(256):
        mu += i * hist[i]
    mu *= scale
    q1 = 0.0
    mu1 = 0.0
    best_sigma = 0.0
    best_t = 0
    for i in range(256):
        p_i = hist[i] * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < _FLT_EPS or max(q1, q2) > 1.0 - _FLT_EPS:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > best_sigma:
            best_sigma = sigma
            best_t = i
    return best_t


@njit(parallel=True, cache=True, boundscheck=False)
def _otsu_nb(imgs, out):
    for i in prange(imgs.shape[0]):
        out[i] = _otsu_map(imgs[i])


def otsu_threshold_u8(imgs, *, threads=0) -> np.ndarray:
    """OpenCV's Otsu threshold of uint8 (N, H, W) images: int32 (N,)."""
    imgs = np.ascontiguousarray(imgs, dtype=np.uint8)
    if imgs.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {imgs.shape}")
    out = np.zeros(imgs.shape[0], np.int32)
    if imgs.shape[0] and imgs.size:
        with _threads(threads, imgs.size):
            _otsu_nb(imgs, out)
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def _taps(n_out, n_in):
    i0s = np.empty(n_out, np.int64)
    i1s = np.empty(n_out, np.int64)
    ts = np.empty(n_out, np.float64)
    ratio = n_in / n_out
    for d in range(n_out):
        s = (d + 0.5) * ratio - 0.5
        f = math.floor(s)
        i0 = int(f)
        ts[d] = s - f
        i0s[d] = min(max(i0, 0), n_in - 1)
        i1s[d] = min(max(i0 + 1, 0), n_in - 1)
    return i0s, i1s, ts


@njit(cache=True, nogil=True, boundscheck=False)
def _resize_map(m, out_h, out_w, out):
    """Half-pixel-centre bilinear resize of one map into float64 out (out_h, out_w)."""
    h, w = m.shape
    y0s, y1s, fys = _taps(out_h, h)
    x0s, x1s, fxs = _taps(out_w, w)
    for y in range(out_h):
        ra = m[y0s[y]]
        rb = m[y1s[y]]
        fy = fys[y]
        for x in range(out_w):
            x0 = x0s[x]
            x1 = x1s[x]
            fx = fxs[x]
            top = np.float64(ra[x0]) * (1 - fx) + np.float64(ra[x1]) * fx
            bot = np.float64(rb[x0]) * (1 - fx) + np.float64(rb[x1]) * fx
            out[y, x] = top * (1 - fy) + bot * fy


@njit(parallel=True, cache=True, boundscheck=False)
def _resize_nb(maps, out):
    N, oh, ow = out.shape
    for i in prange(N):
        r = np.empty((oh, ow), np.float64)
        _resize_map(maps[i], oh, ow, r)
        out[i] = r.astype(np.float32)


def resize_bilinear(maps, out_h, out_w, *, threads=0) -> np.ndarray:
    """Bilinear resize (half-pixel centres, edge clamp): float32 (N, out_h, out_w)."""
    maps = _f32(maps)
    out_h, out_w = int(out_h), int(out_w)
    if out_h < 1 or out_w < 1:
        raise ValueError("output size must be >= 1")
    if maps.shape[1:] == (out_h, out_w):
        return maps.copy()
    out = np.empty((maps.shape[0], out_h, out_w), np.float32)
    if maps.shape[0]:
        if maps.shape[1] == 0 or maps.shape[2] == 0:
            raise ValueError("cannot resize an empty map")
        with _threads(threads, 4 * out.size):
            _resize_nb(maps, out)
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def _localization_map(m, masks, res):
    C, hm, wm = masks.shape
    r = np.empty((hm, wm), np.float64)
    if m.shape[0] == hm and m.shape[1] == wm:
        for y in range(hm):
            for x in range(wm):
                r[y, x] = m[y, x]
    else:
        _resize_map(m, hm, wm, r)
    rf = r.ravel()
    n = rf.size
    u8 = np.empty(n, np.uint8)
    for i in range(n):
        v = np.float32(rf[i]) * np.float32(255.0)
        v = min(max(v, np.float32(0.0)), np.float32(255.0))
        u8[i] = np.uint8(math.floor(v))
    t = _otsu_map(u8)
    iou = 0.0
    fg = np.zeros(n, np.bool_)
    for c in range(C):
        g = masks[c].ravel()
        inter = 0
        union = 0
        for i in range(n):
            pi = u8[i] > t
            gi = g[i] != 0
            if gi:
                fg[i] = True
            if pi and gi:
                inter += 1
            if pi or gi:
                union += 1
        if union > 0:
            iou = max(iou, inter / union)
    nfg = 0
    for i in range(n):
        if fg[i]:
            nfg += 1
    vf = np.empty(nfg, np.float64)
    vb = np.empty(n - nfg, np.float64)
    jf = 0
    jb = 0
    for i in range(n):
        if fg[i]:
            vf[jf] = rf[i]
            jf += 1
        else:
            vb[jb] = rf[i]
            jb += 1
    sum_fg = _sum(vf)
    mean_fg = sum_fg / nfg if nfg > 0 else 0.0
    mean_bg = _sum(vb) / (n - nfg) if n - nfg > 0 else 0.0
    res[0] = iou
    res[1] = mean_fg / (mean_bg + 1e-8)
    res[2] = sum_fg / (_sum(rf) + 1e-8)


@njit(parallel=True, cache=True, boundscheck=False)
def _localization_nb(maps, masks, out):
    for i in prange(maps.shape[0]):
        _localization_map(maps[i], masks[i], out[i])


def localization(maps, masks, *, threads=0) -> np.ndarray:
    """Obj-IoU, contrast, concentration of every map against its masks: float64 (N, 3)."""
    maps = _f32(maps)
    masks = np.asarray(masks)
    if masks.dtype != np.uint8:
        masks = masks.astype(bool).astype(np.uint8)
    masks = np.ascontiguousarray(masks)
    if masks.ndim != 4 or masks.shape[0] != maps.shape[0]:
        raise ValueError(f"masks must be (N, C, Hm, Wm), got {masks.shape}")
    out = np.zeros((maps.shape[0], 3), np.float64)
    if maps.shape[0] and masks.shape[2] and masks.shape[3]:
        with _threads(threads, 8 * masks.size):
            _localization_nb(maps, masks, out)
    return out
