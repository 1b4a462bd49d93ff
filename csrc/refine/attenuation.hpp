// Contextual Background Attenuation (CBA, method.md 2.3).
//
// tau_bg = w_median * S1 + w_pct * S2 + w_mean * S3 + w_max * S4 with S1 the median of the
// positive pixels, S2 the bg_percentile of all pixels, S3 the float64 mean of the positive
// pixels, S4 the max (tau_bg_floor when no pixel is positive or the sum is not > 0); then
// M < tau_bg -> M * max(gamma, M / tau_bg), in float64.  O(H W): one branch-free SSE2 pass
// (count, sum and max of the positives; the sums in the scalar loop's order), then ONE
// select_ranks_f of the 4 ranks of S1 and S2 (the positive pixels are the top np ranks of the
// map, so their median is at shifted ranks).  In the pipeline the statistics come from DACG's
// output pass (PosStats, the same sums in the same order) and the attenuation runs fused with
// the clip and the min-max (cba_clip_normalize_map: CBA is nondecreasing, so the extremes of its
// output are the images of its input's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "debias.hpp"
#include "params.hpp"
#include "stats.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace diffcam {

// tau_bg from the PosStats of m (pos_stats(), or the DACG output pass that computed them);
// scratch: the select's work space (select_scratch).
inline double background_threshold_from(const float* m, size_t n, const double* p, const PosStats& ps,
                                        std::vector<float>& scratch) {
  if (ps.np == 0) return p[P::tau_bg_floor];
  float* work;
  uint8_t* bidx;
  select_scratch(scratch, n, work, bidx);
  const size_t np = ps.np;
  const double psum = ps.ps[0] + ps.ps[1];
  const float mx = ps.mx;
  // the positive pixels are the top np ranks: their median is a percentile of the whole map at
  // shifted ranks.  Select the 4 ranks at once.
  size_t ranks[4];
  double t1, t2;
  {
    const double h = static_cast<double>(np - 1) * 0.5;
    const double fl = std::floor(h);
    const size_t lo = static_cast<size_t>(fl);
    ranks[0] = (n - np) + lo;
    ranks[1] = (n - np) + (lo + 1 < np ? lo + 1 : lo);
    t1 = h - fl;
  }
  {
    const double h = static_cast<double>(n - 1) * (p[P::bg_percentile] / 100.0);
    const double fl = std::floor(h);
    size_t lo = static_cast<size_t>(fl);
    if (lo > n - 1) lo = n - 1;
    ranks[2] = lo;
    ranks[3] = lo + 1 < n ? lo + 1 : lo;
    t2 = h - fl;
  }
  size_t sr[4] = {ranks[2], ranks[3], ranks[0], ranks[1]};
  int ord[4] = {2, 3, 0, 1};
  // sort the 4 ranks (insertion) keeping where each came from
  for (int a = 1; a < 4; ++a)
    for (int b = a; b > 0 && sr[b - 1] > sr[b]; --b) {
      std::swap(sr[b - 1], sr[b]);
      std::swap(ord[b - 1], ord[b]);
    }
  float sk[4], kk[4];
  select_ranks_f(m, n, sr, 4, sk, work, bidx);
  for (int a = 0; a < 4; ++a) kk[ord[a]] = sk[a];
  const double s1 = numpy_lerp(kk[0], kk[1], t1);
  const double s2 = numpy_lerp(kk[2], kk[3], t2);
  const double s3 = psum / static_cast<double>(np);
  const double tau = p[P::bg_w_median] * s1 + p[P::bg_w_pct] * s2 + p[P::bg_w_mean] * s3 +
                     p[P::bg_w_max] * static_cast<double>(mx);
  return tau > 0 ? tau : p[P::tau_bg_floor];
}

inline double background_threshold(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
  return background_threshold_from(m, n, p, pos_stats(m, n), scratch);
}

// CBA's attenuation of one pixel: M < tau -> float(M * max(gamma, M / tau)) in float64, else M.
// sse4(): 4 pixels, 2 per float64 op, the same operations (exact same results; _mm_max_pd equals
// std::max for these non-NaN values).
struct CbaOp {
  double tau, gamma;
  float operator()(float x) const {
    const double v = x;
    const double f = std::max(gamma, v / tau);
    const float att = static_cast<float>(v * f);
    return v < tau ? att : x;
  }
#if defined(__SSE2__)
  __m128 sse4(__m128 x) const {
    const __m128d vt = _mm_set1_pd(tau), vg = _mm_set1_pd(gamma);
    const __m128d a = _mm_cvtps_pd(x), b = _mm_cvtps_pd(_mm_movehl_ps(x, x));
    const __m128d fa = _mm_max_pd(vg, _mm_div_pd(a, vt)), fb = _mm_max_pd(vg, _mm_div_pd(b, vt));
    const __m128 att = _mm_movelh_ps(_mm_cvtpd_ps(_mm_mul_pd(a, fa)), _mm_cvtpd_ps(_mm_mul_pd(b, fb)));
    // masks of the two double compares packed to 4 float lanes
    const __m128 ma = _mm_castpd_ps(_mm_cmplt_pd(a, vt)), mb = _mm_castpd_ps(_mm_cmplt_pd(b, vt));
    const __m128 msk = _mm_shuffle_ps(ma, mb, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm_or_ps(_mm_and_ps(msk, att), _mm_andnot_ps(msk, x));
  }
#endif
  // M -> CBA(M) is nondecreasing when tau > 0 and 0 <= gamma <= 1: below 0 it is gamma M; on
  // [0, tau) both factors of M * max(gamma, M / tau) are >= 0 and nondecreasing (rounding is
  // monotone) and the product is <= M (the factor rounds to <= 1); from tau on it is M.
  bool monotone() const { return tau > 0 && std::isfinite(tau) && gamma >= 0 && gamma <= 1; }
};

inline void cba_apply(const float* m, float* out, size_t n, const CbaOp& cba) {
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(out + i, cba.sse4(_mm_loadu_ps(m + i)));
#endif
  for (; i < n; ++i) out[i] = cba(m[i]);
}

inline double background_attenuation_map(const float* m, float* out, size_t n, const double* p,
                                         std::vector<float>& scratch) {
  const double tau = background_threshold(m, n, p, scratch);
  cba_apply(m, out, n, CbaOp{tau, p[P::gamma]});
  return tau;
}

// The pipeline's CBA attenuation (tau given), then clip + min-max (ClipNorm, what
// clip_normalize_map computes) in ONE pass, with st the sum4 sums and the extremes of the
// result for SICD.  The min / max that the normalisation needs are those of CBA's output, known
// before the pass: CBA is nondecreasing (CbaOp::monotone), so they are the images of the
// input's min / max mn / mx.  Outside those parameters: the two passes of before.
inline void cba_clip_normalize_map(const float* m, float* out, size_t n, const CbaOp& cba, float mn, float mx,
                                   double clip_max, double eps, MapStats4* st) {
  if (!cba.monotone()) {
    cba_apply(m, out, n, cba);
    clip_normalize_map(out, n, clip_max, eps, st);
    return;
  }
  const float fmin = cba(mn), fmax = cba(mx);
  const ClipNorm f(fmin, fmax, clip_max, eps);
  double s[4];
  apply_sum4(m, out, n, Then<CbaOp, ClipNorm>{cba, f}, s);
  if (st) {
    for (int l = 0; l < 4; ++l) st->s[l] = s[l];
    st->mn = f(fmin), st->mx = f(fmax);
  }
}

}  // namespace diffcam
