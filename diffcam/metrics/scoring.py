"""Scoring an explanation against ground-truth masks: which answer word names which mask, and
the paper's metrics plus the TAM protocol for those words -- what ``diffcam run`` records per
sample and :meth:`diffcam.Explanation.score` returns.

>>> import numpy as np
>>> match_mask("Crosses", {"cross": np.ones((2, 2), bool)})
'cross'
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["match_mask", "score_explanation"]


def _plain_words(name: str) -> List[str]:
    w = name.strip().lower()
    out = [w]
    if w.endswith("es") and len(w) > 3:
        out.append(w[:-2])
    if w.endswith("s") and len(w) > 2:
        out.append(w[:-1])
    return out


def match_mask(name: str, masks: Optional[Dict[str, np.ndarray]]) -> Optional[str]:
    """The key of ``masks`` that the target word ``name`` refers to, or None: exact match
    (case-insensitive), then the word with a plural ``-s`` / ``-es`` removed, then a key whose
    plural is the word.

    >>> match_mask("Crosses", {"cross": None}), match_mask("dog", {"dogs": None})
    ('cross', 'dogs')
    >>> match_mask("the", {"cross": None}) is None
    True
    """
    if not masks:
        return None
    lower = {k.strip().lower(): k for k in masks}
    for w in _plain_words(name):
        if w in lower:
            return lower[w]
    for k_low, k in lower.items():
        if name.strip().lower() in _plain_words(k_low):
            return k
    return None


def _normalised(m: np.ndarray) -> np.ndarray:
    """A map clipped at 0 and divided by its maximum (unchanged when that is 0), float32."""
    m = np.maximum(np.asarray(m, np.float64), 0.0)
    mx = m.max() if m.size else 0.0
    return (m / mx if mx > 0 else m).astype(np.float32)


def _is_tam_function_word(name: str) -> bool:
    """A function word of the TAM protocol: a word of FUNCTION_WORDS (punctuation is not)."""
    from ..attribution.targets import FUNCTION_WORDS

    return name.strip().lower() in FUNCTION_WORDS


def score_explanation(exp, masks, cfg, refined=None) -> Tuple[Dict[str, dict], dict]:
    """Scores of every target of the Explanation ``exp`` whose word names one of ``masks``
    ({name: (H, W) mask}, :func:`match_mask`), as ``diffcam run`` records them and
    :meth:`Explanation.score` returns them (first image, default
    grid -- the high-resolution grid of anyres layouts --, first state): raw (min-max
    normalised, grid resolution) and refined (at the image's resolution); and the TAM
    protocol's Func-IoU of every function-word target (:mod:`diffcam.metrics.tam`: the share
    of its map below the mean Otsu threshold of the scored maps), ``{}`` when there is none."""
    from . import tam
    from .localization import localization

    if not masks or exp.aggregate_only:
        return {}, {}
    picks = []
    # SICD's interference: the explanation's own maps (stored as ".../interference"), else the
    # targets that are repeated function words (as Explanation.refined picks them)
    rep_idx = [] if cfg.preset == "reference" else (
        "maps" if exp.interference_maps else exp.interference_targets())
    for k, t in enumerate(exp.targets):
        key = match_mask(t.name, masks)
        if key is not None and masks[key].any():
            picks.append((k, t.name, key))
    if not picks:
        return {}, {}
    picked = {k for k, _, _ in picks}
    funs = [(k, t.name) for k, t in enumerate(exp.targets)
            if k not in picked and _is_tam_function_word(t.name)]
    g = exp.default_grid(0)
    rows = [k for k, _, _ in picks] + [k for k, _ in funs]
    raw = np.stack([_normalised(m) for m in exp.maps[0][g][rows, 0]])
    if refined is None:      # refine only what is scored: image 0, its default grid, state 0
        from dataclasses import replace

        sub = replace(exp, maps=[{g: exp.maps[0][g][:, :1]}], states=exp.states[:1],
                      images=exp.images[:1], layouts=exp.layouts[:1])
        refined = sub.refined(cfg)
    ref = np.ascontiguousarray(refined.maps[0][g][rows, 0], np.float32)
    n = len(picks)
    masks = [masks[key][None] for _, _, key in picks]
    s_raw = localization(raw[:n], masks)
    s_ref = localization(ref[:n], masks)
    out = {}
    for j, (k, name, key) in enumerate(picks):
        out[name] = {"mask": key, "target": k, "grid": g, "interference": rep_idx,
                     "raw": {f: float(np.atleast_1d(getattr(s_raw, f))[j])
                             for f in ("obj_iou", "contrast", "concentration", "f3")},
                     "refined": {f: float(np.atleast_1d(getattr(s_ref, f))[j])
                                 for f in ("obj_iou", "contrast", "concentration", "f3")}}
    if not funs:
        return out, {}
    hw = masks[0].shape[-2:]
    t = {w: tam.foreground_threshold(a[:n], masks) for w, a in (("raw", raw), ("refined", ref))}
    fi = {w: tam.func_iou(a[n:], t[w], size=hw) for w, a in (("raw", raw), ("refined", ref))}
    return out, {"threshold": t, "function_words": [
        {"word": name, "target": k, "raw": float(fi["raw"][j]),
         "refined": float(fi["refined"][j])} for j, (k, name) in enumerate(funs)]}
