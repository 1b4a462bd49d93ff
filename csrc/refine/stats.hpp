// Map statistics in float64: mean, population std, skewness, and NumPy-compatible percentiles.
//
// Means and central moments are two-pass sums in float64 over the float32 values (O(n)).
// percentile() is NumPy's default 'linear' method: h = (n-1) * (q/100), the lower neighbour
// found by std::nth_element (O(n) expected), the upper one as the minimum of the part above it,
// then NumPy's _lerp (a + (b-a) t if t < 0.5 else b - (b-a)(1-t)).  The input buffer is
// reordered in place (callers pass a scratch copy).  For the small maps of the pipeline
// (token grids, hundreds to a few thousand pixels) sort_floats() -- an LSD radix sort on
// order-preserving uint32 keys, 4 byte-passes from one histogram pass, trivial passes skipped,
// O(n + 1024) and branch-free -- sorts a map once so that every percentile of it (and of its
// positive suffix) is a direct lookup (percentile_sorted); it is far cheaper than
// std::nth_element, whose comparisons mispredict on random data.
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

inline MeanStd mean_std(const float* m, size_t n) {
  // 4 independent float64 accumulators (ILP); fixed order, so deterministic.
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += m[i], s1 += m[i + 1], s2 += m[i + 2], s3 += m[i + 3];
  }
  for (; i < n; ++i) s0 += m[i];
  const double mu = ((s0 + s1) + (s2 + s3)) / static_cast<double>(n);
  double q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0;
  for (i = 0; i + 4 <= n; i += 4) {
    const double d0 = m[i] - mu, d1 = m[i + 1] - mu, d2 = m[i + 2] - mu, d3 = m[i + 3] - mu;
    q0 += d0 * d0, q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3;
  }
  for (; i < n; ++i) {
    const double d = m[i] - mu;
    q0 += d * d;
  }
  return {mu, std::sqrt(((q0 + q1) + (q2 + q3)) / static_cast<double>(n))};
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

// q in [0, 100]; n >= 1; v is reordered.
inline double percentile_inplace(float* v, size_t n, double q) {
  const double h = static_cast<double>(n - 1) * (q / 100.0);
  double fl = std::floor(h);
  size_t lo = static_cast<size_t>(fl);
  if (lo > n - 1) lo = n - 1;
  const double t = h - fl;
  std::nth_element(v, v + lo, v + n);
  const double a = v[lo];
  double b = a;
  if (lo + 1 < n) b = *std::min_element(v + lo + 1, v + n);
  return numpy_lerp(a, b, t);
}


// Percentile of an ascending sorted array (n >= 1), NumPy 'linear'.
inline double percentile_sorted(const float* v, size_t n, double q) {
  const double h = static_cast<double>(n - 1) * (q / 100.0);
  const double fl = std::floor(h);
  size_t lo = static_cast<size_t>(fl);
  if (lo > n - 1) lo = n - 1;
  const size_t hi = lo + 1 < n ? lo + 1 : lo;
  return numpy_lerp(v[lo], v[hi], h - fl);
}

