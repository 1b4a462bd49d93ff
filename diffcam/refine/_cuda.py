"""Python glue of the CUDA backend (the compiled kernels are ``diffcam._cuda``).

The functions here have the names and signatures of the kernel contract (docs/kernels.md) and
take maps that already live on a GPU: torch CUDA tensors, CuPy arrays, any object exposing
``__cuda_array_interface__`` (Numba device arrays...) or a DLPack-capable GPU object.  The maps
are made contiguous float32 with the library that produced them (no copy to the host), the
outputs are allocated with that same library on the same device, the kernels are enqueued on
that library's *current stream* and the results come back as arrays of the same kind (per-map
scalars -- ``k``, ``branch``, ``tau``, ``tau_bg``, ``lam``, ``applied`` -- as device arrays too).
Nothing synchronises: use the results on the same stream, or synchronise before reading them
from another one.

``diffcam._cuda`` does not link against PyTorch; it receives raw device pointers, sizes, the
stream handle and the device ordinal.  ``params`` (``RefineConfig.to_params()``) is a host
float64 vector passed to the kernels by value.

>>> from diffcam.refine import _cuda
>>> ok, reason = _cuda.available()      # (False, 'no CUDA device: ...') on a CPU-only machine
>>> isinstance(ok, bool) and isinstance(reason, str)
True
"""

from __future__ import annotations

import numpy as np

from .config import PARAM_FIELDS

try:  # the compiled module is optional: this file must import without it
    from .. import _cuda as _ext
    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["available", "kernel_sizes", "rank_gaussian_filter", "confidence_gating",
           "background_attenuation", "causal_debiasing", "refine", "otsu_threshold_u8",
           "resize_bilinear", "localization"]

_AKD = PARAM_FIELDS.index("akd")


def available() -> tuple[bool, str]:
    """(True, description) when the extension imported and a CUDA device is visible, else
    (False, reason).  Never raises."""
    if _ext is None:
        return False, f"the CUDA extension diffcam._cuda could not be imported ({_IMPORT_ERROR})"
    try:
        count, err = _ext.device_count()
    except Exception as exc:  # pragma: no cover
        return False, f"no CUDA device: device query failed ({type(exc).__name__}: {exc})"
    if count <= 0:
        return False, f"no CUDA device: {err or 'cudaGetDeviceCount returned 0'}"
    return True, f"{count} CUDA device(s)"


def _require_ext():
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the CUDA backend is not available: {reason}")
    return _ext


# --------------------------------------------------------------------------- array adapters
def _module_of(x) -> str:
    return type(x).__module__.split(".")[0]


def _is_torch(x) -> bool:
    return _module_of(x) == "torch"


def _is_cupy(x) -> bool:
    return _module_of(x) == "cupy"


