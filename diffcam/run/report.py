"""What a run folder holds, in numbers: :func:`summarize` and the text table of ``diffcam report``.

>>> import diffcam                                   # doctest: +SKIP
>>> s = diffcam.run.summarize("runs/shapes-test")    # doctest: +SKIP
>>> s["refined"]["f3_of_means"], s["raw"]["f3_of_means"]   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from .store import RunStore

__all__ = ["summarize", "format_summary", "score_rows", "function_word_rows", "write_scores"]

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


def _tam(rows: List[dict], funs: List[float]) -> dict:
    """The TAM protocol's summary of a run's scored maps (``rows``) and function-word maps."""
    from ..metrics.tam import TokenScores, summarize_tokens

    objs = np.array([r["obj_iou"] for r in rows], np.float64)
    return summarize_tokens([TokenScores(objs, np.asarray(funs, np.float64), float("nan"))])


def summarize(run) -> Dict:
    """Counts and localization scores of a run folder (or :class:`RunStore`): ``method``,
    ``done``,
    ``errors`` (id -> error type and message), ``correct`` / ``judged`` (samples whose expected
    answer is known), ``seconds_per_sample`` (median), and for the scored maps ``raw`` and
    ``refined``: the paper's summary (means of Obj-IoU, contrast, concentration, F3 of the
    means, mean per-map F3, ``n_maps``), overall and per ``meta["kind"]`` under ``by_kind``;
    ``tam``: the TAM protocol (:mod:`diffcam.metrics.tam`) for ``raw`` and ``refined``: mean
    Obj-IoU of the scored maps, mean Func-IoU of the function-word maps, F1-IoU, counts -- None
    when the run explained no function word next to a scored one (``targets="all"`` does)."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    recs = list(store.records())
    errs = store.errors({r["id"] for r in recs})
    rows: Dict[str, List[dict]] = {"raw": [], "refined": []}
    by_kind: Dict[str, Dict[str, List[dict]]] = {}
    for r in recs:
        kind = (r.get("meta") or {}).get("kind", "all")
        for sc in r.get("scores", {}).values():
            for which in ("raw", "refined"):
                rows[which].append(sc[which])
                by_kind.setdefault(kind, {"raw": [], "refined": []})[which].append(sc[which])
    funs: Dict[str, List[float]] = {"raw": [], "refined": []}
    for r in recs:
        for fw in (r.get("tam") or {}).get("function_words", []):
            for which in ("raw", "refined"):
                v = fw[which]
                if v == v:                                   # not NaN
                    funs[which].append(v)
    judged = [r for r in recs if "correct" in r]
    secs = [r["seconds"] for r in recs if "seconds" in r]
    return {
        "path": store.path, "dataset": store.settings.get("dataset"),
        "model": store.settings.get("model", {}).get("adapter"),
        "method": (store.settings.get("explain") or {}).get("method") or "diffusion-cam",
        "done": len(recs), "errors": {k: f"{v['type']}: {v['message']}" for k, v in errs.items()},
        "correct": sum(bool(r["correct"]) for r in judged), "judged": len(judged),
        "seconds_per_sample": float(np.median(secs)) if secs else None,
        "raw": _summ(rows["raw"]), "refined": _summ(rows["refined"]),
        "tam": {w: _tam(rows[w], funs[w]) for w in ("raw", "refined")}
        if funs["raw"] else None,
        "by_kind": {k: {w: _summ(v[w]) for w in ("raw", "refined")}
                    for k, v in sorted(by_kind.items())} if len(by_kind) > 1 else {},
    }


def _row(name, s):
    if s is None:
        return f"| {name} | - | - | - | - | - | 0 |"
    return (f"| {name} | {100 * s['obj_iou']:.2f} | {s['contrast']:.2f}x | "
            f"{100 * s['concentration']:.2f} | {100 * s['f3_of_means']:.2f} | "
            f"{100 * s['f3_mean']:.2f} | {s['n_maps']} |")


