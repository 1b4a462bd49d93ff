"""The Token Activation Map paper's token-level protocol: Obj-IoU, Func-IoU and F1-IoU.

Per-token maps are judged two ways (docs/method.md 3).  The map of a word that names an object
should cover that object: Obj-IoU, exactly as :func:`diffcam.metrics.localization` computes it
(bilinear resize to the mask, uint8 by truncation, Otsu).  The map of a function word ("the",
"of", "and") should cover nothing: **Func-IoU** is the IoU of its predicted background with an
all-background ground truth, i.e. the fraction of its pixels below the image's foreground
threshold, ``mean(floor(255 * m) < t_fg)`` after the same resize, where ``t_fg`` is the mean of
the Otsu thresholds (uint8 units) of that image's object-word maps.  **F1-IoU** is the harmonic
mean of the dataset's mean Obj-IoU and mean Func-IoU (0 when either is 0).

This is the definition of the Diffusion-CAM authors' released evaluation
(``compute_obj_func_iou``: the Otsu thresholds of the noun maps, averaged, and the share of a
map strictly below that threshold); the TAM paper's own evaluation code is not available here.
An image without an object-word map has no threshold: its function-word maps get NaN and are
left out of the means.

>>> import numpy as np
>>> from diffcam.metrics import tam
>>> obj = np.array([[0.9, 0.8, 0.1, 0], [0.8, 0.7, 0.05, 0],     # "dog": top-left
...                 [0.1, 0, 0, 0], [0, 0, 0, 0.05]], np.float32)
>>> mask = np.zeros((4, 4), bool); mask[:2, :2] = True
>>> quiet = np.zeros((4, 4), np.float32); quiet[3, 3] = 0.6    # "the": one pixel lit
>>> loud = np.full((4, 4), 0.5, np.float32)                    # "of": lit everywhere
>>> s = tam.token_scores([obj], [mask], [quiet, loud])
>>> s.obj_iou.tolist(), s.func_iou.tolist(), s.threshold
([1.0], [0.9375, 0.0], 25.0)
>>> round(tam.f1_iou(s.obj_iou.mean(), s.func_iou.mean()), 4)
0.6383
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..refine.resize import resize
from .localization import _host_maps, _mask_groups, localization, otsu_threshold

__all__ = ["TokenScores", "token_scores", "func_iou", "foreground_threshold",
           "summarize_tokens", "f1_iou"]


@dataclass
class TokenScores:
    """The protocol's scores of one image.

    obj_iou    (K,) Obj-IoU of each object-word map
    func_iou   (F,) Func-IoU of each function-word map (NaN without an object-word map)
    threshold  t_fg, the mean Otsu threshold of the object-word maps in uint8 units (NaN when
               there is none)
    """

    obj_iou: np.ndarray
    func_iou: np.ndarray
    threshold: float

    def to_dict(self) -> dict:
        return {"obj_iou": self.obj_iou.tolist(), "func_iou": self.func_iou.tolist(),
                "threshold": self.threshold}


def _stack(maps, what: str) -> np.ndarray:
    if isinstance(maps, np.ndarray) and maps.ndim == 3:
        arr = maps
    else:
        items = list(maps)
        if not items:
            return np.zeros((0, 1, 1), np.float32)
        shapes = {np.shape(m) for m in items}
        if len(shapes) != 1:
            raise ValueError(f"{what}: every map must have the same shape, got {sorted(shapes)}")
        arr = np.stack([np.asarray(m) for m in items])
    if arr.ndim == 3 and arr.shape[0] == 0:
        return np.zeros(arr.shape, np.float32)
    _, data = _host_maps(arr)
    return data


def _at(data: np.ndarray, hw) -> np.ndarray:
    if data.shape[0] == 0 or tuple(data.shape[-2:]) == tuple(hw):
        return data
    return np.asarray(resize(data, tuple(int(v) for v in hw)), np.float32)


def foreground_threshold(maps, masks) -> float:
    """t_fg of one image: the mean Otsu threshold (uint8 units) of its object-word ``maps``
    (K, h, w), each resized to the resolution of its ``masks`` entry first (``masks``: K
    entries, each an (Hm, Wm) mask or a (C, Hm, Wm) stack, as for
    :func:`diffcam.metrics.localization`); NaN for K = 0.

    >>> import numpy as np
    >>> m = np.array([[[0.0, 0.2], [0.6, 1.0]]], np.float32)
    >>> foreground_threshold(m, [np.ones((2, 2), bool)])
    51.0
    """
    data = _stack(maps, "maps")
    if data.shape[0] == 0:
        return float("nan")
    groups = _mask_groups(masks, data.shape[0], False)
    ts = [float(otsu_threshold(_at(data[i:i + 1], g.shape[-2:]))[0])
          for i, g in enumerate(groups)]
    return float(np.mean(ts))


def func_iou(maps, threshold: float, size=None):
    """Func-IoU of function-word ``maps`` (one (h, w) map or a stack): the fraction of each
    map's pixels whose uint8 value ``floor(255 * m)`` is below ``threshold`` (t_fg, uint8
    units), after a bilinear resize to ``size`` = (height, width) when given.  A float for one
    map, an array for a stack; NaN where ``threshold`` is NaN.

    >>> import numpy as np
    >>> func_iou(np.array([[0.0, 0.5], [0.1, 1.0]], np.float32), 26)   # 0 and 25 are below
    0.5
    """
    single = isinstance(maps, np.ndarray) and maps.ndim == 2
    data = _stack(maps[None] if single else maps, "maps")
    t = float(threshold)
    if math.isnan(t):
        out = np.full(data.shape[0], np.nan)
    else:
        if size is not None:
            data = _at(data, size)
        u8 = np.floor(np.clip(data * np.float32(255.0), 0, 255))
        out = (u8 < t).reshape(data.shape[0], -1).mean(axis=1) if data.shape[0] else \
            np.zeros(0)
    return float(out[0]) if single else out


def token_scores(object_maps, object_masks, function_maps) -> TokenScores:
    """The protocol on one image: Obj-IoU of each object-word map against its masks
    (:func:`diffcam.metrics.localization`), t_fg from those maps
    (:func:`foreground_threshold`) and the Func-IoU of each function-word map at the first
    mask's resolution (:func:`func_iou`).  Maps are [0, 1] (K, h, w) / (F, h, w) stacks or
    lists; ``object_masks`` one entry per object map.
    """
    obj = _stack(object_maps, "object_maps")
    fun = _stack(function_maps, "function_maps")
    if obj.shape[0] == 0:
        if len(object_masks):
            raise ValueError(f"object_masks has {len(object_masks)} entries for 0 object maps")
        return TokenScores(np.zeros(0), np.full(fun.shape[0], np.nan), float("nan"))
    groups = _mask_groups(object_masks, obj.shape[0], False)
    ious = np.atleast_1d(np.asarray(localization(obj, groups).obj_iou, np.float64))
    t = foreground_threshold(obj, groups)
    return TokenScores(ious, np.atleast_1d(func_iou(fun, t, size=groups[0].shape[-2:])), t)


def f1_iou(obj: float, func: float) -> float:
    """The harmonic mean 2 O F / (O + F); 0 when either is 0 (or NaN).

    >>> f1_iou(0.5, 0.75)
    0.6
    """
    if not (obj > 0 and func > 0):
        return 0.0
    return float(2.0 * obj * func / (obj + func))


def summarize_tokens(scores: Iterable[TokenScores]) -> dict:
    """Dataset summary: ``obj_iou`` (mean over all object-word maps), ``func_iou`` (mean over
    the function-word maps that have a threshold), ``f1_iou`` of those two means, and the
    counts ``n_object_maps``, ``n_function_maps``.

    >>> import numpy as np
    >>> a = TokenScores(np.array([0.5]), np.array([0.9, 0.7]), 30.0)
    >>> b = TokenScores(np.zeros(0), np.array([np.nan]), float("nan"))
    >>> s = summarize_tokens([a, b]); (s["func_iou"], round(s["f1_iou"], 4), s["n_function_maps"])
    (0.8, 0.6154, 2)
    """
    objs, funs = [], []
    for s in scores:
        objs.extend(np.asarray(s.obj_iou, np.float64).ravel().tolist())
        funs.extend(v for v in np.asarray(s.func_iou, np.float64).ravel().tolist()
                    if not math.isnan(v))
    o = float(np.mean(objs)) if objs else float("nan")
    f = float(np.mean(funs)) if funs else float("nan")
    return {"obj_iou": o, "func_iou": f, "f1_iou": f1_iou(o, f),
            "n_object_maps": len(objs), "n_function_maps": len(funs)}
