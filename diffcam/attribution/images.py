"""Image inputs of the explainer: paths, PIL images or NumPy arrays -> RGB uint8 (H, W, 3).

Grayscale, RGBA / LA / palette, 16-bit and float images are converted to RGB uint8 with a
UserWarning that says what was done; unreadable or corrupt files raise ValueError naming the path.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["load_image", "is_image_like"]


def is_image_like(x) -> bool:
    if isinstance(x, (str, os.PathLike, np.ndarray)):
        return True
    return type(x).__module__.startswith("PIL.") or hasattr(x, "convert") and hasattr(x, "mode")


def _warn(what: str, name: str) -> None:
    warnings.warn(f"{name}: {what}; converted to RGB uint8", UserWarning, stacklevel=4)


def _array_to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ValueError(f"{name}: expected an image array (H, W), (H, W, 3) or (H, W, 4), got "
                         f"shape {a.shape}")
    if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.dtype.itemsize > 1):
        _warn(f"{a.dtype} image (16-bit)" if a.dtype.itemsize == 2 else f"{a.dtype} image", name)
        hi = 65535.0 if a.dtype.itemsize == 2 or a.max() > 255 else 255.0
        a = np.clip(np.round(a.astype(np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)
    elif a.dtype.kind == "f":
        _warn(f"{a.dtype} image (float, read as [0, 1])", name)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: the float image contains NaN or inf")
        scale = 255.0 if a.max() <= 1.0 else 1.0
        a = np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        _warn("boolean image", name)
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.uint8)
    if a.ndim == 2:
        _warn("grayscale image", name)
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 4:
        _warn("RGBA image (alpha dropped)", name)
        a = a[..., :3]
    return np.ascontiguousarray(a)


def _pil_to_rgb(im, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if mode == "I" and a.size and a.max() <= 255:
            return _array_to_rgb(a.astype(np.uint8), name)
        return _array_to_rgb(a.astype(np.uint16) if mode.startswith("I;16") else a, name)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        _warn(f"{mode} image (alpha dropped)", name)
    elif mode in ("L", "1"):
        _warn(f"grayscale ({mode}) image", name)
    else:
        _warn(f"{mode} image", name)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image(x, name: str = "image") -> np.ndarray:
    """One image (path, PIL image, NumPy array, or CHW/HWC torch tensor) as RGB uint8."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        try:
            from PIL import Image
        except ImportError as e:          # pragma: no cover
            raise ImportError("reading image files needs Pillow: pip install Pillow; or pass "
                              "NumPy arrays") from e
        if not os.path.isfile(path):
            raise ValueError(f"cannot read image {path!r}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                return _pil_to_rgb(im, repr(path))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e} "
                             "(unreadable or corrupt file)") from e
    if isinstance(x, np.ndarray):
        return _array_to_rgb(x, name)
    if hasattr(x, "mode") and hasattr(x, "convert"):
        return _pil_to_rgb(x, name)
    if hasattr(x, "detach") and hasattr(x, "cpu"):       # a torch tensor
        a = x.detach().cpu().numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)
        return _array_to_rgb(a, name)
    raise ValueError(f"{name}: unsupported image type {type(x).__name__}; pass a path, a PIL "
                     "image or a NumPy array (H, W, 3)")