def _row_names(method: str):
    """Table labels of a run's raw and refined maps: Grad-CAM and Diffusion-CAM for the
    default method, else the method's maps and their refinement."""
    if method == "diffusion-cam":
        return "raw Grad-CAM", "Diffusion-CAM"
    name = {"grad-cam": "Grad-CAM", "llava-cam": "LLaVA-CAM", "tam": "TAM"}.get(method, method)
    return f"{name} (raw)", f"{name} + paper refinement"


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
        raw_name, ref_name = _row_names(s.get("method", "diffusion-cam"))
        lines += ["", "| maps | Obj-IoU % | contrast | concentration % | F3 % | per-map F3 % | "
                  "maps |", "|---|---:|---:|---:|---:|---:|---:|",
                  _row(raw_name, s["raw"]), _row(ref_name, s["refined"])]
        for kind, d in s["by_kind"].items():
            lines += [_row(f"{kind}: raw", d["raw"]), _row(f"{kind}: refined", d["refined"])]
        if s.get("tam"):
            lines += ["", "| TAM protocol | Obj-IoU % | Func-IoU % | F1-IoU % | function-word "
                      "maps |", "|---|---:|---:|---:|---:|"]
            for name, w in ((raw_name, "raw"), (ref_name, "refined")):
                t = s["tam"][w]
                lines.append(f"| {name} | {100 * t['obj_iou']:.2f} | {100 * t['func_iou']:.2f} | "
                             f"{100 * t['f1_iou']:.2f} | {t['n_function_maps']} |")
    if s["errors"]:
        lines += ["", "errors (first 10):"]
        lines += [f"- {k}: {v}" for k, v in list(s["errors"].items())[:10]]
    return "\n".join(lines)


def score_rows(run) -> List[dict]:
    """One flat row per scored map of a run: ``id``, ``index``, ``kind``, ``answer``,
    ``correct`` (None when not judged), ``word``, ``mask``, ``grid``, then ``raw_obj_iou``,
    ``raw_contrast``, ... ``refined_f3`` -- ready for a DataFrame
    (``pandas.DataFrame(score_rows(run))``) or :func:`write_scores`."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    rows = []
    for r in store.records():
        meta = r.get("meta") or {}
        for word, sc in r.get("scores", {}).items():
            row = {"id": r["id"], "index": r.get("index"), "kind": meta.get("kind"),
                   "answer": r.get("answer"), "correct": r.get("correct"), "word": word,
                   "mask": sc.get("mask"), "grid": sc.get("grid")}
            for which in ("raw", "refined"):
                for f in FIELDS:
                    row[f"{which}_{f}"] = sc[which][f]
            rows.append(row)
    return rows


FUNCTION_COLUMNS = ["id", "index", "kind", "answer", "correct", "word", "target",
                    "raw_threshold", "refined_threshold", "raw_func_iou", "refined_func_iou"]


def function_word_rows(run) -> List[dict]:
    """One flat row per function-word map of a run (the TAM protocol, :mod:`diffcam.metrics.tam`):
    ``id``, ``index``, ``kind``, ``answer``, ``correct``, ``word``, ``target`` (its index in
    the record's targets), ``raw_threshold`` / ``refined_threshold`` (the sample's t_fg, uint8
    units) and ``raw_func_iou`` / ``refined_func_iou``."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    rows = []
    for r in store.records():
        meta = r.get("meta") or {}
        t = r.get("tam") or {}
        for fw in t.get("function_words", []):
            rows.append({"id": r["id"], "index": r.get("index"), "kind": meta.get("kind"),
                         "answer": r.get("answer"), "correct": r.get("correct"),
                         "word": fw["word"], "target": fw["target"],
                         "raw_threshold": t["threshold"]["raw"],
                         "refined_threshold": t["threshold"]["refined"],
                         "raw_func_iou": fw["raw"], "refined_func_iou": fw["refined"]})
    return rows


def write_scores(run, path: str, which: str = "objects") -> int:
    """Write :func:`score_rows` (``which="objects"``, default) or :func:`function_word_rows`
    (``which="function_words"``) to ``path``: ``.csv`` (no dependency) or ``.parquet`` (needs
    pyarrow); written to a temporary file and renamed.  Returns the number of rows."""
    import csv
    import os
    import tempfile

    if which == "objects":
        rows = score_rows(run)
        cols = ["id", "index", "kind", "answer", "correct", "word", "mask", "grid"] + \
            [f"{w}_{f}" for w in ("raw", "refined") for f in FIELDS]
    elif which == "function_words":
        rows, cols = function_word_rows(run), FUNCTION_COLUMNS
    else:
        raise ValueError(f"which={which!r}: expected 'objects' or 'function_words'")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".parquet"):
        raise ValueError(f"{path}: expected a .csv or .parquet file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    os.close(fd)
    try:
        if ext == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)
        else:
            try:
                import pyarrow as pa
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError("writing .parquet needs pyarrow: pip install pyarrow (or "
                                  "write a .csv)") from e
            pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(rows)
