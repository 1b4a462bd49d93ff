// Batched refinement pipeline (docs/method.md 2, docs/kernels.md): AKD kernel sizes, DACG, CBA,
// clip + min-max normalisation and SICD.  The batch goes through a fixed number of launches:
// (1) `akd_kernel`, one block per map, computes the raw maximum and the float64 mean/std of the
// map and from them the AKD kernel size; (2) the rank filter (rank_filter.cu, one launch per
// candidate kernel size, blocks of other sizes exit at once); (3) `stage_kernel`, one block per
// map, runs every remaining module of that map.  For maps that fit (2n + pow2(n) floats of
// dynamic shared memory, e.g. up to 64x64 in 48 KiB and 128x128 with the opt-in limit of
// sm_80/sm_90) the stage kernel copies the map into shared memory, works there (reductions in
// float64, percentiles from a block-wide bitonic sort: positive values form the sorted tail, so
// the percentile of the positive pixels needs no compaction) and writes the result once.
// Larger maps use the same code on global memory, with percentiles from a block-wide radix
// select; the block loops over the map, which is slower per map but keeps one launch per stage.

#include "common.cuh"
#include "rank_filter.cuh"

namespace diffcam_cuda {

enum StageFlags : int { ST_DACG = 1, ST_CBA = 2, ST_NORM = 4, ST_SICD = 8 };

__device__ __forceinline__ int akd_kernel_size(const Params& P, double sd, int H) {
  const double* p = P.p;
  if (p[P_KERNEL_SIZE] > 0) return (int)p[P_KERNEL_SIZE];
  const double f_step = fmin(p[P_STEPS] / p[P_STEP_DIV], p[P_STEP_CAP]);
  const double f_std = fmin(p[P_STD_FACTOR] * sd, p[P_STD_CAP]);
  const double f_size = fmin((double)H / p[P_SIZE_DIV], p[P_SIZE_CAP]);
  const double x = p[P_K_BASE] * f_step * f_std * f_size;
  const int kmax = (int)p[P_K_MAX];
  if (!(x < 1e6)) return kmax;
  int k = (int)x;
  if (k % 2 == 0) k += 1;
  if (k < 3) k = 3;
  if (k > kmax) k = kmax;
  return k;
}

// One block per map: raw max (optional) and the AKD kernel size.
__global__ void akd_kernel(const float* __restrict__ maps, int H, int W, Params P,
                           int* __restrict__ k_out, double* __restrict__ max_out) {
  __shared__ double red[32];
  const int n = H * W;
  const float* m = maps + (size_t)blockIdx.x * n;
  double s = 0.0, mx = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const double v = m[i];
    s += v;
    mx = fmax(mx, v);
  }
  if (max_out) {
    mx = block_max(mx, red);
    if (threadIdx.x == 0) max_out[blockIdx.x] = mx;
  }
  if (P.p[P_KERNEL_SIZE] > 0) {
    if (threadIdx.x == 0) k_out[blockIdx.x] = (int)P.p[P_KERNEL_SIZE];
    return;
  }
  const double mu = block_sum(s, red) / n;
  double ss = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = (double)m[i] - mu;
    ss += d * d;
  }
  const double sd = sqrt(block_sum(ss, red) / n);
  if (threadIdx.x == 0) k_out[blockIdx.x] = akd_kernel_size(P, sd, H);
}

// Percentile source: sorted shared-memory copy (SMEM) or radix select on the live buffer.
template <bool SMEM>
struct Ranker {
  float* S;          // SMEM: sorted buffer of pow2 size (n valid values, then +inf)
  const float* cur;  // !SMEM: the data
  int n;
  unsigned* hist;
  unsigned* sh;
  __device__ void prepare(const float* data) {
    if constexpr (SMEM) {
      int P2 = 1;
      while (P2 < n) P2 <<= 1;
      for (int i = threadIdx.x; i < P2; i += blockDim.x) S[i] = i < n ? data[i] : INFINITY;
      block_bitonic_sort(S, P2);
    } else {
      cur = data;
    }
  }
  // Element of rank r among all values (npos < 0) or among the npos positive values.
  __device__ float at(int r, int npos) {
    if constexpr (SMEM) {
      return npos < 0 ? S[r] : S[n - npos + r];
    } else {
      return block_radix_select(cur, n, npos >= 0, (unsigned)r, hist, sh);
    }
  }
  __device__ double percentile(int npos, double q) {
    const int m = npos < 0 ? n : npos;
    return percentile_sorted([&](int r) { return at(r, npos); }, m, q);
  }
};

