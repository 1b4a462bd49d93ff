"""diffcam.data.coco: RLE codecs, polygons, the shapes export round trip, validation, samples."""

import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from diffcam.data import coco, shapes
from diffcam.data.coco import CocoDataset, decode_rle, decode_segmentation, encode_rle, load_coco
from diffcam.data.sample import Sample

N = 4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_coco")
    shapes.export_coco(str(root), "val", n=N)
    return root


@pytest.fixture(scope="module")
def scenes():
    return [shapes.scene("val", i) for i in range(N)]


def _union(sc, pick):
    out = {}
    for k, m in enumerate(sc.masks):
        name = pick(k)
        out[name] = out[name] | m if name in out else m.copy()
    return out


def _same_masks(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == bool and a[k].shape == b[k].shape
        assert np.array_equal(a[k], b[k]), k


# --------------------------------------------------------------------- shapes export round trip
def test_shapes_export_round_trip(export, scenes):
    ds = CocoDataset(str(export))
    assert len(ds) == N and ds.image_ids == list(range(N))
    assert set(ds.categories.values()) == set(shapes.SHAPES) | {"distractor"}
    assert ds.images_dir == os.path.join(str(export), "images")
    for i, sc in enumerate(scenes):
        _same_masks(ds.masks(i), _union(sc, lambda k: sc.shapes[k]))
        _same_masks(ds.masks(i, keys=("colour",)), _union(sc, lambda k: sc.colours[k]))
        both = ds.masks(i, keys=("category", "colour"))
        _same_masks(both, {**_union(sc, lambda k: sc.shapes[k]),
                           **_union(sc, lambda k: sc.colours[k])})
        assert ds.captions(i) == [shapes.describe(sc)]
        qa = ds.qa(i)
        want = shapes.questions(sc)
        assert [(q["prompt"], q["answer"], q["kind"]) for q in qa] == \
               [(q.prompt, q.answer, q.kind) for q in want]
        assert [[tuple(g) for g in q["grounding"]] for q in qa] == \
               [[tuple(g) for g in q.grounding] for q in want]
        img = ds.load_image(i)
        assert img.dtype == np.uint8 and np.array_equal(img, sc.image)
        assert ds.image_path(i) == os.path.join(str(export), "images", f"val_{i:06d}.png")
        assert ds.image_info(i)["height"] == sc.image.shape[0]


def test_load_image_without_pillow(export, scenes, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    ds = load_coco(str(export / "instances.json"))
    assert np.array_equal(ds.load_image(2), scenes[2].image)


def test_json_path_and_explicit_folders(export, tmp_path):
    ds = CocoDataset(str(export / "instances.json"))
    assert ds.captions_path == str(export / "captions.json") and ds.captions(0)
    ds = CocoDataset(str(export / "instances.json"), images_dir=str(export / "images"),
                     captions=False)
    assert ds.captions(0) == [] and ds.qa(0) == []
    assert ds.load_image(0).shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
    with pytest.raises(ValueError, match="no 'qa'"):
        ds.qa_samples()


def test_standard_coco_layout(export, tmp_path):
    """coco/annotations/instances_val2017.json + captions_val2017.json + coco/val2017/."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    inst = json.loads((export / "instances.json").read_text())
    caps = json.loads((export / "captions.json").read_text())
    for c in caps["annotations"]:
        del c["qa"]
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(inst))
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(caps))
    for im in inst["images"]:
        (tmp_path / "val2017" / im["file_name"]).write_bytes(
            (export / "images" / im["file_name"]).read_bytes())
    for path in (tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017"):
        ds = CocoDataset(str(path))
        assert ds.images_dir == str(tmp_path / "val2017")
        assert ds.captions(1) == [shapes.describe(shapes.scene("val", 1))]
        assert ds.qa(1) == []
        assert os.path.isfile(ds.image_path(1))


# --------------------------------------------------------------------------------- RLE codecs
def _adversarial():
    rng = np.random.default_rng(7)
    out = []
    for h, w in [(1, 1), (1, 37), (37, 1), (5, 7), (300, 300)]:
        out.append(np.zeros((h, w), bool))
        out.append(np.ones((h, w), bool))
        m = np.zeros((h, w), bool)
        m[0, 0] = True
        out.append(m)
        m = np.zeros((h, w), bool)
        m[-1, -1] = True
        out.append(m)
        out.append(~m)
    long_runs = np.zeros((300, 300), bool)      # runs of 75000 and 15000 pixels (> 2**16)
    long_runs[:, 250:] = True
    out.append(long_runs)
    stripes = np.zeros((400, 400), bool)        # a 70000-pixel run between short ones
    stripes[:, :2] = rng.random((400, 2)) < 0.5
    stripes[:, 177:] = True
    out.append(stripes)
    out.append(np.zeros((1, 70001), bool))
    for _ in range(40):
        h, w = rng.integers(1, 30, 2)
        out.append(rng.random((h, w)) < rng.random())
    return out


MASKS = _adversarial()


def _runs_of(m):
    flat = m.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def test_rle_round_trip_pure_numpy():
    for m in MASKS:
        r = encode_rle(m)
        assert isinstance(r["counts"], str) and r["size"] == list(m.shape)
        d = decode_rle(r)
        assert d.dtype == bool and np.array_equal(d, m), m.shape
        assert np.array_equal(decode_rle({"size": r["size"], "counts": r["counts"].encode()}), m)
        assert np.array_equal(decode_rle({"size": list(m.shape), "counts": _runs_of(m)}), m)


def test_rle_hand_made_strings():
    # runs [2, 3, 4, 1, 2] of a 3x4 mask; counts 3 and 4 are stored as 1-3 = -2 and 2-4 = -2,
    # and -2 is the single 5-bit group 0b11110 (sign bit 0x10 set) -> chr(48 + 30) = "N"
    assert encode_rle(decode_rle({"size": [3, 4], "counts": [2, 3, 4, 1, 2]}))["counts"] == "234NN"
    m = decode_rle({"size": [3, 4], "counts": "234NN"})
    # column-major: 0 0 | 1 1 1 | 0 0 0 0 | 1 | 0 0
    assert m.astype(int).tolist() == [[0, 1, 0, 1],
                                      [0, 1, 0, 0],
                                      [1, 0, 0, 0]]
    # 40 = 0b01000_01000: low group 8 with continuation (8 | 0x20 = 40 -> "X"), then 1 -> "1"
    m = decode_rle({"size": [1, 41], "counts": b"X11"})
    assert m.sum() == 1 and m[0, 40]
    assert encode_rle(m)["counts"] == "X11"
    # the all-ones mask starts with an empty zero run
    assert encode_rle(np.ones((2, 2), bool))["counts"] == "04"
    assert decode_rle({"size": [2, 2], "counts": "04"}).all()


def test_rle_rejects_corrupt_input():
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [2, 2], "counts": "5"})
    with pytest.raises(ValueError, match="ends inside"):
        decode_rle({"size": [2, 2], "counts": "X"})
    with pytest.raises(ValueError, match="outside"):
        decode_rle({"size": [2, 2], "counts": "1 3"})
    with pytest.raises(ValueError, match="negative"):
        decode_rle({"size": [1, 2], "counts": [3, -1]})
    with pytest.raises(ValueError, match="size"):
        decode_rle({"counts": [1]})
    with pytest.raises(ValueError, match="does not match"):
        decode_segmentation({"size": [2, 2], "counts": [4]}, 2, 3)


def test_rle_against_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    for m in MASKS:
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert encode_rle(m)["counts"] == ref["counts"].decode("ascii"), m.shape
        assert np.array_equal(decode_rle(ref), m)
        assert np.array_equal(mask_utils.decode(encode_rle(m)).astype(bool), m)
        # pycocotools' own compression of the uncompressed form
        fr = mask_utils.frPyObjects({"size": list(m.shape), "counts": _runs_of(m)}, *m.shape)
        assert np.array_equal(decode_rle(fr), m)


# ----------------------------------------------------------------------------------- polygons
POLYS = [[2, 2, 12, 2, 12, 9, 2, 9], [14.5, 3, 19, 14, 10, 14], [0, 0, 1, 1]]


def test_polygons_against_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    h, w = 16, 21
    m = decode_segmentation(POLYS, h, w)
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYS[:2], h, w)))
    assert m.dtype == bool and m.shape == (h, w)
    assert np.array_equal(m, ref.astype(bool))
    assert 60 <= decode_segmentation(POLYS[:1], h, w).sum() <= 90      # the 10 x 7 rectangle
    assert m[5, 6] and not m[0, 0] and m[12, 14]
    assert np.array_equal(decode_segmentation(POLYS[0], h, w),
                          decode_segmentation(POLYS[:1], h, w))


def test_polygons_without_pycocotools(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        decode_segmentation(POLYS, 16, 21)
    # nothing to rasterise, and RLE needs no pycocotools
    assert not decode_segmentation([], 3, 4).any()
    assert not decode_segmentation([[0, 0, 1, 1]], 3, 4).any()
    assert decode_segmentation({"size": [3, 4], "counts": "234NN"}, 3, 4).sum() == 4
    with pytest.raises(ValueError, match="even length"):
        decode_segmentation([[0, 0, 1, 1, 2]], 3, 4)


# ------------------------------------------------------------------------------- PNG fallback
def _png(rows: np.ndarray, ctype: int, depth: int, filters) -> bytes:
    """A PNG whose row y uses PNG filter filters[y % len(filters)] (an encoder independent of the
    reader: every predictor is computed from the original bytes)."""
    h = rows.shape[0]
    raw = rows.reshape(h, -1).astype(np.int64)
    bpp = max(1, {0: 1, 2: 3, 4: 2, 6: 4}[ctype] * depth // 8)
    out = []
    for y in range(h):
        x = raw[y]
        up = raw[y - 1] if y else np.zeros_like(x)
        a = np.concatenate([np.zeros(bpp, np.int64), x[:-bpp]])
        c = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        ft = filters[y % len(filters)]
        if ft == 0:
            pred = 0
        elif ft == 1:
            pred = a
        elif ft == 2:
            pred = up
        elif ft == 3:
            pred = (a + up) // 2
        else:
            p = a + up - c
            pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, up, c))
        out.append(bytes([ft]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    w = rows.shape[1]

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def test_png_reader_filters_and_modes(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
    cases = {
        "rgb": (rgb, 2, 8, rgb),
        "rgba": (np.dstack([rgb, rgb[..., :1]]), 6, 8, rgb),
        "gray": (rgb[..., 0], 0, 8, np.repeat(rgb[..., :1], 3, 2)),
        "gray_alpha": (np.dstack([rgb[..., 0], rgb[..., 1]]), 4, 8, np.repeat(rgb[..., :1], 3, 2)),
        "rgb16": ((rgb.astype(np.uint16) * 256 + 100).astype(">u2").view(np.uint8)
                  .reshape(9, 11, 6), 2, 16, rgb),
    }
    for name, (rows, ctype, depth, want) in cases.items():
        for filters in ([0], [1], [2], [3], [4], [3, 4, 1, 2, 0]):
            p = tmp_path / f"{name}{filters[0]}.png"
            p.write_bytes(_png(rows, ctype, depth, filters))
            got = coco._read_png(str(p))
            assert got.dtype == np.uint8 and np.array_equal(got, want), (name, filters)


def test_grayscale_png_both_readers(tmp_path, monkeypatch):
    from diffcam.viz.png import write_png

    g = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    write_png(str(tmp_path / "g.png"), g)
    want = np.repeat(g[..., None], 3, 2)
    assert np.array_equal(coco._read_png(str(tmp_path / "g.png")), want)
    try:
        import PIL  # noqa: F401
        assert np.array_equal(coco._read_image(str(tmp_path / "g.png")), want)
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert np.array_equal(coco._read_image(str(tmp_path / "g.png")), want)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImportError, match="Pillow"):
        coco._read_image(str(tmp_path / "x.jpg"))


# ---------------------------------------------------------------------------------- bad input
def _write(tmp_path, inst, caps=None):
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    if caps is not None:
        (tmp_path / "captions.json").write_text(json.dumps(caps))
    return str(tmp_path)


def _tiny():
    return {"images": [{"id": 5, "file_name": "a.png", "height": 2, "width": 3}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 9, "image_id": 5, "category_id": 1,
                             "segmentation": {"size": [2, 3], "counts": [1, 2, 3]}}]}


def test_missing_files(tmp_path, export):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(missing)
    with pytest.raises(FileNotFoundError, match="instances.json"):
        CocoDataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="caps.json"):
        CocoDataset(str(export), captions=str(tmp_path / "caps.json"))
    with pytest.raises(FileNotFoundError, match="imgs"):
        CocoDataset(str(export), images_dir=str(tmp_path / "imgs"))
    ds = CocoDataset(_write(tmp_path, _tiny()))
    with pytest.raises(FileNotFoundError, match="a.png"):
        ds.load_image(5)


def test_malformed_json(tmp_path):
    (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDataset(str(tmp_path))
    with pytest.raises(ValueError, match="'images'"):
        CocoDataset(_write(tmp_path, {"annotations": []}))
    bad = _tiny()
    bad["annotations"][0]["image_id"] = 777
    with pytest.raises(ValueError, match="annotation 9 refers to unknown image id 777"):
        CocoDataset(_write(tmp_path, bad))
    bad = _tiny()
    bad["annotations"][0]["category_id"] = 42
    with pytest.raises(ValueError, match="unknown category id 42"):
        CocoDataset(_write(tmp_path, bad))
    bad = _tiny()
    bad["images"].append(dict(bad["images"][0]))
    with pytest.raises(ValueError, match="image id 5 occurs twice"):
        CocoDataset(_write(tmp_path, bad))
    with pytest.raises(ValueError, match="unknown image id 6"):
        CocoDataset(_write(tmp_path, _tiny(),
                           {"annotations": [{"id": 1, "image_id": 6, "caption": "x"}]}))
    bad = _tiny()
    bad["annotations"][0]["segmentation"] = {"size": [4, 4], "counts": [16]}
    ds = CocoDataset(_write(tmp_path, bad, {"annotations": []}))
    with pytest.raises(ValueError, match="annotation 9 of image 5"):
        ds.masks(5)


def test_unknown_image_id(export):
    ds = CocoDataset(str(export))
    for call in (ds.masks, ds.captions, ds.qa, ds.image_path, ds.image_info, ds.load_image):
        with pytest.raises(KeyError, match="12345"):
            call(12345)


def test_masks_keys_and_crowd(tmp_path):
    inst = _tiny()
    inst["categories"][0]["supercategory"] = "animal"
    inst["annotations"].append({"id": 10, "image_id": 5, "category_id": 1, "iscrowd": 1,
                                "colour": None,
                                "segmentation": {"size": [2, 3], "counts": [5, 1]}})
    inst["annotations"][0]["colour"] = "red"
    ds = CocoDataset(_write(tmp_path, inst, {"annotations": []}))
    m = ds.masks(5, keys=("category", "colour", "supercategory"))
    assert sorted(m) == ["animal", "cat", "red"]
    assert m["cat"].astype(int).tolist() == [[0, 1, 0], [1, 0, 1]]   # crowd region included
    assert m["red"].astype(int).tolist() == [[0, 1, 0], [1, 0, 0]]   # None colour skipped
    assert np.array_equal(m["animal"], m["cat"])
    assert ds.masks(5, keys="colour").keys() == {"red"}
    with pytest.raises(ValueError, match="keys"):
        ds.masks(5, keys=())


# ------------------------------------------------------------------------------------ samples
def test_samples(export, scenes):
    a = list(CocoDataset(str(export)).samples())
    b = list(load_coco(str(export)).samples())
    ids = [s.id for s in a]
    assert ids == [s.id for s in b] == [f"coco-{i}" for i in range(N)]
    assert len(set(ids)) == N
    s = a[1]
    assert isinstance(s, Sample) and s.answer is None and s.prompt == coco.DEFAULT_PROMPT
    assert s.image == os.path.join(str(export), "images", "val_000001.png")
    assert s.meta == {"image_id": 1, "file_name": "val_000001.png"}
    _same_masks(s.masks, _union(scenes[1], lambda k: scenes[1].shapes[k]))

    ds = CocoDataset(str(export))
    caps = [s.answer for s in ds.samples(answer="caption", prompt="<image> caption .")]
    assert caps == [shapes.describe(sc) for sc in scenes]
    got = list(ds.samples(answer=lambda d, i: f"image {i} of {len(d)}", start=1, limit=2))
    assert [s.id for s in got] == ["coco-1", "coco-2"]
    assert [s.answer for s in got] == ["image 1 of 4", "image 2 of 4"]
    assert [s.id for s in ds.samples(start=3)] == ["coco-3"]
    assert list(ds.samples(start=10)) == [] and list(ds.samples(limit=0)) == []
    with pytest.raises(ValueError, match="answer"):
        ds.samples(answer="gold")
    with pytest.raises(ValueError, match="start"):
        ds.samples(start=-1)
    with pytest.raises(ValueError, match="limit"):
        ds.samples(limit=-2)
    no_caps = CocoDataset(str(export), captions=False)
    with pytest.raises(ValueError, match="no caption"):
        next(no_caps.samples(answer="caption"))


def test_qa_samples(export, scenes):
    ds = CocoDataset(str(export))
    qs = list(ds.qa_samples())
    assert len(qs) == N * len(shapes.KINDS) and len({s.id for s in qs}) == len(qs)
    assert qs[0].id == "coco-0-qa0"
    want = shapes.questions(scenes[0])
    for s, q in zip(qs[:len(want)], want):
        assert (s.prompt, s.answer, s.meta["kind"], s.meta["expected"]) == \
               (q.prompt, q.answer, q.kind, q.answer)
        assert [tuple(g) for g in s.meta["grounding"]] == [tuple(g) for g in q.grounding]
    colour = [s for s in ds.qa_samples(kinds="colour", limit=2)]
    assert {s.meta["kind"] for s in colour} == {"colour"} and len(colour) == 2
    for s in colour:
        assert s.answer in s.masks                    # the colour word has its mask
        assert s.id.endswith(f"qa{shapes.KINDS.index('colour')}")
    assert all(s.answer is None for s in ds.qa_samples(gold=False, limit=1))
