"""A procedural grounded world: coloured shapes on textured backgrounds, with pixel-exact masks.

Every scene holds one to four *named* objects (six shapes, six colours, radii 8-15 px, random
positions, partial occlusion allowed) and zero to two grey *distractor* objects that no answer ever
mentions, on a noisy, gradient, striped, checkered or blotchy background.  Each object comes with
its visible-pixel instance mask, so a map's localization can be scored exactly.

Questions and answers are deterministic functions of the scene:

=============  ======================================  =====================================
kind           prompt                                  answer
=============  ======================================  =====================================
describe       ``<image> describe the image .``        ``a red circle , a blue star and a
                                                       green cross .`` (left to right)
colour         ``<image> what colour is the star ?``   ``blue`` (asked shape occurs once)
presence       ``<image> is there a square ?``         ``yes`` / ``no``
count          ``<image> how many shapes are there ?`` ``three`` (also ``how many stars``)
=============  ======================================  =====================================

Splits are seeded and disjoint streams: scene ``i`` of split ``s`` is always the same picture.

>>> from diffcam.data import shapes
>>> sc = shapes.scene("test", 0)
>>> sc.image.shape, sc.image.dtype
((96, 96, 3), dtype('uint8'))
>>> qa = shapes.question(sc, "describe")
>>> qa.answer == shapes.describe(sc)
True
>>> all(sc.masks[i].any() for i in range(len(sc.shapes)))
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["SHAPES", "PLURALS", "COLOURS", "NUMBERS", "KINDS", "SPLITS", "Scene", "QA", "scene",
           "render_scene", "question", "count_question", "questions", "describe", "vocabulary",
           "samples", "dataset", "word_masks", "export_coco", "IMAGE_SIZE"]

IMAGE_SIZE = 96
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "star": "stars", "cross": "crosses"}
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
           "yellow": (235, 215, 45), "purple": (145, 60, 200), "orange": (245, 140, 30)}
NUMBERS = ("zero", "one", "two", "three", "four")
KINDS = ("describe", "colour", "presence", "count")
#: split name -> first entropy word of its seed stream (disjoint streams per split)
SPLITS = {"train": 1001, "val": 2002, "test": 3003}
DISTRACTOR = "distractor"


@dataclass
class Scene:
    """One picture.

    image    uint8 (S, S, 3)
    masks    bool (N, S, S): visible pixels of every instance; the named objects first, in
             left-to-right order, then the distractors
    shapes   category of each instance (``"distractor"`` for distractors)
    colours  colour word of each instance (``"grey"`` for distractors)
    centres  (x, y) centre of each instance in pixels
    n_named  number of named objects (the first ``n_named`` instances)
    radii, angles  size and rotation of each instance (``shape_mask`` redraws its full,
             unoccluded outline)
    """

    image: np.ndarray
    masks: np.ndarray
    shapes: List[str]
    colours: List[str]
    centres: List[Tuple[float, float]]
    n_named: int
    split: str = ""
    index: int = -1
    radii: List[float] = field(default_factory=list)
    angles: List[float] = field(default_factory=list)

    @property
    def named(self) -> range:
        return range(self.n_named)


@dataclass
class QA:
    """A prompt, its deterministic answer, and which instance each answer word refers to.

    grounding  list of (answer word index, instance index): the words whose maps are scored
               against that instance's mask (colour and shape words of a description, the
               colour word of a colour question, ``yes`` of a presence question, the number of a
               count question -> every counted instance)
    """

    prompt: str
    answer: str
    kind: str
    grounding: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def objects(self) -> List[int]:
        """Instances the answer refers to, each once, in order of first mention."""
        seen: List[int] = []
        for _, k in self.grounding:
            if k not in seen:
                seen.append(k)
        return seen


# ------------------------------------------------------------------------------------- drawing
def _rot(xx, yy, cx, cy, angle):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return c * dx + s * dy, -s * dx + c * dy


def _polygon(u, v, verts):
    """Even-odd point-in-polygon on coordinate arrays u, v; verts (K, 2)."""
    inside = np.zeros(u.shape, bool)
    k = len(verts)
    for i in range(k):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % k]
        cond = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= cond & (u < xint)
    return inside


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape (pixel centres at integer + 0.5)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u, v = _rot(xx, yy, cx, cy, angle)
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        h = 0.82 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "diamond":
        return np.abs(u) / (0.68 * r) + np.abs(v) / r <= 1.0
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    if shape == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        verts = np.stack([r * np.cos(a), r * np.sin(a) + 0.2 * r], 1)
        return _polygon(u, v, verts)
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * r)
        verts = np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
        return _polygon(u, v, verts)
    if shape == DISTRACTOR:  # a thin ring
        d = np.sqrt(u * u + v * v)
        return (d <= r) & (d >= 0.62 * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    level = rng.uniform(70, 180)
    tint = rng.uniform(-10, 10, 3)
    kind = int(rng.integers(0, 5))
    if kind == 0:      # flat
        g = np.zeros((size, size))
    elif kind == 1:    # gradient
        a = rng.uniform(0, 2 * np.pi)
        g = 40 * ((np.cos(a) * xx + np.sin(a) * yy) - 0.5)
    elif kind == 2:    # stripes
        a, f = rng.uniform(0, np.pi), rng.uniform(4, 12)
        g = 14 * np.sin(2 * np.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == 3:    # checker
        n = int(rng.integers(3, 9))
        g = 12 * (((xx * n).astype(int) + (yy * n).astype(int)) % 2 * 2 - 1)
    else:              # smooth blotches
        c = rng.normal(0, 1, (6, 6))
        g = np.kron(c, np.ones((size // 6 + 1, size // 6 + 1)))[:size, :size]
        for _ in range(3):  # cheap blur
            g = (g + np.roll(g, 3, 0) + np.roll(g, -3, 0) + np.roll(g, 3, 1) + np.roll(g, -3, 1)) / 5
        g = 25 * g / (np.abs(g).max() + 1e-9)
    img = level + g[..., None] + tint
    img = img + rng.normal(0, rng.uniform(3, 10), (size, size, 3))
    return img


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE, n_objects: Optional[int] = None,
                 max_tries: int = 200, object_scale: float = 1.0) -> Scene:
    """Draw one scene from ``rng`` (1-4 named objects unless ``n_objects`` is given).
    ``object_scale`` multiplies the object radii (the training curriculum starts with large
    objects; the splits always use 1)."""
    if size < 64:
        raise ValueError(f"size={size}: scenes need at least 64x64 pixels")
    if not 0.5 <= object_scale <= 3.0:
        raise ValueError(f"object_scale={object_scale}: expected 0.5..3")
    s = size / IMAGE_SIZE
    for _ in range(max_tries):
        n = int(rng.integers(1, 5)) if n_objects is None else int(n_objects)
        if not 1 <= n <= 4:
            raise ValueError(f"n_objects={n_objects}: expected 1..4")
        objs = []
        ok = True
        for _k in range(n):
            for _t in range(100):
                r = rng.uniform(8, 15) * s * object_scale
                cx = rng.uniform(r + 2, size - r - 2)
                cy = rng.uniform(r + 2, size - r - 2)
                if all(abs(cx - o[1]) >= 11 * s and np.hypot(cx - o[1], cy - o[2]) >= 0.8 * (r + o[3])
                       for o in objs):
                    break
            else:
                ok = False
                break
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
            if shape == "square":
                angle = rng.uniform(-0.25, 0.25)
            elif shape in ("triangle", "star", "diamond"):
                angle = rng.uniform(-0.3, 0.3)
            else:
                angle = rng.uniform(0, np.pi)
            objs.append((shape, cx, cy, r, angle, colour))
        if not ok:
            continue
        n_dis = int(rng.integers(0, 3))
        dis = []
        for _k in range(n_dis):
            r = rng.uniform(4, 7) * s
            dis.append((DISTRACTOR, rng.uniform(r, size - r), rng.uniform(r, size - r), r, 0.0, "grey"))
        img = _background(rng, size)
        # distractors first (under everything), then named objects in random depth order
        draw = list(range(n, n + n_dis)) + list(rng.permutation(n))
        everything = objs + dis
        full = [shape_mask(o[0], size, o[1], o[2], o[3], o[4]) for o in everything]
        visible = [m.copy() for m in full]
        for pos, k in enumerate(draw):
            o = everything[k]
            if o[0] == DISTRACTOR:
                col = np.full(3, rng.uniform(30, 230))
            else:
                col = np.asarray(COLOURS[o[5]], float) + rng.uniform(-15, 15, 3)
            m = full[k]
            shade = col + rng.normal(0, 6, (int(m.sum()), 3))
            img[m] = shade
            for earlier in draw[:pos]:
                visible[earlier] &= ~m
        named_vis = [visible[k].sum() / max(full[k].sum(), 1) for k in range(n)]
        if min(named_vis) < 0.6 or any(visible[k].sum() < 4 for k in range(n, n + n_dis)):
            continue
        order = sorted(range(n), key=lambda k: objs[k][1])
        keep = order + list(range(n, n + n_dis))
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return Scene(image=image, masks=np.stack([visible[k] for k in keep]),
                     shapes=[everything[k][0] for k in keep],
                     colours=[everything[k][5] for k in keep],
                     centres=[(float(everything[k][1]), float(everything[k][2])) for k in keep],
                     n_named=n, radii=[float(everything[k][3]) for k in keep],
                     angles=[float(everything[k][4]) for k in keep])
    raise RuntimeError("could not place the objects; try a larger image size")  # pragma: no cover


def _rng(split: str, index: int, salt: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    if index < 0:
        raise ValueError(f"index={index} must be >= 0")
    return np.random.default_rng(np.random.SeedSequence([SPLITS[split], int(index), int(salt)]))


def scene(split: str, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Scene ``index`` of ``split`` ('train', 'val' or 'test'); always the same picture."""
    sc = render_scene(_rng(split, index), size=size)
    sc.split, sc.index = split, int(index)
    return sc


