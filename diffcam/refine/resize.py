"""Bilinear resizing of maps: a token-grid map brought to image resolution before refinement.

The refinement modules are defined on image-resolution maps -- AKD's size factor is
``min(H / 512, 1.5)`` with H the height of the map being filtered, and a 3 x 3 rank filter on a
12 x 12 token grid spreads a map over a quarter of an object's width -- so the explainer and the
evaluation upsample a grid map to its image's size first (``Explanation.refined(size=...)``).
The resize is the one the metrics use (docs/method.md 3): half-pixel centres, edge clamping,
the same arithmetic on every backend.
"""

from __future__ import annotations

import numpy as np

from . import _common
from ._arrays import as_batch

__all__ = ["resize", "resize_stack"]

#: the largest output side accepted (a guard against a swapped or mistyped size)
MAX_SIDE = 16384


def _check_size(size):
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or an (height, width) pair, got {size!r}") from None
    out = []
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"size: the {name} must be an int, got {v!r}")
        if not 1 <= int(v) <= MAX_SIDE:
            raise ValueError(f"size: the {name} must be in [1, {MAX_SIDE}], got {int(v)}")
        out.append(int(v))
    return tuple(out)


def resize(maps, size, backend=None, threads=None):
    """Bilinear resize of one (H, W) map or a batch (N, H, W) to ``size`` = (height, width)
    (or one int for a square).  Half-pixel centres with edge clamping (OpenCV's ``INTER_LINEAR``
    for upsampling); values stay within each map's [min, max].  NumPy, torch (CPU or CUDA) or
    CuPy in, the same kind out.

    >>> import numpy as np
    >>> m = np.array([[0, 1], [1, 0]], np.float32)
    >>> resize(m, 4)
    array([[0.   , 0.25 , 0.75 , 1.   ],
           [0.25 , 0.375, 0.625, 0.75 ],
           [0.75 , 0.625, 0.375, 0.25 ],
           [1.   , 0.75 , 0.25 , 0.   ]], dtype=float32)
    >>> resize(np.zeros((3, 12, 12), np.float32), (96, 64)).shape
    (3, 96, 64)
    """
    h, w = _check_size(size)
    batch = as_batch(maps, "maps", allow_negative=True)
    mod = _common.backend_for(batch, backend)
    out = _common.call(mod, "resize_bilinear", batch.data, h, w,
                       threads=_common.check_threads(threads))
    return batch.wrap(out)


def resize_stack(maps, hw):
    """float32 NumPy resize of a stack of any leading shape (..., rows, cols) to ``hw`` =
    (height, width); ``hw`` None or equal to the current size returns the maps unchanged.  The
    helper behind ``Explanation.refined(size=...)`` and the evaluation's ``refine_at="image"``.

    >>> import numpy as np
    >>> resize_stack(np.zeros((2, 3, 4, 4), np.float32), (8, 6)).shape
    (2, 3, 8, 6)
    """
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    if hw is None or tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    flat = maps.reshape(-1, *maps.shape[-2:])
    return np.asarray(resize(flat, hw), np.float32).reshape(*maps.shape[:-2], *hw)
