// pybind11 module diffcam._cuda: thin bindings over the batched CUDA kernels (api.hpp).
// Every function takes raw device pointers as integers, the batch geometry, the CUDA stream as
// an integer (0 = legacy default stream) and a device ordinal; it enqueues the kernels on that
// stream and returns without synchronising.  The module does not link against PyTorch or any
// array library: diffcam/refine/_cuda.py turns torch / CuPy / __cuda_array_interface__ /
// DLPack objects into pointers and allocates the outputs.  The float64 parameter vector is the
// only host array read here (it is passed to the kernels by value).  CUDA errors become
// RuntimeError; the GIL is released while launching.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.hpp"

namespace py = pybind11;
namespace dc = diffcam_cuda;

namespace {

using ParamArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

std::vector<double> read_params(const ParamArray& params) {
  if (params.ndim() != 1 || params.shape(0) < dc::kNumParams)
    throw std::invalid_argument("params must be a 1-D float64 vector of at least " +
                                std::to_string(dc::kNumParams) + " values");
  return std::vector<double>(params.data(), params.data() + dc::kNumParams);
}

void check_dims(int n, int h, int w) {
  if (n < 0 || h <= 0 || w <= 0) throw std::invalid_argument("invalid map shape");
}

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error("diffcam._cuda: " + err);
}

template <class F>
void run(F&& f) {
  std::string err;
  {
    py::gil_scoped_release release;
    err = f();
  }
  raise_if(err);
}

}  // namespace

// The module name: _cuda, or _cuda_emu for the CPU emulation build (tests/refine/cuda_emu.py).
#ifndef DIFFCAM_CUDA_MODULE
#define DIFFCAM_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(DIFFCAM_CUDA_MODULE, m) {
  m.doc() = "diffcam CUDA kernels (raw device pointers; see diffcam/refine/_cuda.py)";
  m.attr("NUM_PARAMS") = dc::kNumParams;

  m.def("device_count", []() {
    std::string err;
    int c = dc::device_count(&err);
    return py::make_tuple(c, err);
  }, "Number of CUDA devices and the error text of the query ('' when it succeeded).");

  m.def("kernel_sizes", [](uintptr_t maps, int n, int h, int w, ParamArray params,
                           uintptr_t k_out, uintptr_t stream, int device) {
    check_dims(n, h, w);
    auto p = read_params(params);
    run([&] { return dc::kernel_sizes(maps, n, h, w, p.data(), k_out, stream, device); });
  }, py::arg("maps"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("params"),
     py::arg("k_out"), py::arg("stream"), py::arg("device"));

  m.def("rank_gaussian_filter", [](uintptr_t maps, uintptr_t ksizes, int n, int h, int w,
                                   uintptr_t out, uintptr_t stream, int device, int kmin,
                                   int kmax) {
    check_dims(n, h, w);
    run([&] {
      return dc::rank_gaussian_filter(maps, ksizes, n, h, w, out, kmin, kmax, stream, device);
    });
  }, py::arg("maps"), py::arg("ksizes"), py::arg("n"), py::arg("h"), py::arg("w"),
     py::arg("out"), py::arg("stream"), py::arg("device"), py::arg("kmin") = 1,
     py::arg("kmax") = 31);

  m.def("confidence_gating", [](uintptr_t maps, int n, int h, int w, ParamArray params,
                                uintptr_t out, uintptr_t branch, uintptr_t tau, uintptr_t stream,
                                int device) {
    check_dims(n, h, w);
    auto p = read_params(params);
    run([&] {
      return dc::confidence_gating(maps, n, h, w, p.data(), out, branch, tau, stream, device);
    });
  }, py::arg("maps"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("params"),
     py::arg("out"), py::arg("branch"), py::arg("tau"), py::arg("stream"), py::arg("device"));

  m.def("background_attenuation", [](uintptr_t maps, int n, int h, int w, ParamArray params,
                                     uintptr_t out, uintptr_t tau_bg, uintptr_t stream,
                                     int device) {
    check_dims(n, h, w);
    auto p = read_params(params);
    run([&] {
      return dc::background_attenuation(maps, n, h, w, p.data(), out, tau_bg, stream, device);
    });
  }, py::arg("maps"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("params"),
     py::arg("out"), py::arg("tau_bg"), py::arg("stream"), py::arg("device"));

  m.def("causal_debiasing", [](uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h,
                               int w, ParamArray params, uintptr_t out, uintptr_t lam,
                               uintptr_t applied, uintptr_t stream, int device) {
    check_dims(n, h, w);
    auto p = read_params(params);
    run([&] {
      return dc::causal_debiasing(maps, rep, rep_const, n, h, w, p.data(), out, lam, applied,
                                  stream, device);
    });
  }, py::arg("maps"), py::arg("rep"), py::arg("rep_const"), py::arg("n"), py::arg("h"),
     py::arg("w"), py::arg("params"), py::arg("out"), py::arg("lam"), py::arg("applied"),
     py::arg("stream"), py::arg("device"));

  m.def("refine", [](uintptr_t maps, uintptr_t rep, uintptr_t rep_const, int n, int h, int w,
                     ParamArray params, uintptr_t out, uintptr_t k, uintptr_t branch,
                     uintptr_t tau, uintptr_t tau_bg, uintptr_t lam, uintptr_t applied,
                     uintptr_t scratch, uintptr_t scratch_max, uintptr_t stream, int device) {
    check_dims(n, h, w);
    auto p = read_params(params);
    run([&] {
      return dc::refine(maps, rep, rep_const, n, h, w, p.data(), out, k, branch, tau, tau_bg,
                        lam, applied, scratch, scratch_max, stream, device);
    });
  }, py::arg("maps"), py::arg("rep"), py::arg("rep_const"), py::arg("n"), py::arg("h"),
     py::arg("w"), py::arg("params"), py::arg("out"), py::arg("k"), py::arg("branch"),
     py::arg("tau"), py::arg("tau_bg"), py::arg("lam"), py::arg("applied"), py::arg("scratch"),
     py::arg("scratch_max"), py::arg("stream"), py::arg("device"));

  m.def("otsu_threshold_u8", [](uintptr_t imgs, int n, int h, int w, uintptr_t out,
                                uintptr_t stream, int device) {
    check_dims(n, h, w);
    run([&] { return dc::otsu_threshold_u8(imgs, n, h, w, out, stream, device); });
  }, py::arg("imgs"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("out"),
     py::arg("stream"), py::arg("device"));

  m.def("resize_bilinear", [](uintptr_t maps, int n, int h, int w, int out_h, int out_w,
                              uintptr_t out, uintptr_t stream, int device) {
    check_dims(n, h, w);
    if (out_h <= 0 || out_w <= 0) throw std::invalid_argument("invalid output size");
    run([&] { return dc::resize_bilinear(maps, n, h, w, out_h, out_w, out, stream, device); });
  }, py::arg("maps"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("out_h"),
     py::arg("out_w"), py::arg("out"), py::arg("stream"), py::arg("device"));

  m.def("localization", [](uintptr_t maps, int n, int h, int w, uintptr_t masks, int c, int hm,
                           int wm, uintptr_t out, uintptr_t stream, int device) {
    check_dims(n, h, w);
    if (c < 0 || hm <= 0 || wm <= 0) throw std::invalid_argument("invalid mask shape");
    run([&] { return dc::localization(maps, n, h, w, masks, c, hm, wm, out, stream, device); });
  }, py::arg("maps"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("masks"), py::arg("c"),
     py::arg("hm"), py::arg("wm"), py::arg("out"), py::arg("stream"), py::arg("device"));
}