# ------------------------------------------------------------------------------------- language
def describe(sc: Scene) -> str:
    """The one-sentence description: every named object, left to right."""
    parts = [f"a {sc.colours[k]} {sc.shapes[k]}" for k in sc.named]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = " , ".join(parts[:-1]) + " and " + parts[-1]
    return body + " ."


def question(sc: Scene, kind: str, rng: Optional[np.random.Generator] = None) -> QA:
    """A question of ``kind`` about the scene with its answer.  ``rng`` picks what is asked
    (default: seeded by the scene, so the same scene always gets the same question)."""
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    if rng is None:
        rng = _rng(sc.split or "train", max(sc.index, 0), salt=1 + KINDS.index(kind))
    named = list(sc.named)
    if kind == "describe":
        answer = describe(sc)
        ground, w = [], 1
        for k in named:  # "a <colour> <shape>" then "," / "and"
            ground += [(w, k), (w + 1, k)]
            w += 4
        return QA("<image> describe the image .", answer, kind, ground)
    if kind == "colour":
        unique = [k for k in named if sc.shapes[:sc.n_named].count(sc.shapes[k]) == 1]
        if not unique:  # every shape repeats: ask how many of one instead
            return question(sc, "count", rng)
        k = unique[int(rng.integers(0, len(unique)))]
        return QA(f"<image> what colour is the {sc.shapes[k]} ?", sc.colours[k], kind, [(0, k)])
    if kind == "presence":
        present = sorted({sc.shapes[k] for k in named})
        if rng.random() < 0.5:
            shp = present[int(rng.integers(0, len(present)))]
            ks = [k for k in named if sc.shapes[k] == shp]
            return QA(f"<image> is there a {shp} ?", "yes", kind, [(0, k) for k in ks])
        absent = [s for s in SHAPES if s not in present]
        shp = absent[int(rng.integers(0, len(absent)))]
        return QA(f"<image> is there a {shp} ?", "no", kind, [])
    # count
    if rng.random() < 0.5:
        return count_question(sc)
    shp = SHAPES[int(rng.integers(0, len(SHAPES)))] if rng.random() < 0.3 else \
        sc.shapes[named[int(rng.integers(0, len(named)))]]
    return count_question(sc, shp)


