"""A dependency-free PNG writer and a perceptual colour map for activation maps.

>>> import numpy as np, tempfile, os
>>> rgb = colorize(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
>>> rgb.shape, rgb.dtype
((3, 4, 3), dtype('uint8'))
>>> path = os.path.join(tempfile.mkdtemp(), "m.png"); write_png(path, rgb)
>>> open(path, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np

# Anchor colours of a dark-blue -> teal -> yellow ramp (perceptually ordered), interpolated.
_ANCHORS = np.array([[13, 8, 135], [84, 2, 163], [139, 10, 165], [185, 50, 137],
                     [219, 92, 104], [244, 136, 73], [254, 188, 43], [240, 249, 33]],
                    dtype=np.float64)


def colorize(m: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (values outside are clipped)."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0.0, 1.0)
    pos = m * (len(_ANCHORS) - 1)
    i0 = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (pos - i0)[..., None]
    rgb = _ANCHORS[i0] * (1 - t) + _ANCHORS[i0 + 1] * t
    return np.round(rgb).astype(np.uint8)


def _resize_nearest(m: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * m.shape[0] // h)
    xs = (np.arange(w) * m.shape[1] // w)
    return m[ys[:, None], xs[None, :]]


def overlay(image: np.ndarray | None, m: np.ndarray, alpha: float = 0.5,
            size: tuple[int, int] | None = None) -> np.ndarray:
    """Blend a colourised map over an RGB uint8 image (or return the map alone).

    The map is upsampled by pixel replication so token cells stay visible.
    """
    if image is None:
        h, w = size or (m.shape[0] * 8, m.shape[1] * 8)
        return colorize(_resize_nearest(m, h, w))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    heat = colorize(_resize_nearest(m, image.shape[0], image.shape[1])).astype(np.float64)
    out = (1 - alpha) * image.astype(np.float64) + alpha * heat
    return np.round(out).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG, atomically (temp file + rename)."""
    a = np.ascontiguousarray(rgb)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"write_png needs uint8 (H, W) or (H, W, 3), got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    color_type = 2 if a.ndim == 3 else 0
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
