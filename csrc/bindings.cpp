// pybind11 module diffcam._core: the native CPU backend of docs/kernels.md.
//
// Every function validates shapes, dtypes and contiguity (no silent conversion: the Python
// layer converts), releases the GIL, and spreads the maps of a batch over threads with a static
// partition (a single large map instead splits the rows of its rank filter).  Each map's
// statistics are computed by one thread in a fixed order, so results never depend on `threads`.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "refine/attenuation.hpp"
#include "refine/debias.hpp"
#include "refine/gating.hpp"
#include "refine/kernel_size.hpp"
#include "refine/metrics.hpp"
#include "refine/otsu.hpp"
#include "refine/parallel.hpp"
#include "refine/params.hpp"
#include "refine/pipeline.hpp"
#include "refine/rank_filter.hpp"
#include "refine/resize.hpp"

namespace py = pybind11;
using namespace diffcam;

namespace {

std::string describe(const py::array& a) {
  std::ostringstream os;
  os << py::str(a.dtype()).cast<std::string>() << " array of shape (";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) os << ",";
  os << ")" << ((a.flags() & py::array::c_style) ? "" : " (not C-contiguous)");
  return os.str();
}

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

template <class T>
py::array as_checked(const py::handle& obj, const char* name, int ndim, const char* what,
                     const std::vector<py::ssize_t>& expect = {}) {
  if (!py::isinstance<py::array>(obj))
    throw py::value_error(std::string(name) + " must be a numpy array (" + what + "), got " +
                          py::str(py::type::of(obj)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(obj);
  bool ok = is_dtype<T>(a) && a.ndim() == ndim && (a.flags() & py::array::c_style);
  for (size_t i = 0; ok && i < expect.size(); ++i)
    if (expect[i] >= 0 && a.shape(static_cast<py::ssize_t>(i)) != expect[i]) ok = false;
  if (!ok) throw py::value_error(std::string(name) + " must be " + what + ", got " + describe(a));
  return a;
}

struct Maps {
  py::array arr;
  const float* ptr;
  int N, H, W;
};

Maps check_maps(const py::handle& obj, const char* name = "maps") {
  py::array a = as_checked<float>(obj, name, 3, "a C-contiguous float32 array of shape (N, H, W)");
  if (a.shape(1) < 1 || a.shape(2) < 1)
    throw py::value_error(std::string(name) + " must have H >= 1 and W >= 1, got " + describe(a));
  return {a, static_cast<const float*>(a.data()), static_cast<int>(a.shape(0)),
          static_cast<int>(a.shape(1)), static_cast<int>(a.shape(2))};
}

const double* check_params(const py::handle& obj) {
  py::array a = as_checked<double>(obj, "params", 1, "a C-contiguous float64 vector (RefineConfig.to_params())");
  if (a.shape(0) < kNumParams)
    throw py::value_error("params must have at least " + std::to_string(kNumParams) + " entries, got " +
                          describe(a));
  return static_cast<const double*>(a.data());
}

template <class T>
py::array_t<T> new_array(std::vector<py::ssize_t> shape) {
  return py::array_t<T>(shape);
}

// Every value of x[0..n) finite, >= 0 and <= max_value * (1 + 1e-6) (the API's as_batch rule for
// the values).  Float compares against float_floor of the float64 bound give the same answer as
// float64 compares for every float; NaN fails both compares.  Two SSE2 accumulators, one
// movemask at the end (no branch per value).
bool values_in_range(const float* x, size_t n, double max_value) {
  float hi = float_floor(max_value * (1 + 1e-6));
  if (!(hi <= FLT_MAX)) hi = FLT_MAX;  // a bound beyond the floats (or NaN): still finite values only
  size_t i = 0;
  bool ok = true;
#if defined(__SSE2__)
  {
    const __m128 z = _mm_setzero_ps(), h = _mm_set1_ps(hi);
    __m128 a0 = _mm_castsi128_ps(_mm_set1_epi32(-1)), a1 = a0;
    for (; i + 8 <= n; i += 8) {
      const __m128 v0 = _mm_loadu_ps(x + i), v1 = _mm_loadu_ps(x + i + 4);
      a0 = _mm_and_ps(a0, _mm_and_ps(_mm_cmpge_ps(v0, z), _mm_cmple_ps(v0, h)));
      a1 = _mm_and_ps(a1, _mm_and_ps(_mm_cmpge_ps(v1, z), _mm_cmple_ps(v1, h)));
    }
    ok = _mm_movemask_ps(_mm_and_ps(a0, a1)) == 0xF;
  }
#endif
  unsigned bad = 0;
  for (; i < n; ++i) bad |= static_cast<unsigned>(!(x[i] >= 0.0f && x[i] <= hi));
  return ok && bad == 0;
}

// params of the whole pipeline (refine, refine_default): check_params plus the kernel sizes.
const double* check_pipeline_params(const py::handle& params) {
  const double* p = check_params(params);
  if (p[P::kernel_size] > 0) {
    int k = static_cast<int>(p[P::kernel_size]);
    if (k < 1 || k > 31 || k % 2 == 0)
      throw py::value_error("params[kernel_size] must be 0 or an odd size in [1, 31]");
  }
  if (p[P::k_max] < 1 || p[P::k_max] > 31) throw py::value_error("params[k_max] must be in [1, 31]");
  return p;
}

// threads for a batch of N maps of n pixels: 1 when the work is too small to pay thread start-up.
int batch_threads(int threads, long N, long n, long cost_per_px = 1) {
  int t = resolve_threads(threads);
  if (N * n * cost_per_px < 8192) t = 1;
  return t;
}

// maps per block of parallel_for_dynamic: about 16 blocks per thread (small enough to balance a
// loaded core, large enough that the shared counter costs nothing).
long map_grain(long N, int t) { return std::max<long>(1, N / (16L * t)); }

// values_in_range over a whole batch (the GIL released for big ones).
bool values_ok(const Maps& mp, double max_value) {
  const size_t total = static_cast<size_t>(mp.N) * mp.H * mp.W;
  if (total < (1u << 16)) return values_in_range(mp.ptr, total, max_value);
  py::gil_scoped_release rel;
  return values_in_range(mp.ptr, total, max_value);
}

// The pipeline over a checked batch (refine and refine_default): the refined maps, shaped
// out_shape, and with info the six per-map arrays.  rp / rc: SICD's inputs (nullptr: zeros).
py::object run_refine(const Maps& mp, const float* rp, const double* rc, const double* p, int threads,
                      bool info, const std::vector<py::ssize_t>& out_shape) {
  const int N = mp.N;
  const long n = static_cast<long>(mp.H) * mp.W;
  auto out = new_array<float>(out_shape);
  // null handles until needed (a default-constructed py::array_t allocates an empty array)
  py::object ka, ba, ta, tba, la, aa;
  int32_t *k_ = nullptr, *b_ = nullptr;
  double *t_ = nullptr, *tb_ = nullptr, *l_ = nullptr;
  uint8_t* a_ = nullptr;
  if (info) {
    auto k = new_array<int32_t>({N}), b = new_array<int32_t>({N});
    auto t = new_array<double>({N}), tb = new_array<double>({N}), l = new_array<double>({N});
    auto a = new_array<uint8_t>({N});
    k_ = k.mutable_data(), b_ = b.mutable_data();
    t_ = t.mutable_data(), tb_ = tb.mutable_data(), l_ = l.mutable_data();
    a_ = a.mutable_data();
    ka = std::move(k), ba = std::move(b), ta = std::move(t), tba = std::move(tb), la = std::move(l);
    aa = std::move(a);
  }
  float* o = out.mutable_data();
  {
    py::gil_scoped_release rel;
    int t = batch_threads(threads, N, n, 32);
    auto one = [&](long i, Workspace& ws, int ft) {
      RefineInfo ri = refine_map(mp.ptr + i * n, rp ? rp + i * n : nullptr, rc ? rc[i] : 0.0, o + i * n,
                                 mp.H, mp.W, p, ws, ft);
      if (k_) k_[i] = ri.k, b_[i] = ri.branch, t_[i] = ri.tau, tb_[i] = ri.tau_bg, l_[i] = ri.lam, a_[i] = ri.applied;
    };
    // the calling thread keeps its scratch between calls (no allocation for small maps)
    static thread_local Workspace ws_caller;
    if (t <= 1) {
      for (long i = 0; i < N; ++i) one(i, ws_caller, 1);
    } else if (N >= t) {
      std::vector<Workspace> ws_local(t);
      parallel_for_dynamic(N, t, map_grain(N, t), [&](long b, long e, int w) {
        Workspace& ws = w == 0 ? ws_caller : ws_local[w];
        for (long i = b; i < e; ++i) one(i, ws, 1);
      });
    } else {
      for (long i = 0; i < N; ++i) one(i, ws_caller, t);
    }
  }
  if (!info) return std::move(out);
  return py::make_tuple(out, ka, ba, ta, tba, la, aa);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "diffcam native CPU kernels (docs/kernels.md)";

  m.def("simd", [] { return std::string(rank_dispatch().name); },
        "The SIMD path picked at runtime for the rank filter: 'avx2' or 'scalar'.");

  m.def(
      "value_range",
      [](py::object arr) {
        if (!py::isinstance<py::array>(arr))
          throw py::value_error("value_range needs a numpy float32 array, got " +
                                py::str(py::type::of(arr)).cast<std::string>());
        py::array a = py::reinterpret_borrow<py::array>(arr);
        if (!is_dtype<float>(a) || !(a.flags() & py::array::c_style) || a.size() == 0)
          throw py::value_error("value_range needs a non-empty C-contiguous float32 array, got " +
                                describe(a));
        const float* x = static_cast<const float*>(a.data());
        const size_t n = static_cast<size_t>(a.size());
        float lo = x[0], hi = x[0];
        bool nan = false;
        {
          py::gil_scoped_release rel;
          // four independent accumulators (short dependency chains); NaN is caught by x != x,
          // since min/max comparisons would silently skip it
          float l4[4] = {lo, lo, lo, lo}, h4[4] = {hi, hi, hi, hi};
          unsigned bad = 0;
          size_t i = 0;
          for (; i + 4 <= n; i += 4)
            for (int j = 0; j < 4; ++j) {
              const float v = x[i + j];
              l4[j] = v < l4[j] ? v : l4[j];
              h4[j] = v > h4[j] ? v : h4[j];
              bad |= static_cast<unsigned>(v != v);
            }
          for (; i < n; ++i) {
            const float v = x[i];
            l4[0] = v < l4[0] ? v : l4[0];
            h4[0] = v > h4[0] ? v : h4[0];
            bad |= static_cast<unsigned>(v != v);
          }
          lo = std::min(std::min(l4[0], l4[1]), std::min(l4[2], l4[3]));
          hi = std::max(std::max(h4[0], h4[1]), std::max(h4[2], h4[3]));
          nan = bad != 0 || lo != lo || hi != hi;
        }
        if (nan) return py::make_tuple(static_cast<double>(NAN), static_cast<double>(NAN));
        return py::make_tuple(static_cast<double>(lo), static_cast<double>(hi));
      },
      py::arg("arr"),
      "(min, max) of a C-contiguous float32 array in one pass, as Python floats; (nan, nan) when "
      "any value is NaN (Inf is returned as is).");

  m.def(
      "kernel_sizes",
      [](py::object maps, py::object params, int threads) {
        Maps mp = check_maps(maps);
        const double* p = check_params(params);
        auto ks = new_array<int32_t>({mp.N});
        int32_t* k = ks.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, n), [&](long b, long e, int) {
            for (long i = b; i < e; ++i) k[i] = kernel_size_map(mp.ptr + i * n, mp.H, mp.W, p);
          });
        }
        return ks;
      },
      py::arg("maps"), py::arg("params"), py::kw_only(), py::arg("threads") = 0);

  m.def(
      "rank_gaussian_filter",
      [](py::object maps, py::object ksizes, int threads) {
        Maps mp = check_maps(maps);
        py::array ka = as_checked<int32_t>(ksizes, "ksizes", 1, "a C-contiguous int32 array of shape (N,)", {mp.N});
        const int32_t* ks = static_cast<const int32_t*>(ka.data());
        for (int i = 0; i < mp.N; ++i)
          if (ks[i] < 1 || ks[i] > 31 || ks[i] % 2 == 0)
            throw py::value_error("ksizes must hold odd kernel sizes in [1, 31], got " + std::to_string(ks[i]) +
                                  " at index " + std::to_string(i));
        auto out = new_array<float>({mp.N, mp.H, mp.W});
        float* o = out.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W;
        {
          py::gil_scoped_release rel;
          int t = batch_threads(threads, mp.N, n, 32);
          auto par = [](long nn, int tt, auto&& fn) { parallel_for(nn, tt, fn); };
          if (mp.N >= t) {
            std::vector<std::vector<float>> pads(t);
            parallel_for_dynamic(mp.N, t, map_grain(mp.N, t), [&](long b, long e, int w) {
              for (long i = b; i < e; ++i) rank_filter_map(mp.ptr + i * n, o + i * n, mp.H, mp.W, ks[i], pads[w], 1, par);
            });
          } else {
            std::vector<float> pad;
            for (long i = 0; i < mp.N; ++i) rank_filter_map(mp.ptr + i * n, o + i * n, mp.H, mp.W, ks[i], pad, t, par);
          }
        }
        return out;
      },
      py::arg("maps"), py::arg("ksizes"), py::kw_only(), py::arg("threads") = 0);

  m.def(
      "confidence_gating",
      [](py::object maps, py::object params, int threads) {
        Maps mp = check_maps(maps);
        const double* p = check_params(params);
        auto out = new_array<float>({mp.N, mp.H, mp.W});
        auto br = new_array<int32_t>({mp.N});
        auto tau = new_array<double>({mp.N});
        float* o = out.mutable_data();
        int32_t* b_ = br.mutable_data();
        double* t_ = tau.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, n), [&](long b, long e, int) {
            std::vector<float> s, tmp;
            for (long i = b; i < e; ++i) {
              GateInfo gi = confidence_gating_map(mp.ptr + i * n, o + i * n, mp.H, mp.W, p, s, tmp);
              b_[i] = gi.branch;
              t_[i] = gi.tau;
            }
          });
        }
        return py::make_tuple(out, br, tau);
      },
      py::arg("maps"), py::arg("params"), py::kw_only(), py::arg("threads") = 0);

  m.def(
      "background_attenuation",
      [](py::object maps, py::object params, int threads) {
        Maps mp = check_maps(maps);
        const double* p = check_params(params);
        auto out = new_array<float>({mp.N, mp.H, mp.W});
        auto tau = new_array<double>({mp.N});
        float* o = out.mutable_data();
        double* t_ = tau.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, n), [&](long b, long e, int) {
            std::vector<float> s;
            for (long i = b; i < e; ++i) t_[i] = background_attenuation_map(mp.ptr + i * n, o + i * n, n, p, s);
          });
        }
        return py::make_tuple(out, tau);
      },
      py::arg("maps"), py::arg("params"), py::kw_only(), py::arg("threads") = 0);

  auto check_rep = [](const Maps& mp, const py::object& rep, const py::object& rep_const,
                      const float*& rp, const double*& rc, py::array& keep1, py::array& keep2) {
    rp = nullptr;
    if (!rep.is_none()) {
      keep1 = as_checked<float>(rep, "rep", 3, "None or a C-contiguous float32 array of the maps' shape (N, H, W)",
                                {mp.N, mp.H, mp.W});
      rp = static_cast<const float*>(keep1.data());
    }
    rc = nullptr;  // rep_const None: all zeros
    if (!rep_const.is_none()) {
      keep2 = as_checked<double>(rep_const, "rep_const", 1, "None or a C-contiguous float64 array of shape (N,)", {mp.N});
      rc = static_cast<const double*>(keep2.data());
    }
  };

  m.def(
      "causal_debiasing",
      [check_rep](py::object maps, py::object rep, py::object rep_const, py::object params, int threads) {
        Maps mp = check_maps(maps);
        const float* rp;
        const double* rc;
        py::array k1, k2;
        check_rep(mp, rep, rep_const, rp, rc, k1, k2);
        const double* p = check_params(params);
        auto out = new_array<float>({mp.N, mp.H, mp.W});
        auto lam = new_array<double>({mp.N});
        auto app = new_array<uint8_t>({mp.N});
        float* o = out.mutable_data();
        double* l_ = lam.mutable_data();
        uint8_t* a_ = app.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, n), [&](long b, long e, int) {
            std::vector<double> d;
            for (long i = b; i < e; ++i) {
              DebiasInfo di = causal_debiasing_map(mp.ptr + i * n, rp ? rp + i * n : nullptr, rc ? rc[i] : 0.0, o + i * n, n, p, d);
              l_[i] = di.lam;
              a_[i] = di.applied;
            }
          });
        }
        return py::make_tuple(out, lam, app);
      },
      py::arg("maps"), py::arg("rep"), py::arg("rep_const"), py::arg("params"), py::kw_only(),
      py::arg("threads") = 0);

  // refine(maps, rep, rep_const, params, threads=0, info=True, max_value=None) (positional or
  // keyword: pybind11 matches keywords by name, about 1 us a call, so the API passes them by position);
  // rep_const may be None (all zeros, as for causal_debiasing).  info=False returns only the refined maps (no per-map
  // arrays: the API's calls without return_info).  max_value: first check in one pass that every
  // value is finite, >= 0 and <= max_value * (1 + 1e-6) (the API's as_batch rule) and return
  // None, without refining, when one is not (the caller then takes its validating path).
  m.def(
      "refine",
      [check_rep](py::object maps, py::object rep, py::object rep_const, py::object params, int threads,
                  bool info, py::object max_value) -> py::object {
        Maps mp = check_maps(maps);
        const float* rp;
        const double* rc;
        py::array k1, k2;
        check_rep(mp, rep, rep_const, rp, rc, k1, k2);
        const double* p = check_pipeline_params(params);
        if (!max_value.is_none() && !values_ok(mp, max_value.cast<double>())) return py::none();
        return run_refine(mp, rp, rc, p, threads, info, {mp.N, mp.H, mp.W});
      },
      py::arg("maps"), py::arg("rep"), py::arg("rep_const"), py::arg("params"),
      py::arg("threads") = 0, py::arg("info") = true, py::arg("max_value") = py::none());

  // refine_default(maps, params, threads=0): diffcam.refine(maps) with its default SICD inputs
  // and no info, in one call for the case it shortcuts: maps a C-contiguous float32 NumPy array
  // of shape (H, W) or (N, H, W) (H, W >= 1, N >= 1) whose values are all finite, >= 0 and
  // <= 1 + 1e-6 (the API's rule).  The refined maps come back in the same shape (threads as
  // refine's); None for anything else -- another type, dtype, rank or layout, or a value the
  // check rejects -- so that the caller's general path converts or names the error.  params is
  // checked as refine's.  No SICD inputs (zeros) and no per-map info arrays.
  m.def(
      "refine_default",
      [](py::handle maps, py::handle params, int threads) -> py::object {
        if (!py::isinstance<py::array>(maps)) return py::none();
        py::array a = py::reinterpret_borrow<py::array>(maps);
        const py::ssize_t nd = a.ndim();
        if ((nd != 2 && nd != 3) || !is_dtype<float>(a) || !(a.flags() & py::array::c_style)) return py::none();
        const py::ssize_t N = nd == 3 ? a.shape(0) : 1, H = a.shape(nd - 2), W = a.shape(nd - 1);
        if (N < 1 || H < 1 || W < 1 || N > INT32_MAX || H > INT32_MAX || W > INT32_MAX) return py::none();
        const double* p = check_pipeline_params(params);
        Maps mp{a, static_cast<const float*>(a.data()), static_cast<int>(N), static_cast<int>(H),
                static_cast<int>(W)};
        if (!values_ok(mp, 1.0)) return py::none();
        std::vector<py::ssize_t> shape(a.shape(), a.shape() + nd);
        return run_refine(mp, nullptr, nullptr, p, threads, false, shape);
      },
      py::arg("maps"), py::arg("params"), py::arg("threads") = 0);

  m.def(
      "otsu_threshold_u8",
      [](py::object imgs, int threads) {
        py::array a = as_checked<uint8_t>(imgs, "imgs", 3, "a C-contiguous uint8 array of shape (N, H, W)");
        const long N = a.shape(0), n = a.shape(1) * a.shape(2);
        const uint8_t* ptr = static_cast<const uint8_t*>(a.data());
        auto res = new_array<int32_t>({N});
        int32_t* r = res.mutable_data();
        {
          py::gil_scoped_release rel;
          parallel_for(N, batch_threads(threads, N, n), [&](long b, long e, int) {
            for (long i = b; i < e; ++i) r[i] = otsu_threshold_u8(ptr + i * n, static_cast<size_t>(n));
          });
        }
        return res;
      },
      py::arg("imgs"), py::kw_only(), py::arg("threads") = 0);

  m.def(
      "resize_bilinear",
      [](py::object maps, int out_h, int out_w, int threads) {
        Maps mp = check_maps(maps);
        if (out_h < 1 || out_w < 1) throw py::value_error("out_h and out_w must be >= 1");
        auto out = new_array<float>({mp.N, out_h, out_w});
        float* o = out.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W, no = static_cast<long>(out_h) * out_w;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, no), [&](long b, long e, int) {
            std::vector<double> d(no);
            std::vector<Tap> ty, tx;
            for (long i = b; i < e; ++i) {
              resize_bilinear_d(mp.ptr + i * n, mp.H, mp.W, out_h, out_w, d.data(), ty, tx);
              for (long j = 0; j < no; ++j) o[i * no + j] = static_cast<float>(d[j]);
            }
          });
        }
        return out;
      },
      py::arg("maps"), py::arg("out_h"), py::arg("out_w"), py::kw_only(), py::arg("threads") = 0);

  m.def(
      "localization",
      [](py::object maps, py::object masks, int threads) {
        Maps mp = check_maps(maps);
        py::array ma = as_checked<uint8_t>(masks, "masks", 4, "a C-contiguous uint8 array of shape (N, C, Hm, Wm)", {mp.N});
        const int C = static_cast<int>(ma.shape(1)), Hm = static_cast<int>(ma.shape(2)), Wm = static_cast<int>(ma.shape(3));
        if (Hm < 1 || Wm < 1) throw py::value_error("masks must have Hm >= 1 and Wm >= 1, got " + describe(ma));
        const uint8_t* mk = static_cast<const uint8_t*>(ma.data());
        auto res = new_array<double>({mp.N, 3});
        double* r = res.mutable_data();
        const long n = static_cast<long>(mp.H) * mp.W, nm = static_cast<long>(Hm) * Wm;
        {
          py::gil_scoped_release rel;
          parallel_for(mp.N, batch_threads(threads, mp.N, nm * (C + 1)), [&](long b, long e, int) {
            LocWork wk;
            for (long i = b; i < e; ++i)
              localization_map(mp.ptr + i * n, mp.H, mp.W, mk + i * C * nm, C, Hm, Wm, r + 3 * i, wk);
          });
        }
        return res;
      },
      py::arg("maps"), py::arg("masks"), py::kw_only(), py::arg("threads") = 0);
}