def count_question(sc: Scene, shape: Optional[str] = None) -> QA:
    """"how many shapes are there ?" (``shape`` None) or "how many <shape>s are there ?", with
    the true count of the named objects as the answer and every counted instance grounded."""
    named = list(sc.named)
    if shape is None:
        return QA("<image> how many shapes are there ?", NUMBERS[sc.n_named], "count",
                  [(0, k) for k in named])
    ks = [k for k in named if sc.shapes[k] == shape]
    return QA(f"<image> how many {PLURALS[shape]} are there ?", NUMBERS[len(ks)], "count",
              [(0, k) for k in ks])


def questions(sc: Scene) -> List[QA]:
    """One question of every kind."""
    return [question(sc, k) for k in KINDS]


def vocabulary() -> List[str]:
    """Every word the prompts and answers use (no special tokens)."""
    words = ["describe", "the", "image", ".", "what", "colour", "is", "?", "there", "a", "how",
             "many", "shapes", "are", "yes", "no", ",", "and"]
    words += list(SHAPES) + list(PLURALS.values()) + list(COLOURS) + list(NUMBERS)
    return list(dict.fromkeys(words))


def samples(split: str, start: int = 0, stop: Optional[int] = None,
            kinds: Sequence[str] = KINDS, weights: Optional[Sequence[float]] = None
            ) -> Iterator[Tuple[Scene, QA]]:
    """(scene, question) pairs of scenes ``start..stop`` (endless when stop is None); the kind
    of each is drawn with ``weights`` (default uniform) from a stream seeded by the scene."""
    kinds = tuple(kinds)
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)
    i = start
    while stop is None or i < stop:
        sc = scene(split, i)
        r = _rng(split, i, salt=99)
        kind = kinds[int(r.choice(len(kinds), p=p))]
        yield sc, question(sc, kind, r)
        i += 1


