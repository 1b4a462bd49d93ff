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

namespace diffcam {

struct MeanStd {
  double mean, std;
};

inline MeanStd mean_std(const float* m, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += m[i];
  const double mu = s / static_cast<double>(n);
  double q = 0.0;
  for (size_t i = 0; i < n; ++i) {
    double d = m[i] - mu;
    q += d * d;
  }
  return {mu, std::sqrt(q / static_cast<double>(n))};
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

}  // namespace diffcam
