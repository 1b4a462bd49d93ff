"""The pointing game (Zhang et al., 2016), one of method.md 3's metrics beyond the paper.

A map *hits* when its peak -- after the same bilinear resize to the mask resolution as
:func:`~diffcam.metrics.localization` -- lies on the object: within ``tolerance`` pixels
(Euclidean) of a foreground pixel of the union of the map's class masks.  The peak is the first
maximum in row-major order.  A map without a peak (constant, e.g. all zero) points nowhere and
counts as a miss, so a method cannot score by giving up.

>>> import numpy as np
>>> m = np.zeros((4, 4), np.float32); m[1, 1] = 1
>>> mask = np.zeros((8, 8), bool); mask[:4, :4] = True
>>> bool(pointing_game(m, mask))
True
>>> bool(pointing_game(np.zeros((4, 4), np.float32), mask))     # no peak: a miss
False
"""

from __future__ import annotations

import numpy as np

from ..refine.resize import resize_stack
from .localization import _host_maps, _mask_groups

__all__ = ["pointing_game"]


def pointing_game(maps, masks, tolerance: float = 0.0):
    """Per map, True where its peak lies on (or within ``tolerance`` pixels of) the object.

    ``maps``: one (H, W) map or a batch (N, H, W) in [0, 1]; ``masks``: as for
    :func:`~diffcam.metrics.localization` (the union of a map's class masks is its object).
    Returns a bool for one map, a bool array for a batch; the hit rate is its mean.
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    batch, data = _host_maps(maps)
    groups = _mask_groups(masks, batch.n, batch.single)
    hits = np.zeros(batch.n, dtype=bool)
    tol2 = float(tolerance) ** 2
    for i, g in enumerate(groups):
        obj = g.any(axis=0)
        m = resize_stack(data[i], obj.shape)
        if not m.max() > m.min():
            continue
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        if obj[y, x]:
            hits[i] = True
        elif tol2 > 0:
            ys, xs = np.nonzero(obj)
            hits[i] = bool(len(ys)) and bool((((ys - y) ** 2 + (xs - x) ** 2) <= tol2).any())
    return bool(hits[0]) if batch.single else hits
