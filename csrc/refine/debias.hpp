// Single-Instance Causal Debiasing (SICD, method.md 2.4) and the min-max normalisations.
//
// mu, sigma and skewness of the map in float64 (two passes).  With gate = 1 the module runs only
// when sigma > gate_std or skewness > gate_skew.  I = w_rep M_rep + w_out 1[M > mu + k sigma]
// (M_rep = rep map or the constant rep_const); lam = <M, I> / <I, I> (0 when <I, I> = 0) clipped
// to [lambda_min, lambda_max]; M' = max(M - lam I, 0) in float64; the range guard and the
// optional final min-max act on the float64 M'.  O(H W), a few passes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "params.hpp"

namespace diffcam {

struct DebiasInfo {
  double lam;
  unsigned char applied;
};

// out may alias m.  dbuf is float64 scratch.
inline DebiasInfo causal_debiasing_map(const float* m, const float* rep, double rep_const, float* out,
                                       size_t n, const double* p, std::vector<double>& dbuf) {
  double s = 0.0;
  for (size_t i = 0; i < n; ++i) s += m[i];
  const double mu = s / static_cast<double>(n);
  double q2 = 0.0, q3 = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = m[i] - mu;
    q2 += d * d;
    q3 += d * d * d;
  }
  const double sd = std::sqrt(q2 / static_cast<double>(n));
  auto unchanged = [&](double lam) {
    if (out != m) std::copy(m, m + n, out);
    return DebiasInfo{lam, 0};
  };
  if (p[P::gate] != 0.0) {
    const double sd3 = sd * sd * sd;  // skewness 0 also when sd^3 underflows
    const double skew = sd3 > 0 ? (q3 / static_cast<double>(n)) / sd3 : 0.0;
    if (!(sd > p[P::gate_std] || skew > p[P::gate_skew])) return unchanged(0.0);
  }
  const double w_rep = p[P::w_rep], w_out = p[P::w_out];
  const double thr = mu + p[P::outlier_sigmas] * sd;
  double ii = 0.0, mi = 0.0, mmin = m[0], mmax = m[0];
  for (size_t i = 0; i < n; ++i) {
    const double mv = m[i];
    const double r = rep ? static_cast<double>(rep[i]) : rep_const;
    const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
    ii += inter * inter;
    mi += mv * inter;
    mmin = std::min(mmin, mv);
    mmax = std::max(mmax, mv);
  }
  double lam = ii > 0 ? mi / ii : 0.0;
  lam = std::min(std::max(lam, p[P::lambda_min]), p[P::lambda_max]);
  dbuf.resize(n);
  double cmin = INFINITY, cmax = -INFINITY;
  for (size_t i = 0; i < n; ++i) {
    const double mv = m[i];
    const double r = rep ? static_cast<double>(rep[i]) : rep_const;
    const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
    const double c = std::max(mv - lam * inter, 0.0);
    dbuf[i] = c;
    cmin = std::min(cmin, c);
    cmax = std::max(cmax, c);
  }
  const double guard = p[P::range_guard];
  if (guard > 0 && (cmax - cmin) < (1.0 - guard) * (mmax - mmin)) return unchanged(lam);
  if (p[P::final_normalize] != 0.0) {
    const double den = cmax - cmin + p[P::norm_eps];
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>((dbuf[i] - cmin) / den);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(dbuf[i]);
  }
  return {lam, 1};
}

// clip to [0, max(clip_max, 0)] then (M - min) / (max - min + eps), float64.
inline void clip_normalize_map(float* m, size_t n, double clip_max, double eps) {
  const double hi_clip = std::max(clip_max, 0.0);
  double lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < n; ++i) {
    const double v = std::min(std::max(static_cast<double>(m[i]), 0.0), hi_clip);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const double den = hi - lo + eps;
  for (size_t i = 0; i < n; ++i) {
    const double v = std::min(std::max(static_cast<double>(m[i]), 0.0), hi_clip);
    m[i] = static_cast<float>((v - lo) / den);
  }
}

}  // namespace diffcam
