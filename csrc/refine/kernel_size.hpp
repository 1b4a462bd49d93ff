// AKD kernel size of one map (method.md 2.1):
// k = odd(int(k_base * F_step * F_std * F_size)) clamped to [3, k_max], with
// F_step = min(steps / step_div, step_cap), F_std = min(std_factor * sigma_M, std_cap)
// (sigma_M the float64 population std of the map), F_size = min(H / size_div, size_cap);
// a positive `kernel_size` parameter forces k.  O(H W) for the std.
#pragma once

#include <algorithm>
#include <cstddef>

#include "params.hpp"
#include "stats.hpp"

namespace diffcam {

// k from the map's population std sd (kernel_size_map; the pipeline passes the std it computed
// in its first pass over the map, fused with the raw min / max).
inline int kernel_size_from_std(int H, const double* p, double sd) {
  if (p[P::kernel_size] > 0) return static_cast<int>(p[P::kernel_size]);
  const double f_step = std::min(p[P::steps] / p[P::step_div], p[P::step_cap]);
  const double f_std = std::min(p[P::std_factor] * sd, p[P::std_cap]);
  const double f_size = std::min(static_cast<double>(H) / p[P::size_div], p[P::size_cap]);
  long k = static_cast<long>(p[P::k_base] * f_step * f_std * f_size);
  if (k % 2 == 0) k += 1;
  const long kmax = static_cast<long>(p[P::k_max]);
  return static_cast<int>(std::min(std::max(k, 3L), kmax));
}

inline int kernel_size_map(const float* m, int H, int W, const double* p) {
  if (p[P::kernel_size] > 0) return static_cast<int>(p[P::kernel_size]);
  return kernel_size_from_std(H, p, mean_std(m, static_cast<size_t>(H) * W).std);
}

}  // namespace diffcam
