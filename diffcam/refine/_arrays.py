"""Input checking and array-type round trips for the public refinement API.

The kernels see only C-contiguous float32 (N, H, W) arrays that passed these checks; callers
get back the type and shape they passed in (NumPy in, NumPy out; a torch tensor in, a torch
tensor on the same device out; one (H, W) map in, one map out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

_FLOAT_KINDS = "f"


#: Host arrays up to this many values get their range from one native pass (cheaper than
#: NumPy's two reductions on token-grid maps); larger ones use NumPy's vectorised min / max.
_NATIVE_RANGE_MAX = 1 << 16
_VALUE_RANGE: Any = None    # resolved on first use: diffcam._core.value_range, or False


def _native_value_range():
    global _VALUE_RANGE
    if _VALUE_RANGE is None:
        from .. import _backend

        mod, _ = _backend._probe("native")      # honours DIFFCAM_DISABLE_EXTENSIONS
        _VALUE_RANGE = getattr(mod, "value_range", False) if mod is not None else False
    return _VALUE_RANGE or None


def host_range(arr) -> tuple:
    """(min, max) of a C-contiguous float32 host array as floats; NaN anywhere shows up in both
    or either (Inf is kept), so ``math.isfinite`` of the two tells whether every value is."""
    fn = _native_value_range() if arr.size <= _NATIVE_RANGE_MAX else None
    if fn is not None:
        return fn(arr)
    return float(arr.min()), float(arr.max())


def _is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach") and hasattr(x, "device")


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy")


@dataclass
class Batch:
    """A validated batch of maps plus what is needed to give results back in the caller's form."""

    data: Any            # np.ndarray float32 (N, H, W) C-contiguous, or a GPU array of that shape
    single: bool         # the caller passed one (H, W) map
    kind: str            # "numpy" | "torch" | "cupy"
    on_gpu: bool
    dtype: Any           # the caller's floating dtype, restored on output
    device: Any = None

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    def wrap(self, out):
        """Return kernel output ``out`` ((N, H, W)) in the caller's form."""
        if self.kind == "torch":
            import torch

            if not isinstance(out, torch.Tensor):
                out = torch.from_numpy(np.ascontiguousarray(out))
            out = out.to(device=self.device, dtype=self.dtype)
        elif self.kind == "cupy":
            out = out.astype(self.dtype, copy=False)
        else:
            out = np.asarray(out)
            if out.dtype != self.dtype:
                out = out.astype(self.dtype)
        return out[0] if self.single else out

    def wrap_scalars(self, values):
        """Per-map values as a host NumPy array (or a scalar for a single map)."""
        if hasattr(values, "get") and _is_cupy(values):
            values = values.get()
        elif _is_torch(values):
            values = values.detach().cpu().numpy()
        values = np.asarray(values)
        return values[0].item() if self.single else values


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    return f"{type(x).__name__} of shape {tuple(shape) if shape is not None else '?'} and dtype {dtype}"


