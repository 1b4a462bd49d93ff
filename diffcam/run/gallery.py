"""The best and worst maps of a run, as pictures: :func:`gallery` (``diffcam report --gallery``).

For the ``n`` lowest- and ``n`` highest-scoring maps of a run (by any column of
:func:`diffcam.run.score_rows`, default the refined map's F3) it writes one PNG strip per map
-- the image, the raw Grad-CAM overlay, the Diffusion-CAM overlay, the ground-truth mask -- and
an ``index.html`` that lists them with the answer, the word and the scores.  The refined map is
recomputed from the stored raw maps exactly as the run scored it (same preset, same resolution,
same interference maps), so the picture is the map behind the number.

>>> import diffcam                                              # doctest: +SKIP
>>> diffcam.run.gallery("runs/shapes-test", "runs/shapes-test/gallery", n=8)   # doctest: +SKIP
'runs/shapes-test/gallery/index.html'
"""

from __future__ import annotations

import html
import os
import re
from typing import Optional

import numpy as np

from .report import score_rows
from .store import RunStore

__all__ = ["gallery", "scored_maps"]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:60] or "x"


def _config(store: RunStore):
    from ..refine import RefineConfig

    d = store.settings.get("refine")
    return RefineConfig.from_dict(d) if d else RefineConfig.paper()


def _image(rec: dict, arrays: dict) -> Optional[np.ndarray]:
    key = f"{rec['id']}/0/image"
    if key in arrays:
        return arrays[key]
    files = rec.get("image_files") or [None]
    if files[0] and os.path.isfile(files[0]):
        from ..attribution.images import load_image

        return load_image(files[0])
    return None


def scored_maps(run, sample_id: str, word: str):
    """(raw map normalised to [0, 1] at the grid's size, refined map at the image's size) of
    one scored word of one sample, recomputed from the stored raw maps as the run scored
    them."""
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    rec = next((r for r in store.records() if r["id"] == sample_id), None)
    if rec is None:
        raise KeyError(f"sample {sample_id!r} has no committed record in {store.path}")
    return _scored(store, rec, store.maps(sample_id), word)


def _scored(store: RunStore, rec: dict, arrays: dict, word: str):
    """:func:`scored_maps` for a record and its arrays already read."""
    from .. import refine as _refine
    from ..refine.resize import resize_stack
    from ..metrics.scoring import _normalised

    sc = rec.get("scores", {}).get(word)
    if sc is None:
        raise KeyError(f"sample {rec['id']!r} has no scored word {word!r}; scored: "
                       f"{sorted(rec.get('scores', {}))}")
    arr = arrays[f"{rec['id']}/0/{sc['grid']}"]
    hw = tuple(rec["image_sizes"][0]) if rec.get("image_sizes") else None
    m = resize_stack(arr[sc["target"], 0], hw)
    rep = sc.get("interference") or []
    if rep == "maps":           # the explanation's own interference maps
        inter = resize_stack(arrays[f"{rec['id']}/0/{sc['grid']}/interference"][:, 0], hw)
    else:
        inter = resize_stack(arr[rep, 0], hw) if rep else None
    ref = _refine(np.ascontiguousarray(m, np.float32), config=_config(store),
                  tokens=list(rec["token_ids"]), interference=inter)
    return _normalised(arr[sc["target"], 0]), np.asarray(ref, np.float32)


def _auto_masks(store: RunStore):
    """The ground truth of the run's dataset, when its spec says where to find it: the shapes
    world (scenes are regenerated), a COCO-style or a GranD-f dataset (reopened)."""
    spec = str(store.settings.get("dataset") or "")
    if spec.startswith("shapes:"):
        from ..data import shapes

        return lambda rec: shapes.word_masks(shapes.scene(rec["meta"]["split"],
                                                          rec["meta"]["scene"]))
    if spec.startswith("coco:"):
        from ..data.coco import CocoDataset

        path = spec[len("coco:"):].split("|", 1)[0]
        if os.path.exists(path):
            from .sources import coco_mask_keys

            ds = CocoDataset(path)
            keys = coco_mask_keys(ds)
            return lambda rec: ds.masks(rec["meta"]["image_id"], keys)
    if spec.startswith("grandf:"):
        from ..data.grandf import GrandfDataset

        path, *opts = spec[len("grandf:"):].split("|")
        kw = dict(o.partition("=")[::2] for o in opts)
        if os.path.isfile(path) and os.path.isdir(kw.get("images", "")):
            gds = GrandfDataset(path, images_dir=kw["images"])
            index = {sid: i for i, sid in enumerate(gds.ids)}
            keys = kw.get("keys", "head")
            return lambda rec: gds.masks(index[rec["id"]], keys)
    return None