template <bool SMEM>
__global__ void __launch_bounds__(1024) stage_kernel(
    const float* __restrict__ src, float* dst, const float* __restrict__ rep,
    const double* __restrict__ rep_const, const double* __restrict__ raw_max_in, Params P, int H,
    int W, int flags, int* __restrict__ branch_out, double* __restrict__ tau_out,
    double* __restrict__ taubg_out, double* __restrict__ lam_out,
    uint8_t* __restrict__ applied_out) {
  DC_DYNAMIC_SMEM(float, smem);
  __shared__ double red[32];
  __shared__ unsigned hist[256];
  __shared__ unsigned sh[2];
  const double* p = P.p;
  const int n = H * W;
  const int map = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const float* X = src + (size_t)map * n;
  float* out = dst + (size_t)map * n;
  float* Y;
  Ranker<SMEM> rk{nullptr, nullptr, n, hist, sh};
  if constexpr (SMEM) {
    float* A = smem;
    Y = smem + n;
    rk.S = smem + 2 * n;
    for (int i = tid; i < n; i += nt) A[i] = X[i];
    X = A;
    __syncthreads();
  } else {
    Y = out;
  }

  double raw_max = 0.0;
  if (flags & ST_NORM) {
    if (raw_max_in) {
      raw_max = raw_max_in[map];
    } else {
      double mx = -INFINITY;
      for (int i = tid; i < n; i += nt) mx = fmax(mx, (double)X[i]);
      raw_max = block_max(mx, red);
    }
  }

  // ---------------------------------------------------------------- DACG
  if (flags & ST_DACG) {
    double s = 0.0, cnt = 0.0;
    for (int i = tid; i < n; i += nt) {
      const float v = X[i];
      s += v;
      cnt += v > 0.0f ? 1.0 : 0.0;
    }
    const double mu = block_sum(s, red) / n;
    const int npos = (int)block_sum(cnt, red);
    double ss = 0.0;
    for (int i = tid; i < n; i += nt) {
      const double d = (double)X[i] - mu;
      ss += d * d;
    }
    const double sd = sqrt(block_sum(ss, red) / n);
    int branch;
    double alpha;
    if (sd > p[P_VAR_THRESHOLD]) { branch = 0; alpha = p[P_PCT_HIGH_VAR]; }
    else if (mu > p[P_HIGH_MEAN]) { branch = 1; alpha = p[P_PCT_HIGH_MEAN]; }
    else if (mu < p[P_LOW_MEAN]) { branch = 2; alpha = p[P_PCT_LOW_MEAN]; }
    else { branch = 3; alpha = p[P_PCT_DEFAULT]; }
    double tau = p[P_TAU_FLOOR];
    if (npos > 0) {
      rk.prepare(X);
      tau = fmax(rk.percentile(npos, alpha), p[P_TAU_FLOOR]);
    }
    if (tid == 0) {
      if (branch_out) branch_out[map] = branch;
      if (tau_out) tau_out[map] = tau;
    }
    if (p[P_DACG] != 0.0) {
      const double sig = p[P_BLUR_SIGMA];
      const double e = exp(-1.0 / (2.0 * sig * sig));
      const double gs = e + 1.0 + e;
      const double g[3] = {e / gs, 1.0 / gs, e / gs};
      for (int i = tid; i < n; i += nt) {
        const float v = X[i];
        if ((double)v > tau) {
          Y[i] = v;
        } else {
          const int y = i / W, x = i - y * W;
          double acc = 0.0;
          for (int dy = -1; dy <= 1; ++dy) {
            const int yy = fold101(y + dy, H);
            for (int dx = -1; dx <= 1; ++dx) {
              const int xx = fold101(x + dx, W);
              acc += g[dy + 1] * g[dx + 1] * (double)X[yy * W + xx];
            }
          }
          Y[i] = (float)acc;
        }
      }
    } else {
      for (int i = tid; i < n; i += nt) Y[i] = X[i];
    }
  } else {
    for (int i = tid; i < n; i += nt) Y[i] = X[i];
  }
  __syncthreads();

  // ---------------------------------------------------------------- CBA
  if (flags & ST_CBA) {
    double cnt = 0.0, spos = 0.0, mx = -INFINITY;
    for (int i = tid; i < n; i += nt) {
      const float v = Y[i];
      if (v > 0.0f) { cnt += 1.0; spos += v; }
      mx = fmax(mx, (double)v);
    }
    const int npos = (int)block_sum(cnt, red);
    spos = block_sum(spos, red);
    mx = block_max(mx, red);
    double tau = p[P_TAU_BG_FLOOR];
    if (npos > 0) {
      rk.prepare(Y);
      const double s1 = rk.percentile(npos, 50.0);
      const double s2 = rk.percentile(-1, p[P_BG_PERCENTILE]);
      const double t = p[P_BG_W_MEDIAN] * s1 + p[P_BG_W_PCT] * s2 + p[P_BG_W_MEAN] * (spos / npos) +
                       p[P_BG_W_MAX] * mx;
      if (t > 0.0) tau = t;
    }
    if (tid == 0 && taubg_out) taubg_out[map] = tau;
    const double gamma = p[P_GAMMA];
    __syncthreads();
    for (int i = tid; i < n; i += nt) {
      const double v = Y[i];
      if (v < tau) Y[i] = (float)(v * fmax(gamma, v / tau));
    }
    __syncthreads();
  }

  // ---------------------------------------------------------------- clip + min-max
  if (flags & ST_NORM) {
    const double hi_clip = fmax(raw_max, 0.0);
    double lo = INFINITY, hi = -INFINITY;
    for (int i = tid; i < n; i += nt) {
      const double v = fmin(fmax((double)Y[i], 0.0), hi_clip);
      lo = fmin(lo, v);
      hi = fmax(hi, v);
    }
    lo = block_min(lo, red);
    hi = block_max(hi, red);
    const double den = hi - lo + p[P_NORM_EPS];
    for (int i = tid; i < n; i += nt) {
      const double v = fmin(fmax((double)Y[i], 0.0), hi_clip);
      Y[i] = (float)((v - lo) / den);
    }
    __syncthreads();
  }

  // ---------------------------------------------------------------- SICD
  if (flags & ST_SICD) {
    double s = 0.0;
    for (int i = tid; i < n; i += nt) s += Y[i];
    const double mu = block_sum(s, red) / n;
    double s2 = 0.0, s3 = 0.0, mlo = INFINITY, mhi = -INFINITY;
    for (int i = tid; i < n; i += nt) {
      const double v = Y[i];
      const double d = v - mu;
      s2 += d * d;
      s3 += d * d * d;
      mlo = fmin(mlo, v);
      mhi = fmax(mhi, v);
    }
    const double sd = sqrt(block_sum(s2, red) / n);
    bool run = true;
    if (p[P_GATE] != 0.0) {
      const double m3 = block_sum(s3, red) / n;
      const double sd3 = sd * sd * sd;  // 0 also when sd^3 underflows
      const double skew = sd3 > 0.0 ? m3 / sd3 : 0.0;
      run = (sd > p[P_GATE_STD]) || (skew > p[P_GATE_SKEW]);
    }
    double lam = 0.0;
    bool applied = false;
    if (run) {
      mlo = block_min(mlo, red);
      mhi = block_max(mhi, red);
      const double thr = mu + p[P_OUTLIER_SIGMAS] * sd;
      const double wr = p[P_W_REP], wo = p[P_W_OUT];
      const float* R = rep ? rep + (size_t)map * n : nullptr;
      const double rc = rep_const ? rep_const[map] : 0.0;
      double ii = 0.0, mi = 0.0;
      for (int i = tid; i < n; i += nt) {
        const double v = Y[i];
        const double mr = R ? (double)R[i] : rc;
        const double in = wr * mr + wo * (v > thr ? 1.0 : 0.0);
        ii += in * in;
        mi += v * in;
      }
      ii = block_sum(ii, red);
      mi = block_sum(mi, red);
      lam = ii > 0.0 ? mi / ii : 0.0;
      lam = fmin(fmax(lam, p[P_LAMBDA_MIN]), p[P_LAMBDA_MAX]);
      const double guard = p[P_RANGE_GUARD];
      const bool fin = p[P_FINAL_NORMALIZE] != 0.0;
      double clo = 0.0, chi = 0.0;
      if (guard > 0.0 || fin) {
        clo = INFINITY;
        chi = -INFINITY;
        for (int i = tid; i < n; i += nt) {
          const double v = Y[i];
          const double mr = R ? (double)R[i] : rc;
          const double in = wr * mr + wo * (v > thr ? 1.0 : 0.0);
          const double c = fmax(v - lam * in, 0.0);
          clo = fmin(clo, c);
          chi = fmax(chi, c);
        }
        clo = block_min(clo, red);
        chi = block_max(chi, red);
      }
      applied = !(guard > 0.0 && (chi - clo) < (1.0 - guard) * (mhi - mlo));
      if (applied) {
        const double den = chi - clo + p[P_NORM_EPS];
        __syncthreads();  // all reads of Y for the statistics are done
        for (int i = tid; i < n; i += nt) {
          const double v = Y[i];
          const double mr = R ? (double)R[i] : rc;
          const double in = wr * mr + wo * (v > thr ? 1.0 : 0.0);
          double c = fmax(v - lam * in, 0.0);
          if (fin) c = (c - clo) / den;
          Y[i] = (float)c;
        }
        __syncthreads();
      }
    }
    if (tid == 0) {
      if (lam_out) lam_out[map] = lam;
      if (applied_out) applied_out[map] = applied ? 1 : 0;
    }
  }

  if constexpr (SMEM) {
    __syncthreads();
    for (int i = tid; i < n; i += nt) out[i] = Y[i];
  }
}

