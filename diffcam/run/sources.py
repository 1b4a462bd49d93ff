"""Dataset specs for :func:`diffcam.run.run_dataset` and ``diffcam run``.

=====================================  ====================================================
spec                                   samples
=====================================  ====================================================
``shapes:SPLIT``                       scenes 0..99 of the bundled shapes world, "describe"
``shapes:SPLIT:START:STOP``            scenes START..STOP-1
``shapes:SPLIT:START:STOP:K1,K2``      question kinds K1, K2 (describe, colour, presence,
                                       count) for every scene
``coco:PATH`` or ``PATH``              a COCO-style dataset (:mod:`diffcam.data.coco`):
                                       ``PATH`` an instances json or a folder holding
                                       ``instances.json``; one sample per image, masks
                                       keyed by category name (and by colour word for
                                       the shapes export, whose annotations carry one)
``grandf:PATH``                        GranD-f grounded captions (:mod:`diffcam.data.grandf`,
                                       any of its four layouts): one sample per image,
                                       masks keyed by the head word of each grounded phrase
``grandf:PATH|images=DIR|keys=phrase`` the same with the image folder given, and / or the
                                       masks keyed by the whole phrase
=====================================  ====================================================

``prompt`` (COCO, GranD-f: default ``"<image> describe the image ."``) and ``answer`` (COCO:
None = the model answers, ``"caption"`` = explain the image's first caption; GranD-f: None or
``"caption"``, the grounded caption; shapes: ``"gold"`` = explain the expected answer)
complete a spec.

>>> ds = open_dataset("shapes:val:0:3:describe,colour")
>>> ds.count, [s.id for s in ds][:2]
(6, ['shapes-val-0-describe', 'shapes-val-0-colour'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

__all__ = ["open_dataset", "Dataset"]

DEFAULT_PROMPT = "<image> describe the image ."


@dataclass
class Dataset:
    """An iterable of samples with its spec (recorded in run.json) and its length if known."""

    spec: str
    count: Optional[int]
    make: Callable[[], Iterator]

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError(f"dataset {self.spec!r} has no known length")
        return self.count


def _int(text: str, what: str, spec: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"dataset spec {spec!r}: {what} {text!r} is not an integer") from None
    if v < 0:
        raise ValueError(f"dataset spec {spec!r}: {what} must be >= 0, got {v}")
    return v


def _shapes(spec: str, rest: str, prompt, answer) -> Dataset:
    from ..data import shapes

    if prompt is not None:
        raise ValueError("prompt= does not apply to the shapes world: its questions come with "
                         "their prompts (choose them with the kinds field of the spec)")
    if answer not in (None, "gold"):
        raise ValueError(f"answer={answer!r}: the shapes world takes None (the model answers) "
                         f"or 'gold' (explain the expected answer)")
    parts = rest.split(":") if rest else []
    if not parts or len(parts) > 4 or len(parts) == 2:
        raise ValueError(f"dataset spec {spec!r}: expected shapes:SPLIT[:START:STOP[:KINDS]]")
    split = parts[0]
    if split not in shapes.SPLITS:
        raise ValueError(f"dataset spec {spec!r}: split {split!r} is not one of "
                         f"{tuple(shapes.SPLITS)}")
    start, stop = 0, 100
    if len(parts) >= 3:
        start, stop = _int(parts[1], "START", spec), _int(parts[2], "STOP", spec)
        if stop < start:
            raise ValueError(f"dataset spec {spec!r}: STOP {stop} < START {start}")
    kinds = ("describe",)
    if len(parts) == 4:
        kinds = tuple(k.strip() for k in parts[3].split(",") if k.strip())
        bad = [k for k in kinds if k not in shapes.KINDS]
        if bad or not kinds:
            raise ValueError(f"dataset spec {spec!r}: kinds {bad or parts[3]!r}; expected some "
                             f"of {shapes.KINDS}")
    gold = answer == "gold"
    canon = f"shapes:{split}:{start}:{stop}:{','.join(kinds)}" + (":gold" if gold else "")
    return Dataset(canon, (stop - start) * len(kinds),
                   lambda: shapes.dataset(split, start, stop, kinds, gold=gold))


def _coco(spec: str, path: str, prompt, answer) -> Dataset:
    from ..data.coco import CocoDataset

    if not path:
        raise ValueError(f"dataset spec {spec!r}: expected coco:PATH")
    ds = CocoDataset(path)
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if answer not in (None, "caption"):
        raise ValueError(f"answer={answer!r}: a COCO dataset takes None (the model answers) or "
                         f"'caption' (explain the first caption)")
    keys = coco_mask_keys(ds)
    canon = f"coco:{os.path.abspath(path)}|prompt={prompt}|answer={answer}"
    return Dataset(canon, len(ds), lambda: ds.samples(prompt=prompt, answer=answer, keys=keys))


def _grandf(spec: str, rest: str, prompt, answer) -> Dataset:
    from ..data.grandf import GrandfDataset

    path, *opts = rest.split("|")
    if not path:
        raise ValueError(f"dataset spec {spec!r}: expected grandf:PATH[|images=DIR][|keys=KEYS]")
    kw = {}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or k not in ("images", "keys") or k in kw or not v:
            raise ValueError(f"dataset spec {spec!r}: option {o!r}; expected images=DIR or "
                             "keys=head|phrase, each at most once")
        kw[k] = v
    keys = kw.get("keys", "head")
    if keys not in ("head", "phrase"):
        raise ValueError(f"dataset spec {spec!r}: keys={keys!r}; expected head or phrase")
    if answer not in (None, "caption"):
        raise ValueError(f"answer={answer!r}: a GranD-f dataset takes None (the model answers) "
                         f"or 'caption' (explain the grounded caption)")
    ds = GrandfDataset(path, images_dir=kw.get("images"))
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    canon = (f"grandf:{ds.path}|images={os.path.abspath(ds.images_dir)}|keys={keys}"
             f"|prompt={prompt}|answer={answer}")
    return Dataset(canon, len(ds), lambda: ds.samples(prompt=prompt, answer=answer, keys=keys))


def coco_mask_keys(ds) -> tuple:
    """The annotation fields whose values name masks: the category, plus the colour word for
    the shapes export (whose annotations carry one)."""
    first = ds.annotations(ds.image_ids[0]) if len(ds) else []
    if any(isinstance(a.get("colour"), str) for a in first):
        return ("category", "colour")
    return ("category",)


def open_dataset(spec, prompt: Optional[str] = None, answer: Optional[str] = None) -> Dataset:
    """The samples of a dataset spec (table in the module docstring)."""
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind == "shapes":
        return _shapes(spec, rest, prompt, answer)
    if kind == "coco":
        return _coco(spec, rest, prompt, answer)
    if kind == "grandf":
        return _grandf(spec, rest, prompt, answer)
    if os.path.exists(spec):
        return _coco(spec, spec, prompt, answer)
    raise ValueError(f"dataset spec {spec!r}: expected shapes:SPLIT[:START:STOP[:KINDS]], "
                     f"coco:PATH, grandf:PATH or the path of a COCO-style dataset")
