// Contextual Background Attenuation (CBA, method.md 2.3).
//
// tau_bg = w_median * S1 + w_pct * S2 + w_mean * S3 + w_max * S4 with S1 the median of the
// positive pixels, S2 the bg_percentile of all pixels, S3 the float64 mean of the positive
// pixels, S4 the max (tau_bg_floor when no pixel is positive or the sum is not > 0); then
// M < tau_bg -> M * max(gamma, M / tau_bg), in float64.  O(H W): one branch-free SSE2 pass
// (count, sum and max of the positives; the sums in the scalar loop's order), then ONE
// select_ranks_f of the 4 ranks of S1 and S2 (the positive pixels are the top np ranks of the
// map, so their median is at shifted ranks).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "params.hpp"
#include "stats.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace diffcam {

inline double background_threshold(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
  (void)scratch;
  thread_local std::vector<float> work;
  thread_local std::vector<uint8_t> bidx;
  if (work.size() < 10 * n + 64) work.resize(10 * n + 64);
  if (bidx.size() < n) bidx.resize(n);
  size_t np = 0;
  double ps0 = 0.0, ps1 = 0.0;
  float mx = m[0];
  size_t i = 0;
#if defined(__SSE2__)
  // the same sums in the same order: lane 0 of ps holds ps0 (even i), lane 1 ps1 (odd i)
  if (n >= 4) {
    const __m128 z = _mm_setzero_ps();
    __m128d ps = _mm_setzero_pd();
    __m128i cnt = _mm_setzero_si128();
    __m128 vmx = _mm_loadu_ps(m);
    for (; i + 4 <= n; i += 4) {
      const __m128 x = _mm_loadu_ps(m + i);
      const __m128 pos = _mm_cmpgt_ps(x, z);
      const __m128 xp = _mm_and_ps(pos, x);  // x if positive else +0.0
      ps = _mm_add_pd(ps, _mm_cvtps_pd(xp));
      ps = _mm_add_pd(ps, _mm_cvtps_pd(_mm_movehl_ps(xp, xp)));
      cnt = _mm_sub_epi32(cnt, _mm_castps_si128(pos));
      vmx = _mm_max_ps(vmx, x);
    }
    alignas(16) double pd[2];
    alignas(16) uint32_t pc[4];
    alignas(16) float pm[4];
    _mm_store_pd(pd, ps);
    _mm_store_si128(reinterpret_cast<__m128i*>(pc), cnt);
    _mm_store_ps(pm, vmx);
    ps0 = pd[0], ps1 = pd[1];
    np = static_cast<size_t>(pc[0]) + pc[1] + pc[2] + pc[3];
    mx = std::max(std::max(pm[0], pm[1]), std::max(pm[2], pm[3]));
  }
#endif
  for (; i + 2 <= n; i += 2) {  // branch-free
    const float a = m[i], b = m[i + 1];
    np += (a > 0.0f) + (b > 0.0f);
    ps0 += a > 0.0f ? static_cast<double>(a) : 0.0;
    ps1 += b > 0.0f ? static_cast<double>(b) : 0.0;
    mx = std::max(mx, std::max(a, b));
  }
  for (; i < n; ++i) {
    const float a = m[i];
    np += a > 0.0f;
    ps0 += a > 0.0f ? static_cast<double>(a) : 0.0;
    mx = std::max(mx, a);
  }
  if (np == 0) return p[P::tau_bg_floor];
  const double psum = ps0 + ps1;
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
  select_ranks_f(m, n, sr, 4, sk, work.data(), bidx.data());
  for (int a = 0; a < 4; ++a) kk[ord[a]] = sk[a];
  const double s1 = numpy_lerp(kk[0], kk[1], t1);
  const double s2 = numpy_lerp(kk[2], kk[3], t2);
  const double s3 = psum / static_cast<double>(np);
  const double tau = p[P::bg_w_median] * s1 + p[P::bg_w_pct] * s2 + p[P::bg_w_mean] * s3 +
                     p[P::bg_w_max] * static_cast<double>(mx);
  return tau > 0 ? tau : p[P::tau_bg_floor];
}

inline double background_attenuation_map(const float* m, float* out, size_t n, const double* p,
                                         std::vector<float>& scratch) {
  const double tau = background_threshold(m, n, p, scratch);
  const double gamma = p[P::gamma];
  size_t i = 0;
#if defined(__SSE2__)
  // 2 pixels per step in float64: the same operations as the scalar loop (exact same results;
  // _mm_max_pd equals std::max for these non-NaN values).
  const __m128d vt = _mm_set1_pd(tau), vg = _mm_set1_pd(gamma);
  for (; i + 4 <= n; i += 4) {
    const __m128 x = _mm_loadu_ps(m + i);
    const __m128d a = _mm_cvtps_pd(x), b = _mm_cvtps_pd(_mm_movehl_ps(x, x));
    const __m128d fa = _mm_max_pd(vg, _mm_div_pd(a, vt)), fb = _mm_max_pd(vg, _mm_div_pd(b, vt));
    const __m128 att = _mm_movelh_ps(_mm_cvtpd_ps(_mm_mul_pd(a, fa)), _mm_cvtpd_ps(_mm_mul_pd(b, fb)));
    // masks of the two double compares packed to 4 float lanes
    const __m128 ma = _mm_castpd_ps(_mm_cmplt_pd(a, vt)), mb = _mm_castpd_ps(_mm_cmplt_pd(b, vt));
    const __m128 msk = _mm_shuffle_ps(ma, mb, _MM_SHUFFLE(2, 0, 2, 0));
    _mm_storeu_ps(out + i, _mm_or_ps(_mm_and_ps(msk, att), _mm_andnot_ps(msk, x)));
  }
#endif
  for (; i < n; ++i) {
    const double v = m[i];
    const double f = std::max(gamma, v / tau);
    const float att = static_cast<float>(v * f);
    out[i] = v < tau ? att : m[i];
  }
  return tau;
}

}  // namespace diffcam