// ---------------------------------------------------------------- host side
static int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

static std::string launch_stage(const float* src, float* dst, const float* rep,
                                const double* rep_const, const double* raw_max, const Params& P,
                                int n, int h, int w, int flags, int* branch, double* tau,
                                double* taubg, double* lam, uint8_t* applied, cudaStream_t st) {
  if (n <= 0) return std::string();
  const int npx = h * w;
  const size_t bytes = (size_t)(2 * npx + pow2_at_least(npx)) * sizeof(float);
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return cuda_error_text(e, "cudaDeviceGetAttribute");
  const size_t static_smem = 32 * sizeof(double) + 258 * sizeof(unsigned) + 64;
  if (bytes + static_smem <= (size_t)optin) {
    if (bytes + static_smem > 48 * 1024) {
      e = cudaFuncSetAttribute(stage_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)bytes);
      if (e != cudaSuccess) return cuda_error_text(e, "cudaFuncSetAttribute");
    }
    const int threads = npx <= 1024 ? 128 : (npx <= 4096 ? 256 : 512);
    DC_LAUNCH(stage_kernel<true>, n, threads, bytes, st)(src, dst, rep, rep_const, raw_max, P, h, w,
                                                  flags, branch, tau, taubg, lam, applied);
  } else {
    DC_LAUNCH(stage_kernel<false>, n, 1024, 0, st)(src, dst, rep, rep_const, raw_max, P, h, w, flags,
                                            branch, tau, taubg, lam, applied);
  }
  return check_launch("stage_kernel");
}

