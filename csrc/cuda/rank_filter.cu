// Batched rank-weighted Gaussian filter.  One launch per candidate kernel size K (a fixed, small
// number: the odd sizes in [kmin, kmax], never one per map); the grid is one-dimensional over
// (map, tile) pairs so any batch size fits, and a block whose map has another kernel size exits
// at once.  A block of 32x8 threads owns a 32x16 output tile: it first loads the
// (16+K-1) x (32+K-1) halo tile into shared memory, applying the reflect-101 index mapping at
// load time (so maps smaller than the kernel and 1-pixel maps need no special case), then every
// thread computes two vertically adjacent outputs with the per-pixel core of rank_filter.cuh
// (register sorting network for K <= 7, local-memory Shell sort above).
#include "rank_filter.cuh"

namespace diffcam_cuda {

constexpr int kTileW = 32, kTileH = 16, kThreadsY = 8;

template <int K>
__global__ void __launch_bounds__(256) rank_filter_kernel(const float* __restrict__ in,
                                                          const int* __restrict__ ks, int H, int W,
                                                          int tiles_x, int tiles_per_map,
                                                          float* __restrict__ out) {
  constexpr int R = K / 2;
  constexpr int TW = kTileW + K - 1, TH = kTileH + K - 1;
  __shared__ float tile[TH * TW];
  const long long b = blockIdx.x;
  const int map = (int)(b / tiles_per_map);
  const int t = (int)(b % tiles_per_map);
  if (ks[map] != K) return;
  const int y0 = (t / tiles_x) * kTileH, x0 = (t % tiles_x) * kTileW;
  const float* src = in + (size_t)map * H * W;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  for (int i = tid; i < TH * TW; i += kTileW * kThreadsY) {
    const int r = i / TW, c = i - r * TW;
    const int gy = fold101(y0 - R + r, H), gx = fold101(x0 - R + c, W);
    tile[i] = src[(size_t)gy * W + gx];
  }
  __syncthreads();
  float* dst = out + (size_t)map * H * W;
  const int lx = threadIdx.x, x = x0 + lx;
  if (x >= W) return;
#pragma unroll 1
  for (int rr = 0; rr < kTileH / kThreadsY; ++rr) {
    const int ly = threadIdx.y + rr * kThreadsY, y = y0 + ly;
    if (y >= H) break;
    const float* base = tile + ly * TW + lx;
    dst[(size_t)y * W + x] =
        rank_gaussian_pixel<K>([base](int dy, int dx) { return base[dy * TW + dx]; });
  }
}

template <int K>
static void launch_one(const float* in, const int* ks, int n, int h, int w, float* out,
                       cudaStream_t stream) {
  const int tiles_x = (w + kTileW - 1) / kTileW, tiles_y = (h + kTileH - 1) / kTileH;
  const int tpm = tiles_x * tiles_y;
  const long long blocks = (long long)tpm * n;
  DC_LAUNCH(rank_filter_kernel<K>, (unsigned)blocks, dim3(kTileW, kThreadsY), 0, stream)(
      in, ks, h, w, tiles_x, tpm, out);
}

std::string launch_rank_filter(const float* in, const int* ks, int n, int h, int w, float* out,
                               int kmin, int kmax, cudaStream_t stream) {
  if (n <= 0 || h <= 0 || w <= 0) return std::string();
#define DC_K(KK) \
  if (KK >= kmin && KK <= kmax) launch_one<KK>(in, ks, n, h, w, out, stream);
  DC_K(1) DC_K(3) DC_K(5) DC_K(7) DC_K(9) DC_K(11) DC_K(13) DC_K(15) DC_K(17) DC_K(19)
  DC_K(21) DC_K(23) DC_K(25) DC_K(27) DC_K(29) DC_K(31)
#undef DC_K
  return check_launch("rank_gaussian_filter");
}

std::string rank_gaussian_filter(uintptr_t maps, uintptr_t ksizes, int n, int h, int w,
                                 uintptr_t out, int kmin, int kmax, uintptr_t stream,
                                 int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  return launch_rank_filter(reinterpret_cast<const float*>(maps),
                            reinterpret_cast<const int*>(ksizes), n, h, w,
                            reinterpret_cast<float*>(out), kmin, kmax,
                            reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace diffcam_cuda
