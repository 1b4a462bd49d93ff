// Map statistics in float64: mean, population std, skewness, and NumPy-compatible percentiles.
//
// Means and central moments are two-pass sums in float64 over the float32 values, 4 lanes
// (element i to lane i mod 4, lanes added (0+1)+(2+3)); the SSE2 path and the scalar fallback
// compute the very same sums.  Percentiles are NumPy's default 'linear' method,
// h = (n-1) * (q/100), NumPy's _lerp (a + (b-a) t if t < 0.5 else b - (b-a)(1-t)) between the
// values of rank floor(h) and floor(h)+1, found by select_ranks_f(): an exact multi-rank select
// (linear float buckets from the min/max, a 16..256-bin histogram sized by n, a gather of the
// buckets holding the requested ranks, recursion; O(n) per level).  All the ranks a module
// needs (CBA: the positive median and the bg percentile) come from one call; the percentile of
// the positive pixels is read at ranks shifted by the count of non-positive ones (no copy).
// Measured much cheaper than std::nth_element (mispredicted comparisons) or a full radix sort.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace diffcam {

struct MeanStd {
  double mean, std;
};

// sum4(m, n, s): s[l] = sum of m[i] over i = l (mod 4), i < n - n % 4, plus the tail in s[0];
// float64, a fixed order.  The SSE2 path computes the very same sums (lanes (0,1), (2,3)).
inline void sum4(const float* m, size_t n, double* s) {
  size_t i = 0;
  const size_t n4 = n & ~static_cast<size_t>(3);
#if defined(__SSE2__)
  __m128d a = _mm_setzero_pd(), b = _mm_setzero_pd();
  for (; i < n4; i += 4) {
    const __m128 x = _mm_loadu_ps(m + i);
    a = _mm_add_pd(a, _mm_cvtps_pd(x));
    b = _mm_add_pd(b, _mm_cvtps_pd(_mm_movehl_ps(x, x)));
  }
  _mm_storeu_pd(s, a);
  _mm_storeu_pd(s + 2, b);
#else
  s[0] = s[1] = s[2] = s[3] = 0.0;
  for (; i < n4; i += 4)
    for (int l = 0; l < 4; ++l) s[l] += m[i + l];
#endif
  for (; i < n; ++i) s[0] += m[i];
}

// Central moments about mu in the same 4-lane order: q2[l] = sum (m - mu)^2, q3[l] (optional)
// = sum (m - mu)^3 (d * d * d evaluated as (d * d) * d).
inline void moments4(const float* m, size_t n, double mu, double* q2, double* q3) {
  size_t i = 0;
  const size_t n4 = n & ~static_cast<size_t>(3);
#if defined(__SSE2__)
  const __m128d vmu = _mm_set1_pd(mu);
  __m128d a2 = _mm_setzero_pd(), b2 = a2, a3 = a2, b3 = a2;
  for (; i < n4; i += 4) {
    const __m128 x = _mm_loadu_ps(m + i);
    const __m128d da = _mm_sub_pd(_mm_cvtps_pd(x), vmu), db = _mm_sub_pd(_mm_cvtps_pd(_mm_movehl_ps(x, x)), vmu);
    const __m128d sa = _mm_mul_pd(da, da), sb = _mm_mul_pd(db, db);
    a2 = _mm_add_pd(a2, sa), b2 = _mm_add_pd(b2, sb);
    if (q3) a3 = _mm_add_pd(a3, _mm_mul_pd(sa, da)), b3 = _mm_add_pd(b3, _mm_mul_pd(sb, db));
  }
  _mm_storeu_pd(q2, a2);
  _mm_storeu_pd(q2 + 2, b2);
  if (q3) _mm_storeu_pd(q3, a3), _mm_storeu_pd(q3 + 2, b3);
#else
  for (int l = 0; l < 4; ++l) {
    q2[l] = 0.0;
    if (q3) q3[l] = 0.0;
  }
  for (; i < n4; i += 4)
    for (int l = 0; l < 4; ++l) {
      const double d = m[i + l] - mu;
      const double dd = d * d;
      q2[l] += dd;
      if (q3) q3[l] += dd * d;
    }
#endif
  for (; i < n; ++i) {
    const double d = m[i] - mu;
    const double dd = d * d;
    q2[0] += dd;
    if (q3) q3[0] += dd * d;
  }
}