class _Lib:
    """The array library of the input: allocation, conversion, pointers, current stream."""

    def __init__(self, kind: str, device: int, back=None):
        # "torch" | "cupy"; "numpy" only for the CPU emulation of the kernels used by the
        # tests (tests/refine/cuda_emu.py), where device pointers are host pointers
        self.kind = kind
        self.device = device      # CUDA ordinal
        self.back = back          # callable converting a result to the caller's kind, or None

    # -- dtype names: "float32", "float64", "int32", "uint8"
    def _dt(self, name):
        if self.kind == "torch":
            import torch
            return getattr(torch, name)
        return np.dtype(name)

    def empty(self, shape, dtype):
        if self.kind == "numpy":
            return np.empty(tuple(shape), dtype=np.dtype(dtype))
        if self.kind == "torch":
            import torch
            return torch.empty(tuple(shape), dtype=self._dt(dtype), device=f"cuda:{self.device}")
        import cupy
        with cupy.cuda.Device(self.device):
            return cupy.empty(tuple(shape), dtype=self._dt(dtype))

    def convert(self, x, dtype):
        """x (an array of this library) as a C-contiguous array of `dtype` on our device."""
        if self.kind == "numpy":
            return np.ascontiguousarray(x, dtype=np.dtype(dtype))
        if self.kind == "torch":
            x = x.to(device=f"cuda:{self.device}", dtype=self._dt(dtype))
            return x.contiguous()
        import cupy
        with cupy.cuda.Device(self.device):
            return cupy.ascontiguousarray(cupy.asarray(x), dtype=self._dt(dtype))

    def from_host(self, a, dtype):
        a = np.ascontiguousarray(a, dtype=np.dtype(dtype))
        if self.kind == "numpy":
            return a.copy()
        if self.kind == "torch":
            import torch
            return torch.as_tensor(a, device=f"cuda:{self.device}")
        import cupy
        with cupy.cuda.Device(self.device):
            return cupy.asarray(a)

    @staticmethod
    def ptr(x) -> int:
        if x is None:
            return 0
        if isinstance(x, np.ndarray):
            return int(x.ctypes.data)
        if _is_torch(x):
            return int(x.data_ptr())
        return int(x.data.ptr)

    def stream(self) -> int:
        if self.kind == "numpy":
            return 0
        if self.kind == "torch":
            import torch
            return int(torch.cuda.current_stream(self.device).cuda_stream)
        import cupy
        with cupy.cuda.Device(self.device):
            return int(cupy.cuda.get_current_stream().ptr)

    def out(self, x):
        return self.back(x) if self.back is not None else x


def _adopt(x):
    """(array of torch/cupy on the GPU, _Lib) for a GPU array-like `x`; raises TypeError."""
    if _is_torch(x):
        if not x.is_cuda:
            raise TypeError("the CUDA backend needs maps on a GPU; got a CPU torch tensor "
                            "(move it with tensor.cuda())")
        return x, _Lib("torch", x.device.index if x.device.index is not None else 0)
    if _is_cupy(x):
        return x, _Lib("cupy", int(x.device.id))
    if hasattr(x, "__cuda_array_interface__"):
        back = None
        if _module_of(x) == "numba":
            def back(a):
                from numba import cuda as ncuda
                return ncuda.as_cuda_array(a)
        try:
            import cupy
            arr = cupy.asarray(x)
            return arr, _Lib("cupy", int(arr.device.id), back)
        except ImportError:
            pass
        import torch
        t = torch.as_tensor(x, device="cuda")
        return t, _Lib("torch", t.device.index or 0, back)
    if hasattr(x, "__dlpack__"):
        dev_type = None
        if hasattr(x, "__dlpack_device__"):
            dev_type = x.__dlpack_device__()[0]
        if dev_type is not None and int(dev_type) not in (2, 3, 13):  # CUDA, CUDA host, managed
            raise TypeError("the CUDA backend needs GPU memory; the DLPack object lives on "
                            f"device type {dev_type}")
        try:
            import cupy
            arr = cupy.from_dlpack(x)
            return arr, _Lib("cupy", int(arr.device.id))
        except ImportError:
            import torch
            t = torch.from_dlpack(x)
            if not t.is_cuda:
                raise TypeError("the CUDA backend needs maps on a GPU")
            return t, _Lib("torch", t.device.index or 0)
    raise TypeError("the CUDA backend takes GPU arrays (torch CUDA tensors, CuPy arrays, "
                    "__cuda_array_interface__ or DLPack objects); got "
                    f"{type(x).__module__}.{type(x).__name__}")


def _maps(x, ndim=3, dtype="float32"):
    arr, lib = _adopt(x)
    arr = lib.convert(arr, dtype)
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    return arr, lib


def _params(params) -> np.ndarray:
    if _is_torch(params):
        params = params.detach().cpu().numpy()
    elif hasattr(params, "get") and _is_cupy(params):
        params = params.get()
    p = np.ascontiguousarray(params, dtype=np.float64).ravel()
    if p.size < len(PARAM_FIELDS):
        raise ValueError(f"params must have {len(PARAM_FIELDS)} values, got {p.size}")
    return p


