// Map statistics in float64: mean, population std, skewness, and NumPy-compatible percentiles.
//
// Means and central moments are two-pass sums in float64 over the float32 values (O(n)).
// percentile() is NumPy's default 'linear' method: h = (n-1) * (q/100), the lower neighbour
// found by std::nth_element (O(n) expected), the upper one as the minimum of the part above it,
// then NumPy's _lerp (a + (b-a) t if t < 0.5 else b - (b-a)(1-t)).  The input buffer is
// reordered in place (callers pass a scratch copy).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

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

}  // namespace diffcam