// sum4 (the same sums, the same order) and the number of values > 0, in one pass.
inline size_t sum4_count_pos(const float* m, size_t n, double* s) {
  size_t i = 0, np = 0;
  const size_t n4 = n & ~static_cast<size_t>(3);
#if defined(__SSE2__)
  __m128d a = _mm_setzero_pd(), b = _mm_setzero_pd();
  __m128i c = _mm_setzero_si128();
  const __m128 z = _mm_setzero_ps();
  for (; i < n4; i += 4) {
    const __m128 x = _mm_loadu_ps(m + i);
    a = _mm_add_pd(a, _mm_cvtps_pd(x));
    b = _mm_add_pd(b, _mm_cvtps_pd(_mm_movehl_ps(x, x)));
    c = _mm_sub_epi32(c, _mm_castps_si128(_mm_cmpgt_ps(x, z)));
  }
  _mm_storeu_pd(s, a);
  _mm_storeu_pd(s + 2, b);
  alignas(16) uint32_t cc[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(cc), c);
  np = static_cast<size_t>(cc[0]) + cc[1] + cc[2] + cc[3];
#else
  s[0] = s[1] = s[2] = s[3] = 0.0;
  for (; i < n4; i += 4)
    for (int l = 0; l < 4; ++l) {
      s[l] += m[i + l];
      np += m[i + l] > 0.0f;
    }
#endif
  for (; i < n; ++i) {
    s[0] += m[i];
    np += m[i] > 0.0f;
  }
  return np;
}

// sum4 (the same sums, the same order) and the exact float min / max, in one pass (n >= 1).
inline void sum4_minmax(const float* m, size_t n, double* s, float& lo, float& hi) {
  size_t i = 0;
  const size_t n4 = n & ~static_cast<size_t>(3);
  float l = m[0], h = m[0];
#if defined(__SSE2__)
  __m128d a = _mm_setzero_pd(), b = _mm_setzero_pd();
  __m128 vl = _mm_set1_ps(m[0]), vh = vl;
  for (; i < n4; i += 4) {
    const __m128 x = _mm_loadu_ps(m + i);
    a = _mm_add_pd(a, _mm_cvtps_pd(x));
    b = _mm_add_pd(b, _mm_cvtps_pd(_mm_movehl_ps(x, x)));
    vl = _mm_min_ps(vl, x), vh = _mm_max_ps(vh, x);
  }
  _mm_storeu_pd(s, a);
  _mm_storeu_pd(s + 2, b);
  alignas(16) float tl[4], th[4];
  _mm_store_ps(tl, vl);
  _mm_store_ps(th, vh);
  l = std::min(std::min(tl[0], tl[1]), std::min(tl[2], tl[3]));
  h = std::max(std::max(th[0], th[1]), std::max(th[2], th[3]));
#else
  s[0] = s[1] = s[2] = s[3] = 0.0;
  for (; i < n4; i += 4)
    for (int q = 0; q < 4; ++q) {
      s[q] += m[i + q];
      l = std::min(l, m[i + q]), h = std::max(h, m[i + q]);
    }
#endif
  for (; i < n; ++i) {
    s[0] += m[i];
    l = std::min(l, m[i]), h = std::max(h, m[i]);
  }
  lo = l, hi = h;
}

