// Distribution-Aware Confidence Gating (DACG, method.md 2.2).
//
// Branch from the float64 mean/std of the map (strict comparisons, order high_var, high_mean,
// low_mean, default), tau = percentile (that branch's alpha) of the strictly positive pixels,
// max'd with tau_floor (tau_floor when none is positive).  Pixels with M > tau keep their value,
// the others take the separable 3x3 Gaussian blur (taps exp(-x^2 / (2 sigma^2)), x in -1..1,
// normalised; reflect-101).  O(H W): the positive pixels are compacted branch-free and one
// select_ranks_f (stats.hpp) gives the two ranks of the percentile.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstddef>
#include <vector>

#include "border.hpp"
#include "params.hpp"
#include "stats.hpp"

namespace diffcam {

struct GateInfo {
  int branch;
  double tau;
};

inline GateInfo gating_stats(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
  const MeanStd ms = mean_std(m, n);
  int branch;
  double alpha;
  if (ms.std > p[P::var_threshold]) {
    branch = 0, alpha = p[P::pct_high_var];
  } else if (ms.mean > p[P::high_mean]) {
    branch = 1, alpha = p[P::pct_high_mean];
  } else if (ms.mean < p[P::low_mean]) {
    branch = 2, alpha = p[P::pct_low_mean];
  } else {
    branch = 3, alpha = p[P::pct_default];
  }
  thread_local std::vector<float> work;
  thread_local std::vector<uint8_t> bidx;
  if (work.size() < 10 * n + 64) work.resize(10 * n + 64);
  if (bidx.size() < n) bidx.resize(n);
  scratch.resize(n);
  float* pos = scratch.data();
  size_t np = 0;
  for (size_t i = 0; i < n; ++i) {  // branch-free compaction of the positive pixels
    pos[np] = m[i];
    np += m[i] > 0.0f;
  }
  double tau = p[P::tau_floor];
  if (np > 0) tau = std::max(percentile_select(pos, np, alpha, work.data(), bidx.data()), p[P::tau_floor]);
  return {branch, tau};
}

// 3x3 separable Gaussian blur with reflect-101 borders; tmp is scratch.
// With kSelect, out[i] = M[i] > tau ? M[i] : blur[i] directly (DACG's gate fused into the
// vertical pass; out may alias m: each output reads m at its own index only).
template <bool kSelect = false>
inline void blur3(const float* m, float* out, int H, int W, double sigma, std::vector<float>& tmp,
                  double tau = 0.0) {
  const double e = std::exp(-1.0 / (2.0 * sigma * sigma));
  const double s = 1.0 + 2.0 * e;
  const float g1 = static_cast<float>(e / s), g0 = static_cast<float>(1.0 / s);
  tmp.resize(static_cast<size_t>(H) * W);
  for (int y = 0; y < H; ++y) {
    const float* row = m + static_cast<size_t>(y) * W;
    float* t = tmp.data() + static_cast<size_t>(y) * W;
    if (W == 1) {
      t[0] = (g0 + 2.0f * g1) * row[0];
      continue;
    }
    t[0] = g0 * row[0] + g1 * (row[1] + row[1]);
    for (int x = 1; x < W - 1; ++x) t[x] = g0 * row[x] + g1 * (row[x - 1] + row[x + 1]);
    t[W - 1] = g0 * row[W - 1] + g1 * (row[W - 2] + row[W - 2]);
  }
  for (int y = 0; y < H; ++y) {
    const float* a = tmp.data() + static_cast<size_t>(fold_reflect101(y - 1, H)) * W;
    const float* b = tmp.data() + static_cast<size_t>(y) * W;
    const float* c = tmp.data() + static_cast<size_t>(fold_reflect101(y + 1, H)) * W;
    float* o = out + static_cast<size_t>(y) * W;
    if (kSelect) {
      const float* mr = m + static_cast<size_t>(y) * W;
      for (int x = 0; x < W; ++x) {
        const float bv = g0 * b[x] + g1 * (a[x] + c[x]), v = mr[x];
        o[x] = (static_cast<double>(v) > tau) ? v : bv;
      }
    } else {
      for (int x = 0; x < W; ++x) o[x] = g0 * b[x] + g1 * (a[x] + c[x]);
    }
  }
}

inline GateInfo confidence_gating_map(const float* m, float* out, int H, int W, const double* p,
                                      std::vector<float>& scratch, std::vector<float>& tmp) {
  const size_t n = static_cast<size_t>(H) * W;
  GateInfo gi = gating_stats(m, n, p, scratch);
  if (p[P::dacg] == 0.0) {
    if (out != m) std::copy(m, m + n, out);
    return gi;
  }
  blur3<true>(m, out, H, W, p[P::blur_sigma], tmp, gi.tau);
  return gi;
}

}  // namespace diffcam
