"""Diffusion-CAM against the baselines of method.md section 4 on the bundled benchmark
(``diffcam compare``, written to docs/baselines.md).

The same test scenes, questions and answers as ``diffcam eval`` (:mod:`diffcam.models.tables`),
explained by each method on the same model and the same image grid:

* random maps (the floor), Grad-CAM (the raw map, no refinement), Diffusion-CAM (the raw map
  refined by the ``paper`` preset at the image's resolution, as in docs/benchmark.md);
* LLaVA-CAM (``method="llava-cam"``: the norm feeding the hooked block's MLP, ReLU'd gradients,
  max-normalised, threshold 0.5) at the same block;
* the Token Activation Map (``method="tam"``: no gradients, final-layer logit lens with
  estimated causal inference and the rank filter, k = 3).

Every map is min-max normalised and scored by :func:`diffcam.metrics.localization` against the
pixel-exact masks of the objects its word names; the answers are the model's own (wrong answers
are counted, not scored).  Differences to Grad-CAM come with a paired bootstrap over scenes
(95 % interval).  The model parameter randomisation check (rank correlation between the maps of
the model and of a fully re-initialised copy explaining the same answers; an explanation should
give < 0.2) runs on the first ``sanity`` test scenes for every method.

Both shipped models are compared: the diffusion model and its autoregressive twin, where the
autoregressive baselines run in their native setting.

>>> from diffcam.models import compare
>>> report = compare.run(models=("diffusion",), test=20, sanity=5)     # doctest: +SKIP
>>> print(compare.render_markdown(report))                             # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data import shapes
from . import tables

__all__ = ["MODELS", "ROWS", "run", "compare_model", "render_markdown", "to_json"]

#: The shipped models compared, by ``diffcam.load("bundled", kind=...)``.
MODELS = ("diffusion", "autoregressive")

#: (row label, Explainer method, scoring config of :func:`tables.score`).
ROWS = (
    ("random maps (floor)", "diffusion-cam", "random"),
    ("Grad-CAM (raw map)", "diffusion-cam", "raw"),
    ("Diffusion-CAM (paper preset)", "diffusion-cam", "paper"),
    ("LLaVA-CAM", "llava-cam", "raw"),
    ("TAM (Token Activation Map)", "tam", "raw"),
)


def _sanity_config(config: str) -> str:
    return "raw" if config == "random" else config


def compare_model(kind: str = "diffusion", test: int = 200, kinds: Sequence[str] =
                  tables.DEFAULT_KINDS, cache_dir: Optional[str] = None,
                  layer: Optional[int] = None, n_boot: int = 1000, sanity: int = 20,
                  progress: bool = False, adapter=None, faith_scenes: int = 10,
                  faith_steps: int = 10) -> dict:
    """Every row of :data:`ROWS` for one shipped model (``kind``; or ``adapter``, then nothing
    is cached), on test scenes 0..test-1;
    the randomisation check on scenes 0..sanity-1 and the deletion / insertion AUCs
    (:mod:`diffcam.metrics.faithfulness`, ``faith_steps`` steps) on scenes
    0..faith_scenes-1."""
    from .. import load
    from .bundled import weights_dir
    from .evaluate import randomisation_check

    t_start = time.perf_counter()
    ad = adapter if adapter is not None else load("bundled", kind=kind)
    if layer is None:
        layer = int(ad.default_layer)
    fp = tables.weights_fingerprint(weights_dir(kind)) if adapter is None else ""
    if adapter is not None:
        cache_dir = None        # no fingerprint for a given adapter: never reuse cached maps
    methods = list(dict.fromkeys(m for _, m, _ in ROWS))
    records: Dict[str, list] = {}
    seconds: Dict[str, float] = {}
    for m in methods:
        t0 = time.perf_counter()
        if progress:
            print(f"[{kind}] {m}: {test} test scenes x {len(kinds)} questions", flush=True)
        st: dict = {}
        records[m] = tables.collect_split(ad, "test", test, kinds, cache_dir, fp, layer=layer,
                                          progress=progress, stats=st, method=m)
        seconds[m] = (st.get("explained_seconds", 0.0) + st.get("cached_seconds", 0.0))
    ref = records[methods[0]]
    for m in methods[1:]:     # generation does not depend on the method: the same answers
        for a, b in zip(ref, records[m]):
            if (a.index, a.kind, a.answer, a.correct) != (b.index, b.kind, b.answer, b.correct):
                raise RuntimeError(f"{m} records differ from {methods[0]}'s at scene {a.index} "
                                   f"({a.kind}): {a.answer!r} vs {b.answer!r}")
    preps = {m: tables.prepare(records[m], "test") for m in methods}
    base = preps[methods[0]]
    for m in methods[1:]:
        if not np.array_equal(preps[m].cluster, base.cluster):
            raise RuntimeError(f"{m}'s scored maps do not line up with {methods[0]}'s")
    from ..metrics import pointing_game

    rows, pointing, faith = [], [], []
    for label, m, cfg in ROWS:
        r = tables.score(preps[m], cfg, label, keep_maps=True)
        pointing.append(float(np.mean(pointing_game(r.maps, preps[m].masks))))
        if faith_scenes > 0:
            t0 = time.perf_counter()
            faith.append(_faithfulness(ad, preps[m], r.maps, faith_scenes, faith_steps))
            if progress:
                print(f"[{kind}] deletion / insertion {label}: {faith[-1][0]:.3f} / "
                      f"{faith[-1][1]:.3f} ({faith[-1][2]} maps, "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
        r.maps = None
        rows.append(r)
    raw = rows[1]
    deltas = [tables.paired_delta(base, r, raw, n_boot) for r in rows]
    by_kind = {}
    for k in [k for k in shapes.KINDS if k in set(base.kind.tolist())]:
        sel = base.kind == k
        by_kind[k] = [float(tables.f3_vec(*r.per_map[sel].mean(axis=0))) for r in rows]
        by_kind[k].append(int(sel.sum()))
    sanity_rows = []
    if sanity > 0:
        for label, m, cfg in ROWS:
            if cfg == "random":
                continue
            t0 = time.perf_counter()
            recs = [r for r in records[m] if r.index < sanity]
            rc = randomisation_check(ad, recs, _sanity_config(cfg), method=m, layer=layer)
            sanity_rows.append((label, rc["mean_rank_correlation"], rc["n_maps"],
                                time.perf_counter() - t0))
            if progress:
                print(f"[{kind}] randomisation check {label}: "
                      f"{rc['mean_rank_correlation']:+.3f} ({rc['n_maps']} maps)", flush=True)
    for r in rows:
        r.maps = None
    return {"kind": kind, "layer": layer, "fingerprint": fp, "rows": list(zip(rows, deltas)),
            "pointing": pointing, "faithfulness": faith, "faith_scenes": faith_scenes,
            "faith_steps": faith_steps,
            "by_kind": by_kind, "sanity": sanity_rows, "sanity_scenes": sanity,
            "n_scenes": base.n_scenes, "answers": len(ref),
            "correct": sum(r.correct for r in ref), "maps": base.n_maps,
            "accuracy": tables._accuracy(ref), "collect_seconds": seconds,
            "total_s": time.perf_counter() - t_start}


def _faithfulness(ad, prep, maps, n_scenes: int, steps: int):
    """Mean deletion AUC, mean insertion AUC and the number of maps, over the scored maps of
    scenes 0..n_scenes-1 (``maps`` aligned with ``prep``)."""
    from ..metrics.faithfulness import deletion_insertion
    from .evaluate import grounding_for

    dele, ins = [], []
    for pos, lo, hi in prep.slices:
        r = prep.records[pos]
        if r.index >= n_scenes:
            continue
        sc = shapes.scene(r.split, r.index)
        qa = shapes.question(sc, r.kind)
        idx = [w for w, _ in grounding_for(sc, qa)]
        if len(ad.tokenizer.encode(r.answer, add_special_tokens=False)) != len(r.answer.split()):
            raise RuntimeError("the faithfulness targets assume one token per answer word")
        s = deletion_insertion(ad, sc.image, r.prompt, r.token_ids, maps[lo:hi],
                               [[w] for w in idx], steps=steps)
        dele.extend(s.deletion_auc.tolist())
        ins.extend(s.insertion_auc.tolist())
    if not dele:
        return float("nan"), float("nan"), 0
    return float(np.mean(dele)), float(np.mean(ins)), len(dele)


def run(models: Sequence[str] = MODELS, test: int = 200,
        kinds: Sequence[str] = tables.DEFAULT_KINDS, cache_dir: Optional[str] = None,
        n_boot: int = 1000, sanity: int = 20, progress: bool = False, command: str = "",
        faith_scenes: int = 10, faith_steps: int = 10) -> dict:
    """:func:`compare_model` for each of ``models``; the report :func:`render_markdown` writes."""
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown model(s) {bad}: expected some of {MODELS}")
    if test < 1:
        raise ValueError("test needs at least one scene")
    t0 = time.perf_counter()
    out = {m: compare_model(m, test, kinds, cache_dir, None, n_boot, sanity, progress,
                            faith_scenes=faith_scenes, faith_steps=faith_steps)
           for m in models}
    return {"command": command, "models": out, "kinds": list(kinds), "n_boot": n_boot,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": tables._machine(), "total_s": time.perf_counter() - t0}


def render_markdown(report: dict) -> str:
    """docs/baselines.md from a :func:`run` report."""
    L: List[str] = [
        "# Diffusion-CAM against the baselines on the bundled benchmark",
        "",
        "Grad-CAM, Diffusion-CAM, LLaVA-CAM and the Token Activation Map (method.md section 4), "
        "computed on the same model, image grid, answers and target words, on the bundled "
        "models and the procedural shapes world.  Made by one command; nothing below is typed "
        "by hand:",
        "",
        "```",
        report["command"] or "diffcam compare",
        "```",
        "",
        f"Run {report['date']} on {report['machine']}; {report['total_s']:.0f} s in all "
        "(explanations are cached: a rerun only rescores).",
        "",
        "Protocol: test scenes of the shapes world, one question of each kind "
        f"({', '.join(report['kinds'])}) per scene, answered by the model itself; each grounded "
        "word of a correct answer is a target, scored against the pixel-exact mask of the "
        "object(s) it names (Obj-IoU, contrast, concentration, F3 of the means as in the paper, "
        "the mean per-map F3, and the pointing game: the share of maps whose peak lies on the "
        "object, `diffcam.metrics.pointing_game`).  All maps are min-max normalised before scoring; "
        "Diffusion-CAM refines the raw map with the `paper` preset at the image's resolution "
        "(as docs/benchmark.md).  LLaVA-CAM hooks the norm that feeds the MLP of the same block "
        "as Grad-CAM; TAM needs no block.  F3 - Grad-CAM: difference of F3 of the means with a "
        f"95 % paired bootstrap interval over scenes ({report['n_boot']} resamples).",
        "",
    ]
    for kind, rep in report["models"].items():
        title = ("The diffusion model" if kind == "diffusion"
                 else "The autoregressive twin (the baselines' native setting)")
        L += [f"## {title}", "",
              f"Hooked block {rep['layer']}; {rep['n_scenes']} scenes, {rep['correct']} of "
              f"{rep['answers']} answers correct, {rep['maps']} scored maps; weights "
              f"{rep['fingerprint'] or '(given adapter)'}.", ""]
        extra = {id(r): [tables._pct(p), tables._ci(d)]
                 for (r, d), p in zip(rep["rows"], rep["pointing"])}
        L += tables._table([r for r, _ in rep["rows"]],
                           ["pointing game %", "F3 - Grad-CAM (95 % CI)"],
                           lambda r: extra[id(r)])
        L += ["", "F3 of the means per question kind:", "",
              "| kind | maps | " + " | ".join(r.label for r, _ in rep["rows"]) + " |",
              "|---|---:|" + "---:|" * len(rep["rows"])]
        for k, vals in rep["by_kind"].items():
            L.append(f"| {k} | {vals[-1]} | " + " | ".join(tables._pct(v) for v in vals[:-1])
                     + " |")
        if rep["sanity"]:
            L += ["", f"Model parameter randomisation check (test scenes 0-"
                  f"{rep['sanity_scenes'] - 1}; mean Spearman correlation with the maps of a "
                  "fully re-initialised copy explaining the same answers; < 0.2 passes):", "",
                  "| method | rank correlation | maps | verdict |", "|---|---:|---:|---|"]
            for label, rc, n, _ in rep["sanity"]:
                verdict = "no scored map" if n == 0 else ("passes" if rc < 0.2 else "fails")
                L.append(f"| {label} | {'-' if n == 0 else f'{rc:+.3f}'} | {n} | {verdict} |")
        if rep.get("faithfulness"):
            L += ["", f"Deletion and insertion through the model (test scenes 0-"
                  f"{rep['faith_scenes'] - 1}, {rep['faith_steps']} steps, blurred image as the "
                  "baseline, `diffcam.metrics.faithfulness`): the mean AUC of the word's "
                  "probability as the map's top pixels are blurred away (deletion, lower is "
                  "better) or revealed on the blurred image (insertion, higher is better):", "",
                  "| method | deletion AUC | insertion AUC | maps |", "|---|---:|---:|---:|"]
            for (r, _), (d, i, n) in zip(rep["rows"], rep["faithfulness"]):
                L.append(f"| {r.label} | {d:.3f} | {i:.3f} | {n} |")
        secs = ", ".join(f"{m} {s:.0f} s" for m, s in rep["collect_seconds"].items())
        L += ["", f"Explaining time (when first made): {secs}.", ""]
    return "\n".join(L) + "\n"


def to_json(report: dict) -> dict:
    """The numbers of a :func:`run` report as plain JSON types (one entry per model and row)."""
    def num(x):
        x = float(x)
        return x if np.isfinite(x) else None

    out = {k: report[k] for k in ("command", "kinds", "n_boot", "date", "machine", "total_s")}
    out["models"] = {}
    for kind, rep in report["models"].items():
        rows = []
        for n, (r, d) in enumerate(rep["rows"]):
            row = {"label": r.label, "config": r.config if isinstance(r.config, str) else
                   r.config.preset, "obj_iou": num(r.obj_iou), "contrast": num(r.contrast),
                   "concentration": num(r.concentration), "f3": num(r.f3),
                   "f3_mean": num(r.f3_mean), "n_maps": int(r.n_maps),
                   "pointing_game": num(rep["pointing"][n]),
                   "f3_minus_gradcam": [num(x) for x in d]}
            if rep.get("faithfulness"):
                dl, ins, nm = rep["faithfulness"][n]
                row.update(deletion_auc=num(dl), insertion_auc=num(ins), faith_maps=int(nm))
            rows.append(row)
        out["models"][kind] = {
            "layer": rep["layer"], "fingerprint": rep["fingerprint"], "rows": rows,
            "by_kind": {k: {"maps": v[-1], "f3": dict(zip([r["label"] for r in rows],
                                                           map(num, v[:-1])))}
                        for k, v in rep["by_kind"].items()},
            "randomisation": [{"label": lab, "rank_correlation": num(rc), "n_maps": n}
                              for lab, rc, n, _ in rep["sanity"]],
            "answers": rep["answers"], "correct": rep["correct"], "maps": rep["maps"]}
    return out