// Count, float64 sum and float extremes of the positive pixels of a map (CBA's statistics; the
// min / max of the whole map ride along for the normalisation).  The sum is two float64
// accumulators, element i to ps[i & 1] in increasing i (the order of the SSE2 pairs of lanes).
struct PosStats {
  size_t np = 0;
  double ps[2] = {0.0, 0.0};
  float mn = INFINITY, mx = -INFINITY;
  void add(size_t i, float x) {
    np += x > 0.0f;
    ps[i & 1] += x > 0.0f ? static_cast<double>(x) : 0.0;
    mn = std::min(mn, x), mx = std::max(mx, x);
  }
#if defined(__SSE2__)
  // 4 values at a multiple-of-4 index, accumulated into SSE2 registers (flush() folds them in)
  __m128d vps = _mm_setzero_pd();
  __m128i vnp = _mm_setzero_si128();
  __m128 vmn = _mm_set1_ps(INFINITY), vmx = _mm_set1_ps(-INFINITY);
  void add4(__m128 x) {
    const __m128 pos = _mm_cmpgt_ps(x, _mm_setzero_ps());
    const __m128 xp = _mm_and_ps(pos, x);  // x if positive else +0.0
    vps = _mm_add_pd(vps, _mm_cvtps_pd(xp));
    vps = _mm_add_pd(vps, _mm_cvtps_pd(_mm_movehl_ps(xp, xp)));
    vnp = _mm_sub_epi32(vnp, _mm_castps_si128(pos));
    vmn = _mm_min_ps(vmn, x), vmx = _mm_max_ps(vmx, x);
  }
  // call once, after the add4() calls and before the add() calls of the tail
  void flush() {
    alignas(16) double pd[2];
    alignas(16) uint32_t pc[4];
    alignas(16) float pl[4], ph[4];
    _mm_store_pd(pd, vps);
    _mm_store_si128(reinterpret_cast<__m128i*>(pc), vnp);
    _mm_store_ps(pl, vmn);
    _mm_store_ps(ph, vmx);
    ps[0] = pd[0], ps[1] = pd[1];
    np = static_cast<size_t>(pc[0]) + pc[1] + pc[2] + pc[3];
    mn = std::min(std::min(pl[0], pl[1]), std::min(pl[2], pl[3]));
    mx = std::max(std::max(ph[0], ph[1]), std::max(ph[2], ph[3]));
  }
#endif
};

// PosStats of m[0..n) in one pass.
inline PosStats pos_stats(const float* m, size_t n) {
  PosStats st;
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) st.add4(_mm_loadu_ps(m + i));
  st.flush();
#endif
  for (; i < n; ++i) st.add(i, m[i]);
  return st;
}

// sum4 sums of a map and its float min / max, handed from one pass to the next (SICD).
struct MapStats4 {
  double s[4];
  float mn, mx;
};

// Clip to [0, max(clip_max, 0)] then (M - lo) / (hi - lo + eps) in float64, lo / hi the clipped
// float min / max of the map (clipping is monotone: they are the clipped extremes).  One pixel:
// operator(); 4 pixels: sse4() (the same float64 operations: std::max(v, 0) == _mm_max_pd(0, v),
// std::min(u, h) == _mm_min_pd(h, u)).
struct ClipNorm {
  double hi_clip, lo, hi, den;
  ClipNorm(float fmin, float fmax, double clip_max, double eps) {
    hi_clip = std::max(clip_max, 0.0);
    lo = std::min(std::max(static_cast<double>(fmin), 0.0), hi_clip);
    hi = std::min(std::max(static_cast<double>(fmax), 0.0), hi_clip);
    den = hi - lo + eps;
  }
  float operator()(float x) const {
    const double v = std::min(std::max(static_cast<double>(x), 0.0), hi_clip);
    return static_cast<float>((v - lo) / den);
  }
#if defined(__SSE2__)
  __m128 sse4(__m128 x) const {
    const __m128d z = _mm_setzero_pd(), vh = _mm_set1_pd(hi_clip), vlo = _mm_set1_pd(lo), vden = _mm_set1_pd(den);
    auto one = [&](__m128d d) { return _mm_cvtpd_ps(_mm_div_pd(_mm_sub_pd(_mm_min_pd(vh, _mm_max_pd(z, d)), vlo), vden)); };
    return _mm_movelh_ps(one(_mm_cvtps_pd(x)), one(_mm_cvtps_pd(_mm_movehl_ps(x, x))));
  }
#endif
};

// Select scratch carved from one float vector (no thread_local lookups in the hot path):
// work = 10 n + 64 floats (select_ranks_f needs >= 5 (n + 8)), then n bytes of bucket indices.
inline void select_scratch(std::vector<float>& buf, size_t n, float*& work, uint8_t*& bidx) {
  const size_t nw = 10 * n + 64, need = nw + n / sizeof(float) + 1;
  if (buf.size() < need) buf.resize(need);
  work = buf.data();
  bidx = reinterpret_cast<uint8_t*>(buf.data() + nw);
}