static int akd_threads(int npx) { return npx <= 1024 ? 128 : (npx <= 16384 ? 256 : 1024); }

std::string kernel_sizes(uintptr_t maps, int n, int h, int w, const double* params,
                         uintptr_t k_out, uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  if (n <= 0) return std::string();
  DC_LAUNCH(akd_kernel, n, akd_threads(h * w), 0, reinterpret_cast<cudaStream_t>(stream))(
      reinterpret_cast<const float*>(maps), h, w, make_params(params),
      reinterpret_cast<int*>(k_out), nullptr);
  return check_launch("kernel_sizes");
}

std::string confidence_gating(uintptr_t maps, int n, int h, int w, const double* params,
                              uintptr_t out, uintptr_t branch, uintptr_t tau, uintptr_t stream,
                              int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  return launch_stage(reinterpret_cast<const float*>(maps), reinterpret_cast<float*>(out),
                      nullptr, nullptr, nullptr, make_params(params), n, h, w, ST_DACG,
                      reinterpret_cast<int*>(branch), reinterpret_cast<double*>(tau), nullptr,
                      nullptr, nullptr, reinterpret_cast<cudaStream_t>(stream));
}

std::string background_attenuation(uintptr_t maps, int n, int h, int w, const double* params,
                                   uintptr_t out, uintptr_t tau_bg, uintptr_t stream,
                                   int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  return launch_stage(reinterpret_cast<const float*>(maps), reinterpret_cast<float*>(out),
                      nullptr, nullptr, nullptr, make_params(params), n, h, w, ST_CBA, nullptr,
                      nullptr, reinterpret_cast<double*>(tau_bg), nullptr, nullptr,
                      reinterpret_cast<cudaStream_t>(stream));
}