def _per_map(lib: _Lib, v, n: int, dtype: str):
    """A (n,) device array of `dtype` from a scalar, a host array or a device array."""
    if v is None:
        return None
    if _is_torch(v) or _is_cupy(v) or hasattr(v, "__cuda_array_interface__"):
        arr, vlib = _adopt(v)
        if vlib.kind != lib.kind:
            # mixed libraries: go through the host (only for this small per-map vector)
            host = arr.detach().cpu().numpy() if _is_torch(arr) else arr.get()
            arr = lib.from_host(np.broadcast_to(np.asarray(host).ravel(), (n,)), dtype)
        else:
            arr = lib.convert(arr, dtype).reshape(-1)
            if arr.shape[0] != n:
                if arr.shape[0] != 1:
                    raise ValueError(f"expected {n} per-map values, got {arr.shape[0]}")
                arr = lib.convert(arr.expand(n) if lib.kind == "torch"
                                  else __import__("cupy").broadcast_to(arr, (n,)), dtype)
        return arr
    return lib.from_host(np.broadcast_to(np.asarray(v, dtype=np.dtype(dtype)).ravel(), (n,)),
                         dtype)


def _rep(lib: _Lib, rep, shape):
    if rep is None:
        return None
    arr, rlib = _adopt(rep)
    if rlib.kind != lib.kind:
        raise TypeError("rep must come from the same array library as maps")
    arr = lib.convert(arr, "float32")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"rep must have the shape of maps {tuple(shape)}, got {tuple(arr.shape)}")
    return arr


# --------------------------------------------------------------------------- kernels
def kernel_sizes(maps, params, threads=0):
    """int32 (N,): the AKD kernel size of every map."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    k = lib.empty((n,), "int32")
    if n:
        ext.kernel_sizes(lib.ptr(m), n, h, w, _params(params), lib.ptr(k), lib.stream(),
                         lib.device)
    return lib.out(k)


def rank_gaussian_filter(maps, ksizes, threads=0):
    """float32 (N, H, W): the rank-weighted Gaussian filter, one (odd, 1..31) k per map."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    kmin, kmax = 1, 31  # device ksizes: one launch per odd size (blocks of others exit)
    if not (_is_torch(ksizes) or _is_cupy(ksizes) or hasattr(ksizes, "__cuda_array_interface__")):
        host = np.asarray(ksizes).ravel()
        if host.size:  # host ksizes: launch only the sizes that occur
            kmin, kmax = max(int(host.min()), 1), min(int(host.max()), 31)
    ks = _per_map(lib, ksizes, n, "int32")
    out = lib.empty((n, h, w), "float32")
    if n:
        ext.rank_gaussian_filter(lib.ptr(m), lib.ptr(ks), n, h, w, lib.ptr(out), lib.stream(),
                                 lib.device, kmin, kmax)
    return lib.out(out)


def confidence_gating(maps, params, threads=0):
    """out, branch int32 (N,), tau float64 (N,)."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    out = lib.empty((n, h, w), "float32")
    branch = lib.empty((n,), "int32")
    tau = lib.empty((n,), "float64")
    if n:
        ext.confidence_gating(lib.ptr(m), n, h, w, _params(params), lib.ptr(out),
                              lib.ptr(branch), lib.ptr(tau), lib.stream(), lib.device)
    return lib.out(out), lib.out(branch), lib.out(tau)


def background_attenuation(maps, params, threads=0):
    """out, tau_bg float64 (N,)."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    out = lib.empty((n, h, w), "float32")
    tau_bg = lib.empty((n,), "float64")
    if n:
        ext.background_attenuation(lib.ptr(m), n, h, w, _params(params), lib.ptr(out),
                                   lib.ptr(tau_bg), lib.stream(), lib.device)
    return lib.out(out), lib.out(tau_bg)