// The largest float f <= t (t a double): for every float v, (v > t) == (v > float_floor(t)),
// so a float64 threshold can be applied with float compares (NaN stays NaN: both false).
inline float float_floor(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -INFINITY);
  return f;
}

// mean and population std of m[0..n) given its sum4 sums s (the second pass: the moments).
inline MeanStd mean_std_from_sums(const float* m, size_t n, const double* s) {
  double q[4];
  const double mu = ((s[0] + s[1]) + (s[2] + s[3])) / static_cast<double>(n);
  moments4(m, n, mu, q, nullptr);
  return {mu, std::sqrt(((q[0] + q[1]) + (q[2] + q[3])) / static_cast<double>(n))};
}

inline MeanStd mean_std(const float* m, size_t n) {
  double s[4];
  sum4(m, n, s);
  return mean_std_from_sums(m, n, s);
}

// Exact float min and max of m[0..n) (n >= 1); order-free, so the SSE path equals the scalar one.
inline void minmax_f(const float* m, size_t n, float& lo, float& hi) {
  size_t i = 0;
  float l = m[0], h = m[0];
#if defined(__SSE2__)
  if (n >= 8) {
    __m128 l0 = _mm_loadu_ps(m), l1 = _mm_loadu_ps(m + 4), h0 = l0, h1 = l1;
    for (i = 8; i + 8 <= n; i += 8) {
      const __m128 a = _mm_loadu_ps(m + i), b = _mm_loadu_ps(m + i + 4);
      l0 = _mm_min_ps(l0, a), l1 = _mm_min_ps(l1, b);
      h0 = _mm_max_ps(h0, a), h1 = _mm_max_ps(h1, b);
    }
    alignas(16) float tl[4], th[4];
    _mm_store_ps(tl, _mm_min_ps(l0, l1));
    _mm_store_ps(th, _mm_max_ps(h0, h1));
    l = std::min(std::min(tl[0], tl[1]), std::min(tl[2], tl[3]));
    h = std::max(std::max(th[0], th[1]), std::max(th[2], th[3]));
  }
#endif
  for (; i < n; ++i) {
    l = std::min(l, m[i]);
    h = std::max(h, m[i]);
  }
  lo = l, hi = h;
}

inline double numpy_lerp(double a, double b, double t) {
  const double diff = b - a;
  return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

// ---- exact multi-rank selection on floats (the percentiles of the pipeline)
//
// select_ranks_f(v, n, ranks, nr, out, work, bidx): out[j] = the ranks[j]-th smallest of
// v[0..n) (0-based, ranks nondecreasing, nr <= 8).  One level: float min/max (SSE), bucket
// b = min(floor((v - lo) * (T / (hi - lo))), T) in float32, T = nb - 1, nb = 16..256 buckets
// (about 16 values each; monotone in v, so buckets are ordered and exact), a histogram in 4
// tables, then per bucket holding requested ranks a gather (gather_bucket: 16 bucket indices
// per SSE2 compare, only matches visited); buckets of <= kSmallSelect (48) values go to
// small_select_f (rank counting, branch-free), larger ones recurse (the
// bucket of lo and the bucket of hi differ, so every level shrinks the set; after 4 levels the
// rest goes to std::nth_element).  Deterministic and exact; no allocation (work >= 5 (n + 8) floats,
// bidx >= n bytes).
// Exact ranks of a small set by rank counting (no sort, no data-dependent branches):
// lt[j] = #{i : v[i] < v[j]}; the r-th smallest is max{v[j] : lt[j] <= r} (s_r has lt <= r, and
// any v[j] > s_r has lt >= r + 1).  O(n^2 / 4) compares; n <= kSmallSelect.  Finite (or +-inf)
// values; the scalar loop computes the same counts and the same maxima.
constexpr size_t kSmallSelect = 48;
inline void small_select_f(const float* v, size_t n, const size_t* ranks, int nr, float* out) {
  alignas(16) float t[kSmallSelect + 4];
  alignas(16) int32_t lt[kSmallSelect + 4];
  const size_t n4 = (n + 3) & ~static_cast<size_t>(3);
  for (size_t i = 0; i < n; ++i) t[i] = v[i];
  for (size_t i = n; i < n4; ++i) t[i] = INFINITY;  // padding: never < anything, never a candidate
#if defined(__SSE2__)
  __m128i c[kSmallSelect / 4 + 1];
  for (size_t q = 0; q < n4 / 4; ++q) c[q] = _mm_setzero_si128();
  for (size_t i = 0; i < n; ++i) {
    const __m128 b = _mm_set1_ps(t[i]);
    for (size_t q = 0; q < n4 / 4; ++q)
      c[q] = _mm_sub_epi32(c[q], _mm_castps_si128(_mm_cmplt_ps(b, _mm_load_ps(t + 4 * q))));
  }
  for (size_t q = 0; q < n4 / 4; ++q) _mm_store_si128(reinterpret_cast<__m128i*>(lt + 4 * q), c[q]);
  for (size_t j = n; j < n4; ++j) lt[j] = static_cast<int32_t>(n);  // padding lanes: rank n
  for (int k = 0; k < nr; ++k) {
    const __m128i r = _mm_set1_epi32(static_cast<int32_t>(ranks[k]));
    __m128 best = _mm_set1_ps(-INFINITY);
    for (size_t q = 0; q < n4 / 4; ++q) {
      const __m128 ok = _mm_castsi128_ps(_mm_cmpgt_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(lt + 4 * q)), r));
      best = _mm_max_ps(best, _mm_or_ps(_mm_and_ps(ok, _mm_set1_ps(-INFINITY)), _mm_andnot_ps(ok, _mm_load_ps(t + 4 * q))));
    }
    alignas(16) float b4[4];
    _mm_store_ps(b4, best);
    out[k] = std::max(std::max(b4[0], b4[1]), std::max(b4[2], b4[3]));
  }