def word_masks(sc: Scene) -> dict:
    """Ground truth keyed by the words an answer uses: every shape name and colour word of the
    scene's *named* objects -> the union of those objects' masks (distractors are never named).

    >>> m = word_masks(scene("test", 0))
    >>> all(k in SHAPES or k in COLOURS for k in m), all(v.any() for v in m.values())
    (True, True)
    """
    out: dict = {}
    for k in range(sc.n_named):
        for key in (sc.shapes[k], sc.colours[k]):
            out[key] = out[key] | sc.masks[k] if key in out else sc.masks[k].copy()
    return out


def dataset(split: str = "test", start: int = 0, stop: int = 100,
            kinds: Sequence[str] = ("describe",), gold: bool = False):
    """Scenes ``start..stop`` of ``split`` as :class:`~diffcam.data.sample.Sample` objects for
    :func:`diffcam.run.run_dataset`: one sample per scene and question kind (id
    ``"shapes-{split}-{index}-{kind}"``), the image as an array, masks from
    :func:`word_masks`, the expected answer in ``meta["expected"]``; ``gold=True`` explains the
    expected answer (teacher forcing) instead of letting the model answer.

    >>> s = next(iter(dataset("test", 0, 1)))
    >>> s.id, s.prompt
    ('shapes-test-0-describe', '<image> describe the image .')
    """
    from .sample import Sample

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {tuple(SPLITS)}")
    if not 0 <= start <= stop:
        raise ValueError(f"scenes {start}..{stop}: expected 0 <= start <= stop")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    for i in range(start, stop):
        sc = scene(split, i)
        masks = word_masks(sc)
        for kind in kinds:
            qa = question(sc, kind)
            yield Sample(f"shapes-{split}-{i}-{kind}", sc.image, qa.prompt,
                         answer=qa.answer if gold else None, masks=dict(masks),
                         meta={"split": split, "scene": i, "kind": kind, "expected": qa.answer})


# ------------------------------------------------------------------------------------- export
def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: column-major run lengths, starting with a run of zeros."""
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    runs: list = []
    if flat.size:
        idx = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate([[0], idx, [flat.size]])).astype(int).tolist()
        if flat[0] == 1:
            runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of the exporter's uncompressed RLE."""
    h, w = rle["size"]
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for c in rle["counts"]:
        flat[pos:pos + c] = val
        pos += c
        val ^= 1
    return flat.reshape((h, w), order="F").astype(bool)


def export_coco(out_dir: str, split: str = "test", n: int = 100, with_distractors: bool = True
                ) -> str:
    """Write ``n`` scenes of ``split`` as a COCO-style dataset: PNG images under
    ``out_dir/images/``, ``out_dir/instances.json`` (categories, instance masks as uncompressed
    RLE, boxes, areas) and ``out_dir/captions.json`` (one caption per image: the description,
    plus every question/answer under ``"qa"``).  Returns the path of instances.json."""
    from ..viz.png import write_png

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cats.append({"id": len(SHAPES) + 1, "name": DISTRACTOR, "supercategory": "clutter"})
    cat_id = {c["name"]: c["id"] for c in cats}
    images, anns, caps = [], [], []
    for i in range(n):
        sc = scene(split, i)
        fname = f"{split}_{i:06d}.png"
        write_png(os.path.join(out_dir, "images", fname), sc.image)
        images.append({"id": i, "file_name": fname, "height": sc.image.shape[0],
                       "width": sc.image.shape[1]})
        for k, m in enumerate(sc.masks):
            if k >= sc.n_named and not with_distractors:
                continue
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[sc.shapes[k]],
                         "segmentation": _rle(m), "area": int(m.sum()), "iscrowd": 0,
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)],
                         "colour": sc.colours[k], "order": k if k < sc.n_named else None})
        caps.append({"id": i, "image_id": i, "caption": describe(sc),
                     "qa": [{"prompt": q.prompt, "answer": q.answer, "kind": q.kind,
                             "grounding": q.grounding} for q in questions(sc)]})
    inst = {"info": {"description": f"diffcam shapes world, split {split}"}, "images": images,
            "annotations": anns, "categories": cats}
    path = os.path.join(out_dir, "instances.json")
    with open(path, "w") as f:
        json.dump(inst, f)
    with open(os.path.join(out_dir, "captions.json"), "w") as f:
        json.dump({"images": images, "annotations": caps}, f)
    return path


