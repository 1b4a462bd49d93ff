// Distribution-Aware Confidence Gating (DACG, method.md 2.2).
//
// Branch from the float64 mean/std of the map (strict comparisons, order high_var, high_mean,
// low_mean, default), tau = percentile (that branch's alpha) of the strictly positive pixels,
// max'd with tau_floor (tau_floor when none is positive).  Pixels with M > tau keep their value,
// the others take the separable 3x3 Gaussian blur (taps exp(-x^2 / (2 sigma^2)), x in -1..1,
// normalised; reflect-101).  O(H W): one pass gives the sum and the count of the positive
// pixels, a second the central moments; the positives are the top ranks of the map, so one
// select_ranks_f (stats.hpp) on the whole map gives the two ranks of the percentile (no copy).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <vector>

#include "border.hpp"
#include "params.hpp"
#include "stats.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace diffcam {

struct GateInfo {
  int branch;
  double tau;
};

inline GateInfo gating_stats(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
  (void)scratch;
  // mean (sum4 order), the count of positives (same pass), then the central moments
  double s4[4], q[4];
  const size_t np = sum4_count_pos(m, n, s4);
  const double mu = ((s4[0] + s4[1]) + (s4[2] + s4[3])) / static_cast<double>(n);
  moments4(m, n, mu, q, nullptr);
  const MeanStd ms{mu, std::sqrt(((q[0] + q[1]) + (q[2] + q[3])) / static_cast<double>(n))};
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
  double tau = p[P::tau_floor];
  if (np > 0) {
    thread_local std::vector<float> work;
    thread_local std::vector<uint8_t> bidx;
    if (work.size() < 10 * n + 64) work.resize(10 * n + 64);
    if (bidx.size() < n) bidx.resize(n);
    // the positive pixels are the top np ranks of the map: their percentile is read at ranks
    // shifted by n - np (no compaction), NumPy 'linear' on the np positives.
    const double h = static_cast<double>(np - 1) * (alpha / 100.0);
    const double fl = std::floor(h);
    size_t lo = static_cast<size_t>(fl);
    if (lo > np - 1) lo = np - 1;
    const size_t r[2] = {(n - np) + lo, (n - np) + (lo + 1 < np ? lo + 1 : lo)};
    float o[2];
    select_ranks_f(m, n, r, 2, o, work.data(), bidx.data());
    tau = std::max(numpy_lerp(o[0], o[1], h - fl), p[P::tau_floor]);
  }
  return {branch, tau};
}

// 3x3 separable Gaussian blur with reflect-101 borders; tmp is scratch.
// With kSelect, out[i] = M[i] > tau ? M[i] : blur[i] directly (DACG's gate fused into the
// vertical pass; out may alias m: each output reads m at its own index only).  The float64
// compare M > tau is the float compare M > float_floor(tau) (the same for every float M).
// The SSE2 loops do the same float operations in the same order as the scalar ones.
template <bool kSelect = false>
inline void blur3(const float* m, float* out, int H, int W, double sigma, std::vector<float>& tmp,
                  double tau = 0.0) {
  const double e = std::exp(-1.0 / (2.0 * sigma * sigma));
  const double s = 1.0 + 2.0 * e;
  const float g1 = static_cast<float>(e / s), g0 = static_cast<float>(1.0 / s);
  const float tf = float_floor(tau);
  tmp.resize(static_cast<size_t>(H) * W);
#if defined(__SSE2__)
  const __m128 vg0 = _mm_set1_ps(g0), vg1 = _mm_set1_ps(g1), vtf = _mm_set1_ps(tf);
#endif
  for (int y = 0; y < H; ++y) {
    const float* row = m + static_cast<size_t>(y) * W;
    float* t = tmp.data() + static_cast<size_t>(y) * W;
    if (W == 1) {
      t[0] = (g0 + 2.0f * g1) * row[0];
      continue;
    }
    t[0] = g0 * row[0] + g1 * (row[1] + row[1]);
    int x = 1;
#if defined(__SSE2__)
    for (; x + 4 <= W - 1; x += 4) {
      const __m128 l = _mm_loadu_ps(row + x - 1), c = _mm_loadu_ps(row + x), r = _mm_loadu_ps(row + x + 1);
      _mm_storeu_ps(t + x, _mm_add_ps(_mm_mul_ps(vg0, c), _mm_mul_ps(vg1, _mm_add_ps(l, r))));
    }
#endif
    for (; x < W - 1; ++x) t[x] = g0 * row[x] + g1 * (row[x - 1] + row[x + 1]);
    t[W - 1] = g0 * row[W - 1] + g1 * (row[W - 2] + row[W - 2]);
  }
  for (int y = 0; y < H; ++y) {
    const float* a = tmp.data() + static_cast<size_t>(fold_reflect101(y - 1, H)) * W;
    const float* b = tmp.data() + static_cast<size_t>(y) * W;
    const float* c = tmp.data() + static_cast<size_t>(fold_reflect101(y + 1, H)) * W;
    float* o = out + static_cast<size_t>(y) * W;
    const float* mr = m + static_cast<size_t>(y) * W;
    int x = 0;
#if defined(__SSE2__)
    for (; x + 4 <= W; x += 4) {
      const __m128 bv = _mm_add_ps(_mm_mul_ps(vg0, _mm_loadu_ps(b + x)),
                                   _mm_mul_ps(vg1, _mm_add_ps(_mm_loadu_ps(a + x), _mm_loadu_ps(c + x))));
      if (kSelect) {
        const __m128 v = _mm_loadu_ps(mr + x), k = _mm_cmpgt_ps(v, vtf);
        _mm_storeu_ps(o + x, _mm_or_ps(_mm_and_ps(k, v), _mm_andnot_ps(k, bv)));
      } else {
        _mm_storeu_ps(o + x, bv);
      }
    }
#endif
    for (; x < W; ++x) {
      const float bv = g0 * b[x] + g1 * (a[x] + c[x]);
      if (kSelect) {
        const float v = mr[x];
        o[x] = v > tf ? v : bv;
      } else {
        o[x] = bv;
      }
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
