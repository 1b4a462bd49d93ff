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
#include "stats.hpp"

namespace diffcam {

struct DebiasInfo {
  double lam;
  unsigned char applied;
};

// out may alias m.  dbuf is float64 scratch.
inline DebiasInfo causal_debiasing_map(const float* m, const float* rep, double rep_const, float* out,
                                       size_t n, const double* p, std::vector<double>& dbuf) {
  // 4 independent float64 accumulators per sum (element i goes to i mod 4): fixed order.
  double s[4], a2[4], a3[4];
  sum4(m, n, s);
  const double mu = ((s[0] + s[1]) + (s[2] + s[3])) / static_cast<double>(n);
  moments4(m, n, mu, a2, a3);
  const double q2 = (a2[0] + a2[1]) + (a2[2] + a2[3]), q3 = (a3[0] + a3[1]) + (a3[2] + a3[3]);
  size_t i = 0;
  const size_t n4 = n & ~static_cast<size_t>(3);
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
  float fmin, fmax;
  minmax_f(m, n, fmin, fmax);
  const double mmin = fmin, mmax = fmax;
  if (rep == nullptr) {
    // Constant M_rep: I takes two values, i0 (M <= thr) and i1 (M > thr), so <I, I> and <M, I>
    // follow from the count and the sum of the outliers, and M' = max(M - lam I, 0) is
    // nondecreasing in M within each class: its min/max come from the class extremes.  One
    // pass here, one writing the output (M' computed exactly as in the general path).
    const double i0 = w_rep * rep_const + w_out * 0.0, i1 = w_rep * rep_const + w_out * 1.0;
    size_t c1[2] = {0, 0};
    double s1[2] = {0.0, 0.0};
    float max0[2] = {-INFINITY, -INFINITY}, min1[2] = {INFINITY, INFINITY};
    for (i = 0; i + 2 <= n; i += 2)
      for (int l = 0; l < 2; ++l) {
        const float mv = m[i + l];
        const bool o = static_cast<double>(mv) > thr;
        c1[l] += o;
        s1[l] += o ? static_cast<double>(mv) : 0.0;
        max0[l] = o ? max0[l] : std::max(max0[l], mv);
        min1[l] = o ? std::min(min1[l], mv) : min1[l];
      }
    for (; i < n; ++i) {
      const float mv = m[i];
      const bool o = static_cast<double>(mv) > thr;
      c1[0] += o;
      s1[0] += o ? static_cast<double>(mv) : 0.0;
      max0[0] = o ? max0[0] : std::max(max0[0], mv);
      min1[0] = o ? std::min(min1[0], mv) : min1[0];
    }
    const size_t n1 = c1[0] + c1[1], n0 = n - n1;
    const double iis = static_cast<double>(n0) * (i0 * i0) + static_cast<double>(n1) * (i1 * i1);
    const double sum_all = (s[0] + s[1]) + (s[2] + s[3]);
    const double mis = i0 * sum_all + (i1 - i0) * (s1[0] + s1[1]);
    double lam = iis > 0 ? mis / iis : 0.0;
    lam = std::min(std::max(lam, p[P::lambda_min]), p[P::lambda_max]);
    auto clean0 = [&](double mv) { return std::max(mv - lam * i0, 0.0); };
    auto clean1 = [&](double mv) { return std::max(mv - lam * i1, 0.0); };
    double cmin = INFINITY, cmax = -INFINITY;
    if (n0 > 0) {
      cmin = std::min(cmin, clean0(mmin));
      cmax = std::max(cmax, clean0(std::max(max0[0], max0[1])));
    }
    if (n1 > 0) {
      cmin = std::min(cmin, clean1(std::min(min1[0], min1[1])));
      cmax = std::max(cmax, clean1(mmax));
    }
    const double guard = p[P::range_guard];
    if (guard > 0 && (cmax - cmin) < (1.0 - guard) * (mmax - mmin)) return unchanged(lam);
    const bool norm = p[P::final_normalize] != 0.0;
    const double den = cmax - cmin + p[P::norm_eps];
    for (i = 0; i < n; ++i) {
      const double mv = m[i];
      const double c = std::max(mv - lam * (mv > thr ? i1 : i0), 0.0);
      out[i] = static_cast<float>(norm ? (c - cmin) / den : c);
    }
    return {lam, 1};
  }
  double ii[4] = {0.0, 0.0, 0.0, 0.0}, mi[4] = {0.0, 0.0, 0.0, 0.0};
  for (i = 0; i < n4; i += 4)
    for (int l = 0; l < 4; ++l) {
      const double mv = m[i + l];
      const double r = rep ? static_cast<double>(rep[i + l]) : rep_const;
      const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
      ii[l] += inter * inter;
      mi[l] += mv * inter;
    }
  for (; i < n; ++i) {
    const double mv = m[i];
    const double r = rep ? static_cast<double>(rep[i]) : rep_const;
    const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
    ii[0] += inter * inter;
    mi[0] += mv * inter;
  }
  const double iis = (ii[0] + ii[1]) + (ii[2] + ii[3]), mis = (mi[0] + mi[1]) + (mi[2] + mi[3]);
  double lam = iis > 0 ? mis / iis : 0.0;
  lam = std::min(std::max(lam, p[P::lambda_min]), p[P::lambda_max]);
  if (dbuf.size() < n) dbuf.resize(n);
  double* cb = dbuf.data();
  double cmn[4] = {INFINITY, INFINITY, INFINITY, INFINITY}, cmx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  for (i = 0; i < n4; i += 4)
    for (int l = 0; l < 4; ++l) {
      const double mv = m[i + l];
      const double r = rep ? static_cast<double>(rep[i + l]) : rep_const;
      const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
      const double c = std::max(mv - lam * inter, 0.0);
      cb[i + l] = c;
      cmn[l] = std::min(cmn[l], c);
      cmx[l] = std::max(cmx[l], c);
    }
  for (; i < n; ++i) {
    const double mv = m[i];
    const double r = rep ? static_cast<double>(rep[i]) : rep_const;
    const double inter = w_rep * r + w_out * (mv > thr ? 1.0 : 0.0);
    const double c = std::max(mv - lam * inter, 0.0);
    cb[i] = c;
    cmn[0] = std::min(cmn[0], c);
    cmx[0] = std::max(cmx[0], c);
  }
  const double cmin = std::min(std::min(cmn[0], cmn[1]), std::min(cmn[2], cmn[3]));
  const double cmax = std::max(std::max(cmx[0], cmx[1]), std::max(cmx[2], cmx[3]));
  const double guard = p[P::range_guard];
  if (guard > 0 && (cmax - cmin) < (1.0 - guard) * (mmax - mmin)) return unchanged(lam);
  if (p[P::final_normalize] != 0.0) {
    const double den = cmax - cmin + p[P::norm_eps];
    for (i = 0; i < n; ++i) out[i] = static_cast<float>((cb[i] - cmin) / den);
  } else {
    for (i = 0; i < n; ++i) out[i] = static_cast<float>(cb[i]);
  }
  return {lam, 1};
}

// clip to [0, max(clip_max, 0)] then (M - min) / (max - min + eps), float64.  Clipping is
// monotone, so the clipped min/max are the clipped float min/max (exact).
inline void clip_normalize_map(float* m, size_t n, double clip_max, double eps) {
  const double hi_clip = std::max(clip_max, 0.0);
  float fmin, fmax;
  minmax_f(m, n, fmin, fmax);
  const double lo = std::min(std::max(static_cast<double>(fmin), 0.0), hi_clip);
  const double hi = std::min(std::max(static_cast<double>(fmax), 0.0), hi_clip);
  const double den = hi - lo + eps;
  for (size_t i = 0; i < n; ++i) {
    const double v = std::min(std::max(static_cast<double>(m[i]), 0.0), hi_clip);
    m[i] = static_cast<float>((v - lo) / den);
  }
}

}  // namespace diffcam
