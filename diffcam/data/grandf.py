"""GranD-f: GLaMM's grounded-caption (GCG) annotations as samples with one mask per phrase.

GranD-f pairs an image with a detailed caption and a segmentation mask for each grounded phrase
of the caption ("a man in a red shirt" -> the man's pixels).  That is the ground truth that
per-token maps want: explain the caption (``answer="caption"``, teacher-forced) and every
answer word that heads a grounded phrase is scored against that phrase's mask.

Four annotation layouts are read; which one a file holds is detected from its content:

=============  ===============================================  ================================
format         files                                            content
=============  ===============================================  ================================
``"gcg"``      ``GranDf_HA_GCG_train.json``,                    a list of ``{"file_name",
               ``OpenPsgGCG_{train,val}.json``                  "caption", "groundings": {phrase:
                                                                {"token_positives": [start, end],
                                                                "rle_masks": [RLE, ...]}}}``
``"refcocog"`` ``RefCOCOg_GCG_{train,val}.json``                a list of ``{"img_file_name",
                                                                "caption", "refs": [{"sentence",
                                                                "segmentation": polygons}]}``
``"flickr"``   ``flickr_mergedGT_GCG_{train,val}.json``         COCO: images carry the
                                                                ``"caption"``, annotations the
                                                                phrase spans
                                                                (``"tokens_positive"``) and the
                                                                mask (``"sam_mask"``, RLE)
``"eval"``     ``{val,test}_gcg_coco_caption_gt.json`` with     COCO pair: one caption annotation
               ``{val,test}_gcg_coco_mask_gt.json``             per image with its phrases
                                                                (``"labels"``), and the image's
                                                                mask annotations (RLE), the i-th
                                                                for the i-th label
=============  ===============================================  ================================

Give either file of the ``"eval"`` pair; the other is found by name next to it.  Spans are
character offsets ``[start, end)`` into the caption; where a layout has none (``"eval"``
labels, ``"refcocog"`` sentences), the phrase is looked up in the caption case-insensitively,
left to right.  RefCOCOg expressions that do not occur in the caption are dropped (they refer to
other objects than the caption's phrases), as GLaMM's own loader does.

Masks are keyed by ``keys``: ``"head"`` (default) the phrase's head word (:func:`head_word`:
the last word before the first post-modifier, "a man in a red shirt" -> "man"), which is what
an answer word is matched against in a run (:func:`diffcam.metrics.scoring.match_mask`);
``"phrase"`` the phrase text; or a callable ``phrase -> key or None``.  Phrases sharing a key
give the union of their masks.  Masks are decoded only for the image asked for, at the image's
resolution (RLE with pure NumPy, polygons with ``pycocotools``).

The image folder defaults to GLaMM's layout (``GranDf/GranDf_HA_images/{train,val_test}``,
``coco_2017/train2017`` for OpenPSG, ``coco_2014/train2014`` for RefCOCOg,
``flikcr_30k/train`` -- so spelled by GLaMM -- or ``flickr_30k/train`` for Flickr30k, the
dataset folder being the parent of ``GranDf/``), then ``images/`` next to the json, then the
json's folder: the first of those that holds the first image.  Pass ``images_dir`` otherwise.

>>> import json, os, tempfile
>>> import numpy as np
>>> from diffcam.data.coco import encode_rle
>>> from diffcam.data.grandf import GrandfDataset
>>> root = tempfile.mkdtemp()
>>> m = np.zeros((4, 6), bool); m[1:3, 2:5] = True
>>> rec = {"file_name": "sa_1.jpg", "caption": "A dog in the grass.",
...        "groundings": {"A dog": {"token_positives": [0, 5], "rle_masks": [encode_rle(m)]}}}
>>> path = os.path.join(root, "GranDf_HA_GCG_train.json")
>>> with open(path, "w") as f:
...     json.dump([rec], f)
>>> ds = GrandfDataset(path, images_dir=root)
>>> ds.format, len(ds), ds.phrases(0)
('gcg', 1, [('A dog', (0, 5))])
>>> s = next(ds.samples(answer="caption"))
>>> s.id, s.answer, sorted(s.masks), int(s.masks["dog"].sum())
('grandf-sa_1', 'A dog in the grass.', ['dog'], 6)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .coco import DEFAULT_PROMPT, _read_image, _read_json, decode_segmentation
from .sample import Sample

__all__ = ["GrandfDataset", "load_grandf", "head_word", "FORMATS"]

FORMATS = ("gcg", "refcocog", "flickr", "eval")

# words that start a post-modifier ("a man *in* a red shirt", "a dog *lying* on the grass"):
# prepositions, relatives, conjunctions, punctuation, and participles (which may also stand
# before the head: "a *parked* car")
_PARTICIPLES = frozenset("""
wearing holding sitting standing lying laying walking riding carrying looking playing eating
using covered filled made dressed parked placed hanging leaning surrounded attached grazing
swimming flying running jumping waiting talking posing smiling reading working driving
crossing resting perched stacked painted topped lined filled growing floating
""".split())
_POST = frozenset("""
in on at of with without by near under over behind beside besides next to from for into onto
above below beneath across along around inside outside between among against through toward
towards beyond upon within via like about during after before past off
that which who whom whose where while and or but , ; : ( ) -
""".split()) | _PARTICIPLES
# words that never head a noun phrase
_DETERMINERS = frozenset("""
a an the this that these those some any many several few much more most another other each
every both all no its his her their our my your one two three four five six seven eight nine
ten
""".split())
# "a group of people": the noun after "of" is what is shown
_QUANTITIES = frozenset("""
group groups couple pair pairs bunch herd flock number lot lots pile piles stack stacks row
rows set sets variety crowd team line lines kind type sort piece pieces slice slices
collection cluster array assortment bundle handful plenty series
""".split())

_WORD = re.compile(r"[\w'-]+|[^\w\s]", re.UNICODE)


def head_word(phrase: str) -> Optional[str]:
    """The head word of an English noun phrase, lower-cased: the last word before the first
    post-modifier (a preposition, a participle such as "wearing", a relative pronoun, a
    conjunction or punctuation) that follows a noun; after "of" when the word before it is a
    quantity ("a group of people" -> "people"); a trailing possessive "'s" removed.  A
    heuristic (no parser): right for the short grounded phrases of GranD-f, wrong for some
    long ones.  None for a phrase without a word.

    >>> head_word("A man in a red shirt"), head_word("two brown dogs")
    ('man', 'dogs')
    >>> head_word("the top of the building"), head_word("a group of people")
    ('top', 'people')
    >>> head_word("a parked car"), head_word("trees and bushes"), head_word("the woman's")
    ('car', 'trees', 'woman')
    >>> head_word("  ") is None
    True
    """
    if not isinstance(phrase, str):
        raise TypeError(f"phrase must be a str, got {type(phrase).__name__}")
    toks = [t.lower() for t in _WORD.findall(phrase)]
    words = [t for t in toks if re.search(r"\w", t)]
    if not words:
        return None
    pre: List[str] = []
    for t in toks:
        content = [w for w in pre if w not in _DETERMINERS]
        if t in _POST:
            if content:
                if t == "of" and content[-1] in _QUANTITIES:
                    pre = []                 # "a group of people": go on with "people"
                    continue
                break
            if t in _PARTICIPLES:            # before any noun: a modifier ("a parked car")
                pre.append(t)
            continue
        if re.search(r"\w", t):
            pre.append(t)
    content = [w for w in pre if w not in _DETERMINERS]
    head = content[-1] if content else (pre[-1] if pre else words[-1])
    return head[:-2] if head.endswith("'s") and len(head) > 2 else head


@dataclass
class _Phrase:
    text: str
    span: Optional[Tuple[int, int]]
    segs: List[Any]                      # RLE dicts or polygon lists (their union)


@dataclass
class _Record:
    key: str                             # stable id stem
    file_name: str
    caption: str
    phrases: List[_Phrase] = field(default_factory=list)
    size: Optional[Tuple[int, int]] = None


def _find(caption: str, phrase: str, start: int) -> Optional[Tuple[int, int]]:
    """The span of ``phrase`` in ``caption`` (case-insensitive), searched from ``start`` first,
    then from the beginning; None when absent."""
    low, p = caption.lower(), phrase.strip().lower()
    if not p:
        return None
    i = low.find(p, start)
    if i < 0:
        i = low.find(p)
    return None if i < 0 else (i, i + len(p))


def _span(value, caption: str, where: str) -> Tuple[int, int]:
    """A ``[start, end]`` pair (or its first entry when a list of pairs) checked against the
    caption."""
    v = value
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple)):
        v = v[0]
    try:
        s, e = (int(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: a span must be [start, end], got {value!r}") from None
    if not 0 <= s < e <= len(caption):
        raise ValueError(f"{where}: span [{s}, {e}] is outside the caption of "
                         f"{len(caption)} characters")
    return s, e


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(str(name)))[0] or str(name)


def _str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{where}: needs a str {key!r}" + ("" if key not in rec else
                                                             f", got {type(v).__name__}"))
    return v


class GrandfDataset:
    """GranD-f grounded captions (any of the four layouts of the module docstring), served as
    :class:`~diffcam.data.sample.Sample` objects with one mask per grounded phrase.

    annotations  the annotation json (for the ``"eval"`` layout: either file of the pair)
    images_dir   the image folder (default: guessed from GLaMM's layout, module docstring)

    Missing files raise FileNotFoundError naming the path; a malformed file (missing fields, a
    span outside its caption, an annotation of an unknown image, a mask of the wrong size...)
    raises ValueError naming the record.  Annotations are read once; masks are decoded when
    asked for and not cached.
    """

    def __init__(self, annotations, images_dir=None):
        path = os.fspath(annotations)
        if os.path.isdir(path):
            found = sorted(f for f in os.listdir(path) if f.endswith(".json"))
            raise FileNotFoundError(f"{path!r} is a folder: pass one GranD-f annotation json"
                                    + (f" (there: {', '.join(found)})" if found else ""))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GranD-f annotation file not found: {path!r}")
        self.path = os.path.abspath(path)
        self.caption_path: Optional[str] = None       # the "eval" pair (else None)
        self.mask_path: Optional[str] = None
        data = _read_json(self.path, "GranD-f annotation file")
        self.format, self._records = self._parse(data)
        taken = {r.key for r in self._records}
        seen: Dict[str, int] = {}
        for r in self._records:                         # unique, stable ids: file order
            n = seen.get(r.key, 0)
            seen[r.key] = n + 1
            if n:
                base = r.key
                while f"{base}-{n}" in taken:          # a file really named like a repeat
                    n += 1
                seen[base] = n + 1
                r.key = f"{base}-{n}"
                taken.add(r.key)
        self.images_dir = self._images_dir(images_dir)

    # -- parsing ------------------------------------------------------------------------------
    def _parse(self, data) -> Tuple[str, List[_Record]]:
        p = self.path
        if isinstance(data, list):
            first = next((r for r in data if isinstance(r, dict)), {})
            if "groundings" in first:
                return "gcg", [self._gcg(r, k) for k, r in enumerate(data)]
            if "refs" in first:
                return "refcocog", [self._refcocog(r, k) for k, r in enumerate(data)]
            if not data:
                return "gcg", []
            raise ValueError(f"{p}: a list of records without 'groundings' (GranD-f GCG) or "
                             "'refs' (RefCOCOg GCG)")
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            anns = data.get("annotations")
            anns = [] if anns is None else anns
            if not isinstance(anns, list):
                raise ValueError(f"{p}: 'annotations' must be a list")
            if any(isinstance(a, dict) and "labels" in a for a in anns):
                return "eval", self._eval(p, self._partner(p, "caption", "mask"), caps=data)
            if any(isinstance(a, dict) and "tokens_positive" in a for a in anns) or \
                    any(isinstance(i, dict) and "caption" in i for i in data["images"]):
                return "flickr", self._flickr(data)
            if re.search(r"_gcg_coco_mask_gt\.json$", p):
                return "eval", self._eval(self._partner(p, "mask", "caption"), p, masks=data)
            raise ValueError(f"{p}: a COCO file that is neither a GranD-f caption ground truth "
                             "(annotations with 'labels'), a mask ground truth "
                             "(*_gcg_coco_mask_gt.json) nor Flickr30k GCG (images with "
                             "'caption', annotations with 'tokens_positive')")
        raise ValueError(f"{p}: not a GranD-f annotation file (expected a list of records or a "
                         "COCO-style object with an 'images' list)")

    def _gcg(self, rec, k) -> _Record:
        where = f"{self.path}: record {k}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is not an object")
        fname = _str(rec, "file_name", where)
        raw = _str(rec, "caption", where)
        cap = raw.strip().strip('"').strip()
        lead = raw.find(cap) if cap else 0          # characters stripped before the caption
        g = rec.get("groundings")
        if not isinstance(g, dict):
            raise ValueError(f"{where} ({fname}): 'groundings' must be an object phrase -> "
                             "{token_positives, rle_masks}")
        out = _Record(_stem(fname), fname, cap)
        for phrase, item in g.items():
            w = f"{where} ({fname}), phrase {phrase!r}"
            if not isinstance(item, dict) or "token_positives" not in item:
                raise ValueError(f"{w}: needs 'token_positives' and 'rle_masks'")
            rles = item.get("rle_masks")
            if not isinstance(rles, list) or not all(isinstance(x, dict) for x in rles):
                raise ValueError(f"{w}: 'rle_masks' must be a list of RLE objects")
            span = item["token_positives"]
            if lead:     # spans counted in the quoted caption: shift them onto the stripped one
                s, e = _span(span, raw, w)
                if raw[s:e].lower() == str(phrase).lower() != cap[s:e].lower():
                    span = [s - lead, e - lead]
            out.phrases.append(_Phrase(str(phrase), _span(span, cap, w), rles))
            out.size = self._rle_size(rles, out.size, w)
        out.phrases.sort(key=lambda ph: ph.span)
        return out

    def _refcocog(self, rec, k) -> _Record:
        where = f"{self.path}: record {k}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where} is not an object")
        fname = _str(rec, "img_file_name", where)
        cap = _str(rec, "caption", where).strip().strip('"').strip()
        refs = rec.get("refs")
        if not isinstance(refs, list):
            raise ValueError(f"{where} ({fname}): 'refs' must be a list")
        out = _Record(_stem(fname), fname, cap)
        if "height" in rec and "width" in rec:
            out.size = (int(rec["height"]), int(rec["width"]))
        pos = 0
        for j, ref in enumerate(refs):
            w = f"{where} ({fname}), refs[{j}]"
            if not isinstance(ref, dict) or not isinstance(ref.get("sentence"), str) \
                    or "segmentation" not in ref:
                raise ValueError(f"{w}: needs a str 'sentence' and a 'segmentation'")
            span = _find(cap, ref["sentence"], pos)
            if span is None:
                continue
            pos = span[1]
            out.phrases.append(_Phrase(cap[span[0]:span[1]], span, [ref["segmentation"]]))
        out.phrases.sort(key=lambda ph: ph.span)
        return out

    def _flickr(self, data) -> List[_Record]:
        p = self.path
        recs: Dict[Any, _Record] = {}
        for k, info in enumerate(data["images"]):
            where = f"{p}: images[{k}]"
            if not isinstance(info, dict) or "id" not in info:
                raise ValueError(f"{where} lacks 'id'")
            if info["id"] in recs:
                raise ValueError(f"{p}: image id {info['id']!r} occurs twice")
            fname = _str(info, "file_name", where)
            r = _Record(str(info["id"]), fname, _str(info, "caption", where))
            if "height" in info and "width" in info:
                r.size = (int(info["height"]), int(info["width"]))
            recs[info["id"]] = r
        for k, ann in enumerate(data.get("annotations") or []):
            where = f"{p}: annotation {ann.get('id', f'#{k}') if isinstance(ann, dict) else k!r}"
            if not isinstance(ann, dict):
                raise ValueError(f"{where} is not an object")
            if ann.get("ignore", False):
                continue
            r = recs.get(ann.get("image_id"))
            if r is None:
                raise ValueError(f"{where} refers to unknown image id {ann.get('image_id')!r}")
            seg = ann.get("sam_mask", ann.get("segmentation"))
            if seg is None or "tokens_positive" not in ann:
                raise ValueError(f"{where}: needs 'tokens_positive' and 'sam_mask'")
            s, e = _span(ann["tokens_positive"], r.caption, where)
            r.phrases.append(_Phrase(r.caption[s:e], (s, e), [seg]))
            if isinstance(seg, dict):
                r.size = self._rle_size([seg], r.size, where)
        for r in recs.values():
            r.phrases.sort(key=lambda ph: ph.span)
        return list(recs.values())

    def _partner(self, p: str, mine: str, other: str) -> str:
        name = os.path.basename(p)
        if f"_{mine}_" not in name:
            raise ValueError(f"{p}: cannot tell the name of its {other} file (expected a name "
                             f"like val_gcg_coco_{mine}_gt.json)")
        q = os.path.join(os.path.dirname(p), name.replace(f"_{mine}_", f"_{other}_"))
        if not os.path.isfile(q):
            raise FileNotFoundError(f"the GranD-f {other} ground truth of {p!r} is missing: "
                                    f"expected {q!r}")
        return q

    def _eval(self, cap_path: str, mask_path: str, caps=None, masks=None) -> List[_Record]:
        """The "eval" pair; the file already read (the one given) comes as ``caps`` or
        ``masks``, the other is read here."""
        self.caption_path, self.mask_path = cap_path, mask_path
        if caps is None:
            caps = _read_json(cap_path, "GranD-f caption ground truth")
        if masks is None:
            masks = _read_json(mask_path, "GranD-f mask ground truth")
        if not isinstance(caps, dict) or not isinstance(caps.get("images"), list) or \
                not isinstance(caps.get("annotations"), list):
            raise ValueError(f"{cap_path}: not a GranD-f caption ground truth (expected "
                             "'images' and 'annotations' lists)")
        if not isinstance(masks, dict) or not isinstance(masks.get("annotations"), list):
            raise ValueError(f"{mask_path}: not a GranD-f mask ground truth (expected an "
                             "'annotations' list)")
        recs: Dict[Any, _Record] = {}
        info_of: Dict[Any, dict] = {}
        for k, info in enumerate(caps["images"]):
            if not isinstance(info, dict) or "id" not in info:
                raise ValueError(f"{cap_path}: images[{k}] lacks 'id'")
            info_of[info["id"]] = info
        labels: Dict[Any, List[str]] = {}
        for k, ann in enumerate(caps["annotations"]):
            where = f"{cap_path}: annotations[{k}]"
            if not isinstance(ann, dict):
                raise ValueError(f"{where} is not an object")
            iid = ann.get("image_id")
            if iid not in info_of:
                raise ValueError(f"{where} refers to unknown image id {iid!r}")
            if iid in recs:
                raise ValueError(f"{where}: a second caption for image {iid!r}")
            lab = ann.get("labels")
            if not isinstance(lab, list) or not all(isinstance(x, str) for x in lab):
                raise ValueError(f"{where}: 'labels' must be a list of phrases")
            info = info_of[iid]
            fname = info.get("file_name") or f"{iid}.jpg"
            r = _Record(str(iid), str(fname), _str(ann, "caption", where))
            if "height" in info and "width" in info:
                r.size = (int(info["height"]), int(info["width"]))
            recs[iid], labels[iid] = r, lab
        segs: Dict[Any, List[Any]] = {}
        for k, ann in enumerate(masks["annotations"]):
            if not isinstance(ann, dict) or "segmentation" not in ann:
                raise ValueError(f"{mask_path}: annotations[{k}] lacks 'segmentation'")
            iid = ann.get("image_id")
            if iid not in recs:
                raise ValueError(f"{mask_path}: annotations[{k}] refers to image id {iid!r}, "
                                 f"which has no caption in {cap_path}")
            segs.setdefault(iid, []).append(ann["segmentation"])
        for iid, r in recs.items():
            lab, sg = labels[iid], segs.get(iid, [])
            if len(lab) != len(sg):
                raise ValueError(f"{mask_path}: image {iid!r} has {len(sg)} masks for its "
                                 f"{len(lab)} labels in {cap_path}")
            pos = 0
            for j, (text, seg) in enumerate(zip(lab, sg)):
                span = _find(r.caption, text, pos)
                pos = span[1] if span else pos
                r.phrases.append(_Phrase(text, span, [seg]))
                if isinstance(seg, dict):
                    r.size = self._rle_size([seg], r.size, f"{mask_path}: image {iid!r}, "
                                            f"mask {j}")
        return list(recs.values())

    @staticmethod
    def _rle_size(rles, size, where) -> Optional[Tuple[int, int]]:
        for rle in rles:
            if "size" not in rle:
                continue
            try:
                s = (int(rle["size"][0]), int(rle["size"][1]))
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{where}: RLE size must be [h, w], got "
                                 f"{rle['size']!r}") from None
            if size is not None and s != tuple(size):
                raise ValueError(f"{where}: mask size {list(s)} differs from the image's "
                                 f"other masks {list(size)}")
            size = s
        return size

    # -- images -------------------------------------------------------------------------------
    def _candidates(self) -> List[str]:
        d = os.path.dirname(self.path)                  # .../GranDf/annotations/train
        grandf = os.path.dirname(os.path.dirname(d))   # .../GranDf
        root = os.path.dirname(grandf)                  # the dataset folder
        name = os.path.basename(self.path)
        c: List[str] = []
        if self.format == "gcg" and name.lower().startswith("openpsg"):
            c.append(os.path.join(root, "coco_2017", "train2017"))
        elif self.format == "gcg":
            c.append(os.path.join(grandf, "GranDf_HA_images", os.path.basename(d)))
        elif self.format == "refcocog":
            c.append(os.path.join(root, "coco_2014", "train2014"))
        elif self.format == "flickr":
            c += [os.path.join(root, "flikcr_30k", "train"),
                  os.path.join(root, "flickr_30k", "train")]
        else:
            c.append(os.path.join(grandf, "GranDf_HA_images", "val_test"))
        c += [os.path.join(d, "images"), d]
        return c

    def _images_dir(self, images_dir) -> str:
        if images_dir is not None:
            img = os.fspath(images_dir)
            if not os.path.isdir(img):
                raise FileNotFoundError(f"images folder not found: {img!r}")
            return img
        cands = self._candidates()
        if not self._records:
            return next((c for c in cands if os.path.isdir(c)), cands[-1])
        first = self._records[0].file_name
        for c in cands:
            if os.path.isfile(os.path.join(c, first)):
                return c
        raise FileNotFoundError(
            f"cannot find the images of {self.path}: the first one, {first!r}, is in none of "
            + ", ".join(repr(c) for c in cands) + "; pass images_dir=")

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"GrandfDataset({self.path!r}, format={self.format!r}, images={len(self)}, "
                f"phrases={sum(len(r.phrases) for r in self._records)})")

    def _rec(self, index) -> _Record:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        return self._records[int(index)]

    @property
    def ids(self) -> List[str]:
        """The sample id of every image, in file order (``"grandf-{file stem or image id}"``,
        ``-1``, ``-2``... appended to repeats)."""
        return [f"grandf-{r.key}" for r in self._records]

    def image_path(self, index) -> str:
        """Path of the image file of record ``index`` (not checked for existence)."""
        return os.path.join(self.images_dir, self._rec(index).file_name)

    def load_image(self, index) -> np.ndarray:
        """The image of record ``index`` as RGB uint8 ``(H, W, 3)``."""
        return _read_image(self.image_path(index))

    def caption(self, index) -> str:
        """The grounded caption of record ``index``."""
        return self._rec(index).caption

    def phrases(self, index) -> List[Tuple[str, Optional[Tuple[int, int]]]]:
        """The grounded phrases of record ``index`` in caption order: ``(text, (start, end))``,
        the span None where the text does not occur in the caption (``"eval"`` labels)."""
        return [(ph.text, ph.span) for ph in self._rec(index).phrases]

    def _size(self, r: _Record, index) -> Tuple[int, int]:
        if r.size is None:
            path = self.image_path(index)
            try:
                from PIL import Image
            except ImportError:
                Image = None
            if Image is not None and os.path.isfile(path):
                try:
                    with Image.open(path) as im:       # the header only
                        r.size = (int(im.size[1]), int(im.size[0]))
                except (OSError, SyntaxError, ValueError) as e:
                    raise ValueError(f"cannot read image {path!r}: {e}") from e
            else:
                r.size = tuple(self.load_image(index).shape[:2])
        return r.size

    def masks(self, index, keys: Union[str, Callable[[str], Optional[str]]] = "head"
              ) -> Dict[str, np.ndarray]:
        """Ground-truth masks of record ``index``: key -> boolean ``(H, W)`` union of the
        phrases with that key (``keys``: ``"head"``, ``"phrase"`` or a callable, see the
        module docstring; phrases whose key is None or empty are left out)."""
        key_of = self._key_fn(keys)
        r = self._rec(index)
        out: Dict[str, np.ndarray] = {}
        if not r.phrases:
            return out
        h, w = self._size(r, index)
        for ph in r.phrases:
            k = key_of(ph.text)
            if not k:
                continue
            m = np.zeros((h, w), bool)
            for seg in ph.segs:
                try:
                    m |= decode_segmentation(seg, h, w)
                except ValueError as e:
                    raise ValueError(f"{self.path}: {r.file_name}, phrase {ph.text!r}: "
                                     f"{e}") from None
            out[k] = out[k] | m if k in out else m
        return out

    @staticmethod
    def _key_fn(keys) -> Callable[[str], Optional[str]]:
        if keys == "head":
            return head_word
        if keys == "phrase":
            return lambda t: t.strip() or None
        if callable(keys):
            return keys
        raise ValueError(f"keys={keys!r}: expected 'head', 'phrase' or a callable "
                         "phrase -> key")

    # -- samples ------------------------------------------------------------------------------
    def samples(self, prompt: str = DEFAULT_PROMPT,
                answer: Union[None, str, Callable[["GrandfDataset", int], str]] = None,
                keys: Union[str, Callable[[str], Optional[str]]] = "head",
                limit: Optional[int] = None, start: int = 0) -> Iterator[Sample]:
        """One :class:`~diffcam.data.sample.Sample` per record, in file order: records
        ``start .. start + limit - 1``.

        id from :attr:`ids` (stable across loads of the same file), image the file path,
        ``prompt``, masks :meth:`masks` (``keys``), meta ``{"file_name", "caption",
        "phrases": [{"text", "span", "key"}], "format"}``.  ``answer``: None (the model
        answers), ``"caption"`` (explain the grounded caption, teacher-forced) or a callable
        ``(dataset, index) -> str``.  Arguments are checked when called; masks are decoded as
        the iterator advances.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
        if not (answer is None or answer == "caption" or callable(answer)):
            raise ValueError(f"answer={answer!r}: expected None (the model answers), 'caption' "
                             "(explain the grounded caption) or a callable (dataset, index) "
                             "-> str")
        key_of = self._key_fn(keys)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start={start!r}: expected an int >= 0")
        if limit is not None and (isinstance(limit, bool) or
                                  not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"limit={limit!r}: expected None or an int >= 0")
        stop = len(self) if limit is None else min(len(self), int(start) + int(limit))
        return self._samples(range(int(start), stop), prompt, answer, keys, key_of)

    def _samples(self, idx, prompt, answer, keys, key_of) -> Iterator[Sample]:
        for i in idx:
            r = self._records[i]
            if answer == "caption":
                ans = r.caption
            elif answer is None:
                ans = None
            else:
                ans = answer(self, i)
            phrases = [{"text": ph.text, "span": list(ph.span) if ph.span else None,
                        "key": key_of(ph.text)} for ph in r.phrases]
            yield Sample(f"grandf-{r.key}", self.image_path(i), prompt, answer=ans,
                         masks=self.masks(i, keys),
                         meta={"file_name": r.file_name, "caption": r.caption,
                               "phrases": phrases, "format": self.format})


def load_grandf(path, **kw) -> GrandfDataset:
    """``GrandfDataset(path, **kw)``: GranD-f annotations from any of the four layouts."""
    return GrandfDataset(path, **kw)
