"""Localization metrics of the paper: Obj-IoU, contrast, concentration and F3.

Protocol (docs/method.md 3): the map is resized to the mask resolution (bilinear), scaled to
uint8 by truncation and thresholded by Otsu (OpenCV semantics, 256 bins); Obj-IoU is the best
IoU over the ground-truth classes; contrast and concentration are read on the resized float map
with the union of the masks as foreground.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..refine import _common
from ..refine._arrays import as_batch
from ..refine.reference import f3_score

__all__ = ["localization", "LocalizationScores", "otsu_threshold", "f3_score", "summarize",
           "HIGHER_IS_BETTER"]

#: Score direction of every metric diffcam reports: the paper's four and the pointing game
#: (higher is better), the deletion AUC (lower is better) and the insertion AUC (higher).
HIGHER_IS_BETTER = {"obj_iou": True, "contrast": True, "concentration": True, "f3": True,
                    "pointing_game": True, "deletion_auc": False, "insertion_auc": True}


@dataclass
class LocalizationScores:
    """Per-map scores (arrays of length N, floats for a single map)."""

    obj_iou: Any
    contrast: Any
    concentration: Any
    f3: Any

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in self.__dict__.items()}


def _host_maps(maps):
    batch = as_batch(maps, "maps", max_value=1.0)
    data = batch.data
    if batch.on_gpu:
        data = _common.host(data).astype(np.float32)
    return batch, np.ascontiguousarray(data)


def otsu_threshold(maps, backend=None):
    """Otsu threshold (OpenCV semantics) of each [0, 1] map after uint8 scaling by truncation.

    The foreground is ``floor(255 * map) > threshold``.

    >>> import numpy as np
    >>> otsu_threshold(np.array([[0.0, 0.1], [0.9, 1.0]], np.float32))
    25
    """
    batch, data = _host_maps(maps)
    mod = _common.backend_for(_HostOnly(batch), backend)
    u8 = np.floor(np.clip(data * np.float32(255.0), 0, 255)).astype(np.uint8)
    return batch.wrap_scalars(np.asarray(_common.call(mod, "otsu_threshold_u8", u8)))


class _HostOnly:
    """Metrics always run on the host (masks and scores are small)."""

    on_gpu = False

    def __init__(self, batch):
        self.batch = batch


def _mask_groups(masks, n: int, single: bool):
    """Masks per map as uint8 (C, Hm, Wm) arrays."""
    if single:
        items = [masks]
    elif isinstance(masks, (list, tuple)):
        if len(masks) != n:
            raise ValueError(f"masks has {len(masks)} entries for {n} maps")
        items = list(masks)
    else:
        arr = np.asarray(_common.host(masks))
        if arr.ndim not in (3, 4) or arr.shape[0] != n:
            raise ValueError(f"masks for {n} maps must be (N, C, Hm, Wm), (N, Hm, Wm) or a list "
                             f"of N arrays, got shape {arr.shape}")
        items = list(arr)
    out = []
    for i, m in enumerate(items):
        a = np.asarray(_common.host(m))
        if a.dtype.kind not in "biuf":
            raise TypeError(f"masks[{i}] must be a boolean or numeric array, got {a.dtype}")
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or 0 in a.shape:
            raise ValueError(f"masks[{i}] must be (C, Hm, Wm) or (Hm, Wm) and non-empty, got "
                             f"shape {a.shape}")
        out.append(np.ascontiguousarray(a != 0, dtype=np.uint8))
    return out


def localization(maps, masks, backend=None) -> LocalizationScores:
    """Obj-IoU, contrast, concentration and F3 of each map against its ground-truth masks.

    ``masks``: for one map a (C, Hm, Wm) stack of class masks (or one (Hm, Wm) mask); for a
    batch an (N, C, Hm, Wm) array or a list of N stacks (sizes may differ between maps).

    >>> import numpy as np
    >>> m = np.zeros((4, 4), np.float32); m[:2, :2] = 1
    >>> masks = np.zeros((2, 8, 8), bool); masks[0, :4, :4] = True; masks[1, 6:, 6:] = True
    >>> s = localization(m, masks)
    >>> s.obj_iou, round(s.concentration, 3)   # bilinear 4x4 -> 8x8 spreads a little mass
    (1.0, 0.879)
    """
    batch, data = _host_maps(maps)
    groups = _mask_groups(masks, batch.n, batch.single)
    mod = _common.backend_for(_HostOnly(batch), backend)
    scores = np.zeros((batch.n, 3), dtype=np.float64)
    by_shape: dict = {}
    for i, g in enumerate(groups):
        by_shape.setdefault(g.shape, []).append(i)
    for shape, idx in by_shape.items():
        sub = np.ascontiguousarray(data[idx])
        stack = np.ascontiguousarray(np.stack([groups[i] for i in idx]))
        scores[idx] = _common.call(mod, "localization", sub, stack)
    f3 = np.array([f3_score(*row) for row in scores])
    w = batch.wrap_scalars
    return LocalizationScores(w(scores[:, 0]), w(scores[:, 1]), w(scores[:, 2]), w(f3))


def summarize(scores: LocalizationScores) -> dict:
    """Dataset summary as the paper reports it: the means of the three terms, F3 of those means,
    and the mean per-image F3.

    >>> s = LocalizationScores(np.array([0.5, 0.3]), np.array([4.0, 2.0]), np.array([0.6, 0.4]),
    ...                        np.array([0.0, 0.0]))
    >>> round(summarize(s)["f3_of_means"], 4)
    0.2687
    """
    iou = float(np.mean(scores.obj_iou))
    con = float(np.mean(scores.contrast))
    cen = float(np.mean(scores.concentration))
    return {"obj_iou": iou, "contrast": con, "concentration": cen,
            "f3_of_means": f3_score(iou, con, cen), "f3_mean": float(np.mean(scores.f3))}
