"""COCO-style datasets: instance masks, captions and (shapes export) questions as samples.

One loader serves real COCO (``instances_val2017.json`` + ``captions_val2017.json`` + the image
folder) and the export of the bundled shapes world (:func:`diffcam.data.shapes.export_coco`:
``instances.json``, ``captions.json`` and ``images/``).  Nothing large is cached: images stay on
disk (a :class:`~diffcam.data.sample.Sample` carries the image *path*) and masks are decoded
only for the image asked for.

Segmentations come as run-length encodings (both COCO forms, decoded here in pure NumPy) or as
polygons (rasterised by ``pycocotools``, an optional dependency: ``pip install pycocotools``).

>>> import shutil, tempfile
>>> from diffcam.data import shapes
>>> from diffcam.data.coco import CocoDataset
>>> root = tempfile.mkdtemp()
>>> _ = shapes.export_coco(root, "val", n=2)
>>> ds = CocoDataset(root)
>>> len(ds), ds.image_ids
(2, [0, 1])
>>> s = next(ds.samples(answer="caption"))
>>> s.id, s.answer == shapes.describe(shapes.scene("val", 0))
('coco-0', True)
>>> sorted(s.masks) == sorted(set(shapes.scene("val", 0).shapes))
True
>>> shutil.rmtree(root)
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .sample import Sample

__all__ = ["decode_rle", "encode_rle", "decode_segmentation", "CocoDataset", "load_coco",
           "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "<image> describe the image ."
_PYCOCOTOOLS_ADVICE = ('pip install pycocotools (or pip install "diffcam[eval]")')


# ------------------------------------------------------------------------------------------ RLE
def _counts_from_string(s: Union[str, bytes]) -> np.ndarray:
    """The run lengths of COCO's compact RLE string (``maskApi.c``'s ``rleFrString``)."""
    raw = s.encode("ascii") if isinstance(s, str) else bytes(s)
    c = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        bad = raw[int(np.flatnonzero((c < 0) | (c > 63))[0])]
        raise ValueError(f"corrupt compressed RLE: character {chr(bad)!r} is outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("corrupt compressed RLE: the string ends inside a count")
    last = np.flatnonzero(~more)                          # the last character of every count
    first = np.concatenate([[0], last[:-1] + 1])
    group = np.repeat(np.arange(last.size), last - first + 1)
    shift = 5 * (np.arange(c.size) - first[group])
    if shift.max() > 50:
        raise ValueError("corrupt compressed RLE: a count is longer than 11 characters")
    x = np.zeros(last.size, np.int64)
    np.add.at(x, group, (c & 0x1F) << shift)
    neg = (c[last] & 0x10) != 0                           # sign bit of the last 5-bit group
    x[neg] -= np.int64(1) << (5 * (last[neg] - first[neg] + 1))
    # counts 3, 4, ... are stored as differences to the count two before
    out = x.copy()
    if out.size > 3:
        out[1::2] = np.cumsum(x[1::2])
        out[2::2] = np.cumsum(x[2::2])
    return out


def _counts_to_string(counts: Sequence[int]) -> str:
    """COCO's compact RLE string of ``counts`` (``maskApi.c``'s ``rleToString``)."""
    chars: List[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5                                       # arithmetic shift, like C's long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def _runs(mask: np.ndarray) -> List[int]:
    """Column-major run lengths of a boolean mask, starting with a (possibly empty) zero run."""
    flat = np.asarray(mask, bool).reshape(-1, order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
    """A COCO run-length encoding as a boolean ``(h, w)`` mask.

    ``rle`` is ``{"size": [h, w], "counts": ...}`` with ``counts`` either a list of run lengths
    (the *uncompressed* form of COCO crowd annotations and the shapes export) or a str / bytes in
    COCO's compact string form (what ``pycocotools.mask.encode`` writes).  Runs cover the pixels
    in column-major (Fortran) order and start with a run of zeros.  Pure NumPy.

    >>> decode_rle({"size": [2, 3], "counts": [1, 2, 3]}).astype(int)
    array([[0, 1, 0],
           [1, 0, 0]])
    >>> decode_rle({"size": [1, 41], "counts": "X11"}).nonzero()[1]    # 40 zeros, then a one
    array([40])
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got "
                         f"{type(rle).__name__}" + (f" with keys {sorted(rle)}"
                                                    if isinstance(rle, dict) else ""))
    try:
        h, w = (int(v) for v in rle["size"])
    except (TypeError, ValueError):
        raise ValueError(f"RLE size must be [h, w], got {rle['size']!r}") from None
    if h < 0 or w < 0:
        raise ValueError(f"RLE size must be non-negative, got {[h, w]}")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        cnt = _counts_from_string(counts)
    else:
        cnt = np.asarray(counts, np.int64).reshape(-1) if len(counts) else np.zeros(0, np.int64)
    if cnt.size and cnt.min() < 0:
        raise ValueError(f"corrupt RLE: negative run length {int(cnt.min())}")
    if int(cnt.sum()) != h * w:
        raise ValueError(f"corrupt RLE: the runs cover {int(cnt.sum())} pixels, size {[h, w]} "
                         f"has {h * w}")
    vals = (np.arange(cnt.size) % 2).astype(bool)
    return np.repeat(vals, cnt).reshape((h, w), order="F")


def encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    """A 2-D mask as COCO's compressed RLE ``{"size": [h, w], "counts": str}`` (the counts
    string that ``pycocotools.mask.encode`` produces, as str so that it is JSON-ready).

    >>> import numpy as np
    >>> r = encode_rle(np.array([[0, 1], [1, 1]], bool))
    >>> r
    {'size': [2, 2], 'counts': '13'}
    >>> decode_rle(r).astype(int)
    array([[0, 1],
           [1, 1]])
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_rle needs a 2-D mask, got shape {m.shape}")
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _counts_to_string(_runs(m))}


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` field as a boolean ``(h, w)`` mask.

    ``seg`` is an RLE dict (either form, see :func:`decode_rle`; its size must be ``[h, w]``)
    or polygons: a list of flat ``[x0, y0, x1, y1, ...]`` lists, whose union is rasterised by
    ``pycocotools`` (ImportError with the install command when it is missing).  Polygons with
    fewer than three points enclose nothing and are dropped.

    >>> decode_segmentation({"size": [2, 2], "counts": [3, 1]}, 2, 2).astype(int)
    array([[0, 0],
           [0, 1]])
    """
    h, w = int(h), int(w)
    if isinstance(seg, dict):
        m = decode_rle(seg)
        if m.shape != (h, w):
            raise ValueError(f"RLE size {list(m.shape)} does not match the image size {[h, w]}")
        return m
    if not isinstance(seg, (list, tuple)):
        raise ValueError(f"segmentation must be an RLE dict or a list of polygons, got "
                         f"{type(seg).__name__}")
    if seg and all(isinstance(p, dict) for p in seg):       # a list of RLEs (rare): union
        out = np.zeros((h, w), bool)
        for p in seg:
            out |= decode_segmentation(p, h, w)
        return out
    if seg and all(isinstance(v, (int, float)) for v in seg):   # one bare polygon
        seg = [seg]
    polys = []
    for p in seg:
        if not isinstance(p, (list, tuple, np.ndarray)) or len(p) % 2:
            size = len(p) if hasattr(p, "__len__") else "?"
            raise ValueError("a polygon must be a flat list [x0, y0, x1, y1, ...] of even length"
                             f", got {type(p).__name__} of length {size}")
        if len(p) >= 6:
            polys.append([float(v) for v in p])
    if not polys:
        return np.zeros((h, w), bool)
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError(f"decoding polygon segmentations needs pycocotools: "
                          f"{_PYCOCOTOOLS_ADVICE}") from e
    rles = mask_utils.frPyObjects(polys, h, w)
    return np.asarray(mask_utils.decode(rles)).reshape(h, w, -1).any(axis=2)


