"""``diffcam demo``: the bundled diffusion MLLM explains a handful of held-out scenes.

For every scene of the shapes world's test split the bundled model answers "describe the image",
Diffusion-CAM explains every word of the answer (raw Grad-CAM at the hooked block, refined with
the ``paper`` preset), and the maps of the words that name an object are scored against that
object's pixel-exact mask.  Written to the output folder:

* ``sceneNN.png``: the image, then one overlay per explained word (refined map), left to right;
* ``sceneNN_raw.png``: the same words with the raw Grad-CAM maps;
* ``maps.npz``: raw and refined maps of every scene, with the answer words;
* ``summary.json``: answers, per-scene and total scores, timings.

A table of Obj-IoU, contrast, concentration and F3 per scene and in total is printed.

``diffcam demo --synthetic`` runs the refinement core alone on synthetic token-grid maps (no
torch needed).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

GRID = 27
MASK = 216


def synthetic_scene(rng, grid: int = GRID, mask_size: int = MASK):
    """(raw map (grid, grid) in [0, 1], class masks (C, mask_size, mask_size), labels)."""
    n_obj = int(rng.integers(1, 4))
    yy, xx = np.mgrid[0:mask_size, 0:mask_size] / mask_size
    masks, labels = [], []
    for c in range(n_obj):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.08, 0.2, 2)
        if rng.random() < 0.5:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            labels.append("ellipse")
        else:
            m = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
            labels.append("box")
        masks.append(m)
    masks = np.stack(masks)
    # object coverage per token cell
    cell = mask_size // grid
    cover = masks.any(0).reshape(grid, cell, grid, cell).mean(axis=(1, 3))
    gy, gx = np.mgrid[0:grid, 0:grid]
    raw = cover * rng.uniform(0.5, 1.0, (grid, grid))                 # uneven object response
    raw += 0.25 * np.exp(-((gy - grid / 2) ** 2 + (gx - grid / 2) ** 2) / (2 * (grid / 3) ** 2))
    raw += 0.12 * rng.random((grid, grid))                            # diffuse background
    for _ in range(int(rng.integers(2, 6))):                          # artifact tokens
        raw[rng.integers(0, grid), rng.integers(0, grid)] += rng.uniform(0.6, 1.2)
    raw = np.maximum(raw, 0)
    raw = (raw - raw.min()) / (raw.max() - raw.min() + 1e-8)
    return raw.astype(np.float32), masks, labels


def run_synthetic(out_dir: str = "diffcam-demo", scenes: int = 8, seed: int = 0, backend=None,
                  quiet: bool = False) -> dict:
    """The refinement-only demo on synthetic maps (no torch needed); returns the summary dict
    that is also written to summary.json."""
    import diffcam
    from diffcam import metrics
    from diffcam.viz import overlay, write_png

    rng = np.random.default_rng(seed)
    data = [synthetic_scene(rng) for _ in range(scenes)]
    raw = np.stack([d[0] for d in data])
    masks = [d[1] for d in data]
    os.makedirs(out_dir, exist_ok=True)

    t0 = time.perf_counter()
    paper, info = diffcam.refine(raw, backend=backend, return_info=True)
    t_paper = time.perf_counter() - t0
    reference = diffcam.refine(raw, config="reference", backend=backend)

    results = {}
    for name, maps in (("raw", raw), ("paper", paper), ("reference", reference)):
        results[name] = metrics.localization(maps, masks)
    np.savez_compressed(os.path.join(out_dir, "maps.npz"), raw=raw, paper=paper,
                        reference=reference)
    for i in range(scenes):
        base = np.zeros((MASK, MASK, 3), np.uint8)
        base[masks[i].any(0)] = (90, 90, 90)
        tiles = [overlay(base, raw[i]), overlay(base, paper[i]), overlay(base, reference[i])]
        write_png(os.path.join(out_dir, f"scene{i:02d}_raw-paper-reference.png"),
                  np.concatenate(tiles, axis=1))

    summary = {name: metrics.summarize(s) for name, s in results.items()}
    summary["backend"] = info.backend
    summary["refine_ms_per_map"] = 1e3 * t_paper / scenes
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    if not quiet:
        _print_table(results, summary, out_dir)
    return summary


def _print_table(results, summary, out_dir):
    names = ("raw", "paper", "reference")
    print("Diffusion-CAM refinement demo (synthetic token-grid maps with known objects)")
    print(f"backend: {summary['backend']}, {summary['refine_ms_per_map']:.3f} ms per map "
          f"(including the first call)")
    header = f"{'scene':>6} " + " ".join(f"{n + ' IoU':>13} {n + ' F3':>12}" for n in names)
    print(header)
    n = len(np.atleast_1d(results["raw"].obj_iou))
    for i in range(n):
        cells = []
        for name in names:
            s = results[name]
            cells.append(f"{100 * s.obj_iou[i]:13.1f} {100 * s.f3[i]:12.1f}")
        print(f"{i:>6} " + " ".join(cells))
    print()
    print(f"{'map':>10} {'Obj-IoU %':>10} {'Contrast':>9} {'Concent. %':>11} {'F3 %':>7}")
    for name in names:
        s = summary[name]
        print(f"{name:>10} {100 * s['obj_iou']:10.2f} {s['contrast']:8.2f}x "
              f"{100 * s['concentration']:11.2f} {100 * s['f3_of_means']:7.2f}")
    print(f"\noverlays (raw | paper | reference) and maps.npz written to {os.path.abspath(out_dir)}")


# ------------------------------------------------------------------------ the bundled model
def run(out_dir: str = "diffcam-demo", scenes: int = 6, start: int = 0, split: str = "test",
        backend=None, quiet: bool = False, adapter=None) -> dict:
    """Explain ``scenes`` scenes of ``split`` with the bundled model; returns the summary dict
    that is also written to summary.json."""
    import diffcam
    from diffcam import metrics
    from diffcam.data import shapes
    from diffcam.models import evaluate
    from diffcam.viz import overlay, write_png

    if scenes < 1:
        raise ValueError(f"scenes={scenes} must be >= 1")
    t0 = time.perf_counter()
    ad = adapter if adapter is not None else diffcam.load("bundled")
    t_load = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    if not quiet:
        print(f"Diffusion-CAM demo: the bundled diffusion MLLM ({len(ad.blocks())} blocks, hooked "
              f"block {ad.default_layer}) on {scenes} held-out scenes of the shapes world")
    rows, arrays, total_raw, total_ref = [], {}, [], []
    t1 = time.perf_counter()
    for i in range(start, start + scenes):
        ts = time.perf_counter()
        rec = evaluate.collect_maps(ad, split, n=1, start=i, kinds=("describe",),
                                    gold_if_wrong=True)[0]
        sc = shapes.scene(split, i)
        row = {"scene": i, "answer": rec.answer, "expected": shapes.describe(sc),
               "correct": rec.correct}
        tiles_ref, tiles_raw = [sc.image], [sc.image]
        if rec.raw is not None:
            raw = evaluate.refine_record(rec, "raw")
            ref = evaluate.refine_record(rec, "paper")
            s_raw = metrics.localization(raw, [m[None] for m in rec.masks], backend=backend)
            s_ref = metrics.localization(ref, [m[None] for m in rec.masks], backend=backend)
            total_raw.append(s_raw)
            total_ref.append(s_ref)
            row.update({"words": rec.words, "paper": metrics.summarize(s_ref),
                        "raw": metrics.summarize(s_raw)})
            for k in range(len(rec.words)):
                tiles_ref.append(overlay(sc.image, ref[k]))
                tiles_raw.append(overlay(sc.image, raw[k]))
            arrays[f"scene{i:02d}_raw"] = rec.raw
            arrays[f"scene{i:02d}_paper"] = ref
            arrays[f"scene{i:02d}_words"] = np.array(rec.words)
        sep = np.full((sc.image.shape[0], 4, 3), 255, np.uint8)
        for name, tiles in (("", tiles_ref), ("_raw", tiles_raw)):
            strip = [t for tile in tiles for t in (tile, sep)][:-1]
            write_png(os.path.join(out_dir, f"scene{i:02d}{name}.png"), np.concatenate(strip, 1))
        row["seconds"] = time.perf_counter() - ts
        rows.append(row)
    t_explain = time.perf_counter() - t1
    np.savez_compressed(os.path.join(out_dir, "maps.npz"), **arrays)

    def _total(parts):
        if not parts:
            return None
        cat = metrics.LocalizationScores(*[np.concatenate([np.atleast_1d(getattr(p, f))
                                                           for p in parts])
                                           for f in ("obj_iou", "contrast", "concentration", "f3")])
        return metrics.summarize(cat)

    summary = {"model": ad.info(), "split": split, "scenes": rows,
               "answers_correct": sum(r["correct"] for r in rows),
               "total": {"raw": _total(total_raw), "paper": _total(total_ref)},
               "seconds": {"load": t_load, "explain": t_explain,
                           "per_scene": t_explain / scenes}}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if not quiet:
        _print_model_table(summary, out_dir)
    return summary


def _print_model_table(summary, out_dir):
    answers = [r["answer"] + ("" if r["correct"] else "  [wrong*]") for r in summary["scenes"]]
    w = max([52] + [len(a) for a in answers])          # the answer column fits every answer
    print(f"{'scene':>5}  {'answer':<{w}} {'Obj-IoU':>8} {'Contrast':>9} {'Concent.':>9} "
          f"{'F3':>6}")
    for r, ans in zip(summary["scenes"], answers):
        if "paper" in r:
            s = r["paper"]
            print(f"{r['scene']:>5}  {ans:<{w}} {100 * s['obj_iou']:7.1f}% {s['contrast']:8.2f}x "
                  f"{100 * s['concentration']:8.1f}% {100 * s['f3_of_means']:5.1f}%")
        else:
            print(f"{r['scene']:>5}  {ans:<{w}} {'(not scored: wrong answer)':>35}")
    for name in ("raw", "paper"):
        s = summary["total"][name]
        if s is None:
            continue
        label = "total, raw Grad-CAM" if name == "raw" else "total, Diffusion-CAM"
        print(f"{label:>{w + 6}} {100 * s['obj_iou']:7.1f}% {s['contrast']:8.2f}x "
              f"{100 * s['concentration']:8.1f}% {100 * s['f3_of_means']:5.1f}%")
    sec = summary["seconds"]
    print("* wrong answer: the maps explain the correct description (teacher forcing)")
    print(f"\n{summary['answers_correct']}/{len(summary['scenes'])} answers exactly right; "
          f"{sec['per_scene']:.2f} s per scene (generation + attribution + refinement), model "
          f"loaded in {sec['load']:.1f} s")
    print(f"overlays (image | one map per word), maps.npz and summary.json written to "
          f"{os.path.abspath(out_dir)}")
