// Batched localization metrics (docs/kernels.md): Otsu threshold of uint8 maps, half-pixel
// bilinear resize and the Obj-IoU / contrast / concentration triple.  Otsu and localization run
// one block per map: the 256-bin histogram is built with shared-memory atomics (integer counts,
// so the result does not depend on the order), then one thread runs OpenCV's float64 threshold
// loop in exactly the reference's order of operations, which makes it bit-exact.  The resize is
// a flat elementwise kernel over every output pixel of the batch, with the taps computed in
// float64 as the reference does.  Localization never materialises the resized map: each pass
// recomputes r(y, x) from the four source taps (float64), converts it to uint8 in float32
// arithmetic, and accumulates the per-class intersections/unions and the foreground sums with
// float64 block reductions.
#include "common.cuh"

namespace diffcam_cuda {

__device__ __forceinline__ void taps1(int d, int n_out, int n_in, int& a, int& b, double& t) {
  const double s = ((double)d + 0.5) * ((double)n_in / (double)n_out) - 0.5;
  const double i0 = floor(s);
  t = s - i0;
  const int i = (int)i0;
  a = min(max(i, 0), n_in - 1);
  b = min(max(i + 1, 0), n_in - 1);
}

__device__ __forceinline__ double bilinear_at(const float* m, int h, int w, int oh, int ow,
                                              int y, int x) {
  int y0, y1, x0, x1;
  double fy, fx;
  taps1(y, oh, h, y0, y1, fy);
  taps1(x, ow, w, x0, x1, fx);
  const double top = (double)m[y0 * w + x0] * (1 - fx) + (double)m[y0 * w + x1] * fx;
  const double bot = (double)m[y1 * w + x0] * (1 - fx) + (double)m[y1 * w + x1] * fx;
  return top * (1 - fy) + bot * fy;
}

__device__ __forceinline__ unsigned to_u8(double r) {
  float v = (float)r * 255.0f;
  v = fminf(fmaxf(v, 0.0f), 255.0f);
  return (unsigned)floorf(v);
}

// Thread 0 only: OpenCV's Otsu on a 256-bin histogram of `total` pixels.
__device__ int otsu_from_hist(const unsigned* hist, int total) {
  const double scale = 1.0 / (double)total;
  double mu = 0.0;
  for (int i = 0; i < 256; ++i) mu += (double)i * (double)hist[i];
  mu *= scale;
  const double flt_eps = 1.1920928955078125e-07;
  double q1 = 0.0, mu1 = 0.0, best_sigma = 0.0;
  int best_t = 0;
  for (int i = 0; i < 256; ++i) {
    const double p_i = (double)hist[i] * scale;
    mu1 *= q1;
    q1 += p_i;
    const double q2 = 1.0 - q1;
    if (fmin(q1, q2) < flt_eps || fmax(q1, q2) > 1.0 - flt_eps) continue;
    mu1 = (mu1 + (double)i * p_i) / q1;
    const double mu2 = (mu - q1 * mu1) / q2;
    const double sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
    if (sigma > best_sigma) {
      best_sigma = sigma;
      best_t = i;
    }
  }
  return best_t;
}

__global__ void otsu_kernel(const uint8_t* __restrict__ imgs, int npx, int* __restrict__ out) {
  __shared__ unsigned hist[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const uint8_t* img = imgs + (size_t)blockIdx.x * npx;
  for (int i = threadIdx.x; i < npx; i += blockDim.x) atomicAdd(&hist[img[i]], 1u);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = otsu_from_hist(hist, npx);
}

__global__ void resize_kernel(const float* __restrict__ maps, int n, int h, int w, int oh, int ow,
                              float* __restrict__ out) {
  const long long total = (long long)n * oh * ow;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int map = (int)(i / ((long long)oh * ow));
    const int rem = (int)(i - (long long)map * oh * ow);
    const int y = rem / ow, x = rem - y * ow;
    out[i] = (float)bilinear_at(maps + (size_t)map * h * w, h, w, oh, ow, y, x);
  }
}

__global__ void localization_kernel(const float* __restrict__ maps, int h, int w,
                                    const uint8_t* __restrict__ masks, int C, int hm, int wm,
                                    double* __restrict__ out) {
  __shared__ unsigned hist[256];
  __shared__ double red[32];
  __shared__ int t_sh;
  const int npx = hm * wm;
  const float* m = maps + (size_t)blockIdx.x * h * w;
  const uint8_t* mk = masks + (size_t)blockIdx.x * C * npx;
  const bool same = (h == hm && w == wm);
  auto r_at = [&](int i) -> double {
    if (same) return (double)m[i];
    const int y = i / wm, x = i - y * wm;
    return bilinear_at(m, h, w, hm, wm, y, x);
  };
  for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < npx; i += blockDim.x) atomicAdd(&hist[to_u8(r_at(i))], 1u);
  __syncthreads();
  if (threadIdx.x == 0) t_sh = otsu_from_hist(hist, npx);
  __syncthreads();
  const unsigned t = (unsigned)t_sh;
  double sfg = 0.0, nfg = 0.0, sbg = 0.0, nbg = 0.0;
  for (int i = threadIdx.x; i < npx; i += blockDim.x) {
    const double r = r_at(i);
    bool fg = false;
    for (int c = 0; c < C && !fg; ++c) fg = mk[(size_t)c * npx + i] != 0;
    if (fg) { sfg += r; nfg += 1.0; } else { sbg += r; nbg += 1.0; }
  }
  sfg = block_sum(sfg, red);
  nfg = block_sum(nfg, red);
  sbg = block_sum(sbg, red);
  nbg = block_sum(nbg, red);
  double iou = 0.0;
  for (int c = 0; c < C; ++c) {
    double inter = 0.0, uni = 0.0;
    const uint8_t* g = mk + (size_t)c * npx;
    for (int i = threadIdx.x; i < npx; i += blockDim.x) {
      const bool pred = to_u8(r_at(i)) > t;
      const bool gg = g[i] != 0;
      inter += (pred && gg) ? 1.0 : 0.0;
      uni += (pred || gg) ? 1.0 : 0.0;
    }
    inter = block_sum(inter, red);
    uni = block_sum(uni, red);
    if (uni > 0.0) iou = fmax(iou, inter / uni);
  }
  if (threadIdx.x == 0) {
    const double mean_fg = nfg > 0.0 ? sfg / nfg : 0.0;
    const double mean_bg = nbg > 0.0 ? sbg / nbg : 0.0;
    double* o = out + (size_t)blockIdx.x * 3;
    o[0] = iou;
    o[1] = mean_fg / (mean_bg + 1e-8);
    o[2] = sfg / ((sfg + sbg) + 1e-8);
  }
}