def gallery(run, out_dir, n: int = 8, metric: str = "refined_f3", masks="auto") -> str:
    """Write the gallery of the ``n`` worst and ``n`` best maps by ``metric`` into
    ``out_dir``; returns the path of its ``index.html``.

    masks  the ground truth drawn as the last panel: "auto" (default) reads it from the
           run's dataset when the spec names one (the shapes world, a COCO-style folder that
           still exists), None leaves the panel out, or a callable ``(record) -> {name: mask}``
    """
    from ..viz.png import overlay, write_png

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    store = run if isinstance(run, RunStore) else RunStore.open(run)
    if isinstance(masks, str):
        if masks != "auto":
            raise ValueError(f"masks={masks!r}: expected 'auto', None or a callable")
        masks = _auto_masks(store)
    rows = score_rows(store)
    if not rows:
        raise ValueError(f"{store.path} has no scored maps: nothing to draw")
    if metric not in rows[0] or not isinstance(rows[0][metric], float):
        cols = [k for k, v in rows[0].items() if isinstance(v, float)]
        raise ValueError(f"metric={metric!r}: expected one of {cols}")
    order = sorted(range(len(rows)), key=lambda i: (rows[i][metric], i))
    worst = order[:n]
    best = [i for i in reversed(order[-n:]) if i not in worst]
    os.makedirs(out_dir, exist_ok=True)
    records = {r["id"]: r for r in store.records()}
    items = []
    for label, idx in (("worst", worst), ("best", best)):
        for rank, i in enumerate(idx):
            row = rows[i]
            rec = records[row["id"]]
            arrays = store.maps(row["id"])
            img = _image(rec, arrays)
            raw, ref = _scored(store, rec, arrays, row["word"])
            hw = ref.shape
            tiles = [img if img is not None else np.full((*hw, 3), 255, np.uint8),
                     overlay(img, raw) if img is not None else overlay(None, raw, size=hw),
                     overlay(img, ref) if img is not None else overlay(None, ref, size=hw)]
            if masks is not None:
                mk = masks(rec).get(row["mask"])
                if mk is not None:
                    tiles.append(np.repeat((np.asarray(mk, bool)[..., None] * 255)
                                           .astype(np.uint8), 3, axis=2))
            sep = np.full((hw[0], 4, 3), 255, np.uint8)
            strip = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)
            fn = f"{label}{rank:02d}_{_safe(row['id'])}_{_safe(row['word'])}.png"
            write_png(os.path.join(out_dir, fn), strip)
            items.append((label, fn, row))
    cells = []
    for label, fn, row in items:
        cells.append(
            f"<tr><td>{label}</td><td>{html.escape(str(row['id']))}</td>"
            f"<td>{html.escape(str(row['word']))}</td><td>{html.escape(str(row['answer']))}</td>"
            f"<td>{100 * row['raw_obj_iou']:.1f} / {100 * row['refined_obj_iou']:.1f}</td>"
            f"<td>{100 * row['raw_f3']:.1f} / {100 * row['refined_f3']:.1f}</td>"
            f"<td><img src=\"{html.escape(fn)}\"></td></tr>")
    doc = ("<!doctype html><meta charset=\"utf-8\"><title>diffcam gallery</title>"
           f"<h1>{html.escape(store.path)}</h1>"
           f"<p>{len(worst)} worst and {len(best)} best of {len(rows)} scored maps by "
           f"{html.escape(metric)}. Panels: image, raw Grad-CAM, Diffusion-CAM"
           + (", ground truth" if masks is not None else "") + ".</p>"
           "<table border=\"1\" cellpadding=\"4\"><tr><th></th><th>sample</th><th>word</th>"
           "<th>answer</th><th>Obj-IoU % raw / refined</th><th>F3 % raw / refined</th>"
           "<th></th></tr>" + "".join(cells) + "</table>")
    path = os.path.join(out_dir, "index.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc)
    os.replace(tmp, path)
    return path
