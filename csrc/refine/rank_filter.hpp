// Rank-weighted Gaussian filter (AKD's L-filter), k x k window, reflect-101 border.
//
// Algorithm: the map is copied into a reflect-101 padded buffer (r = k/2 halo on every side
// plus L-1 spare zero columns, so the last vector of a row needs no masking): small maps as a
// whole, big maps band by band (16 output rows + 2r halo rows, padded by the worker that filters
// the band, so the copy runs in parallel and stays in L2).  Each output
// row is processed in vectors of L consecutive pixels (L = 8 with AVX2, 1 scalar): the k^2
// window values of the L pixels are L-wide unaligned loads at offsets (dy, dx), sorted
// per lane by a sorting network, then reduced by the policy's finish() (mean, std, per-pixel
// Gaussian rank weights, weighted sum; see simd_ops.hpp).  For k = 3..11 the network is a
// generated straight-line Batcher network (networks.hpp; 28..1388 compare-exchanges), for
// k = 13..31 the same Batcher construction runs from a comparator list over an L1-resident
// array of vectors (slower per comparator, but compile time stays small).  For k = 5..11 output
// rows go in pairs: SortNet2 sorts the (k-1) x k core shared by the windows of rows y and y+1
// once and merges each window's own row into it (k = 7: 278 instead of 394 compare-exchanges per
// pixel; k = 11: 1004 instead of 1388), and two blocks of L pixels (four windows) are finished
// together so their latency chains overlap; a block whose two windows are all +0.0 (the zero
// area of a ReLU'd map) skips the sort and outputs 0, as finish() would.  Cost:
// O(H W k^2 log^2(k^2) / L); rows are independent, so a big map is split over threads in
// dynamic bands of 16 rows (always starting at an even row, so the row pairs are the same for
// any thread count; the banding is the same for 1 thread) and results never depend on the split.  finish() is the compile-time-N
// finish_k of the policy for k = 3..11; k = 3 finishes its U = 4 blocks of L pixels in one
// call (with AVX2 that is the all-float32 finish9, see simd_ops.hpp).  (Sorting each 3-value
// column once per row and merging three sorted columns per window, 19 instead of 28
// compare-exchanges per L pixels, was tried for k = 3 and gained only 1-3 %: the k = 3 rows are
// not bound by the network, so it was left out.)
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#include "border.hpp"
#include "networks.hpp"

