// Shared device helpers of the diffcam CUDA kernels.  The parameter vector travels to every
// kernel by value (struct Params, 42 doubles, well under the 4 KiB argument limit), so no
// device copy of the configuration is ever made.  Block-wide reductions run in float64: each
// warp reduces with shuffles, the per-warp partials go to shared memory and every thread then
// adds the (at most 32) partials in the same fixed order, which makes the result deterministic
// and broadcast without a further barrier.  Percentiles follow NumPy's 'linear' method on a
// sorted sequence: small maps are sorted in shared memory by a block-wide bitonic network
// (padded with +inf to a power of two, strictly positive values therefore form the tail), large
// maps use a block-wide radix select (four 8-bit passes over order-preserving uint32 keys, with
// a shared-memory histogram) that finds the element of a given rank without any sort buffer.
// Border handling is reflect-101 at any distance (fold with period 2n-2).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cmath>
#include <string>

#include "api.hpp"

// Kernel launches and dynamic shared memory go through these two macros so that the same
// sources also compile for the CPU emulation of csrc/cuda/emu/cuda_runtime.h (which defines
// them itself).
#ifndef DIFFCAM_CUDA_EMU_HEADER
#define DC_LAUNCH(kern, grid, block, smem, stream) kern<<<grid, block, smem, stream>>>
#define DC_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace diffcam_cuda {

// Positions in the parameter vector (PARAM_FIELDS of diffcam/refine/config.py).
enum ParamIndex : int {
  P_AKD = 0, P_K_BASE, P_K_MAX, P_STEPS, P_STEP_DIV, P_STEP_CAP, P_STD_FACTOR, P_STD_CAP,
  P_SIZE_DIV, P_SIZE_CAP, P_KERNEL_SIZE,
  P_DACG = 11, P_VAR_THRESHOLD, P_HIGH_MEAN, P_LOW_MEAN, P_PCT_HIGH_VAR, P_PCT_HIGH_MEAN,
  P_PCT_LOW_MEAN, P_PCT_DEFAULT, P_TAU_FLOOR, P_BLUR_SIGMA, P_RESERVED21,
  P_CBA = 22, P_BG_W_MEDIAN, P_BG_W_PCT, P_BG_W_MEAN, P_BG_W_MAX, P_BG_PERCENTILE, P_GAMMA,
  P_TAU_BG_FLOOR,
  P_SICD = 30, P_W_REP, P_W_OUT, P_OUTLIER_SIGMAS, P_LAMBDA_MIN, P_LAMBDA_MAX, P_GATE,
  P_GATE_STD, P_GATE_SKEW, P_RANGE_GUARD,
  P_NORM_EPS = 40, P_FINAL_NORMALIZE = 41
};

struct Params {
  double p[kNumParams];
};

inline Params make_params(const double* src) {
  Params P;
  for (int i = 0; i < kNumParams; ++i) P.p[i] = src[i];
  return P;
}

// RAII: make `device` current for the duration of a host call, restore the previous one.
struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

inline std::string cuda_error_text(cudaError_t e, const char* where) {
  if (e == cudaSuccess) return std::string();
  return std::string(where) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e);
}

inline std::string check_launch(const char* where) {
  return cuda_error_text(cudaGetLastError(), where);
}

__host__ __device__ __forceinline__ int fold101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

// ------------------------------------------------------------------ block reductions
struct OpSum { __device__ static double apply(double a, double b) { return a + b; } };
struct OpMax { __device__ static double apply(double a, double b) { return fmax(a, b); } };
struct OpMin { __device__ static double apply(double a, double b) { return fmin(a, b); } };

// `red` is a __shared__ double[32]; blockDim.x is a multiple of 32.  All threads get the result.
template <class Op>
__device__ __forceinline__ double block_reduce(double v, double* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int nw = blockDim.x >> 5;
  __syncthreads();  // earlier readers of `red` are done
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double r = red[0];
  for (int w = 1; w < nw; ++w) r = Op::apply(r, red[w]);
  return r;
}

__device__ __forceinline__ double block_sum(double v, double* red) {
  return block_reduce<OpSum>(v, red);
}
__device__ __forceinline__ double block_max(double v, double* red) {
  return block_reduce<OpMax>(v, red);
}
__device__ __forceinline__ double block_min(double v, double* red) {
  return block_reduce<OpMin>(v, red);
}

// ------------------------------------------------------------------ percentiles
// NumPy's linear percentile of a sorted sequence of m >= 1 values given by `at(i)`.
template <class At>
__device__ __forceinline__ double percentile_sorted(At at, int m, double q) {
  const double h = (double)(m - 1) * (q / 100.0);
  double fl = floor(h);
  if (fl < 0.0) fl = 0.0;
  int lo = (int)fl;
  if (lo >= m - 1) return (double)at(m - 1);
  const double t = h - fl;
  const double a = (double)at(lo), b = (double)at(lo + 1);
  const double d = b - a;
  return t < 0.5 ? a + d * t : b - d * (1.0 - t);
}

// Block-wide ascending bitonic sort of S[0..P) (P a power of two), in shared memory.
__device__ __forceinline__ void block_bitonic_sort(float* S, int P) {
  __syncthreads();
  const int half = P >> 1;
  for (int k = 2; k <= P; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < half; t += blockDim.x) {
        const int i = 2 * t - (t & (j - 1));
        const int ixj = i + j;
        const float a = S[i], b = S[ixj];
        const bool up = (i & k) == 0;
        if ((a > b) == up) { S[i] = b; S[ixj] = a; }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  return __uint_as_float(u);
}

// The element of rank `kth` (0-based, ascending) among the values of data[0..n) that satisfy
// (positive_only ? v > 0 : true).  `hist` is __shared__ unsigned[256], `sh` __shared__ unsigned[2].
// Must be called by the whole block; data must be visible to the block (synchronised).
__device__ __forceinline__ float block_radix_select(const float* data, int n, bool positive_only,
                                    unsigned kth, unsigned* hist, unsigned* sh) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = data[i];
      if (positive_only && !(v > 0.0f)) continue;
      const uint32_t key = float_key(v);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned acc = 0, digit = 255;
      for (unsigned b = 0; b < 256; ++b) {
        if (acc + hist[b] > kth) { digit = b; break; }
        acc += hist[b];
      }
      sh[0] = digit;
      sh[1] = kth - acc;
    }
    __syncthreads();
    prefix |= sh[0] << shift;
    mask |= 255u << shift;
    kth = sh[1];
    __syncthreads();
  }
  return key_float(prefix);
}

}  // namespace diffcam_cuda
