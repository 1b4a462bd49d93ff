// Vector "ops" policies for the rank-weighted Gaussian filter: one 8-lane AVX2 policy (compiled
// only in the -mavx2 -mfma translation unit) and a 1-lane scalar policy.
//
// Each policy provides load/store, the compare-exchange ce(a, b) used by the sorting networks,
// and finish(v, n): given the n sorted window values of L pixels (one pixel per lane) it
// computes the window mean and population std (two-pass, float32 with 4 partial sums; see
// "Magnitudes" below), the per-pixel rank weights g_d = exp(-a d^2),
// a = mu^2 / (2 s^2) = 1 / (2 sigma_r^2), with ONE double-precision exponential per pixel
// (q = exp(-a)) and the recurrence
// g_{d+1} = g_d * r_d, r_{d+1} = r_d * q^2 (r_0 = q), in float64 so that no error accumulates
// over up to 480 ranks, and the symmetric weighted sum
// (v_c + sum_d g_d (v_{c-d} + v_{c+d})) / (1 + 2 sum_d g_d).  The loop over d stops once every
// lane's weight is below 1e-20 (the weights decrease monotonically; what is dropped is below
// 1e-17 of the result).  s = 0 or a tiny sigma_r gives a = +inf, q = 0: one-hot weights, the
// output is v_c, never NaN; mu <= 0 gives 0 (when every lane of the U blocks has mu <= 0, the
// variance, exponential and weights are skipped).  finish_u<U> does U blocks at once (interleaved
// latency chains; the fixed-k rows use U = 2).  Cost per pixel: the network (k^2 log^2 k^2
// compare-exchanges / L) plus O(k^2) adds and O(effective weight support) multiplies.
// Magnitudes: float32 squared deviations underflow for windows below ~1e-19 and overflow above
// ~1e19 (their sum of n terms already from ~sqrt(FLT_MAX / n): ~2e18 at k = 31), which made a
// wrong (errors up to 20 % of the map's maximum).  So a lane whose mean is in (0, 2^-50) (or
// NaN), or whose float32 sum of squared deviations S is not finite, gets a from a float64 mean
// and variance of its own window (a_double).  From mu >= 2^-50 on, the float32 S is accurate
// wherever a matters: a <= 44 means s >= mu / 9.4, so S >= n 2^-106.4, far above the denormal
// range (for a > 44 only the centre weight is kept, and an underflowed S only makes a larger);
// mu^2 and a are float64, so only S can overflow, and it is tested itself (mu does not bound
// the window's spread).  In finish_n the test is 5 vector ops per block and one movemask branch
// per call; a call with such a lane re-runs out of line (finish_n_fix, cold), where only those
// lanes take the float64 a: every output depends on its own window alone (not on the other
// lanes of its vector, nor on the thread split).  The scalar finish tests the same bounds per
// window.  Inputs are assumed below ~FLT_MAX / n in magnitude (the float32 weighted sums).
// Exception, AVX2 with k = 3 (n = 9, d = 1..4, the common case): finish9 stays in float32 for
// all 8 lanes (no float64 conversions): a in float32 (float64 only for lanes whose mean or
// variance could overflow or underflow), two float32 exponentials e^{-a}, e^{-4a} (exp2-based,
// <= 1.2 ulp for a d^2 < 1, 1.8 ulp below 5, growing as (a d^2) 2^-24 beyond, where the weight
// is small: absolute error <= 6.5e-8) and e^{-9a} = e^{-a} (e^{-4a})^2,
// e^{-16a} = (e^{-4a})^4 (~4-6 ulp where they matter), every weight with a d^2 > 44 set
// to 0 (never denormal); 4 blocks at once; its own magnitude fallback (a9_double: mean outside
// [2^-50, 2^60] or S not finite, a being float32 there).  The scalar policy keeps the float64
// finish for every k (so its k = 3 outputs may differ from AVX2's in the last bits; both are
// within the tests' tolerance of the float64 reference).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace diffcam {

