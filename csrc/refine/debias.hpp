// Single-Instance Causal Debiasing (SICD, method.md 2.4) and the min-max normalisations.
//
// mu, sigma and skewness of the map in float64 (two passes).  With gate = 1 the module runs only
// when sigma > gate_std or skewness > gate_skew.  I = w_rep M_rep + w_out 1[M > mu + k sigma]
// (M_rep = rep map or the constant rep_const); lam = <M, I> / <I, I> (0 when <I, I> = 0) clipped
// to [lambda_min, lambda_max]; M' = max(M - lam I, 0) in float64; the range guard and the
// optional final min-max act on the float64 M'.  O(H W), a few passes; in the pipeline the sum
// and the extremes of M come from the clip + min-max pass (clip_normalize_map or CBA's fused
// cba_clip_normalize_map; MapStats4), and the constant-M_rep
// path runs its class and output passes in SSE2 with the scalar code's exact operations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "params.hpp"
#include "stats.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace diffcam {

struct DebiasInfo {
  double lam;
  unsigned char applied;
};

// out may alias m.  dbuf is float64 scratch.
// st (optional): sum4 of m and its float min / max, already known (clip_normalize_map).
inline DebiasInfo causal_debiasing_map(const float* m, const float* rep, double rep_const, float* out,
                                       size_t n, const double* p, std::vector<double>& dbuf,
                                       const MapStats4* st = nullptr) {
  // 4 independent float64 accumulators per sum (element i goes to i mod 4): fixed order.
  double s[4], a2[4], a3[4] = {0.0, 0.0, 0.0, 0.0};
  if (st) {
    for (int l = 0; l < 4; ++l) s[l] = st->s[l];
  } else {
    sum4(m, n, s);
  }
  const double mu = ((s[0] + s[1]) + (s[2] + s[3])) / static_cast<double>(n);
  moments4(m, n, mu, a2, p[P::gate] != 0.0 ? a3 : nullptr);  // the skewness only for the gate
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
  if (st) {
    fmin = st->mn, fmax = st->mx;
  } else {
    minmax_f(m, n, fmin, fmax);
  }
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
    i = 0;
#if defined(__SSE2__)
    // the same sums in the same order (lane 0 of vs: even i, lane 1: odd i); the float compare
    // M > float_floor(thr) equals the float64 M > thr
    if (n >= 4) {
      const __m128 vthr = _mm_set1_ps(float_floor(thr));
      const __m128 ninf = _mm_set1_ps(-INFINITY), pinf = _mm_set1_ps(INFINITY);
      __m128d vs = _mm_setzero_pd();
      __m128i vc = _mm_setzero_si128();
      __m128 vmax0 = ninf, vmin1 = pinf;
      for (; i + 4 <= n; i += 4) {
        const __m128 x = _mm_loadu_ps(m + i);
        const __m128 o = _mm_cmpgt_ps(x, vthr);
        const __m128 xo = _mm_and_ps(o, x);
        vs = _mm_add_pd(vs, _mm_cvtps_pd(xo));
        vs = _mm_add_pd(vs, _mm_cvtps_pd(_mm_movehl_ps(xo, xo)));
        vc = _mm_sub_epi32(vc, _mm_castps_si128(o));
        vmax0 = _mm_max_ps(vmax0, _mm_or_ps(_mm_and_ps(o, ninf), _mm_andnot_ps(o, x)));
        vmin1 = _mm_min_ps(vmin1, _mm_or_ps(_mm_and_ps(o, x), _mm_andnot_ps(o, pinf)));
      }
      alignas(16) double ts[2];
      alignas(16) uint32_t tc[4];
      alignas(16) float tmx[4], tmn[4];
      _mm_store_pd(ts, vs);
      _mm_store_si128(reinterpret_cast<__m128i*>(tc), vc);
      _mm_store_ps(tmx, vmax0);
      _mm_store_ps(tmn, vmin1);
      s1[0] = ts[0], s1[1] = ts[1];
      c1[0] = static_cast<size_t>(tc[0]) + tc[1] + tc[2] + tc[3];
      max0[0] = std::max(std::max(tmx[0], tmx[1]), std::max(tmx[2], tmx[3]));
      min1[0] = std::min(std::min(tmn[0], tmn[1]), std::min(tmn[2], tmn[3]));
    }
#endif
    for (; i + 2 <= n; i += 2)
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
    i = 0;
#if defined(__SSE2__)
    {  // the same float64 operations, 4 pixels per step (std::max(u, 0) == _mm_max_pd(0, u))
      const __m128d vthr = _mm_set1_pd(thr), vi0 = _mm_set1_pd(i0), vi1 = _mm_set1_pd(i1);
      const __m128d vlam = _mm_set1_pd(lam), z = _mm_setzero_pd(), vcmin = _mm_set1_pd(cmin), vden = _mm_set1_pd(den);
      auto one = [&](__m128d mv) {
        const __m128d o = _mm_cmpgt_pd(mv, vthr);
        const __m128d iv = _mm_or_pd(_mm_and_pd(o, vi1), _mm_andnot_pd(o, vi0));
        const __m128d c = _mm_max_pd(z, _mm_sub_pd(mv, _mm_mul_pd(vlam, iv)));
        return _mm_cvtpd_ps(norm ? _mm_div_pd(_mm_sub_pd(c, vcmin), vden) : c);
      };
      for (; i + 4 <= n; i += 4) {
        const __m128 x = _mm_loadu_ps(m + i);
        _mm_storeu_ps(out + i, _mm_movelh_ps(one(_mm_cvtps_pd(x)), one(_mm_cvtps_pd(_mm_movehl_ps(x, x)))));
      }
    }
#endif
    for (; i < n; ++i) {
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

// out[i] = op(m[i]) for i < n (out may alias m), and s[0..4) = the sum4 sums (stats.hpp order)
// of the results in one pass.  op: a per-pixel functor with float operator()(float) and, with
// SSE2, __m128 sse4(__m128) doing the same float operations on 4 pixels (ClipNorm, CbaOp, or
// Then<A, B>).
template <class Op>
inline void apply_sum4(const float* m, float* out, size_t n, const Op& op, double* s) {
  s[0] = s[1] = s[2] = s[3] = 0.0;
  size_t i = 0;
#if defined(__SSE2__)
  {
    __m128d sa = _mm_setzero_pd(), sb = _mm_setzero_pd();
    for (; i + 4 <= n; i += 4) {
      const __m128 y = op.sse4(_mm_loadu_ps(m + i));
      _mm_storeu_ps(out + i, y);
      sa = _mm_add_pd(sa, _mm_cvtps_pd(y));
      sb = _mm_add_pd(sb, _mm_cvtps_pd(_mm_movehl_ps(y, y)));
    }
    _mm_storeu_pd(s, sa);
    _mm_storeu_pd(s + 2, sb);
  }
#endif
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) {
      out[i + l] = op(m[i + l]);
      s[l] += out[i + l];
    }
  for (; i < n; ++i) {
    out[i] = op(m[i]);
    s[0] += out[i];
  }
}

// b(a(x)): two per-pixel functors applied one after the other (apply_sum4's op).
template <class A, class B>
struct Then {
  const A& a;
  const B& b;
  float operator()(float x) const { return b(a(x)); }
#if defined(__SSE2__)
  __m128 sse4(__m128 x) const { return b.sse4(a.sse4(x)); }
#endif
};

// clip to [0, max(clip_max, 0)] then (M - min) / (max - min + eps), float64 (ClipNorm,
// stats.hpp).  With st, also the sum4 sums of the result (same order as sum4) and its float
// min / max: the map is monotone nondecreasing, so they are the images of the input min / max.
// known_mn / known_mx (optional, both or neither): the float min / max of m, already computed
// by an earlier pass (the pipeline's DACG output pass), so no min / max pass here.
inline void clip_normalize_map(float* m, size_t n, double clip_max, double eps, MapStats4* st = nullptr,
                               const float* known_mn = nullptr, const float* known_mx = nullptr) {
  float fmin, fmax;
  if (known_mn && known_mx) {
    fmin = *known_mn, fmax = *known_mx;
  } else {
    minmax_f(m, n, fmin, fmax);
  }
  const ClipNorm f(fmin, fmax, clip_max, eps);
  double s[4];
  apply_sum4(m, m, n, f, s);
  if (st) {
    for (int l = 0; l < 4; ++l) st->s[l] = s[l];
    st->mn = f(fmin), st->mx = f(fmax);
  }
}

}  // namespace diffcam