std::string causal_debiasing(uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h,
                             int w, const double* params, uintptr_t out, uintptr_t lam,
                             uintptr_t applied, uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  return launch_stage(reinterpret_cast<const float*>(maps), reinterpret_cast<float*>(out),
                      reinterpret_cast<const float*>(rep),
                      reinterpret_cast<const double*>(rep_const), nullptr, make_params(params), n,
                      h, w, ST_SICD, nullptr, nullptr, nullptr, reinterpret_cast<double*>(lam),
                      reinterpret_cast<uint8_t*>(applied), reinterpret_cast<cudaStream_t>(stream));
}

__global__ void fill_pipeline_defaults(int n, int* k, double* taubg, double* lam,
                                       uint8_t* applied, bool akd, bool cba, bool sicd) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (!akd) k[i] = 0;
  if (!cba) taubg[i] = NAN;
  if (!sicd) {
    lam[i] = NAN;
    applied[i] = 0;
  }
}

std::string refine(uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h, int w,
                   const double* params, uintptr_t out, uintptr_t k, uintptr_t branch,
                   uintptr_t tau, uintptr_t tau_bg, uintptr_t lam, uintptr_t applied,
                   uintptr_t scratch, uintptr_t scratch_max, uintptr_t stream, int device) {
  DeviceGuard g(device);
  if (g.err != cudaSuccess) return cuda_error_text(g.err, "cudaSetDevice");
  if (n <= 0) return std::string();
  const Params P = make_params(params);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool akd = P.p[P_AKD] != 0.0, cba = P.p[P_CBA] != 0.0, sicd = P.p[P_SICD] != 0.0;
  const float* in = reinterpret_cast<const float*>(maps);
  const float* src = in;
  const double* raw_max = nullptr;
  int* kp = reinterpret_cast<int*>(k);
  if (akd) {
    if (!scratch || !scratch_max) return "refine: scratch buffers are required when akd is on";
    double* mx = reinterpret_cast<double*>(scratch_max);
    DC_LAUNCH(akd_kernel, n, akd_threads(h * w), 0, st)(in, h, w, P, kp, mx);
    std::string err = check_launch("refine/akd");
    if (!err.empty()) return err;
    int kmin = 3, kmax = (int)P.p[P_K_MAX];
    if (P.p[P_KERNEL_SIZE] > 0) kmin = kmax = (int)P.p[P_KERNEL_SIZE];
    float* filt = reinterpret_cast<float*>(scratch);
    err = launch_rank_filter(in, kp, n, h, w, filt, kmin, kmax, st);
    if (!err.empty()) return err;
    src = filt;
    raw_max = mx;
  }
  DC_LAUNCH(fill_pipeline_defaults, (n + 255) / 256, 256, 0, st)(
      n, kp, reinterpret_cast<double*>(tau_bg), reinterpret_cast<double*>(lam),
      reinterpret_cast<uint8_t*>(applied), akd, cba, sicd);
  const int flags = ST_DACG | ST_NORM | (cba ? ST_CBA : 0) | (sicd ? ST_SICD : 0);
  return launch_stage(src, reinterpret_cast<float*>(out), reinterpret_cast<const float*>(rep),
                      reinterpret_cast<const double*>(rep_const), raw_max, P, n, h, w, flags,
                      reinterpret_cast<int*>(branch), reinterpret_cast<double*>(tau),
                      reinterpret_cast<double*>(tau_bg), reinterpret_cast<double*>(lam),
                      reinterpret_cast<uint8_t*>(applied), st);
}

int device_count(std::string* err) {
  int c = 0;
  cudaError_t e = cudaGetDeviceCount(&c);
  if (e != cudaSuccess) {
    if (err) *err = cuda_error_text(e, "cudaGetDeviceCount");
    cudaGetLastError();  // clear the sticky-free error state
    return 0;
  }
  if (c == 0 && err) *err = "cudaGetDeviceCount returned 0 devices";
  return c;
}

}  // namespace diffcam_cuda