struct OpsScalar {
  static constexpr int L = 1;
  using V = float;
  static inline V load(const float* p) { return *p; }
  static inline void store(float* p, V v) { *p = v; }
  static inline V zero() { return 0.0f; }
  // Every value at p + dy * stride + dx (dy < rows, dx < cols) is +0.0 (bit pattern 0; NaN
  // and -0.0 never match).
  static inline bool all_pos_zero_rows(const float* p, int stride, int rows, int cols) {
    uint32_t acc = 0;
    for (int dy = 0; dy < rows; ++dy)
      for (int dx = 0; dx < cols; ++dx) {
        uint32_t b;
        std::memcpy(&b, p + dy * stride + dx, 4);
        acc |= b;
        if (acc) return false;
      }
    return true;
  }
  static inline void ce(V& a, V& b) {
    V lo = a < b ? a : b;
    V hi = a < b ? b : a;
    a = lo;
    b = hi;
  }
  // a = mu^2 / (2 var) of one window of n values with the mean and the variance in float64
  // (+inf for var = 0): the rare windows whose float32 statistics could be wrong.
  __attribute__((noinline, cold)) static double a_double(const V* v, int n) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += v[i];
    const double m = s / n;
    double q = 0.0;
    for (int i = 0; i < n; ++i) q += (v[i] - m) * (v[i] - m);
    return (m * m) * (0.5 * n) / q;
  }
  static inline V finish(const V* v, int n) {
    const int c = (n - 1) / 2;
    float s4[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) s4[i & 3] += v[i];
    const float mu = ((s4[0] + s4[1]) + (s4[2] + s4[3])) / static_cast<float>(n);
    float q4[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) {
      float d = v[i] - mu;
      q4[i & 3] += d * d;
    }
    const float S = (q4[0] + q4[1]) + (q4[2] + q4[3]);
    const float var = S / static_cast<float>(n);
    if (!(mu > 0.f)) return 0.f;
    const double mud = mu, vard = var;
    // mu < 2^-50 or S not finite: the float32 squares may have underflowed or overflowed (see
    // the header); this window's a from its float64 mean and variance instead (rare).
    const double a = __builtin_expect(mu >= 0x1p-50f && S <= FLT_MAX, 1)
                         ? (mud * mud) / (2.0 * vard)  // +inf when var == 0
                         : a_double(v, n);
    const double q = std::exp(-a), q2 = q * q;
    double g = 1.0, r = q, wsum = 0.0;
    float acc = v[c];
    for (int d = 1; d <= c; ++d) {
      g *= r;
      r *= q2;
      wsum += g;
      acc += static_cast<float>(g) * (v[c - d] + v[c + d]);
      if (g < 1e-20) break;
    }
    return acc / static_cast<float>(1.0 + 2.0 * wsum);
  }
  template <int U>
  static inline void finish_u(const V* const* vs, int n, V* out) {
    for (int u = 0; u < U; ++u) out[u] = finish(vs[u], n);
  }
  template <int N, int U>
  static inline void finish_k(const V* const* vs, V* out) {
    finish_u<U>(vs, N, out);
  }
};

#if defined(__AVX2__) && defined(__FMA__)
struct OpsAVX2 {
  static constexpr int L = 8;
  using V = __m256;
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline V zero() { return _mm256_setzero_ps(); }
  // The L-pixel windows at p + dy * stride + dx (dy < rows, dx < cols) are all +0.0 (bit
  // pattern 0; NaN and -0.0 never match).  A probe of 3 vectors first: the common answer
  // outside zero areas is a quick "no".
  static inline bool all_pos_zero_rows(const float* p, int stride, int rows, int cols) {
    {
      const __m256i t = _mm256_castps_si256(_mm256_or_ps(
          _mm256_or_ps(load(p), load(p + (rows / 2) * stride + cols / 2)), load(p + (rows - 1) * stride + cols - 1)));
      if (!_mm256_testz_si256(t, t)) return false;
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int dy = 0; dy < rows; ++dy) {
      const float* q = p + dy * stride;
      int dx = 0;
      for (; dx + 1 < cols; dx += 2) a0 = _mm256_or_ps(a0, load(q + dx)), a1 = _mm256_or_ps(a1, load(q + dx + 1));
      if (dx < cols) a0 = _mm256_or_ps(a0, load(q + dx));
    }
    const __m256i a = _mm256_castps_si256(_mm256_or_ps(a0, a1));
    return _mm256_testz_si256(a, a) != 0;
  }
  static inline void ce(V& a, V& b) {
    V lo = _mm256_min_ps(a, b);
    b = _mm256_max_ps(a, b);
    a = lo;
  }

