// Rank-weighted Gaussian filter, per-pixel core (docs/method.md 2.1, docs/kernels.md).  One
// window of n = K*K values is sorted ascending; the window mean and population standard
// deviation are accumulated in float64 (two passes over the register values), mu <= 0 gives 0,
// s == 0 gives the central order statistic, and otherwise the output is sum g_j v_j / sum g_j
// with g_j = exp(-(j-c)^2 / (2 sigma_r^2)), sigma_r = s / mu.  The weights are per pixel, but
// cost only one float64 exponential: with a = 1/(2 sigma_r^2), g_{d+1} = g_d * exp(-a(2d+1)) and
// the ratio itself advances by exp(-2a) = exp(-a)^2; the symmetry g_{c-d} = g_{c+d} halves the
// multiply-adds.  Underflow is benign (the weights simply become 0, g_c = 1 exactly).  For
// K = 3, 5, 7 the window lives in registers and is sorted by Batcher's odd-even merge network
// (the arbitrary-n formulation; all loop bounds are compile-time constants, so the network is
// straight-line fminf/fmaxf code); larger K (9..31) and K = 1 use a Shell sort of a local array.
#pragma once
#include <utility>

#include "common.cuh"

namespace diffcam_cuda {

__device__ __forceinline__ void ce(float& a, float& b) {
  const float lo = fminf(a, b), hi = fmaxf(a, b);
  a = lo;
  b = hi;
}

// Batcher's odd-even merge sort for arbitrary N, generated at compile time: the comparator
// list is a constexpr table, applied by a fold expression with constant indices, so the
// window array stays in registers.
template <int N>
struct BatcherNet {
  static constexpr int count() {
    int c = 0;
    for (int p = 1; p < N; p <<= 1)
      for (int k = p; k >= 1; k >>= 1)
        for (int j = k % p; j + k < N; j += 2 * k)
          for (int i = 0; i < k && i + j + k < N; ++i)
            if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) ++c;
    return c;
  }
  static constexpr int kCount = count() > 0 ? count() : 1;
  struct Table {
    int a[kCount];
    int b[kCount];
  };
  static constexpr Table table() {
    Table t{};
    int c = 0;
    for (int p = 1; p < N; p <<= 1)
      for (int k = p; k >= 1; k >>= 1)
        for (int j = k % p; j + k < N; j += 2 * k)
          for (int i = 0; i < k && i + j + k < N; ++i)
            if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) {
              t.a[c] = i + j;
              t.b[c] = i + j + k;
              ++c;
            }
    return t;
  }
  static constexpr Table kTable = table();
};

template <int A, int B, int N>
__device__ __forceinline__ void ce_at(float (&v)[N]) {
  ce(v[A], v[B]);
}

template <int N, size_t... I>
__device__ __forceinline__ void batcher_apply(float (&v)[N], std::index_sequence<I...>) {
  (ce_at<BatcherNet<N>::kTable.a[I], BatcherNet<N>::kTable.b[I]>(v), ...);
}

template <int N>
__device__ __forceinline__ void batcher_sort(float (&v)[N]) {
  if constexpr (N > 1) batcher_apply<N>(v, std::make_index_sequence<BatcherNet<N>::kCount>{});
}

template <int N>
__device__ __forceinline__ void shell_sort(float* v) {
  constexpr int gaps[8] = {701, 301, 132, 57, 23, 10, 4, 1};
  for (int g = 0; g < 8; ++g) {
    const int gap = gaps[g];
    if (gap >= N) continue;
    for (int i = gap; i < N; ++i) {
      const float t = v[i];
      int j = i;
      while (j >= gap && v[j - gap] > t) {
        v[j] = v[j - gap];
        j -= gap;
      }
      v[j] = t;
    }
  }
}

// The rank-weighted Gaussian average of a sorted window v[0..N).
template <int N, class V>
__device__ __forceinline__ float rank_weighted_sorted(const V& v) {
  constexpr int U = N <= 49 ? N : 1;  // full unroll only for register windows
  double sum = 0.0;
#pragma unroll U
  for (int j = 0; j < N; ++j) sum += (double)v[j];
  const double mu = sum / (double)N;
  if (mu <= 0.0) return 0.0f;
  double ss = 0.0;
#pragma unroll U
  for (int j = 0; j < N; ++j) {
    const double d = (double)v[j] - mu;
    ss += d * d;
  }
  const double s = sqrt(ss / (double)N);
  constexpr int c = (N - 1) / 2;
  if (s == 0.0) return v[c];
  const double sr = s / mu;
  const double a = 1.0 / (2.0 * sr * sr);
  const double e1 = exp(-a);
  const double e2 = e1 * e1;
  double g = 1.0, r = e1, wsum = 1.0, acc = (double)v[c];
#pragma unroll U
  for (int d = 1; d <= c; ++d) {
    g *= r;
    r *= e2;
    acc += g * ((double)v[c - d] + (double)v[c + d]);
    wsum += 2.0 * g;
  }
  return (float)(acc / wsum);
}

// One output pixel: `fetch(dy, dx)` returns the window value at offset (dy, dx) in [0, K)^2.
template <int K, class Fetch>
__device__ __forceinline__ float rank_gaussian_pixel(Fetch fetch) {
  constexpr int N = K * K;
  if constexpr (K >= 3 && K <= 7) {
    float v[N];
#pragma unroll
    for (int dy = 0; dy < K; ++dy)
#pragma unroll
      for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = fetch(dy, dx);
    batcher_sort<N>(v);
    return rank_weighted_sorted<N>(v);
  } else {
    float v[N];
    for (int dy = 0; dy < K; ++dy)
      for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = fetch(dy, dx);
    shell_sort<N>(v);
    return rank_weighted_sorted<N>(v);
  }
}

// Filters all maps of the batch whose kernel size equals K (others: early exit) into `out`.
// `ks` is the device int32 (N,) kernel-size vector.  Launched once per distinct candidate K.
std::string launch_rank_filter(const float* in, const int* ks, int n, int h, int w, float* out,
                               int kmin, int kmax, cudaStream_t stream);

}  // namespace diffcam_cuda
