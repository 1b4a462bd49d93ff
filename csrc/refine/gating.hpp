// Distribution-Aware Confidence Gating (DACG, method.md 2.2).
//
// Branch from the float64 mean/std of the map (strict comparisons, order high_var, high_mean,
// low_mean, default), tau = percentile (that branch's alpha) of the strictly positive pixels,
// max'd with tau_floor (tau_floor when none is positive).  Pixels with M > tau keep their value,
// the others take the separable 3x3 Gaussian blur (taps exp(-x^2 / (2 sigma^2)), x in -1..1,
// normalised; reflect-101).  O(H W): one pass gives the sum and the count of the positive
// pixels, a second the central moments; the positives are the top ranks of the map, so one
// select_ranks_f (stats.hpp) on the whole map gives the two ranks of the percentile (no copy).
// The gate's output pass can also gather CBA's statistics of its result (PosStats).
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

// scratch: the select's work space (select_scratch; grown once, then reused).
inline GateInfo gating_stats(const float* m, size_t n, const double* p, std::vector<float>& scratch) {
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
    float* work;
    uint8_t* bidx;
    select_scratch(scratch, n, work, bidx);
    // the positive pixels are the top np ranks of the map: their percentile is read at ranks
    // shifted by n - np (no compaction), NumPy 'linear' on the np positives.
    const double h = static_cast<double>(np - 1) * (alpha / 100.0);
    const double fl = std::floor(h);
    size_t lo = static_cast<size_t>(fl);
    if (lo > np - 1) lo = np - 1;
    const size_t r[2] = {(n - np) + lo, (n - np) + (lo + 1 < np ? lo + 1 : lo)};
    float o[2];
    select_ranks_f(m, n, r, 2, o, work, bidx);
    tau = std::max(numpy_lerp(o[0], o[1], h - fl), p[P::tau_floor]);
  }
  return {branch, tau};
}

// 3x3 separable Gaussian blur with reflect-101 borders; tmp is scratch.
// With kSelect, out[i] = M[i] > tau ? M[i] : blur[i] directly (DACG's gate fused into the
// vertical pass; out may alias m: each output reads m at its own index only).  The float64
// compare M > tau is the float compare M > float_floor(tau) (the same for every float M).
// The horizontal pass writes rows 0..H-1 to tmp rows 1..H and copies the reflect-101 rows -1
// and H next to them, so the vertical pass is one flat loop over the H W outputs (rows are
// contiguous: row y -+ 1 is index -+ W); with st, that loop also gathers the PosStats of the
// output (CBA's statistics and the map's min / max, fused: one pass over the map fewer).
// The SSE2 loops do the same float operations in the same order as the scalar ones.
template <bool kSelect = false>
inline void blur3(const float* m, float* out, int H, int W, double sigma, std::vector<float>& tmp,
                  double tau = 0.0, PosStats* st = nullptr) {
  const double e = std::exp(-1.0 / (2.0 * sigma * sigma));
  const double s = 1.0 + 2.0 * e;
  const float g1 = static_cast<float>(e / s), g0 = static_cast<float>(1.0 / s);
  const float tf = float_floor(tau);
  const size_t n = static_cast<size_t>(H) * W;
  tmp.resize(n + 2 * static_cast<size_t>(W));
#if defined(__SSE2__)
  const __m128 vg0 = _mm_set1_ps(g0), vg1 = _mm_set1_ps(g1), vtf = _mm_set1_ps(tf);
#endif
  for (int y = 0; y < H; ++y) {
    const float* row = m + static_cast<size_t>(y) * W;
    float* t = tmp.data() + static_cast<size_t>(y + 1) * W;
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
  float* t0 = tmp.data() + W;  // t0 + y * W: the horizontal pass of row y, y in -1..H
  std::copy(t0 + static_cast<size_t>(fold_reflect101(-1, H)) * W,
            t0 + static_cast<size_t>(fold_reflect101(-1, H)) * W + W, t0 - W);
  std::copy(t0 + static_cast<size_t>(fold_reflect101(H, H)) * W,
            t0 + static_cast<size_t>(fold_reflect101(H, H)) * W + W, t0 + n);
  const float* ta = t0 - W;
  const float* tc = t0 + W;
  PosStats acc;  // a local copy (st in memory could alias the stores to out: __m128 may alias)
  size_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) {
    const __m128 bv = _mm_add_ps(_mm_mul_ps(vg0, _mm_loadu_ps(t0 + i)),
                                 _mm_mul_ps(vg1, _mm_add_ps(_mm_loadu_ps(ta + i), _mm_loadu_ps(tc + i))));
    __m128 o = bv;
    if (kSelect) {
      const __m128 v = _mm_loadu_ps(m + i), k = _mm_cmpgt_ps(v, vtf);
      o = _mm_or_ps(_mm_and_ps(k, v), _mm_andnot_ps(k, bv));
    }
    _mm_storeu_ps(out + i, o);
    if (st) acc.add4(o);
  }
  if (st) acc.flush();
#endif
  for (; i < n; ++i) {
    const float bv = g0 * t0[i] + g1 * (ta[i] + tc[i]);
    float o = bv;
    if (kSelect) {
      const float v = m[i];
      o = v > tf ? v : bv;
    }
    out[i] = o;
    if (st) acc.add(i, o);
  }
  if (st) *st = acc;
}

// st (optional): the PosStats of the output (from the blur's pass, or one pass when dacg is off).
inline GateInfo confidence_gating_map(const float* m, float* out, int H, int W, const double* p,
                                      std::vector<float>& scratch, std::vector<float>& tmp,
                                      PosStats* st = nullptr) {
  const size_t n = static_cast<size_t>(H) * W;
  GateInfo gi = gating_stats(m, n, p, scratch);
  if (p[P::dacg] == 0.0) {
    if (out != m) std::copy(m, m + n, out);
    if (st) *st = pos_stats(out, n);
    return gi;
  }
  blur3<true>(m, out, H, W, p[P::blur_sigma], tmp, gi.tau, st);
  return gi;
}

}  // namespace diffcam