  // exp(x) for x <= 0 (x < -708 and -inf give 0), ~1 ulp: x = n ln2 + r, |r| <= ln2/2,
  // degree-13 Taylor polynomial, scale by 2^n through the exponent bits.
  static inline __m256d exp_neg_pd(__m256d x) {
    const __m256d log2e = _mm256_set1_pd(1.4426950408889634074);
    const __m256d ln2hi = _mm256_set1_pd(6.93145751953125e-1);
    const __m256d ln2lo = _mm256_set1_pd(1.42860682030941723212e-6);
    const __m256d magic = _mm256_set1_pd(6755399441055744.0);  // 1.5 * 2^52
    const __m256d lo_lim = _mm256_set1_pd(-708.0);
    __m256d under = _mm256_cmp_pd(x, lo_lim, _CMP_LT_OQ);
    __m256d xc = _mm256_max_pd(x, lo_lim);
    __m256d t = _mm256_fmadd_pd(xc, log2e, magic);
    __m256d nf = _mm256_sub_pd(t, magic);
    __m256d r = _mm256_fnmadd_pd(nf, ln2hi, xc);
    r = _mm256_fnmadd_pd(nf, ln2lo, r);
    static const double c[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                 1.0 / 3628800.0,   1.0 / 362880.0,    1.0 / 40320.0,
                                 1.0 / 5040.0,      1.0 / 720.0,       1.0 / 120.0,
                                 1.0 / 24.0,        1.0 / 6.0,         0.5,
                                 1.0,               1.0};
    // Estrin: p(r) = sum_{i<=13} c[13-i] r^i in pairs, halving the dependency chain.
    const __m256d r2 = _mm256_mul_pd(r, r), r4 = _mm256_mul_pd(r2, r2);
    auto C = [&](int i) { return _mm256_set1_pd(c[13 - i]); };  // coefficient of r^i
    __m256d e0 = _mm256_fmadd_pd(C(1), r, C(0)), e1 = _mm256_fmadd_pd(C(3), r, C(2));
    __m256d e2 = _mm256_fmadd_pd(C(5), r, C(4)), e3 = _mm256_fmadd_pd(C(7), r, C(6));
    __m256d e4 = _mm256_fmadd_pd(C(9), r, C(8)), e5 = _mm256_fmadd_pd(C(11), r, C(10));
    __m256d e6 = _mm256_fmadd_pd(C(13), r, C(12));
    __m256d f0 = _mm256_fmadd_pd(e1, r2, e0), f1 = _mm256_fmadd_pd(e3, r2, e2);
    __m256d f2 = _mm256_fmadd_pd(e5, r2, e4);
    __m256d g0 = _mm256_fmadd_pd(f1, r4, f0), g1 = _mm256_fmadd_pd(e6, r4, f2);
    const __m256d r8 = _mm256_mul_pd(r4, r4);
    __m256d p = _mm256_fmadd_pd(g1, r8, g0);
    __m256i ni = _mm256_sub_epi64(_mm256_castpd_si256(t), _mm256_castpd_si256(magic));
    __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)), 52);
    __m256d res = _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
    return _mm256_blendv_pd(res, _mm256_setzero_pd(), under);
  }

  // The weights of U blocks of L pixels (one window per lane, values sorted): the float32
  // two-pass mean / var with 4 partial sums, a and q = exp(-a) in float64, the float64 weight
  // recurrence, the symmetric sum into 2 float32 accumulators, the d loop in steps of 4 with
  // the early exit between steps.  With the window size NC known at compile time (k = 5..11:
  // finish_k) everything unrolls and, for U = 1..2, the live values fit the 16 ymm registers.
  // k = 3 (N = 9) takes the all-float32 finish9 instead.
  template <int N, int U>
  static inline void finish_k(const V* const* vs, V* out) {
    if constexpr (N == 9)
      finish9<U>(vs, out);
    else
      finish_n<U, N>(vs, N, out);
  }

  // exp(-x) for x in [0, 44] in float32 (the caller clamps x and masks the weights of larger
  // x): exp(-x) = 2^t, t = -x log2(e) = n + f, n = round(t) (in [-64, 0], so 2^n and
  // the result stay normal), f = fma(-x, log2 e, -n) in [-1/2, 1/2], 2^f by a degree-6
  // polynomial (a Chebyshev fit, relative error 8e-8), scaled by 2^n through the exponent bits.
  // The rounding of x log2(e) adds up to ~x * 2^-24 relative (the same order as the rounding
  // of x = a d^2 itself): measured against exp() in float64, max 1.13 ulp for x < 1, 1.74 for
  // x < 5, 4.9 for x < 20, 10.3 up to 44; absolute error <= 6.5e-8 everywhere (Cephes' expf
  // with a Cody-Waite reduction: 1.0 ulp, but 5 more operations, ~8 % of the k = 3 filter).
  static inline __m256 exp_neg_ps(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
    const __m256 nl2e = _mm256_set1_ps(-1.44269504088896341f);
    const __m256 t = _mm256_fmadd_ps(x, nl2e, magic);
    const __m256 nf = _mm256_sub_ps(t, magic);
    const __m256 f = _mm256_fmsub_ps(x, nl2e, nf);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.00015337577497120947f), f, _mm256_set1_ps(0.0013399859890341759f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009618519805371761f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05550329014658928f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022646248340607f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471824645996f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }

  // Lane-wise a = mu^2 / (2 var) of one block of 9 sorted values in float64 (mean and variance
  // too): the rare lanes whose float32 mean or variance could overflow or lose precision.
  __attribute__((noinline, cold)) static __m256 a9_double(const V* v) {
    __m256d a[2];
    for (int h = 0; h < 2; ++h) {
      __m256d x[9];
      for (int i = 0; i < 9; ++i)
        x[i] = _mm256_cvtps_pd(h ? _mm256_extractf128_ps(v[i], 1) : _mm256_castps256_ps128(v[i]));
      __m256d s = x[0];
      for (int i = 1; i < 9; ++i) s = _mm256_add_pd(s, x[i]);
      const __m256d m = _mm256_div_pd(s, _mm256_set1_pd(9.0));
      __m256d q = _mm256_setzero_pd();
      for (int i = 0; i < 9; ++i) {
        const __m256d d = _mm256_sub_pd(x[i], m);
        q = _mm256_fmadd_pd(d, d, q);
      }
      a[h] = _mm256_div_pd(_mm256_mul_pd(_mm256_mul_pd(m, m), _mm256_set1_pd(4.5)), q);
    }
    return _mm256_set_m128(_mm256_cvtpd_ps(a[1]), _mm256_cvtpd_ps(a[0]));
  }

  // finish() for k = 3 (9 sorted values, centre c = 4, d = 1..4) entirely in float32, all 8
  // lanes at once, U blocks interleaved: mu (the partial sums of finish_n, times 1/9) and
  // S = sum (v - mu)^2, a = 4.5 mu^2 / S (= mu^2 / (2 var); +inf for s = 0), then
  // g_1 = exp(-a) and g_2 = exp(-4a) by exp_neg_ps, g_3 = g_1 g_2^2, g_4 = (g_2^2)^2.  Each
  // g_d is 0 where a d^2 > 44 (g_d < 8e-20, dropped as in finish_n; also for a = +inf or NaN),
  // and the factors of a product are masked by the product's cutoff before multiplying, so no
  // weight (nor a product of weights) is ever denormal.  Lanes with mu > 0 outside
  // [2^-50, 2^60] or a non-finite S (mu^2 or (v - mu)^2 could overflow, or lose precision near
  // the underflow) take a from a9_double (float64 mean and variance), per lane, so every output
  // is a function of its window alone.  Measured against the float64 reference: <= 2.7 * 2^-24 of the window's
  // largest magnitude for a in [1e-4, 50] and window magnitudes 1e-36 .. 1e30 (the backend
  // tests allow 1e-6 of the map's maximum; test_rank_filter_lanes.py holds this path to 5 * 2^-24
  // per window).  Inputs are assumed below ~FLT_MAX / 9 in magnitude (the float32 sums overflow
  // beyond; finish_n has the same limit).
  template <int U>
  static inline void finish9(const V* const* vs, V* out) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 mu[U], a[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V* v = vs[u];
      const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(v[0], v[4]), v[8]), _mm256_add_ps(v[1], v[5]));
      const __m256 t = _mm256_add_ps(_mm256_add_ps(v[2], v[6]), _mm256_add_ps(v[3], v[7]));
      mu[u] = _mm256_mul_ps(_mm256_add_ps(s, t), _mm256_set1_ps(1.0f / 9.0f));
    }
    {
      __m256 allnp = _mm256_cmp_ps(mu[0], zero, _CMP_LE_OQ);
      for (int u = 1; u < U; ++u) allnp = _mm256_and_ps(allnp, _mm256_cmp_ps(mu[u], zero, _CMP_LE_OQ));
      if (_mm256_movemask_ps(allnp) == 0xFF) {
        for (int u = 0; u < U; ++u) out[u] = zero;
        return;
      }
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V* v = vs[u];
      __m256 q[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 d0 = _mm256_sub_ps(v[j], mu[u]);
        q[j] = _mm256_mul_ps(d0, d0);
      }
      for (int j = 0; j < 4; ++j) {
        const __m256 d0 = _mm256_sub_ps(v[4 + j], mu[u]);
        q[j] = _mm256_fmadd_ps(d0, d0, q[j]);
      }
      {
        const __m256 d0 = _mm256_sub_ps(v[8], mu[u]);
        q[0] = _mm256_fmadd_ps(d0, d0, q[0]);
      }
      const __m256 S = _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3]));
      a[u] = _mm256_div_ps(_mm256_mul_ps(_mm256_mul_ps(mu[u], mu[u]), _mm256_set1_ps(4.5f)), S);
      const __m256 ok = _mm256_and_ps(
          _mm256_and_ps(_mm256_cmp_ps(mu[u], _mm256_set1_ps(0x1p-50f), _CMP_GE_OQ),
                        _mm256_cmp_ps(mu[u], _mm256_set1_ps(0x1p60f), _CMP_LE_OQ)),
          _mm256_cmp_ps(S, _mm256_set1_ps(3.0e38f), _CMP_LE_OQ));
      const __m256 bad = _mm256_andnot_ps(ok, _mm256_cmp_ps(mu[u], zero, _CMP_GT_OQ));
      if (__builtin_expect(_mm256_movemask_ps(bad) != 0, 0)) a[u] = _mm256_blendv_ps(a[u], a9_double(v), bad);
    }
    const __m256 xmax = _mm256_set1_ps(44.0f);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V* v = vs[u];
      const __m256 x1 = a[u];
      const __m256 x2 = _mm256_mul_ps(a[u], _mm256_set1_ps(4.0f));
      const __m256 x3 = _mm256_mul_ps(a[u], _mm256_set1_ps(9.0f));
      const __m256 x4 = _mm256_mul_ps(a[u], _mm256_set1_ps(16.0f));
      // x <= 44 is false for NaN: those weights are 0 too; min() maps NaN to 44 (its second
      // operand), so the exponential never sees NaN or x > 44.
      auto w = [&](__m256 x) {
        return _mm256_and_ps(_mm256_cmp_ps(x, xmax, _CMP_LE_OQ), exp_neg_ps(_mm256_min_ps(x, xmax)));
      };
      // Two exponentials: g_1 = e^{-a}, g_2 = e^{-4a}; g_3 = g_1 g_2^2, g_4 = (g_2^2)^2 (relative
      // error ~4 ulp on g_3, g_4, instead of ~16 ulp for powers of one e^{-a}).  The factors of
      // g_3, g_4 are masked by their own cutoff first (9a, 16a <= 44), so no product is denormal.
      const __m256 g1 = w(x1), g2 = w(x2);
      const __m256 g2a = _mm256_and_ps(g2, _mm256_cmp_ps(x3, xmax, _CMP_LE_OQ));
      const __m256 g2b = _mm256_and_ps(g2, _mm256_cmp_ps(x4, xmax, _CMP_LE_OQ));
      const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g1, g2a), g2a);
      const __m256 h = _mm256_mul_ps(g2b, g2b);
      const __m256 g4 = _mm256_mul_ps(h, h);
      __m256 acc0 = _mm256_fmadd_ps(g1, _mm256_add_ps(v[3], v[5]), v[4]);
      __m256 acc1 = _mm256_mul_ps(g2, _mm256_add_ps(v[2], v[6]));
      acc0 = _mm256_fmadd_ps(g3, _mm256_add_ps(v[1], v[7]), acc0);
      acc1 = _mm256_fmadd_ps(g4, _mm256_add_ps(v[0], v[8]), acc1);
      const __m256 gs = _mm256_add_ps(_mm256_add_ps(g1, g2), _mm256_add_ps(g3, g4));
      const __m256 den = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), gs, _mm256_set1_ps(1.0f));
      const __m256 o = _mm256_div_ps(_mm256_add_ps(acc0, acc1), den);
      out[u] = _mm256_blendv_ps(o, zero, _mm256_cmp_ps(mu[u], zero, _CMP_LE_OQ));
    }
  }

  // a = mu^2 / (2 var) of the 8 windows of one block of n sorted values, the mean and the
  // variance in float64 (lanes 0-3 in lo, 4-7 in hi; +inf or NaN for var = 0): the rare lanes
  // of finish_n whose float32 statistics could be wrong.
  struct A2 {
    __m256d lo, hi;
  };
  __attribute__((noinline, cold)) static A2 a_double(const V* v, int n) {
    __m256d a[2];
    const __m256d fn = _mm256_set1_pd(n);
    for (int h = 0; h < 2; ++h) {
      auto x = [&](int i) { return _mm256_cvtps_pd(h ? _mm256_extractf128_ps(v[i], 1) : _mm256_castps256_ps128(v[i])); };
      __m256d s = _mm256_setzero_pd();
      for (int i = 0; i < n; ++i) s = _mm256_add_pd(s, x(i));
      const __m256d m = _mm256_div_pd(s, fn);
      __m256d q = _mm256_setzero_pd();
      for (int i = 0; i < n; ++i) {
        const __m256d d = _mm256_sub_pd(x(i), m);
        q = _mm256_fmadd_pd(d, d, q);
      }
      a[h] = _mm256_div_pd(_mm256_mul_pd(_mm256_mul_pd(m, m), _mm256_mul_pd(fn, _mm256_set1_pd(0.5))), q);
    }
    return A2{a[0], a[1]};
  }

  // The rare path of finish_n (some lane needs the float64 a): the same block again, out of
  // line, so the fast path holds no call and no extra live values.
  template <int U, int NC>
  __attribute__((noinline, cold)) static void finish_n_fix(const V* const* vs, int n_rt, V* out) {
    finish_n<U, NC, true>(vs, n_rt, out);
  }

  template <int U, int NC, bool Fix = false>
  static inline void finish_n(const V* const* vs, int n_rt, V* out) {
    const int N = NC > 0 ? NC : n_rt;  // NC > 0: the size is a compile-time constant
    const int C = (N - 1) / 2;
    const __m256 fn = _mm256_set1_ps(static_cast<float>(N));
    __m256 mu[U], var[U], fine[U];
    for (int u = 0; u < U; ++u) {
      const V* v = vs[u];
      __m256 s[4] = {v[0], v[1], v[2], v[3]};
      for (int i = 4; i + 4 <= N; i += 4)
        for (int j = 0; j < 4; ++j) s[j] = _mm256_add_ps(s[j], v[i + j]);
      for (int i = N & ~3; i < N; ++i) s[0] = _mm256_add_ps(s[0], v[i]);
      mu[u] = _mm256_div_ps(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])), fn);
    }
    {
      // Every lane's mean <= 0 (e.g. inside the zero area of a ReLU'd map): the output is 0,
      // as below; skip the variance, the exponential and the weights.  NaN means go on.
      __m256 allnp = _mm256_cmp_ps(mu[0], _mm256_setzero_ps(), _CMP_LE_OQ);
      for (int u = 1; u < U; ++u) allnp = _mm256_and_ps(allnp, _mm256_cmp_ps(mu[u], _mm256_setzero_ps(), _CMP_LE_OQ));
      if (_mm256_movemask_ps(allnp) == 0xFF) {
        for (int u = 0; u < U; ++u) out[u] = _mm256_setzero_ps();
        return;
      }
    }
    for (int u = 0; u < U; ++u) {
      const V* v = vs[u];
      __m256 s[4];
      for (int j = 0; j < 4; ++j) {
        __m256 d0 = _mm256_sub_ps(v[j], mu[u]);
        s[j] = _mm256_mul_ps(d0, d0);
      }
      for (int i = 4; i + 4 <= N; i += 4)
        for (int j = 0; j < 4; ++j) {
          __m256 d0 = _mm256_sub_ps(v[i + j], mu[u]);
          s[j] = _mm256_fmadd_ps(d0, d0, s[j]);
        }
      for (int i = N & ~3; i < N; ++i) {
        __m256 d0 = _mm256_sub_ps(v[i], mu[u]);
        s[0] = _mm256_fmadd_ps(d0, d0, s[0]);
      }
      const __m256 S = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
      var[u] = _mm256_div_ps(S, fn);
      // A lane is fine when mu <= 0 (output 0) or mu >= 2^-50 with S finite (see the header);
      // the others (mean tiny or NaN, squares overflowed) need a from a_double.
      fine[u] = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(mu[u], _mm256_set1_ps(0x1p-50f), _CMP_GE_OQ),
                                           _mm256_cmp_ps(S, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ)),
                             _mm256_cmp_ps(mu[u], _mm256_setzero_ps(), _CMP_LE_OQ));
    }
    if constexpr (!Fix) {
      __m256 all = fine[0];
      for (int u = 1; u < U; ++u) all = _mm256_and_ps(all, fine[u]);
      if (__builtin_expect(_mm256_movemask_ps(all) != 0xFF, 0)) {
        finish_n_fix<U, NC>(vs, n_rt, out);
        return;
      }
    }
    const __m256d zero = _mm256_setzero_pd();
    const __m256d dinf = _mm256_set1_pd(INFINITY), amax = _mm256_set1_pd(44.0);
    __m256d qlo[U], qhi[U];
    for (int u = 0; u < U; ++u) {
      const __m256d mlo = _mm256_cvtps_pd(_mm256_castps256_ps128(mu[u]));
      const __m256d mhi = _mm256_cvtps_pd(_mm256_extractf128_ps(mu[u], 1));
      const __m256d vlo = _mm256_cvtps_pd(_mm256_castps256_ps128(var[u]));
      const __m256d vhi = _mm256_cvtps_pd(_mm256_extractf128_ps(var[u], 1));
      __m256d alo = _mm256_div_pd(_mm256_mul_pd(mlo, mlo), _mm256_add_pd(vlo, vlo));
      __m256d ahi = _mm256_div_pd(_mm256_mul_pd(mhi, mhi), _mm256_add_pd(vhi, vhi));
      if constexpr (Fix) {
        if (_mm256_movemask_ps(fine[u]) != 0xFF) {
          // the lanes that are not fine take a from float64 statistics of their own window
          const A2 f = a_double(vs[u], N);
          const __m256i b = _mm256_castps_si256(fine[u]);
          alo = _mm256_blendv_pd(f.lo, alo, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(b))));
          ahi = _mm256_blendv_pd(f.hi, ahi, _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(b, 1))));
        }
      }
      alo = _mm256_blendv_pd(dinf, alo, _mm256_cmp_pd(alo, alo, _CMP_ORD_Q));
      ahi = _mm256_blendv_pd(dinf, ahi, _mm256_cmp_pd(ahi, ahi, _CMP_ORD_Q));
      // a > 44: every weight but the centre's is below 1e-19 (dropped, like the early exit
      // below); q = 0 keeps the recurrence out of the denormal range (g_4 = q^16 would be
      // denormal for a > 44.25: each such multiply is a slow microcode assist).
      qlo[u] = _mm256_andnot_pd(_mm256_cmp_pd(alo, amax, _CMP_GT_OQ), exp_neg_pd(_mm256_sub_pd(zero, alo)));
      qhi[u] = _mm256_andnot_pd(_mm256_cmp_pd(ahi, amax, _CMP_GT_OQ), exp_neg_pd(_mm256_sub_pd(zero, ahi)));
    }
    __m256d q2lo[U], q2hi[U], glo[U], ghi[U], rlo[U], rhi[U], wlo[U], whi[U];
    __m256 acc0[U], acc1[U];
    for (int u = 0; u < U; ++u) {
      q2lo[u] = _mm256_mul_pd(qlo[u], qlo[u]);
      q2hi[u] = _mm256_mul_pd(qhi[u], qhi[u]);
      glo[u] = ghi[u] = _mm256_set1_pd(1.0);
      rlo[u] = qlo[u];
      rhi[u] = qhi[u];
      wlo[u] = whi[u] = zero;
      acc0[u] = vs[u][C];
      acc1[u] = _mm256_setzero_ps();
    }
    const __m256d tiny = _mm256_set1_pd(1e-20);
    auto step = [&](int d) {
      for (int u = 0; u < U; ++u) {
        glo[u] = _mm256_mul_pd(glo[u], rlo[u]);
        ghi[u] = _mm256_mul_pd(ghi[u], rhi[u]);
        rlo[u] = _mm256_mul_pd(rlo[u], q2lo[u]);
        rhi[u] = _mm256_mul_pd(rhi[u], q2hi[u]);
        wlo[u] = _mm256_add_pd(wlo[u], glo[u]);
        whi[u] = _mm256_add_pd(whi[u], ghi[u]);
        __m256 gf = _mm256_set_m128(_mm256_cvtpd_ps(ghi[u]), _mm256_cvtpd_ps(glo[u]));
        __m256 pair = _mm256_add_ps(vs[u][C - d], vs[u][C + d]);
        if (d & 1)
          acc1[u] = _mm256_fmadd_ps(gf, pair, acc1[u]);
        else
          acc0[u] = _mm256_fmadd_ps(gf, pair, acc0[u]);
      }
    };
    int d = 1;
    for (; d + 3 <= C; d += 4) {
      step(d), step(d + 1), step(d + 2), step(d + 3);
      // Lanes whose weight fell below 1e-20 are done: their g and r become 0 (the rest of
      // their weights is dropped), so no lane ever multiplies into the denormal range (a live
      // lane has a d^2 <= 46 here, so its next 4 weights stay above 1e-200).
      __m256d m = _mm256_set1_pd(-1.0);
      for (int u = 0; u < U; ++u) {
        const __m256d mlo = _mm256_cmp_pd(glo[u], tiny, _CMP_LT_OQ);
        const __m256d mhi = _mm256_cmp_pd(ghi[u], tiny, _CMP_LT_OQ);
        glo[u] = _mm256_andnot_pd(mlo, glo[u]), rlo[u] = _mm256_andnot_pd(mlo, rlo[u]);
        ghi[u] = _mm256_andnot_pd(mhi, ghi[u]), rhi[u] = _mm256_andnot_pd(mhi, rhi[u]);
        m = _mm256_and_pd(m, _mm256_and_pd(mlo, mhi));
      }
      if (_mm256_movemask_pd(m) == 0xF) {
        d = C + 1;
        break;
      }
    }
    for (; d <= C; ++d) step(d);
    const __m256d one = _mm256_set1_pd(1.0), two = _mm256_set1_pd(2.0);
    for (int u = 0; u < U; ++u) {
      __m256d dlo = _mm256_fmadd_pd(two, wlo[u], one), dhi = _mm256_fmadd_pd(two, whi[u], one);
      __m256 den = _mm256_set_m128(_mm256_cvtpd_ps(dhi), _mm256_cvtpd_ps(dlo));
      __m256 o = _mm256_div_ps(_mm256_add_ps(acc0[u], acc1[u]), den);
      __m256 nonpos = _mm256_cmp_ps(mu[u], _mm256_setzero_ps(), _CMP_LE_OQ);
      out[u] = _mm256_blendv_ps(o, _mm256_setzero_ps(), nonpos);
    }
  }

  static inline V finish(const V* v, int n) {
    const V* vs[1] = {v};
    V out;
    finish_u<1>(vs, n, &out);
    return out;
  }

  // finish() of U independent pixel blocks at once: their dependency chains (mean -> var ->
  // exp -> recurrence -> divide, ~200 cycles of latency) interleave, so the core overlaps them.
  // The window size n is known only at run time (k = 13..31).
  template <int U>
  static inline void finish_u(const V* const* vs, int n, V* out) {
    finish_n<U, 0>(vs, n, out);
  }
};
#endif

}  // namespace diffcam