# ---------------------------------------------------------------------------------------- images
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unfilter_png(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the per-row PNG filters of ``rows`` (h, 1 + stride)."""
    h, stride = rows.shape[0], rows.shape[1] - 1
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        ft, line = int(rows[y, 0]), rows[y, 1:]
        if ft == 0:
            cur = line
        elif ft == 1:                                     # Sub: running sum per byte lane
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif ft == 2:                                     # Up
            cur = line + prev
        elif ft in (3, 4):                                # Average, Paeth: sequential
            lst, up, c = line.tolist(), prev.tolist(), [0] * stride
            for i in range(stride):
                a = c[i - bpp] if i >= bpp else 0
                if ft == 3:
                    c[i] = (lst[i] + ((a + up[i]) >> 1)) & 0xFF
                else:
                    b, d = up[i], (up[i - bpp] if i >= bpp else 0)
                    p = a + b - d
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - d)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else d)
                    c[i] = (lst[i] + pred) & 0xFF
            cur = np.asarray(c, np.uint8)
        else:
            raise ValueError(f"unknown PNG filter type {ft} in row {y}")
        out[y] = cur
        prev = out[y]
    return out


def _read_png(path: str) -> np.ndarray:
    """A PNG file as RGB uint8 (H, W, 3) without Pillow (non-interlaced; alpha dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError(f"cannot read image {path!r}: not a PNG file")
    pos, hdr, plte, idat = 8, None, None, []
    while pos + 8 <= len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if len(body) != n:
            raise ValueError(f"cannot read image {path!r}: truncated PNG chunk {tag!r}")
        pos += 12 + n
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            plte = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if hdr is None:
        raise ValueError(f"cannot read image {path!r}: PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = hdr
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(ctype)
    ok_depth = {0: (1, 2, 4, 8, 16), 3: (1, 2, 4, 8)}.get(ctype, (8, 16))
    if channels is None or depth not in ok_depth:
        raise ValueError(f"cannot read image {path!r}: PNG colour type {ctype} with bit depth "
                         f"{depth} is not valid")
    if interlace:
        raise ImportError(f"reading the interlaced PNG {path!r} needs Pillow: pip install Pillow")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"cannot read image {path!r}: corrupt PNG data ({e})") from None
    bits = channels * depth
    stride = (w * bits + 7) // 8
    if len(raw) < h * (stride + 1):
        raise ValueError(f"cannot read image {path!r}: truncated PNG data")
    rows = np.frombuffer(raw, np.uint8, count=h * (stride + 1)).reshape(h, stride + 1)
    px = _unfilter_png(rows, max(1, bits // 8))
    if depth == 16:                                       # keep the high byte, like Pillow
        a = px.reshape(h, w * channels, 2)[..., 0].reshape(h, w, channels)
    elif depth == 8:
        a = px.reshape(h, w, channels)
    else:
        per = 8 // depth
        bitsarr = np.unpackbits(px, axis=1).reshape(h, stride * per, depth)
        a = (bitsarr @ (1 << np.arange(depth - 1, -1, -1))).astype(np.uint8)[:, :w, None]
        if ctype == 0:
            a = a * np.uint8(255 // ((1 << depth) - 1))
    if ctype == 3:
        if plte is None or (a.size and int(a.max()) >= len(plte)):
            raise ValueError(f"cannot read image {path!r}: palette index out of range")
        return np.ascontiguousarray(plte[a[..., 0]])
    if ctype in (0, 4):
        return np.ascontiguousarray(np.repeat(a[..., :1], 3, axis=2))
    return np.ascontiguousarray(a[..., :3])


def _read_pil(path: str, Image) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3) via Pillow (alpha dropped, 16-bit: high byte)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "RGB":
                return np.asarray(im, np.uint8).copy()
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                a = np.asarray(im).astype(np.float64)
                if mode == "F" and a.size and np.nanmax(a) <= 1.0:
                    a = a * 255.0
                elif mode.startswith("I;16") or (a.size and a.max() > 255):
                    a = np.floor(a / 256.0)
                g = np.clip(np.nan_to_num(np.round(a)), 0, 255).astype(np.uint8)
                return np.repeat(g[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from e


def _read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        return _read_pil(path, Image)
    with open(path, "rb") as f:
        is_png = f.read(8) == _PNG_SIGNATURE
    if not is_png:
        raise ImportError(f"reading {path!r} needs Pillow: pip install Pillow (without it only "
                          "PNG files can be read)")
    return _read_png(path)


# --------------------------------------------------------------------------------------- dataset
def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None


def _sibling(inst: str, stem: str) -> str:
    """``captions.json`` next to ``instances.json``, ``captions_X.json`` next to
    ``instances_X.json``; '' for other names."""
    d, name = os.path.split(inst)
    m = re.fullmatch(r"instances(_.+)?\.json", name)
    return os.path.join(d, f"{stem}{m.group(1) or ''}.json") if m else ""


def _resolve(instances, images_dir, captions) -> Tuple[str, str, Optional[str]]:
    """(instances json, images folder, captions json or None) of the constructor's arguments."""
    path = os.fspath(instances)
    guess_images = None
    if os.path.isdir(path):
        own = os.path.join(path, "instances.json")
        base = os.path.basename(os.path.normpath(os.path.abspath(path)))
        std = os.path.join(os.path.dirname(os.path.abspath(path)), "annotations",
                           f"instances_{base}.json")
        found = sorted(glob.glob(os.path.join(glob.escape(path), "instances_*.json")))
        if os.path.isfile(own):
            inst = own
        elif os.path.isfile(std):             # coco/val2017 -> coco/annotations/instances_val2017
            inst, guess_images = std, path
        elif len(found) == 1:
            inst = found[0]
        else:
            raise FileNotFoundError(
                f"no COCO instances file in directory {path!r}: looked for {own!r}, {std!r} and "
                f"a single instances_*.json there (found {len(found)})")
    elif os.path.isfile(path):
        inst = path
    else:
        raise FileNotFoundError(f"COCO instances file not found: {path!r}")

    if captions is None:
        cap = _sibling(inst, "captions")
        cap = cap if cap and os.path.isfile(cap) else None
    elif captions is False:
        cap = None
    else:
        cap = os.fspath(captions)
        if not os.path.isfile(cap):
            raise FileNotFoundError(f"COCO captions file not found: {cap!r}")

    if images_dir is not None:
        img = os.fspath(images_dir)
        if not os.path.isdir(img):
            raise FileNotFoundError(f"images folder not found: {img!r}")
    elif guess_images is not None:
        img = guess_images
    else:
        d = os.path.dirname(os.path.abspath(inst))
        m = re.fullmatch(r"instances_(.+)\.json", os.path.basename(inst))
        split_dir = os.path.join(os.path.dirname(d), m.group(1)) if m else ""
        if os.path.isdir(os.path.join(d, "images")):
            img = os.path.join(d, "images")
        elif split_dir and os.path.isdir(split_dir):  # coco/annotations/.. -> coco/val2017
            img = split_dir
        else:
            img = d
    return inst, img, cap


def _sort_ids(ids) -> list:
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=lambda i: (type(i).__name__, str(i)))


class CocoDataset:
    """A COCO-style dataset: images, instance masks, captions (and the shapes export's
    questions), served as :class:`~diffcam.data.sample.Sample` objects.

    instances   the instances json, or a folder holding ``instances.json`` (the shapes export),
                or a COCO image folder such as ``coco/val2017`` whose annotations lie in
                ``coco/annotations/instances_val2017.json``
    images_dir  the folder of the images (default: ``images/`` next to the json if it exists;
                else ``../X`` for ``instances_X.json`` if it exists; else the json's folder)
    captions    the captions json (default: ``captions.json`` / ``captions_X.json`` next to the
                instances json when it exists; ``False``: none)

    Missing files raise FileNotFoundError naming the path; a malformed json (no ``images``, an
    annotation of an unknown image or category, ...) raises ValueError naming the problem.
    Annotations are read once; masks are decoded on demand and nothing decoded is cached.
    """

    def __init__(self, instances, images_dir=None, captions=None):
        self.instances_path, self.images_dir, self.captions_path = _resolve(
            instances, images_dir, captions)
        self._images: Dict[Any, dict] = {}
        self._anns: Dict[Any, List[dict]] = {}
        self._cats: Dict[Any, dict] = {}
        self._caps: Dict[Any, List[str]] = {}
        self._qa: Dict[Any, List[dict]] = {}
        self._load_instances()
        if self.captions_path is not None:
            self._load_captions()
        self.image_ids: List[Any] = _sort_ids(self._images)

    # -- loading -----------------------------------------------------------------------------
    def _load_instances(self) -> None:
        p = self.instances_path
        data = _read_json(p, "COCO instances file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{p}: not a COCO instances file (expected a JSON object with an "
                             f"'images' list)")
        for k, info in enumerate(data["images"]):
            if not isinstance(info, dict) or "id" not in info or "file_name" not in info:
                raise ValueError(f"{p}: images[{k}] lacks 'id' or 'file_name'")
            if info["id"] in self._images:
                raise ValueError(f"{p}: image id {info['id']!r} occurs twice")
            self._images[info["id"]] = info
        for k, cat in enumerate(data.get("categories") or []):
            if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
                raise ValueError(f"{p}: categories[{k}] lacks 'id' or a str 'name'")
            if cat["id"] in self._cats:
                raise ValueError(f"{p}: category id {cat['id']!r} occurs twice")
            self._cats[cat["id"]] = cat
        anns = data.get("annotations") or []
        if not isinstance(anns, list):
            raise ValueError(f"{p}: 'annotations' must be a list")
        for k, ann in enumerate(anns):
            if not isinstance(ann, dict):
                raise ValueError(f"{p}: annotations[{k}] is not an object")
            name = f"annotation {ann.get('id', f'#{k}')!r}"
            iid = ann.get("image_id")
            if iid not in self._images:
                raise ValueError(f"{p}: {name} refers to unknown image id {iid!r}")
            if ann.get("category_id") not in self._cats:
                raise ValueError(f"{p}: {name} refers to unknown category id "
                                 f"{ann.get('category_id')!r}")
            if "segmentation" not in ann:
                raise ValueError(f"{p}: {name} has no 'segmentation'")
            self._anns.setdefault(iid, []).append(ann)

    def _load_captions(self) -> None:
        p = self.captions_path
        data = _read_json(p, "COCO captions file")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise ValueError(f"{p}: not a COCO captions file (expected a JSON object with an "
                             f"'annotations' list)")
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                raise ValueError(f"{p}: annotations[{k}] is not an object")
            name = f"caption {ann.get('id', f'#{k}')!r}"
            iid = ann.get("image_id")
            if iid not in self._images:
                raise ValueError(f"{p}: {name} refers to unknown image id {iid!r} (not in "
                                 f"{self.instances_path})")
            if not isinstance(ann.get("caption"), str):
                raise ValueError(f"{p}: {name} has no str 'caption'")
            self._caps.setdefault(iid, []).append(ann["caption"])
            qa = ann.get("qa") or []
            for j, q in enumerate(qa):
                if not isinstance(q, dict) or not isinstance(q.get("prompt"), str) \
                        or not isinstance(q.get("answer"), str):
                    raise ValueError(f"{p}: {name}: qa[{j}] needs a str 'prompt' and 'answer'")
            self._qa.setdefault(iid, []).extend(qa)

    # -- lookup ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, image_id) -> bool:
        return image_id in self._images

    def __repr__(self) -> str:
        return (f"CocoDataset({self.instances_path!r}, images={len(self)}, "
                f"categories={len(self._cats)}, captions={self.captions_path is not None})")

    @property
    def categories(self) -> Dict[Any, str]:
        """Category id -> name."""
        return {cid: c["name"] for cid, c in self._cats.items()}

    def image_info(self, image_id) -> dict:
        """The ``images`` entry of ``image_id`` (a copy); KeyError naming the id if unknown."""
        return dict(self._info(image_id))

    def _info(self, image_id) -> dict:
        try:
            return self._images[image_id]
        except (KeyError, TypeError):
            raise KeyError(f"image id {image_id!r} is not in {self.instances_path}") from None

    def image_path(self, image_id) -> str:
        """Path of the image file of ``image_id`` (not checked for existence)."""
        return os.path.join(self.images_dir, self._info(image_id)["file_name"])

    def load_image(self, image_id) -> np.ndarray:
        """The image of ``image_id`` as RGB uint8 ``(H, W, 3)`` (grayscale and palette images
        converted, alpha dropped), read with Pillow, or without Pillow if it is a PNG."""
        return _read_image(self.image_path(image_id))

    def _size(self, image_id) -> Tuple[int, int]:
        info = self._info(image_id)
        if "height" in info and "width" in info:
            return int(info["height"]), int(info["width"])
        for ann in self._anns.get(image_id, ()):
            if isinstance(ann["segmentation"], dict) and "size" in ann["segmentation"]:
                h, w = ann["segmentation"]["size"]
                return int(h), int(w)
        return self.load_image(image_id).shape[:2]

    def annotations(self, image_id) -> List[dict]:
        """The instance annotations of ``image_id`` (the json's dicts, in file order)."""
        self._info(image_id)
        return list(self._anns.get(image_id, ()))

    def masks(self, image_id, keys: Union[str, Sequence[str]] = ("category",)
              ) -> Dict[str, np.ndarray]:
        """Ground-truth masks of ``image_id``: name -> boolean ``(H, W)`` union of the image's
        instances carrying that name (crowd regions included).

        ``keys`` says where names come from: ``"category"`` (the category name),
        ``"supercategory"``, or any annotation field holding a string, e.g. ``"colour"`` of the
        shapes export (instances whose field is missing or not a str are skipped).  A name that
        several keys produce gets the union of all of them.  An image without instances gives
        ``{}``; an unknown id raises KeyError naming it.
        """
        keys = self._check_keys(keys)
        self._info(image_id)
        anns = self._anns.get(image_id, ())
        if not anns:
            return {}
        h, w = self._size(image_id)
        out: Dict[str, np.ndarray] = {}
        for ann in anns:
            names: List[str] = []
            cat = self._cats[ann["category_id"]]
            for key in keys:
                if key == "category":
                    v = cat["name"]
                elif key == "supercategory":
                    v = cat.get("supercategory")
                else:
                    v = ann.get(key)
                if isinstance(v, str) and v and v not in names:
                    names.append(v)
            if not names:
                continue
            try:
                m = decode_segmentation(ann["segmentation"], h, w)
            except ValueError as e:
                raise ValueError(f"{self.instances_path}: annotation {ann.get('id')!r} of image "
                                 f"{image_id!r}: {e}") from None
            for n in names:
                out[n] = out[n] | m if n in out else m.copy()
        return out

    def captions(self, image_id) -> List[str]:
        """The captions of ``image_id`` in file order (empty without a captions file)."""
        self._info(image_id)
        return list(self._caps.get(image_id, ()))

    def qa(self, image_id) -> List[dict]:
        """The questions of ``image_id`` (the shapes export's ``"qa"`` entries: ``prompt``,
        ``answer``, ``kind``, ``grounding``); empty for real COCO."""
        self._info(image_id)
        return [dict(q) for q in self._qa.get(image_id, ())]

    # -- samples -----------------------------------------------------------------------------
    @staticmethod
    def _check_keys(keys) -> Tuple[str, ...]:
        if isinstance(keys, str):
            keys = (keys,)
        keys = tuple(keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"keys must be a non-empty sequence of field names, got {keys!r}")
        return keys

    def _window(self, start, limit) -> List[Any]:
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start={start!r}: expected an int >= 0")
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"limit={limit!r}: expected None or an int >= 0")
        stop = None if limit is None else int(start) + int(limit)
        return self.image_ids[int(start):stop]

    def samples(self, prompt: str = DEFAULT_PROMPT,
                answer: Union[None, str, Callable[["CocoDataset", Any], str]] = None,
                keys: Union[str, Sequence[str]] = ("category",), limit: Optional[int] = None,
                start: int = 0) -> Iterator[Sample]:
        """One :class:`~diffcam.data.sample.Sample` per image, in image-id order: images
        ``start .. start + limit - 1`` of :attr:`image_ids`.

        id ``"coco-{image_id}"`` (stable across loads), image the file path, ``prompt``, masks
        :meth:`masks` (``keys``), meta ``{"image_id", "file_name"}``.  ``answer``: None (the
        model answers), ``"caption"`` (explain the image's first caption, teacher-forced;
        ValueError for an image without captions) or a callable ``(dataset, image_id) -> str``.
        Arguments are checked when called; masks are decoded as the iterator advances.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
        if not (answer is None or answer == "caption" or callable(answer)):
            raise ValueError(f"answer={answer!r}: expected None (the model answers), 'caption' "
                             "(explain the first caption) or a callable (dataset, image_id) -> str")
        keys = self._check_keys(keys)
        ids = self._window(start, limit)
        return self._samples(ids, prompt, answer, keys)

    def _samples(self, ids, prompt, answer, keys) -> Iterator[Sample]:
        for iid in ids:
            if answer == "caption":
                caps = self._caps.get(iid)
                if not caps:
                    raise ValueError(f"answer='caption': image {iid!r} has no caption"
                                     + ("" if self.captions_path else " (no captions file)"))
                ans = caps[0]
            elif answer is None:
                ans = None
            else:
                ans = answer(self, iid)
            info = self._images[iid]
            yield Sample(f"coco-{iid}", self.image_path(iid), prompt, answer=ans,
                         masks=self.masks(iid, keys),
                         meta={"image_id": iid, "file_name": info["file_name"]})

    def qa_samples(self, kinds: Union[None, str, Sequence[str]] = None,
                   keys: Union[str, Sequence[str]] = ("category", "colour"),
                   limit: Optional[int] = None, start: int = 0, gold: bool = True
                   ) -> Iterator[Sample]:
        """One :class:`~diffcam.data.sample.Sample` per question of the shapes export, for
        images ``start .. start + limit - 1`` of :attr:`image_ids`.

        id ``"coco-{image_id}-qa{j}"`` (``j`` the question's index in the image's list, whatever
        ``kinds`` keeps), prompt and answer from the entry (``gold=False``: answer None, the
        model answers), masks :meth:`masks` with ``keys`` (default: shape and colour words),
        meta ``{"image_id", "file_name", "kind", "grounding", "expected"}``.  ``kinds`` keeps
        only those question kinds.  ValueError if the dataset holds no questions (real COCO).
        """
        if not any(self._qa.values()):
            raise ValueError(f"{self.captions_path or self.instances_path}: no 'qa' entries "
                             "(only the diffcam shapes export has questions)")
        if isinstance(kinds, str):
            kinds = (kinds,)
        kinds = None if kinds is None else frozenset(kinds)
        keys = self._check_keys(keys)
        ids = self._window(start, limit)
        return self._qa_samples(ids, kinds, keys, gold)

    def _qa_samples(self, ids, kinds, keys, gold) -> Iterator[Sample]:
        for iid in ids:
            qas = self._qa.get(iid, ())
            picked = [(j, q) for j, q in enumerate(qas) if kinds is None or q.get("kind") in kinds]
            if not picked:
                continue
            masks = self.masks(iid, keys)
            fname = self._images[iid]["file_name"]
            for j, q in picked:
                yield Sample(f"coco-{iid}-qa{j}", self.image_path(iid), q["prompt"],
                             answer=q["answer"] if gold else None, masks=dict(masks),
                             meta={"image_id": iid, "file_name": fname, "kind": q.get("kind"),
                                   "grounding": q.get("grounding", []),
                                   "expected": q["answer"]})


def load_coco(path, **kw) -> CocoDataset:
    """``CocoDataset(path, **kw)``: a COCO-style dataset from an instances json or a folder."""
    return CocoDataset(path, **kw)