namespace diffcam {

// Batcher odd-even merge-sort comparators for n values (pruned from the next power of two).
inline void batcher_oddeven_merge(int lo, int hi, int r, int n, std::vector<std::pair<short, short>>& out) {
  int step = r * 2;
  if (step < hi - lo) {
    batcher_oddeven_merge(lo, hi, step, n, out);
    batcher_oddeven_merge(lo + r, hi, step, n, out);
    for (int i = lo + r; i < hi - r; i += step)
      if (i + r < n) out.emplace_back(static_cast<short>(i), static_cast<short>(i + r));
  } else if (lo + r < n) {
    out.emplace_back(static_cast<short>(lo), static_cast<short>(lo + r));
  }
}
inline void batcher_sort_range(int lo, int hi, int n, std::vector<std::pair<short, short>>& out) {
  if (hi - lo >= 1) {
    int mid = lo + (hi - lo) / 2;
    batcher_sort_range(lo, mid, n, out);
    batcher_sort_range(mid + 1, hi, n, out);
    batcher_oddeven_merge(lo, hi, 1, n, out);
  }
}
// Comparator list of the window of odd size k (1..31); built once, thread-safe.
inline const std::vector<std::pair<short, short>>& batcher_pairs(int k) {
  static const std::vector<std::vector<std::pair<short, short>>> nets = [] {
    std::vector<std::vector<std::pair<short, short>>> all(32);
    for (int kk = 1; kk <= 31; kk += 2) {
      int n = kk * kk, N = 1;
      while (N < n) N *= 2;
      batcher_sort_range(0, N - 1, n, all[kk]);
    }
    return all;
  }();
  return nets[k];
}

// Reflect-101 padded copy: (H + 2r) rows of `stride` floats; columns [W + 2r, stride) are 0.
inline int padded_stride(int W, int r, int L) { return W + 2 * r + L - 1; }
// Padded rows [ya, yb) (padded coordinates: padded row y is map row y - r, folded) into dst.
inline void pad_rows_reflect101(const float* in, int H, int W, int r, int L, int ya, int yb, float* dst0) {
  const int stride = padded_stride(W, r, L);
  for (int y = ya; y < yb; ++y) {
    const float* src = in + static_cast<size_t>(fold_reflect101(y - r, H)) * W;
    float* dst = dst0 + static_cast<size_t>(y - ya) * stride;
    for (int x = 0; x < r; ++x) dst[x] = src[fold_reflect101(x - r, W)];
    std::memcpy(dst + r, src, sizeof(float) * W);
    for (int x = r + W; x < W + 2 * r; ++x) dst[x] = src[fold_reflect101(x - r, W)];
    for (int x = W + 2 * r; x < stride; ++x) dst[x] = 0.0f;  // spare columns (discarded lanes)
  }
}
inline void pad_reflect101(const float* in, int H, int W, int r, int L, std::vector<float>& buf) {
  const int stride = padded_stride(W, r, L), Hp = H + 2 * r;
  if (buf.size() < static_cast<size_t>(Hp) * stride) buf.resize(static_cast<size_t>(Hp) * stride);
  pad_rows_reflect101(in, H, W, r, L, 0, Hp, buf.data());
}

// U blocks of L pixels per step (their finish() chains interleave; U = 4 for k = 3, where the
// network is short, 2 otherwise); the last blocks of a row one at a time.
template <class O, int K>
void rank_rows_fixed(const float* pad, int stride, float* out, int W, int y0, int y1) {
  using V = typename O::V;
  constexpr int N = K * K, L = O::L, U = K <= 3 ? 4 : 2;
  alignas(64) V vv[U][N];
  for (int y = y0; y < y1; ++y) {
    int x = 0;
    for (; x + (U - 1) * L < W; x += U * L) {
      const float* base = pad + static_cast<size_t>(y) * stride + x;
      const V* vs[U];
      for (int u = 0; u < U; ++u) {
        V* v = vv[u];
        for (int dy = 0; dy < K; ++dy)
          for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = O::load(base + dy * stride + dx + u * L);
        SortNet<N>::template run<O>(v);
        vs[u] = v;
      }
      V res[U];
      if constexpr (K == 3)
        O::template finish_k<N, U>(vs, res);  // the float32 finish: all U blocks interleaved
      else
        for (int u = 0; u < U; u += 2) O::template finish_k<N, 2>(vs + u, res + u);
      float* o = out + static_cast<size_t>(y) * W + x;
      for (int u = 0; u < U - 1; ++u) O::store(o + u * L, res[u]);
      if (x + U * L <= W) {
        O::store(o + (U - 1) * L, res[U - 1]);
      } else {
        alignas(64) float tmp[L];
        O::store(tmp, res[U - 1]);
        for (int i = 0; i < W - x - (U - 1) * L; ++i) o[(U - 1) * L + i] = tmp[i];
      }
    }
    for (; x < W; x += L) {
      V* va = vv[0];
      const float* base = pad + static_cast<size_t>(y) * stride + x;
      for (int dy = 0; dy < K; ++dy)
        for (int dx = 0; dx < K; ++dx) va[dy * K + dx] = O::load(base + dy * stride + dx);
      SortNet<N>::template run<O>(va);
      const V* vs1[1] = {va};
      V res;
      O::template finish_k<N, 1>(vs1, &res);
      float* o = out + static_cast<size_t>(y) * W + x;
      if (x + L <= W) {
        O::store(o, res);
      } else {
        alignas(64) float tmp[L];
        O::store(tmp, res);
        for (int i = 0; i < W - x; ++i) o[i] = tmp[i];
      }
    }
  }
}

// Output rows in pairs (y, y + 1): SortNet2 sorts the shared (K-1) x K core of the two windows
// once (~30% fewer compare-exchanges per pixel than two full sorts at K = 7..11); both sorted
// windows of one block of L pixels are finished together.  An odd last row takes the
// single-window path.  Each window's sorted values are the same as with a full sort, so the
// result does not depend on how rows are paired (thread splits included).
template <class O, int K>
void rank_rows_pair(const float* pad, int stride, float* out, int W, int y0, int y1) {
  using V = typename O::V;
  constexpr int N = K * K, L = O::L, B = 2;  // B blocks of L pixels per step: 2B windows
  alignas(64) V v[(K + 1) * K];
  alignas(64) V w[2 * B][N];
  for (int j = 0; j < 2 * B; ++j)
    for (int i = 0; i < N; ++i) w[j][i] = O::zero();
  int y = y0;
  for (; y + 1 < y1; y += 2) {
    for (int x = 0; x < W; x += B * L) {
      const int nb = std::min(B, (W - x + L - 1) / L);
      bool zero[B];
      int nz = 0;
      for (int j = 0; j < nb; ++j) {
        const float* base = pad + static_cast<size_t>(y) * stride + x + j * L;
        // Both windows all +0.0 (the zero area of a ReLU'd map; bit test, so NaN never
        // matches): mean 0, the output is 0 as in finish(); skip the sort.  Tested on the
        // padded rows directly (first a cheap probe of 3 vectors), so the loads and the
        // network below stay as they were.
        // (k >= 7 only: at k = 5 the short network left no gain and the test cost ~8 % on maps
        // without zero areas.)
        if constexpr (K >= 7) zero[j] = O::all_pos_zero_rows(base, stride, K + 1, K);
        else zero[j] = false;
        if (zero[j]) {
          ++nz;
          continue;
        }
        for (int dy = 0; dy <= K; ++dy)
          for (int dx = 0; dx < K; ++dx) v[dy * K + dx] = O::load(base + dy * stride + dx);
        SortNet2<K>::template run<O>(v, w[2 * j], w[2 * j + 1]);
      }
      for (int j = nb; j < B; ++j) {
        zero[j] = true;
        ++nz;
      }
      V res[2 * B];
      if (nz < B) {
        const V* vs[2 * B];
        for (int i = 0; i < 2 * B; ++i) vs[i] = w[i];
        O::template finish_k<N, 2>(vs, res);
        O::template finish_k<N, 2>(vs + 2, res + 2);
      }
      for (int j = 0; j < B; ++j)
        if (zero[j]) res[2 * j] = res[2 * j + 1] = O::zero();
      for (int j = 0; j < nb; ++j)
        for (int u = 0; u < 2; ++u) {
          float* o = out + static_cast<size_t>(y + u) * W + x + j * L;
          const int xl = x + j * L;
          if (xl + L <= W) {
            O::store(o, res[2 * j + u]);
          } else {
            alignas(64) float tmp[L];
            O::store(tmp, res[2 * j + u]);
            for (int i = 0; i < W - xl; ++i) o[i] = tmp[i];
          }
        }
    }
  }
  if (y < y1) rank_rows_fixed<O, K>(pad, stride, out, W, y, y1);
}

template <class O>
void rank_rows_generic(const float* pad, int stride, float* out, int W, int k, int y0, int y1) {
  using V = typename O::V;
  constexpr int L = O::L;
  const int n = k * k;
  const auto& net = batcher_pairs(k);
  alignas(64) V v[31 * 31];  // <= 30 KiB with AVX2: L1-resident
  for (int y = y0; y < y1; ++y) {
    for (int x = 0; x < W; x += L) {
      const float* base = pad + static_cast<size_t>(y) * stride + x;
      for (int dy = 0; dy < k; ++dy)
        for (int dx = 0; dx < k; ++dx) v[dy * k + dx] = O::load(base + dy * stride + dx);
      for (const auto& pr : net) O::ce(v[pr.first], v[pr.second]);
      V res = O::finish(v, n);
      float* o = out + static_cast<size_t>(y) * W + x;
      if (x + L <= W) {
        O::store(o, res);
      } else {
        alignas(64) float tmp[L];
        O::store(tmp, res);
        for (int i = 0; i < W - x; ++i) o[i] = tmp[i];
      }
    }
  }
}

// Rows [y0, y1) of the filtered map from the padded buffer built with this policy's L.
template <class O>
void rank_rows(const float* pad, int stride, float* out, int W, int k, int y0, int y1) {
  switch (k) {
    case 1:
      for (int y = y0; y < y1; ++y)
        for (int x = 0; x < W; ++x) out[static_cast<size_t>(y) * W + x] =
            std::max(0.0f, pad[static_cast<size_t>(y) * stride + x]) > 0.0f ? pad[static_cast<size_t>(y) * stride + x] : 0.0f;
      break;
    case 3: rank_rows_fixed<O, 3>(pad, stride, out, W, y0, y1); break;
    case 5: rank_rows_pair<O, 5>(pad, stride, out, W, y0, y1); break;
    case 7: rank_rows_pair<O, 7>(pad, stride, out, W, y0, y1); break;
    case 9: rank_rows_pair<O, 9>(pad, stride, out, W, y0, y1); break;
    case 11: rank_rows_pair<O, 11>(pad, stride, out, W, y0, y1); break;
    default: rank_rows_generic<O>(pad, stride, out, W, k, y0, y1); break;
  }
}

// ---- runtime dispatch (simd_avx2.cpp / simd_scalar.cpp)
using RankRowsFn = void (*)(const float* pad, int stride, float* out, int W, int k, int y0, int y1);
void rank_rows_scalar(const float* pad, int stride, float* out, int W, int k, int y0, int y1);
void rank_rows_avx2(const float* pad, int stride, float* out, int W, int k, int y0, int y1);
bool have_avx2_build();  // the AVX2 TU was compiled with AVX2 support

struct RankDispatch {
  RankRowsFn fn;
  int lanes;
  const char* name;
};
inline const RankDispatch& rank_dispatch() {
  static const RankDispatch d = [] {
#if defined(__x86_64__) || defined(__i386__)
    if (have_avx2_build() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return RankDispatch{&rank_rows_avx2, 8, "avx2"};
#endif
    return RankDispatch{&rank_rows_scalar, 1, "scalar"};
  }();
  return d;
}

// Filter one H x W map with odd k (1..31).  `threads` > 1 splits rows (only worth it for big maps).
template <class ParFor>
void rank_filter_map(const float* in, float* out, int H, int W, int k, std::vector<float>& padbuf,
                     int threads, ParFor&& par) {
  const RankDispatch& d = rank_dispatch();
  const int r = k / 2;
  const int stride = padded_stride(W, r, d.lanes);
  const bool big = static_cast<long>(H) * W * k * k >= (1L << 18);
  if (!big || H < 64) {
    pad_reflect101(in, H, W, r, d.lanes, padbuf);
    d.fn(padbuf.data(), stride, out, W, k, 0, H);
    return;
  }
  // Big maps: rows in bands of kRows output rows; each worker pads the kRows + 2r input rows of
  // its band into its own small (L2-resident) buffer, so the padding runs in parallel and no
  // map-sized buffer is touched.  Workers take the next band from a shared counter (a core
  // slowed by other work does less).  Bands start at even rows, so the row pairs of
  // rank_rows_pair (and every output value) are the same for any thread count.
  constexpr int kRows = 16;
  std::atomic<int> next{0};
  auto work = [&] {
    std::vector<float> band(static_cast<size_t>(kRows + 2 * r) * stride);
    for (;;) {
      const int y0 = kRows * next.fetch_add(1, std::memory_order_relaxed);
      if (y0 >= H) break;
      const int y1 = std::min(H, y0 + kRows);
      pad_rows_reflect101(in, H, W, r, d.lanes, y0, y1 + 2 * r, band.data());
      d.fn(band.data(), stride, out + static_cast<size_t>(y0) * W, W, k, 0, y1 - y0);
    }
  };
  if (threads <= 1) {
    work();
  } else {
    par(static_cast<long>(threads), threads, [&](long, long, int) { work(); });
  }
}

}  // namespace diffcam