def causal_debiasing(maps, rep, rep_const, params, threads=0):
    """out, lam float64 (N,), applied uint8 (N,)."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    r = _rep(lib, rep, m.shape)
    rc = _per_map(lib, 0.0 if rep_const is None else rep_const, n, "float64")
    out = lib.empty((n, h, w), "float32")
    lam = lib.empty((n,), "float64")
    applied = lib.empty((n,), "uint8")
    if n:
        ext.causal_debiasing(lib.ptr(m), lib.ptr(r), lib.ptr(rc), n, h, w, _params(params),
                             lib.ptr(out), lib.ptr(lam), lib.ptr(applied), lib.stream(),
                             lib.device)
    return lib.out(out), lib.out(lam), lib.out(applied)


def refine(maps, rep, rep_const, params, threads=0):
    """The whole pipeline: out, k, branch, tau, tau_bg, lam, applied (per-map arrays (N,))."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    p = _params(params)
    r = _rep(lib, rep, m.shape)
    rc = _per_map(lib, 0.0 if rep_const is None else rep_const, n, "float64")
    out = lib.empty((n, h, w), "float32")
    k = lib.empty((n,), "int32")
    branch = lib.empty((n,), "int32")
    tau = lib.empty((n,), "float64")
    tau_bg = lib.empty((n,), "float64")
    lam = lib.empty((n,), "float64")
    applied = lib.empty((n,), "uint8")
    scratch = scratch_max = None
    if p[_AKD] != 0 and n:
        scratch = lib.empty((n, h, w), "float32")
        scratch_max = lib.empty((n,), "float64")
    if n:
        ext.refine(lib.ptr(m), lib.ptr(r), lib.ptr(rc), n, h, w, p, lib.ptr(out), lib.ptr(k),
                   lib.ptr(branch), lib.ptr(tau), lib.ptr(tau_bg), lib.ptr(lam),
                   lib.ptr(applied), lib.ptr(scratch), lib.ptr(scratch_max), lib.stream(),
                   lib.device)
    return tuple(lib.out(a) for a in (out, k, branch, tau, tau_bg, lam, applied))


def otsu_threshold_u8(imgs, threads=0):
    """int32 (N,): OpenCV's Otsu threshold of uint8 (N, H, W) images (bit-exact)."""
    ext = _require_ext()
    u8, lib = _maps(imgs, dtype="uint8")
    n, h, w = u8.shape
    out = lib.empty((n,), "int32")
    if n:
        ext.otsu_threshold_u8(lib.ptr(u8), n, h, w, lib.ptr(out), lib.stream(), lib.device)
    return lib.out(out)


def resize_bilinear(maps, out_h, out_w, threads=0):
    """float32 (N, out_h, out_w): half-pixel-centre bilinear resize with edge clamping."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    out_h, out_w = int(out_h), int(out_w)
    out = lib.empty((n, out_h, out_w), "float32")
    if n:
        ext.resize_bilinear(lib.ptr(m), n, h, w, out_h, out_w, lib.ptr(out), lib.stream(),
                            lib.device)
    return lib.out(out)


def localization(maps, masks, threads=0):
    """float64 (N, 3): Obj-IoU, contrast and concentration against uint8 masks (N, C, Hm, Wm)."""
    ext = _require_ext()
    m, lib = _maps(maps)
    n, h, w = m.shape
    mk, mlib = _adopt(masks)
    if mlib.kind != lib.kind:
        raise TypeError("masks must come from the same array library as maps")
    if lib.kind == "torch" and str(mk.dtype) == "torch.bool":
        mk = mk.to(dtype=lib._dt("uint8"))
    mk = lib.convert(mk, "uint8")
    if mk.ndim != 4 or mk.shape[0] != n:
        raise ValueError(f"masks must be (N, C, Hm, Wm) with N={n}, got {tuple(mk.shape)}")
    _, c, hm, wm = mk.shape
    out = lib.empty((n, 3), "float64")
    if n:
        ext.localization(lib.ptr(m), n, h, w, lib.ptr(mk), c, hm, wm, lib.ptr(out),
                         lib.stream(), lib.device)
    return lib.out(out)