inline uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}
inline float key_float(uint32_t k) {
  uint32_t u = (k >> 31) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Sort n floats ascending into out (out may equal in); keys/tmp are scratch.
inline void sort_floats(const float* in, size_t n, float* out, std::vector<uint32_t>& keys,
                        std::vector<uint32_t>& tmp) {
  if (n == 0) return;
  if (n < 64) {
    if (out != in) std::copy(in, in + n, out);
    std::sort(out, out + n);
    return;
  }
  keys.resize(n);
  tmp.resize(n);
  uint32_t hist[4][256];
  std::memset(hist, 0, sizeof(hist));
  uint32_t* a = keys.data();
  for (size_t i = 0; i < n; ++i) {
    const uint32_t k = float_key(in[i]);
    a[i] = k;
    hist[0][k & 255]++;
    hist[1][(k >> 8) & 255]++;
    hist[2][(k >> 16) & 255]++;
    hist[3][k >> 24]++;
  }
  uint32_t* b = tmp.data();
  for (int pass = 0; pass < 4; ++pass) {
    const int sh = 8 * pass;
    uint32_t* h = hist[pass];
    if (h[(a[0] >> sh) & 255] == n) continue;  // every key shares this byte
    uint32_t off = 0;
    for (int j = 0; j < 256; ++j) {
      const uint32_t c = h[j];
      h[j] = off;
      off += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint32_t k = a[i];
      b[h[(k >> sh) & 255]++] = k;
    }
    std::swap(a, b);
  }
  for (size_t i = 0; i < n; ++i) out[i] = key_float(a[i]);
}

// Index of the first value > 0 in an ascending sorted array.
inline size_t first_positive(const float* v, size_t n) {
  return static_cast<size_t>(std::upper_bound(v, v + n, 0.0f) - v);
}

// ---- exact multi-rank selection (radix select on order-preserving uint32 keys)
//
// radix_select(keys, n, ranks, nr, out): out[j] = the ranks[j]-th smallest key (0-based), for
// nondecreasing ranks.  Each level histograms (key - kmin) >> shift into <= 256 buckets (shift
// chosen from the key range, so the range shrinks by 2^8 per level: <= 4 levels), then gathers
// only the buckets holding a requested rank; buckets of <= 32 keys are finished by a small
// sort.  Branch-free inner loops, O(n) per level, no allocation (work: >= 4 n + 64 keys).
inline void small_sort_u32(uint32_t* a, size_t n) {
  for (size_t i = 1; i < n; ++i) {
    uint32_t v = a[i];
    size_t j = i;
    while (j > 0 && a[j - 1] > v) {
      a[j] = a[j - 1];
      --j;
    }
    a[j] = v;
  }
}

inline void radix_select(const uint32_t* keys, size_t n, const size_t* ranks, int nr, uint32_t* out,
                         uint32_t* work) {
  if (nr == 0) return;
  if (n <= 32) {
    uint32_t t[32];
    for (size_t i = 0; i < n; ++i) t[i] = keys[i];
    small_sort_u32(t, n);
    for (int j = 0; j < nr; ++j) out[j] = t[ranks[j]];
    return;
  }
  uint32_t kmin = keys[0], kmax = keys[0];
  for (size_t i = 1; i < n; ++i) {
    kmin = keys[i] < kmin ? keys[i] : kmin;
    kmax = keys[i] > kmax ? keys[i] : kmax;
  }
  if (kmin == kmax) {
    for (int j = 0; j < nr; ++j) out[j] = kmin;
    return;
  }
  const uint32_t range = kmax - kmin;
  const int bits = 32 - __builtin_clz(range);
  const int shift = bits > 8 ? bits - 8 : 0;
  uint32_t h0[256], h1[256];
  std::memset(h0, 0, sizeof(h0));
  std::memset(h1, 0, sizeof(h1));
  size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    h0[(keys[i] - kmin) >> shift]++;
    h1[(keys[i + 1] - kmin) >> shift]++;
  }
  if (i < n) h0[(keys[i] - kmin) >> shift]++;
  const int nb = static_cast<int>(range >> shift) + 1;
  // bucket start offsets
  uint32_t start[257];
  uint32_t off = 0;
  for (int b = 0; b < nb; ++b) {
    start[b] = off;
    off += h0[b] + h1[b];
  }
  start[nb] = off;
  int j = 0, b = 0;
  while (j < nr) {
    const size_t r = ranks[j];
    while (start[b + 1] <= r) ++b;
    int j1 = j;
    size_t sub[8];
    while (j1 < nr && ranks[j1] < start[b + 1] && j1 - j < 8) {
      sub[j1 - j] = ranks[j1] - start[b];
      ++j1;
    }
    const uint32_t cnt = start[b + 1] - start[b];
    if (cnt == 1 || shift == 0) {
      // one key, or a bucket of equal keys
      for (int q = j; q < j1; ++q) out[q] = kmin + (static_cast<uint32_t>(b) << shift);
      if (cnt == 1) {
        for (size_t t = 0; t < n; ++t)
          if (((keys[t] - kmin) >> shift) == static_cast<uint32_t>(b)) {
            for (int q = j; q < j1; ++q) out[q] = keys[t];
            break;
          }
      }
    } else {
      size_t m = 0;
      const uint32_t bb = static_cast<uint32_t>(b);
      for (size_t t = 0; t < n; ++t) {
        work[m] = keys[t];
        m += ((keys[t] - kmin) >> shift) == bb;
      }
      radix_select(work, m, sub, j1 - j, out + j, work + m);
    }
    j = j1;
  }
}

// Percentiles (NumPy 'linear') of the keys at q[0..nq) (nq <= 4); one selection for all.
inline void key_percentiles(const uint32_t* keys, size_t n, const double* q, int nq, double* res,
                            uint32_t* work) {
  size_t ranks[8];
  double t[4];
  int order[8];
  for (int j = 0; j < nq; ++j) {
    const double h = static_cast<double>(n - 1) * (q[j] / 100.0);
    const double fl = std::floor(h);
    size_t lo = static_cast<size_t>(fl);
    if (lo > n - 1) lo = n - 1;
    ranks[2 * j] = lo;
    ranks[2 * j + 1] = lo + 1 < n ? lo + 1 : lo;
    t[j] = h - fl;
  }
  const int nr = 2 * nq;
  for (int j = 0; j < nr; ++j) order[j] = j;
  std::sort(order, order + nr, [&](int a, int b) { return ranks[a] < ranks[b]; });
  size_t sr[8];
  uint32_t sk[8], kk[8];
  for (int j = 0; j < nr; ++j) sr[j] = ranks[order[j]];
  radix_select(keys, n, sr, nr, sk, work);
  for (int j = 0; j < nr; ++j) kk[order[j]] = sk[j];
  for (int j = 0; j < nq; ++j)
    res[j] = numpy_lerp(key_float(kk[2 * j]), key_float(kk[2 * j + 1]), t[j]);
}

}  // namespace diffcam
