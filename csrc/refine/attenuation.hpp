// Contextual Background Attenuation (CBA, method.md 2.3).
//
// tau_bg = w_median * S1 + w_pct * S2 + w_mean * S3 + w_max * S4 with S1 the median of the
// positive pixels, S2 the bg_percentile of all pixels, S3 the float64 mean of the positive
// pixels, S4 the max (tau_bg_floor when no pixel is positive or the sum is not > 0); then
// M < tau_bg -> M * max(gamma, M / tau_bg), in float64.  O(H W): one radix sort of the map
// gives S1, S2 and S4 (the positive pixels are a suffix of the sorted map).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "params.hpp"
#include "stats.hpp"

namespace diffcam {

inline double background_threshold(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
  thread_local std::vector<uint32_t> keys, tmp;
  scratch.resize(n);
  size_t np = 0;
  double psum = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const float v = m[i];
    if (v > 0.0f) {
      ++np;
      psum += v;
    }
  }
  if (np == 0) return p[P::tau_bg_floor];
  sort_floats(m, n, scratch.data(), keys, tmp);
  const float mx = scratch[n - 1];
  const double s1 = percentile_sorted(scratch.data() + (n - np), np, 50.0);
  const double s3 = psum / static_cast<double>(np);
  const double s2 = percentile_sorted(scratch.data(), n, p[P::bg_percentile]);
  const double tau = p[P::bg_w_median] * s1 + p[P::bg_w_pct] * s2 + p[P::bg_w_mean] * s3 +
                     p[P::bg_w_max] * static_cast<double>(mx);
  return tau > 0 ? tau : p[P::tau_bg_floor];
}

inline double background_attenuation_map(const float* m, float* out, size_t n, const double* p,
                                         std::vector<float>& scratch) {
  const double tau = background_threshold(m, n, p, scratch);
  const double gamma = p[P::gamma];
  for (size_t i = 0; i < n; ++i) {
    const double v = m[i];
    out[i] = v < tau ? static_cast<float>(v * std::max(gamma, v / tau)) : m[i];
  }
  return tau;
}

}  // namespace diffcam