GRANDF_LAYOUTS = ("gcg", "flickr", "eval")


def grounded_phrases(sc: Scene) -> List[Tuple[str, Tuple[int, int], List[int]]]:
    """The grounded phrases of :func:`describe`'s caption: ``(text, (start, end), objects)``
    per distinct phrase in caption order, ``objects`` the named instances it refers to (two
    "a red circle" of one scene are one phrase with two instances, spanned at its first
    occurrence).

    >>> sc = scene("test", 0)
    >>> text, (s, e), objs = grounded_phrases(sc)[0]
    >>> describe(sc)[s:e] == text == f"a {sc.colours[0]} {sc.shapes[0]}", objs[0]
    (True, 0)
    """
    cap = describe(sc)
    out: List[Tuple[str, Tuple[int, int], List[int]]] = []
    where = {}
    pos = 0
    for k in sc.named:
        text = f"a {sc.colours[k]} {sc.shapes[k]}"
        s = cap.index(text, pos)
        pos = s + len(text)
        if text in where:
            out[where[text]][2].append(k)
        else:
            where[text] = len(out)
            out.append((text, (s, s + len(text)), [k]))
    return out


def export_grandf(out_dir: str, split: str = "test", n: int = 100, layout: str = "gcg") -> str:
    """Write ``n`` scenes of ``split`` as GranD-f grounded captions (:mod:`diffcam.data.grandf`)
    in one of its layouts: ``"gcg"`` (``GranDf_HA_GCG_{split}.json``: phrase -> span and RLE
    masks), ``"flickr"`` (``flickr_mergedGT_GCG_{split}.json``: COCO, spans and ``sam_mask``
    per annotation) or ``"eval"`` (``{split}_gcg_coco_caption_gt.json`` with its
    ``{split}_gcg_coco_mask_gt.json``: phrases as labels, one mask annotation per label), with
    the PNG images under ``out_dir/images/``.  Caption: :func:`describe`; phrases:
    :func:`grounded_phrases`, each grounded to the union of its instances.  Returns the path of
    the json to open (the caption ground truth for ``"eval"``).
    """
    from ..viz.png import write_png
    from .coco import encode_rle

    if layout not in GRANDF_LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {GRANDF_LAYOUTS}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    recs, images, anns, caps = [], [], [], []
    for i in range(n):
        sc = scene(split, i)
        fname = f"{split}_{i:06d}.png"
        write_png(os.path.join(out_dir, "images", fname), sc.image)
        cap = describe(sc)
        phrases = [(text, span, np.logical_or.reduce(sc.masks[objs]))
                   for text, span, objs in grounded_phrases(sc)]
        h, w = sc.image.shape[:2]
        iid = fname[:-4] if layout == "eval" else i
        images.append({"id": iid, "file_name": fname, "height": h, "width": w})
        if layout == "gcg":
            recs.append({"file_name": fname, "caption": cap, "groundings": {
                text: {"token_positives": list(span), "rle_masks": [encode_rle(m)]}
                for text, span, m in phrases}})
        elif layout == "flickr":
            images[-1]["caption"] = cap
            for text, span, m in phrases:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1,
                             "tokens_positive": [list(span)], "sam_mask": encode_rle(m),
                             "area": int(m.sum())})
        else:
            caps.append({"id": i + 1, "image_id": iid, "caption": cap,
                         "labels": [text for text, _, _ in phrases]})
            for text, span, m in phrases:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1,
                             "segmentation": encode_rle(m), "area": int(m.sum()), "iscrowd": 0})
    cats = [{"id": 1, "name": "object"}]

    def dump(name, obj):
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            json.dump(obj, f)
        return path

    if layout == "gcg":
        return dump(f"GranDf_HA_GCG_{split}.json", recs)
    if layout == "flickr":
        return dump(f"flickr_mergedGT_GCG_{split}.json",
                    {"images": images, "annotations": anns, "categories": cats})
    dump(f"{split}_gcg_coco_mask_gt.json", {"images": images, "annotations": anns,
                                             "categories": cats})
    return dump(f"{split}_gcg_coco_caption_gt.json", {"images": images, "annotations": caps})
