"""What a run folder holds, in numbers: :func:`summarize` and the text table of ``diffcam report``.

>>> import diffcam                                   # doctest: +SKIP
>>> s = diffcam.run.summarize("runs/shapes-test")    # doctest: +SKIP
>>> s["refined"]["f3_of_means"], s["raw"]["f3_of_means"]   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from .store import RunStore

__all__ = ["summarize", "format_summary"]

FIELDS = ("obj_iou", "contrast", "concentration", "f3")


def _summ(rows: List[dict]):
    from ..metrics import LocalizationScores
    from ..metrics import summarize as _s

    if not rows:
        return None
    s = LocalizationScores(*[np.array([r[f] for r in rows], np.float64) for f in FIELDS])
    out = _s(s)
    out["n_maps"] = len(rows)
    return out


def summarize(run) -> Dict:
    """Counts and localization scores of a run folder (or :class:`RunStore`): ``done``,
    ``errors`` (id -> error type and message), ``correct`` / ``judged`` (samples whose expected
    answer is known), ``seconds_per_sample`` (median), and for the scored maps ``raw`` and
    ``refined``: the paper's summary (means of Obj-IoU, contrast, concentration, F3 of the
    means, mean per-map F3, ``n_maps``), overall and per ``meta["kind"]`` under ``by_kind``."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    recs = list(store.records())
    errs = store.errors()
    rows: Dict[str, List[dict]] = {"raw": [], "refined": []}
    by_kind: Dict[str, Dict[str, List[dict]]] = {}
    for r in recs:
        kind = (r.get("meta") or {}).get("kind", "all")
        for sc in r.get("scores", {}).values():
            for which in ("raw", "refined"):
                rows[which].append(sc[which])
                by_kind.setdefault(kind, {"raw": [], "refined": []})[which].append(sc[which])
    judged = [r for r in recs if "correct" in r]
    secs = [r["seconds"] for r in recs if "seconds" in r]
    return {
        "path": store.path, "dataset": store.settings.get("dataset"),
        "model": store.settings.get("model", {}).get("adapter"),
        "done": len(recs), "errors": {k: f"{v['type']}: {v['message']}" for k, v in errs.items()},
        "correct": sum(bool(r["correct"]) for r in judged), "judged": len(judged),
        "seconds_per_sample": float(np.median(secs)) if secs else None,
        "raw": _summ(rows["raw"]), "refined": _summ(rows["refined"]),
        "by_kind": {k: {w: _summ(v[w]) for w in ("raw", "refined")}
                    for k, v in sorted(by_kind.items())} if len(by_kind) > 1 else {},
    }


def _row(name, s):
    if s is None:
        return f"| {name} | - | - | - | - | - | 0 |"
    return (f"| {name} | {100 * s['obj_iou']:.2f} | {s['contrast']:.2f}x | "
            f"{100 * s['concentration']:.2f} | {100 * s['f3_of_means']:.2f} | "
            f"{100 * s['f3_mean']:.2f} | {s['n_maps']} |")


def format_summary(s: Dict) -> str:
    """Markdown text of a :func:`summarize` dict."""
    lines = [f"run: {s['path']}", f"dataset: {s['dataset']}  model: {s['model']}",
             f"samples explained: {s['done']}, errors: {len(s['errors'])}"]
    if s["judged"]:
        lines.append(f"answers right: {s['correct']}/{s['judged']} "
                     f"({100 * s['correct'] / s['judged']:.1f} %)")
    if s["seconds_per_sample"] is not None:
        lines.append(f"median time per sample: {s['seconds_per_sample']:.3f} s")
    if s["raw"] is None:
        lines.append("no scored maps (no sample has a mask named by an explained word)")
    else:
        lines += ["", "| maps | Obj-IoU % | contrast | concentration % | F3 % | per-map F3 % | "
                  "maps |", "|---|---:|---:|---:|---:|---:|---:|",
                  _row("raw Grad-CAM", s["raw"]), _row("Diffusion-CAM", s["refined"])]
        for kind, d in s["by_kind"].items():
            lines += [_row(f"{kind}: raw", d["raw"]), _row(f"{kind}: Diffusion-CAM",
                                                           d["refined"])]
    if s["errors"]:
        lines += ["", "errors (first 10):"]
        lines += [f"- {k}: {v}" for k, v in list(s["errors"].items())[:10]]
    return "\n".join(lines)