def as_batch(x, name: str = "maps", *, allow_negative: bool = False, max_value: float | None = None,
             normalize: bool = False) -> Batch:
    """Validate ``x`` (one (H, W) map or an (N, H, W) batch) and convert it for the kernels.

    Raises ``TypeError`` for non-numeric or integer input and ``ValueError`` for a wrong rank,
    empty arrays, NaN/Inf, negative values (unless ``allow_negative``) and values above
    ``max_value``.  ``normalize=True`` min-max normalises each map first (then ``max_value`` and
    the sign checks apply to the normalised maps).
    """
    if x is None:
        raise TypeError(f"{name} is None; expected an (H, W) or (N, H, W) float array")
    if type(x) is np.ndarray and x.dtype.kind == "f":      # the common case first, cheaply
        arr = x
        kind, on_gpu, dtype, device = "numpy", False, x.dtype, None
        if dtype.itemsize == 2:                  # float16 maps come back as float32
            dtype = np.dtype(np.float32)
    elif _is_torch(x):
        import torch

        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; "
                            f"convert with {name}.float()")
        kind, on_gpu, dtype, device = "torch", x.device.type == "cuda", x.dtype, x.device
        arr = x.detach()
        if not on_gpu:     # resolve_neg: NumPy cannot view a lazily negated tensor
            arr = arr.to(torch.float32).resolve_neg().contiguous().numpy()
    elif _is_cupy(x) or hasattr(x, "__cuda_array_interface__"):
        import cupy  # only reached when the caller already uses CuPy

        arr = cupy.asarray(x)
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got {arr.dtype}")
        kind, on_gpu, dtype, device = "cupy", True, arr.dtype, None
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} could not be read as an array: {exc}") from None
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a float array, got {_describe(arr)}")
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}; integer and "
                            f"boolean maps are ambiguous (scale them to [0, 1] floats first)")
        kind, on_gpu, dtype, device = "numpy", False, arr.dtype, None
        if dtype == np.float16:
            dtype = np.dtype(np.float32)

    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (N, H, W), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)})")
    single = arr.ndim == 2
    if single:
        arr = arr[None]

    if on_gpu:
        arr = _gpu_float32(arr, kind)
        lo, hi, finite = _gpu_stats(arr, kind)
    else:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        lo, hi = host_range(arr)                         # NaN and Inf show up in min/max
        finite = math.isfinite(lo) and math.isfinite(hi)
    if not finite:
        bad = "NaN" if _has_nan(arr) else "Inf"
        raise ValueError(f"{name} contains {bad} values; refine only finite maps "
                         f"(for example with np.nan_to_num)")
    if normalize:
        arr = _normalize(arr)
        lo = hi = None
    if lo is None:
        lo, hi = host_range(arr) if not on_gpu else (float(arr.min()), float(arr.max()))
    if not allow_negative and lo < 0:
        raise ValueError(f"{name} has negative values (min {lo:.4g}); activation maps must be "
                         f">= 0 (apply ReLU, or pass normalize=True to min-max each map)")
    if max_value is not None and hi > max_value * (1 + 1e-6):
        raise ValueError(f"{name} has values above {max_value:g} (max {hi:.4g}); the method expects "
                         f"maps in [0, 1]: pass normalize=True to min-max each map")
    return Batch(arr, single, kind, on_gpu, dtype, device)


def _gpu_float32(arr, kind):
    if kind == "torch":
        import torch

        return arr.to(torch.float32).contiguous()
    import cupy

    return cupy.ascontiguousarray(arr, dtype=cupy.float32)


def _gpu_stats(arr, kind):
    finite = bool((arr.isfinite() if kind == "torch" else __import__("cupy").isfinite(arr)).all())
    if not finite:
        return 0.0, 0.0, False
    return float(arr.min()), float(arr.max()), True


def _has_nan(arr) -> bool:
    """Whether ``arr`` (by its own type: a host map is NumPy by now, whatever came in) holds NaN."""
    if _is_torch(arr):
        return bool(arr.isnan().any())
    if _is_cupy(arr):
        import cupy

        return bool(cupy.isnan(arr).any())
    return bool(np.isnan(arr).any())


def _normalize(arr):
    n = arr.shape[0]
    flat = arr.reshape(n, -1)
    if _is_torch(flat):         # a CUDA tensor; a CPU tensor was turned into NumPy already
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
    else:
        lo = flat.min(axis=1, keepdims=True)
        hi = flat.max(axis=1, keepdims=True)
    out = (flat - lo) / (hi - lo + 1e-8)
    return out.reshape(arr.shape)


def host_array(x, name: str, dtype, ndim: int | None = None):
    """A small auxiliary input (tokens, masks) as a host NumPy array."""
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    elif _is_cupy(x):
        x = x.get()
    arr = np.asarray(x)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)