#else
  for (size_t j = 0; j < n; ++j) {
    int32_t cnt = 0;
    for (size_t i = 0; i < n; ++i) cnt += t[i] < t[j];
    lt[j] = cnt;
  }
  for (int k = 0; k < nr; ++k) {
    float best = -INFINITY;
    for (size_t j = 0; j < n; ++j)
      if (static_cast<size_t>(lt[j]) <= ranks[k]) best = std::max(best, t[j]);
    out[k] = best;
  }
#endif
}

// w[0..m) = the v[t] with bidx[t] == b, in increasing t; returns m.  SSE2: 16 bucket indices
// per compare, then only the matching positions are visited (a bucket holds few of the values).
// The scalar loop is branch-free and writes w[m] one past the last kept value.
inline size_t gather_bucket(const float* v, const uint8_t* bidx, size_t n, uint8_t b, float* w) {
  size_t m = 0, t = 0;
#if defined(__SSE2__) && defined(__GNUC__)
  const __m128i vb = _mm_set1_epi8(static_cast<char>(b));
  for (; t + 16 <= n; t += 16) {
    unsigned mask = static_cast<unsigned>(
        _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bidx + t)), vb)));
    while (mask) {
      w[m++] = v[t + static_cast<size_t>(__builtin_ctz(mask))];
      mask &= mask - 1;
    }
  }
#endif
  for (; t < n; ++t) {
    w[m] = v[t];
    m += bidx[t] == b;
  }
  return m;
}

inline void select_ranks_f(const float* v, size_t n, const size_t* ranks, int nr, float* out,
                           float* work, uint8_t* bidx, int depth = 0) {
  if (nr == 0) return;
  if (n <= kSmallSelect) {
    small_select_f(v, n, ranks, nr, out);
    return;
  }
  if (depth >= 4) {  // pathological spreads: finish with nth_element (exact)
    std::copy(v, v + n, work);
    for (int j = 0; j < nr; ++j) {
      std::nth_element(work, work + ranks[j], work + n);
      out[j] = work[ranks[j]];
    }
    return;
  }
  float lo, hi;
  minmax_f(v, n, lo, hi);
  if (!(lo < hi)) {
    for (int j = 0; j < nr; ++j) out[j] = lo;
    return;
  }
  // nb buckets (a power of two in 16..256): about 16 values per bucket, so the histogram to
  // clear and scan stays small next to n (27 x 27 maps: 64 buckets, measured fastest)
  int nb = 16;
  while (nb < 256 && static_cast<size_t>(nb) * 16 < n) nb *= 2;
  const int top = nb - 1;
  uint32_t h[4][256];
  for (int q = 0; q < 4; ++q) std::memset(h[q], 0, sizeof(uint32_t) * nb);
  const float frange = hi - lo;
  size_t i = 0;
  if (frange <= 3.0e38f && frange >= 1.0e-30f) {  // else float64 buckets (no inf / NaN scale)
    // float32 buckets (monotone: correctly rounded sub / mul by a positive constant), SSE
    const float fs = static_cast<float>(top) / frange;
#if defined(__SSE2__)
    const __m128 vlo = _mm_set1_ps(lo), vs = _mm_set1_ps(fs), vmax = _mm_set1_ps(static_cast<float>(top));
    for (; i + 16 <= n; i += 16) {
      __m128i q[4];
      for (int u = 0; u < 4; ++u)
        q[u] = _mm_cvttps_epi32(_mm_min_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(v + i + 4 * u), vlo), vs), vmax));
      const __m128i w16a = _mm_packs_epi32(q[0], q[1]), w16b = _mm_packs_epi32(q[2], q[3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bidx + i), _mm_packus_epi16(w16a, w16b));
    }
