// Host-side entry points of the diffcam CUDA kernels (csrc/cuda/*.cu), called by
// bindings_cuda.cpp.  Every function takes raw device pointers (as uintptr_t), the batch
// geometry, a cudaStream_t (as uintptr_t) and a device ordinal; it enqueues a fixed, small
// number of kernel launches on that stream (never one per map), does not synchronise and
// returns an empty string on success or the CUDA error text.  The parameter vector `params`
// is the host float64 vector of RefineConfig.to_params() (PARAM_FIELDS order); it is passed to
// the kernels by value.  No header here needs the CUDA toolkit, so the pybind11 module can be
// compiled by the host compiler alone.
#pragma once
#include <cstdint>
#include <string>

namespace diffcam_cuda {

constexpr int kNumParams = 42;

// Number of visible devices; *err receives the CUDA error text when the query fails.
int device_count(std::string* err);

// Batched functions (docs/kernels.md).  Pointers: maps float32 (N,H,W) C-contiguous.
std::string kernel_sizes(uintptr_t maps, int n, int h, int w, const double* params,
                         uintptr_t k_out /*int32 N*/, uintptr_t stream, int device);

// kmin/kmax: bounds of the kernel sizes present (1, 31 when unknown): one launch per odd K in it.
std::string rank_gaussian_filter(uintptr_t maps, uintptr_t ksizes /*int32 N*/, int n, int h,
                                 int w, uintptr_t out, int kmin, int kmax, uintptr_t stream,
                                 int device);

std::string confidence_gating(uintptr_t maps, int n, int h, int w, const double* params,
                              uintptr_t out, uintptr_t branch /*int32*/, uintptr_t tau /*f64*/,
                              uintptr_t stream, int device);

std::string background_attenuation(uintptr_t maps, int n, int h, int w, const double* params,
                                   uintptr_t out, uintptr_t tau_bg /*f64*/, uintptr_t stream,
                                   int device);

// rep: 0 or float32 (N,H,W); rep_const: float64 (N,) on the device.
std::string causal_debiasing(uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h,
                             int w, const double* params, uintptr_t out, uintptr_t lam,
                             uintptr_t applied /*uint8*/, uintptr_t stream, int device);

// scratch: float32 (N,H,W) work buffer (used when params[akd] != 0), scratch_max: f64 (N,).
std::string refine(uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h, int w,
                   const double* params, uintptr_t out, uintptr_t k, uintptr_t branch,
                   uintptr_t tau, uintptr_t tau_bg, uintptr_t lam, uintptr_t applied,
                   uintptr_t scratch, uintptr_t scratch_max, uintptr_t stream, int device);

std::string otsu_threshold_u8(uintptr_t imgs /*uint8 (N,H,W)*/, int n, int h, int w,
                              uintptr_t out /*int32 N*/, uintptr_t stream, int device);

std::string resize_bilinear(uintptr_t maps, int n, int h, int w, int out_h, int out_w,
                            uintptr_t out, uintptr_t stream, int device);

// masks uint8 (N, C, Hm, Wm); out float64 (N, 3).
std::string localization(uintptr_t maps, int n, int h, int w, uintptr_t masks, int c, int hm,
                         int wm, uintptr_t out, uintptr_t stream, int device);

}  // namespace diffcam_cuda