static int small_threads(int npx) { return npx <= 1024 ? 128 : (npx <= 16384 ? 256 : 1024); }

std::string otsu_threshold_u8(uintptr_t imgs, int n, int h, int w, uintptr_t out,
                              uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  if (n <= 0) return std::string();
  DC_LAUNCH(otsu_kernel, n, small_threads(h * w), 0, reinterpret_cast<cudaStream_t>(stream))(
      reinterpret_cast<const uint8_t*>(imgs), h * w, reinterpret_cast<int*>(out));
  return check_launch("otsu_threshold_u8");
}

std::string resize_bilinear(uintptr_t maps, int n, int h, int w, int out_h, int out_w,
                            uintptr_t out, uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  const long long total = (long long)n * out_h * out_w;
  if (total <= 0) return std::string();
  long long blocks = (total + 255) / 256;
  if (blocks > (1LL << 20)) blocks = 1LL << 20;
  DC_LAUNCH(resize_kernel, (unsigned)blocks, 256, 0, reinterpret_cast<cudaStream_t>(stream))(
      reinterpret_cast<const float*>(maps), n, h, w, out_h, out_w, reinterpret_cast<float*>(out));
  return check_launch("resize_bilinear");
}

std::string localization(uintptr_t maps, int n, int h, int w, uintptr_t masks, int c, int hm,
                         int wm, uintptr_t out, uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  if (n <= 0) return std::string();
  DC_LAUNCH(localization_kernel, n, small_threads(hm * wm), 0, reinterpret_cast<cudaStream_t>(stream))(
      reinterpret_cast<const float*>(maps), h, w, reinterpret_cast<const uint8_t*>(masks), c, hm,
      wm, reinterpret_cast<double*>(out));
  return check_launch("localization");
}

}  // namespace diffcam_cuda