#endif
    for (; i < n; ++i)
      bidx[i] = static_cast<uint8_t>(static_cast<int>(std::min((v[i] - lo) * fs, static_cast<float>(top))));
  } else {
    const double dlo = lo, scale = static_cast<double>(top) / (static_cast<double>(hi) - dlo);
    for (; i < n; ++i) {
      const int b0 = static_cast<int>((static_cast<double>(v[i]) - dlo) * scale);
      bidx[i] = static_cast<uint8_t>(b0 < top ? b0 : top);
    }
  }
  // 4 tables: runs of equal buckets (zeros) do not chain their increments
  for (i = 0; i + 4 <= n; i += 4) {
    h[0][bidx[i]]++;
    h[1][bidx[i + 1]]++;
    h[2][bidx[i + 2]]++;
    h[3][bidx[i + 3]]++;
  }
  for (; i < n; ++i) h[0][bidx[i]]++;
  uint32_t start[257];
  uint32_t off = 0;
  for (int b = 0; b < nb; ++b) {
    start[b] = off;
    off += (h[0][b] + h[1][b]) + (h[2][b] + h[3][b]);
  }
  start[nb] = off;
  // group the ranks by bucket; one gather per group (<= 8).  Each group gets one spare slot:
  // the branch-free scalar gather writes one past its last kept value.
  int gb[8], gj0[8], gj1[8], ng = 0;
  float* wg[8];
  size_t mg[8];
  {
    int j = 0, b = 0;
    float* w = work;
    while (j < nr) {
      while (start[b + 1] <= ranks[j]) ++b;
      gb[ng] = b, gj0[ng] = j;
      while (j < nr && ranks[j] < start[b + 1]) ++j;
      gj1[ng] = j;
      wg[ng] = w;
      mg[ng] = 0;
      w += (start[b + 1] - start[b]) + 1;
      ++ng;
    }
  }
  float* next = wg[ng - 1] + (start[gb[ng - 1] + 1] - start[gb[ng - 1]]) + 1;
  for (int g = 0; g < ng; ++g) mg[g] = gather_bucket(v, bidx, n, static_cast<uint8_t>(gb[g]), wg[g]);
  for (int g = 0; g < ng; ++g) {
    size_t sub[8];
    const int cnt = gj1[g] - gj0[g];
    for (int q = 0; q < cnt; ++q) sub[q] = ranks[gj0[g] + q] - start[gb[g]];
    select_ranks_f(wg[g], mg[g], sub, cnt, out + gj0[g], next, bidx, depth + 1);
  }
}

// Percentile (NumPy 'linear') of v[0..n) (n >= 1); v is not modified.
inline double percentile_select(const float* v, size_t n, double q, float* work, uint8_t* bidx) {
  const double h = static_cast<double>(n - 1) * (q / 100.0);
  const double fl = std::floor(h);
  size_t lo = static_cast<size_t>(fl);
  if (lo > n - 1) lo = n - 1;
  size_t r[2] = {lo, lo + 1 < n ? lo + 1 : lo};
  float o[2];
  select_ranks_f(v, n, r, 2, o, work, bidx);
  return numpy_lerp(o[0], o[1], h - fl);
}

}  // namespace diffcam
