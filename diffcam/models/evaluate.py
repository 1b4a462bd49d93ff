"""Scores of the bundled model on the shapes world: answer accuracy and map localization.

>>> import diffcam
>>> from diffcam.models import evaluate
>>> ad = diffcam.load("bundled")
>>> acc = evaluate.answer_accuracy(ad, "test", n=50)          # doctest: +SKIP
>>> recs = evaluate.collect_maps(ad, "test", n=20)             # doctest: +SKIP
>>> evaluate.score_maps(recs, "paper")["f3_of_means"]          # doctest: +SKIP

Map protocol
------------
For every held-out scene the model answers the question (its own generation, greedy
low-confidence remasking, ``adapter.default_generation``).  When the answer is right, each
*grounded* answer word (the colour and shape word of every object of a description; the colour
of a colour question; ``yes`` of a presence question; the number of a count question) is a
target, and its map is scored against the pixel-exact mask of the object(s) it refers to
(Obj-IoU, contrast, concentration, F3 of :func:`diffcam.metrics.localization`, which resize
every map bilinearly to the 96x96 masks).  Wrong answers are counted but not scored (their words
have no ground truth).  Refined maps are refined at the image's resolution by default: the
12x12 grid maps are upsampled to 96x96 first (``refine_at="image"``; ``"grid"`` refines the
token grid itself, where AKD's 3x3 filter blurs across whole objects -- docs/benchmark.md).

``collect_maps`` keeps the raw Grad-CAM maps, so any refinement setting can be scored on the same
records (``score_maps(records, config)``): ``"raw"`` (min-max normalised raw maps),
``"random"`` (uniform noise maps), ``"paper"``, ``"reference"`` or a
:class:`~diffcam.RefineConfig`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data import shapes

__all__ = ["answer_accuracy", "collect_maps", "score_maps", "MapRecord", "grounding_for",
           "randomised_copy", "rank_correlation", "randomisation_check"]


# ------------------------------------------------------------------------------ answers
def _prepare_batch(adapter, items):
    return [adapter.prepare([sc.image], qa.prompt) for sc, qa in items]


def _generate_texts(adapter, samples, config, batch: int) -> List[str]:
    """Answers of prepared samples (grouped by prompt length, batched)."""
    from ..generation import masked_diffusion_generate_batch

    out: List[Optional[str]] = [None] * len(samples)
    groups: Dict[int, List[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(int(s.inputs_embeds.shape[0]), []).append(i)
    for idx in groups.values():
        for lo in range(0, len(idx), batch):
            part = idx[lo:lo + batch]
            if getattr(adapter, "causal", False):
                res = list(adapter.greedy_decode([samples[i] for i in part], config.gen_length))
            else:
                res = [r.response_ids for r in
                       masked_diffusion_generate_batch(adapter, [samples[i] for i in part], config)]
            for i, r in zip(part, res):
                out[i] = adapter.answer_text(r)
    return out  # type: ignore[return-value]


def answer_accuracy(adapter, split: str = "test", n: int = 300, start: int = 0,
                    kinds: Sequence[str] = shapes.KINDS, generation=None, batch: int = 64,
                    return_records: bool = False):
    """Exact-match accuracy per question kind on scenes ``start..start+n`` of ``split`` (one
    question of every kind per scene).  Returns ``{kind: accuracy}`` (and the per-question
    records ``(scene index, kind, prompt, gold, answer)`` with ``return_records=True``)."""
    config = generation or adapter.default_generation
    items = []
    for i in range(start, start + n):
        sc = shapes.scene(split, i)
        for k in kinds:
            items.append((sc, shapes.question(sc, k)))
    texts = _generate_texts(adapter, _prepare_batch(adapter, items), config, batch)
    recs = [(sc.index, qa.kind, qa.prompt, qa.answer, t) for (sc, qa), t in zip(items, texts)]
    acc = {}
    for k in kinds:
        r = [x for x in recs if x[1] == k]
        acc[k] = sum(x[3] == x[4] for x in r) / max(1, len(r))
    return (acc, recs) if return_records else acc


# ------------------------------------------------------------------------------ maps
@dataclass
class MapRecord:
    """The raw maps of one answered question.

    raw        float32 (T, 12, 12): raw Grad-CAM map of every grounded answer token
    token_ids  the answer's token ids (for SICD's repeated-token fallback)
    masks      bool (T, 96, 96): the ground-truth object mask of every target (union of the
               instances a word refers to)
    """

    split: str
    index: int
    kind: str
    prompt: str
    answer: str
    correct: bool
    raw: np.ndarray = field(repr=False, default=None)
    token_ids: List[int] = field(default_factory=list)
    masks: np.ndarray = field(repr=False, default=None)
    words: List[str] = field(default_factory=list)
    interference: Optional[np.ndarray] = field(repr=False, default=None)


def _interference_maps(exp) -> np.ndarray:
    """SICD's interference stack (X, 12, 12) of an explanation of the bundled model: the maps
    the Explainer computed for it (the repeated function words and the ``<eos>`` padding,
    ``Explanation.interference_maps``), else the maps of its targets that are repeated function
    words (``targets="all"``; :meth:`~diffcam.Explanation.interference_targets`), as
    ``Explanation.refined`` picks them."""
    stack = (exp.interference_maps[0]["hires"] if exp.interference_maps
             else exp.maps[0]["hires"][exp.interference_targets()])
    return np.ascontiguousarray(stack[:, 0], dtype=np.float32)


def grounding_for(sc, qa) -> List[tuple]:
    """(answer word index, [instance indices]) of every grounded word of the gold answer."""
    by_word: Dict[int, List[int]] = {}
    for w, k in qa.grounding:
        by_word.setdefault(w, []).append(k)
    return sorted(by_word.items())


def collect_maps(adapter, split: str = "test", n: int = 60, start: int = 0,
                 kinds: Sequence[str] = ("describe",), layer: Optional[int] = None,
                 generation=None, progress: bool = False,
                 gold_if_wrong: bool = False, method: str = "diffusion-cam",
                 explainer_kwargs: Optional[dict] = None) -> List[MapRecord]:
    """Generate, check and explain ``n`` scenes (one question of each of ``kinds`` per scene).

    ``method``: the Explainer's method (``"diffusion-cam"``: the raw Grad-CAM maps, refined
    later by :func:`score_maps`; ``"llava-cam"`` / ``"tam"``: the baselines' maps, which
    ``score_maps(records, "raw")`` scores as they are, min-max normalised);
    ``explainer_kwargs``: more arguments of :class:`~diffcam.Explainer` (e.g. ``tam_kernel``).

    ``gold_if_wrong``: when the generated answer is wrong, explain the correct answer instead
    (teacher forcing, padded with ``<eos>`` like a generated one) so that its words can still be
    scored; ``rec.correct`` stays False and ``rec.answer`` holds the generated text (``""`` when
    the model generated only ``<eos>``: an empty answer is a wrong answer, not an error)."""
    from ..attribution import EmptyAnswerError, Explainer

    recs: List[MapRecord] = []
    t0 = time.perf_counter()
    with Explainer(adapter, layer=layer, **(explainer_kwargs or {})) as ex:
        for i in range(start, start + n):
            sc = shapes.scene(split, i)
            for kind in kinds:
                qa = shapes.question(sc, kind)
                ground = grounding_for(sc, qa)
                try:
                    exp = ex.explain(sc.image, qa.prompt, targets="all", generation=generation,
                                     method=method)
                except EmptyAnswerError:
                    # the model generated nothing but <eos>: a wrong (empty) answer
                    exp, text = None, ""
                else:
                    text = adapter.answer_text(exp.token_ids)
                rec = MapRecord(split, i, kind, qa.prompt, text, text == qa.answer)
                recs.append(rec)
                if not ground or (not rec.correct and not gold_if_wrong):
                    continue
                if not rec.correct:
                    n_gen = (len(exp.token_ids) if exp is not None
                             else (generation or adapter.default_generation).gen_length)
                    pad = n_gen - len(qa.answer.split())
                    eos = adapter.tokenizer.eos_token
                    exp = ex.explain(sc.image, qa.prompt, targets="all",
                                     answer=qa.answer + (" " + eos) * max(0, pad), method=method)
                words = [w.text for w in exp.words]
                gold = qa.answer.split()
                if words[:len(gold)] != gold:
                    raise RuntimeError(f"answer words {words} do not line up with {gold}")
                # targets='all' gives one target per answer word, in order
                names = [t.name for t in exp.targets]
                hires = exp.maps[0]["hires"][:, 0]                     # (targets + 1, 12, 12)
                idx = [w for w, _ in ground]
                if max(idx) >= len(names):
                    raise RuntimeError(f"grounded word {max(idx)} beyond the targets {names}")
                rec.raw = np.ascontiguousarray(hires[idx], dtype=np.float32)
                rec.words = [gold[w] for w in idx]
                rec.token_ids = [int(t) for t in exp.token_ids]
                rec.masks = np.stack([np.any(sc.masks[ks], axis=0) for _, ks in ground])
                rec.interference = _interference_maps(exp)
            if progress and (i - start + 1) % 10 == 0:
                el = time.perf_counter() - t0
                print(f"  explained {i - start + 1}/{n} scenes ({el:.0f} s)", flush=True)
    return recs


def _normalise(maps: np.ndarray) -> np.ndarray:
    m = np.maximum(maps.astype(np.float64), 0)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return ((m - lo) / np.where(hi - lo > 0, hi - lo, 1)).astype(np.float32)


#: where the refinement modules run: "image" upsamples the 12 x 12 grid maps (bilinear, the
#: metrics' resize) to the scene's 96 x 96 pixels first, as the modules are defined on
#: image-resolution maps (Explanation.refined's default); "grid" refines the token grid itself
REFINE_AT = ("image", "grid")


def refine_size(rec: MapRecord, refine_at: str = "image"):
    """(height, width) the record's maps are refined at (None: the grid's own)."""
    if refine_at not in REFINE_AT:
        raise ValueError(f"refine_at={refine_at!r}: expected one of {REFINE_AT}")
    return tuple(int(x) for x in np.shape(rec.masks)[-2:]) if refine_at == "image" else None


def refine_record(rec: MapRecord, config, refine_at: str = "image") -> np.ndarray:
    """The record's maps under ``config`` ('raw', 'random', 'paper', 'reference', RefineConfig).

    'raw' and 'random' maps stay on the token grid (the metrics resize them to the masks);
    refined maps are refined at ``refine_at`` (:data:`REFINE_AT`)."""
    import diffcam

    if isinstance(config, str) and config == "raw":
        return _normalise(rec.raw)
    if isinstance(config, str) and config == "random":
        rng = np.random.default_rng([rec.index, len(rec.words)])
        return rng.random(rec.raw.shape).astype(np.float32)
    from ..refine.resize import resize_stack

    hw = refine_size(rec, refine_at)
    maps = resize_stack(_normalise(rec.raw), hw)
    inter = None
    reference = (config == "reference" if isinstance(config, str)
                 else getattr(config, "preset", "") == "reference")
    # the reference preset reproduces the released code: its uniform constant, no maps
    # (as Explanation.refined)
    if not reference and rec.interference is not None and len(rec.interference):
        inter = [resize_stack(_normalise(rec.interference), hw)] * len(maps)
    return np.asarray(diffcam.refine(maps, config=config, tokens=list(rec.token_ids) or None,
                                     interference=inter), np.float32)


def score_maps(records: Sequence[MapRecord], config="paper", per_map: bool = False,
               refine_at: str = "image"):
    """Localization summary (metrics.summarize) of every scored map of ``records`` under
    ``config`` (refined at ``refine_at``, see :func:`refine_record`); ``n_maps`` and
    ``n_answers`` / ``n_correct`` are added."""
    from .. import metrics

    maps, masks = [], []
    for r in records:
        if r.raw is None:
            continue
        out = refine_record(r, config, refine_at)
        maps.extend(out)
        masks.extend(m[None] for m in r.masks)
    if not maps:
        raise ValueError("no scored maps: every answer was wrong or ungrounded")
    s = metrics.localization(np.stack(maps), masks)
    summ = metrics.summarize(s)
    summ.update(n_maps=len(maps), n_answers=len(records),
                n_correct=sum(r.correct for r in records))
    return (summ, s) if per_map else summ


# ------------------------------------------------------------------------------ sanity check
def randomised_copy(adapter, seed: int = 0):
    """The same adapter around a copy of its model with every weight re-initialised (the model
    parameter randomisation test of Adebayo et al. 2018, full randomisation)."""
    import copy

    from ..adapters.bundled import BundledAdapter

    model = copy.deepcopy(adapter.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)
        model.apply(model._init_weights)
    return BundledAdapter(model, adapter.tokenizer, name=adapter.name + "-randomised")


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (average ranks for ties); 0 for a constant map."""
    def ranks(x):
        x = np.asarray(x, np.float64).ravel()
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        # average ties
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def randomisation_check(adapter, records: Sequence[MapRecord], config="paper",
                        seed: int = 0, refine_at: str = "image", method: str = "diffusion-cam",
                        layer: Optional[int] = None) -> dict:
    """Mean Spearman correlation between the maps of the trained model and those of a randomised
    copy, explaining the *same* answers (teacher forcing) for the same target words with the
    same ``method`` (the records' own method) at ``layer`` (default: the adapter's)."""
    from ..attribution import Explainer

    rand = randomised_copy(adapter, seed)
    corr = []
    with Explainer(rand, layer=layer) as ex:
        for r in records:
            if r.raw is None:
                continue
            sc = shapes.scene(r.split, r.index)
            eos = adapter.tokenizer.eos_token
            pad = len(r.token_ids) - len(r.answer.split())
            exp = ex.explain(sc.image, r.prompt, targets="all",
                             answer=r.answer + (" " + eos) * pad, method=method)
            qa = shapes.question(sc, r.kind)
            idx = [w for w, _ in grounding_for(sc, qa)]
            raw_r = exp.maps[0]["hires"][idx, 0]
            fake = MapRecord(r.split, r.index, r.kind, r.prompt, r.answer, True, raw_r,
                             r.token_ids, r.masks, r.words,
                             _interference_maps(exp))
            a = refine_record(r, config, refine_at)
            b = refine_record(fake, config, refine_at)
            corr.extend(rank_correlation(x, y) for x, y in zip(a, b))
    # no scored map (every answer wrong): no correlation to report, and no warning
    return {"mean_rank_correlation": float(np.mean(corr)) if corr else float("nan"),
            "n_maps": len(corr)}
