"""diffcam.data.grandf: the four GranD-f layouts, head words, image folders, validation, specs."""

import json
import os
import sys

import numpy as np
import pytest

from diffcam.data import shapes
from diffcam.data.coco import encode_rle
from diffcam.data.grandf import GrandfDataset, head_word, load_grandf
from diffcam.run.sources import open_dataset
from diffcam.viz.png import write_png

from .test_coco import _same_masks

N = 5


@pytest.fixture(scope="module", params=shapes.GRANDF_LAYOUTS)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"grandf_{request.param}")
    return request.param, shapes.export_grandf(str(root), "val", n=N, layout=request.param)


@pytest.fixture(scope="module")
def eval_export(tmp_path_factory):
    return shapes.export_grandf(str(tmp_path_factory.mktemp("grandf_eval")), "val", n=N,
                                layout="eval")


@pytest.fixture(scope="module")
def scenes():
    return [shapes.scene("val", i) for i in range(N)]


def _expected_heads(sc):
    """Shape word -> union of the named instances of that shape (what the head keys give)."""
    out = {}
    for k in sc.named:
        s = sc.shapes[k]
        out[s] = out[s] | sc.masks[k] if s in out else sc.masks[k].copy()
    return out


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


# ----------------------------------------------------------------------- layouts: round trips
def test_every_layout_reads_back_the_shapes_world(exported, scenes):
    layout, path = exported
    ds = load_grandf(path)
    assert ds.format == layout and len(ds) == N
    assert ds.images_dir == os.path.join(os.path.dirname(path), "images")   # guessed
    if layout == "eval":
        assert ds.caption_path == ds.path and ds.mask_path.endswith("val_gcg_coco_mask_gt.json")
    samples = list(ds.samples(answer="caption"))
    assert [s.id for s in samples] == ds.ids and len(set(ds.ids)) == N
    for i, (s, sc) in enumerate(zip(samples, scenes)):
        cap = shapes.describe(sc)
        assert s.answer == cap == ds.caption(i)
        assert s.image == ds.image_path(i) and os.path.isfile(s.image)
        assert np.array_equal(ds.load_image(i), sc.image)
        want = [(t, span) for t, span, _ in shapes.grounded_phrases(sc)]
        assert ds.phrases(i) == want
        assert [(p["text"], tuple(p["span"])) for p in s.meta["phrases"]] == want
        assert all(p["key"] == p["text"].split()[-1] for p in s.meta["phrases"])
        assert s.meta["format"] == layout and s.meta["caption"] == cap
        _same_masks(s.masks, _expected_heads(sc))
        _same_masks(ds.masks(i), s.masks)
    assert [s.answer for s in ds.samples()] == [None] * N
    json.dumps([s.meta for s in samples])                   # JSON-ready for the run records


def test_eval_layout_opens_from_either_file(eval_export):
    path = eval_export
    cap = GrandfDataset(path)
    mask = GrandfDataset(path.replace("_caption_", "_mask_"))
    assert (mask.format, mask.caption_path, mask.mask_path) == ("eval", cap.path, cap.mask_path)
    for i in range(N):
        assert mask.phrases(i) == cap.phrases(i)
        _same_masks(mask.masks(i), cap.masks(i))


def test_keys_phrase_callable_and_union(tmp_path):
    a = np.zeros((5, 7), bool)
    a[0:2, 0:3] = True
    b = np.zeros((5, 7), bool)
    b[3:5, 4:7] = True
    c = np.zeros((5, 7), bool)
    c[2, :] = True
    cap = "A dog on a sofa and another dog near the door."
    rec = {"file_name": "x.jpg", "caption": cap, "groundings": {
        "another dog": {"token_positives": [20, 31], "rle_masks": [encode_rle(b)]},
        "A dog": {"token_positives": [0, 5], "rle_masks": [encode_rle(a)]},
        "a sofa": {"token_positives": [9, 15], "rle_masks": [encode_rle(c), encode_rle(a)]}}}
    ds = GrandfDataset(_dump(tmp_path / "g.json", [rec]), images_dir=tmp_path)
    assert ds.phrases(0) == [("A dog", (0, 5)), ("a sofa", (9, 15)), ("another dog", (20, 31))]
    heads = ds.masks(0)                                     # two phrases headed "dog": union
    _same_masks(heads, {"dog": a | b, "sofa": c | a})
    _same_masks(ds.masks(0, keys="phrase"), {"A dog": a, "a sofa": c | a, "another dog": b})
    only_sofa = ds.masks(0, keys=lambda t: "furniture" if "sofa" in t else None)
    _same_masks(only_sofa, {"furniture": c | a})
    s = next(ds.samples(keys="phrase"))
    assert [p["key"] for p in s.meta["phrases"]] == ["A dog", "a sofa", "another dog"]
    with pytest.raises(ValueError, match="keys="):
        ds.masks(0, keys="category")


def test_quoted_captions_keep_their_phrases(tmp_path):
    """Quotes around a caption are stripped (as GLaMM does); spans counted in the quoted text
    are moved onto the stripped one, spans already counted in it stay."""
    m = encode_rle(np.ones((2, 2), bool))
    recs = [{"file_name": "a.jpg", "caption": '"A cat on a mat."', "groundings": {
                "A cat": {"token_positives": [1, 6], "rle_masks": [m]},       # quoted text
                "a mat": {"token_positives": [9, 14], "rle_masks": [m]}}},   # stripped text
            {"file_name": "b.jpg", "caption": ' "a mat"', "groundings": {
                "a mat": {"token_positives": [2, 7], "rle_masks": [m]}}}]
    ds = GrandfDataset(_dump(tmp_path / "q.json", recs), images_dir=tmp_path)
    assert ds.caption(0) == "A cat on a mat." and ds.caption(1) == "a mat"
    assert ds.phrases(0) == [("A cat", (0, 5)), ("a mat", (9, 14))]
    assert ds.phrases(1) == [("a mat", (0, 5))]


def test_repeated_file_names_get_distinct_stable_ids(tmp_path):
    m = encode_rle(np.ones((2, 2), bool))
    recs = [{"file_name": f"{n}.jpg", "caption": "a cat", "groundings": {
        "a cat": {"token_positives": [0, 5], "rle_masks": [m]}}} for n in ("p", "q", "p", "p")]
    path = _dump(tmp_path / "g.json", recs)
    ids = GrandfDataset(path, images_dir=tmp_path).ids
    assert ids == ["grandf-p", "grandf-q", "grandf-p-1", "grandf-p-2"]
    assert GrandfDataset(path, images_dir=tmp_path).ids == ids
    recs.insert(0, dict(recs[0], file_name="p-1.jpg"))     # a real name like a repeat's id
    ids = GrandfDataset(_dump(tmp_path / "h.json", recs), images_dir=tmp_path).ids
    assert ids == ["grandf-p-1", "grandf-p", "grandf-q", "grandf-p-2", "grandf-p-3"]
    assert len(set(ids)) == len(ids)


def test_start_limit_and_answer_callable(exported):
    _, path = exported
    ds = GrandfDataset(path)
    got = list(ds.samples(start=1, limit=2, answer=lambda d, i: f"caption {i}"))
    assert [s.id for s in got] == ds.ids[1:3] and [s.answer for s in got] == ["caption 1",
                                                                             "caption 2"]
    assert list(ds.samples(start=N)) == [] and len(list(ds.samples(limit=0))) == 0
    for bad in (dict(start=-1), dict(start=1.0), dict(limit=-2), dict(limit=True),
                dict(answer="gold"), dict(prompt=" "), dict(keys="colour")):
        with pytest.raises(ValueError):
            ds.samples(**bad)
    with pytest.raises(IndexError, match="out of range"):
        ds.masks(N)
    with pytest.raises(TypeError, match="int"):
        ds.caption("0")


# ------------------------------------------------------------------------------------ RefCOCOg
def test_refcocog_polygons_case_and_dropped_expressions(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    pytest.importorskip("PIL")
    h, w = 20, 30
    write_png(str(tmp_path / "COCO_train2014_000000000009.jpg"), np.zeros((h, w, 3), np.uint8))
    cat = [2.0, 3.0, 12.0, 3.0, 12.0, 15.0, 2.0, 15.0]
    mat = [[14.0, 10.0, 28.0, 10.0, 28.0, 19.0], [0.0, 18.0, 5.0, 18.0, 5.0, 19.0, 0.0, 19.0]]
    rec = {"img_file_name": "COCO_train2014_000000000009.jpg",
           "caption": '"The Cat sits on a mat."',
           "refs": [{"sentence": "a mat", "segmentation": mat},
                    {"sentence": "the cat", "segmentation": [cat]},
                    {"sentence": "a dog", "segmentation": [cat]}]}   # not in the caption
    ds = GrandfDataset(_dump(tmp_path / "RefCOCOg_GCG_val.json", [rec]))
    assert ds.format == "refcocog" and ds.images_dir == str(tmp_path)
    assert ds.caption(0) == "The Cat sits on a mat."          # quotes stripped, case kept
    assert ds.phrases(0) == [("The Cat", (0, 7)), ("a mat", (16, 21))]

    def ref(polys):
        rles = mask_utils.frPyObjects(polys, h, w)
        return np.asarray(mask_utils.decode(rles)).reshape(h, w, -1).any(axis=2)

    got = ds.masks(0)          # the size comes from the image header (the record has none)
    _same_masks(got, {"cat": ref([cat]), "mat": ref(mat)})
    assert got["cat"].any() and got["mat"].any()


# ------------------------------------------------------------------------------ image folders
def _glamm_tree(tmp_path, rec, ann_name, image_parts):
    """A GLaMM data folder: GranDf/annotations/<split>/<ann_name> and the image under
    image_parts (relative to the data folder)."""
    ann = tmp_path / "data" / "GranDf" / "annotations" / "train"
    ann.mkdir(parents=True)
    img = tmp_path / "data" / os.path.join(*image_parts)
    img.mkdir(parents=True)
    write_png(str(img / rec["file_name"]), np.zeros((2, 2, 3), np.uint8))
    return _dump(ann / ann_name, [rec]), str(img)


@pytest.mark.parametrize("ann_name, image_parts", [
    ("GranDf_HA_GCG_train.json", ("GranDf", "GranDf_HA_images", "train")),
    ("OpenPsgGCG_train.json", ("coco_2017", "train2017"))])
def test_images_folder_follows_glamm_layout(tmp_path, ann_name, image_parts):
    rec = {"file_name": "sa_7.png", "caption": "a cat", "groundings": {
        "a cat": {"token_positives": [0, 5], "rle_masks": [encode_rle(np.ones((2, 2), bool))]}}}
    path, img = _glamm_tree(tmp_path, rec, ann_name, image_parts)
    assert GrandfDataset(path).images_dir == img


def test_missing_images_are_reported_at_once(tmp_path):
    rec = {"file_name": "sa_7.png", "caption": "a cat", "groundings": {
        "a cat": {"token_positives": [0, 5], "rle_masks": [encode_rle(np.ones((2, 2), bool))]}}}
    path = _dump(tmp_path / "GranDf_HA_GCG_train.json", [rec])
    with pytest.raises(FileNotFoundError, match=r"sa_7\.png.*GranDf_HA_images.*images_dir="):
        GrandfDataset(path)
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        GrandfDataset(path, images_dir=tmp_path / "nope")
    assert GrandfDataset(path, images_dir=tmp_path).images_dir == str(tmp_path)


# ---------------------------------------------------------------------------------- head words
@pytest.mark.parametrize("phrase, head", [
    ("a man in a red shirt", "man"), ("A Man", "man"), ("two brown dogs", "dogs"),
    ("the top of the building", "top"), ("a group of people", "people"),
    ("a herd of brown cows grazing", "cows"), ("a parked car", "car"),
    ("a car parked on the street", "car"), ("a woman wearing a hat", "woman"),
    ("trees and bushes", "trees"), ("the man's shadow", "shadow"), ("the woman's", "woman"),
    ("a large white building with many windows", "building"), ("that dog", "dog"),
    ("a dog that is running", "dog"), ("the sky", "sky"), ("grass", "grass"),
    ("a tennis player, holding a racket", "player"), ("in the water", "water"),
    ("a black-and-white cat", "cat"), ("", None), ("  ,", None)])
def test_head_word(phrase, head):
    assert head_word(phrase) == head


def test_head_word_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        head_word(3)


# ---------------------------------------------------------------------------------- bad input
def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GrandfDataset(tmp_path / "none.json")
    _dump(tmp_path / "a.json", [])
    with pytest.raises(FileNotFoundError, match=r"is a folder.*a\.json"):
        GrandfDataset(tmp_path)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        GrandfDataset(tmp_path / "bad.json")
    for obj, msg in [({"x": 1}, "not a GranD-f annotation file"),
                     ([{"file_name": "a.jpg"}], "without 'groundings'"),
                     ({"images": [{"id": 1}], "annotations": [{"image_id": 1}]},
                      "neither a GranD-f caption"),
                     ({"images": [], "annotations": {}}, "must be a list")]:
        with pytest.raises(ValueError, match=msg):
            GrandfDataset(_dump(tmp_path / "m.json", obj), images_dir=tmp_path)
    assert len(GrandfDataset(_dump(tmp_path / "e.json", []), images_dir=tmp_path)) == 0


def _gcg(**over):
    rec = {"file_name": "a.jpg", "caption": "a cat on a mat", "groundings": {
        "a cat": {"token_positives": [0, 5],
                  "rle_masks": [encode_rle(np.ones((3, 4), bool))]}}}
    rec.update(over)
    return [rec]


@pytest.mark.parametrize("records, msg", [
    (_gcg(caption=None), "needs a str 'caption'"),
    (_gcg(file_name=3), "needs a str 'file_name'"),
    (_gcg(groundings=[]), "'groundings' must be an object"),
    (_gcg(groundings={"a cat": {"rle_masks": []}}), "needs 'token_positives'"),
    (_gcg(groundings={"a cat": {"token_positives": [0, 5], "rle_masks": "x"}}),
     "'rle_masks' must be a list"),
    (_gcg(groundings={"a cat": {"token_positives": [3, 40], "rle_masks": []}}),
     r"span \[3, 40\] is outside the caption"),
    (_gcg(groundings={"a cat": {"token_positives": [5, 5], "rle_masks": []}}), "outside"),
    (_gcg(groundings={"a cat": {"token_positives": ["a"], "rle_masks": []}}),
     r"must be \[start, end\]"),
    (_gcg(groundings={"a cat": {"token_positives": [0, 5], "rle_masks": [
        encode_rle(np.ones((3, 4), bool)), encode_rle(np.ones((4, 3), bool))]}}),
     r"mask size \[4, 3\] differs"),
    ([_gcg()[0], 7], "record 1 is not an object")])
def test_malformed_records(tmp_path, records, msg):
    with pytest.raises(ValueError, match=msg):
        GrandfDataset(_dump(tmp_path / "g.json", records), images_dir=tmp_path)


def test_corrupt_mask_names_the_phrase(tmp_path):
    bad = {"size": [3, 4], "counts": [1, 2]}                  # covers 3 of 12 pixels
    path = _dump(tmp_path / "g.json", _gcg(groundings={
        "a cat": {"token_positives": [0, 5], "rle_masks": [bad]}}))
    ds = GrandfDataset(path, images_dir=tmp_path)             # masks are decoded on demand
    with pytest.raises(ValueError, match=r"a\.jpg, phrase 'a cat'.*corrupt RLE"):
        ds.masks(0)


def test_eval_pair_errors(eval_export, tmp_path):
    path = eval_export
    caps = json.load(open(path))
    masks = json.load(open(path.replace("_caption_", "_mask_")))
    lonely = _dump(tmp_path / "val_gcg_coco_caption_gt.json", caps)
    with pytest.raises(FileNotFoundError, match="mask ground truth .* is missing"):
        GrandfDataset(lonely, images_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot tell the name"):
        GrandfDataset(_dump(tmp_path / "captions.json", caps), images_dir=tmp_path)
    short = dict(masks, annotations=masks["annotations"][1:])
    _dump(tmp_path / "val_gcg_coco_mask_gt.json", short)
    first = caps["annotations"][0]["image_id"]
    with pytest.raises(ValueError, match=f"image '{first}' has .* masks for its .* labels"):
        GrandfDataset(lonely, images_dir=tmp_path)
    stray = dict(masks, annotations=masks["annotations"] + [
        {"id": 999, "image_id": "nope", "segmentation": masks["annotations"][0]["segmentation"]}])
    _dump(tmp_path / "val_gcg_coco_mask_gt.json", stray)
    with pytest.raises(ValueError, match="image id 'nope', which has no caption"):
        GrandfDataset(lonely, images_dir=tmp_path)
    twice = dict(caps, annotations=caps["annotations"] + caps["annotations"][:1])
    _dump(tmp_path / "val_gcg_coco_caption_gt.json", twice)
    _dump(tmp_path / "val_gcg_coco_mask_gt.json", masks)
    with pytest.raises(ValueError, match="a second caption"):
        GrandfDataset(lonely, images_dir=tmp_path)


def test_labels_not_in_the_caption_keep_their_mask(tmp_path):
    m = np.zeros((3, 3), bool)
    m[1, 1] = True
    caps = {"images": [{"id": "i1", "file_name": "i1.jpg", "height": 3, "width": 3}],
            "annotations": [{"id": 1, "image_id": "i1", "caption": "A cat and a cat.",
                             "labels": ["a cat", "a CAT", "the dog"]}]}
    masks = {"images": caps["images"], "annotations": [
        {"id": k, "image_id": "i1", "segmentation": encode_rle(m)} for k in range(3)]}
    _dump(tmp_path / "test_gcg_coco_mask_gt.json", masks)
    ds = GrandfDataset(_dump(tmp_path / "test_gcg_coco_caption_gt.json", caps),
                       images_dir=tmp_path)
    # repeated labels are found left to right; a label absent from the caption has no span
    assert ds.phrases(0) == [("a cat", (0, 5)), ("a CAT", (10, 15)), ("the dog", None)]
    assert sorted(ds.masks(0)) == ["cat", "dog"]


def test_flickr_ignored_annotations_and_unknown_images(tmp_path):
    m = encode_rle(np.ones((2, 2), bool))
    data = {"images": [{"id": 1, "file_name": "1.jpg", "caption": "a cat", "height": 2,
                        "width": 2}],
            "annotations": [{"id": 1, "image_id": 1, "tokens_positive": [[0, 5]], "sam_mask": m},
                            {"id": 2, "image_id": 1, "tokens_positive": [[0, 5]], "sam_mask": m,
                             "ignore": True}]}
    ds = GrandfDataset(_dump(tmp_path / "f.json", data), images_dir=tmp_path)
    assert ds.format == "flickr" and ds.phrases(0) == [("a cat", (0, 5))]
    data["annotations"].append({"id": 3, "image_id": 2, "tokens_positive": [[0, 5]],
                                "sam_mask": m})
    with pytest.raises(ValueError, match="unknown image id 2"):
        GrandfDataset(_dump(tmp_path / "f.json", data), images_dir=tmp_path)
    data["annotations"][2] = {"id": 3, "image_id": 1, "sam_mask": m}
    with pytest.raises(ValueError, match="needs 'tokens_positive'"):
        GrandfDataset(_dump(tmp_path / "f.json", data), images_dir=tmp_path)


def test_masks_without_pillow_read_the_image(tmp_path, monkeypatch):
    """A layout without sizes (RefCOCOg) takes the size from the image; without Pillow the
    PNG reader serves."""
    pytest.importorskip("pycocotools.mask")
    write_png(str(tmp_path / "a.png"), np.zeros((6, 9, 3), np.uint8))
    rec = {"img_file_name": "a.png", "caption": "a box",
           "refs": [{"sentence": "a box", "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]}]}
    ds = GrandfDataset(_dump(tmp_path / "r.json", [rec]), images_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert ds.masks(0)["box"].shape == (6, 9)


# --------------------------------------------------------------------------------- dataset spec
def test_grandf_spec(exported):
    layout, path = exported
    ds = open_dataset(f"grandf:{path}", answer="caption")
    assert ds.count == N and ds.spec.startswith(f"grandf:{os.path.abspath(path)}|images=")
    got = list(ds)
    assert [s.id for s in got] == GrandfDataset(path).ids and got[0].answer
    img = os.path.join(os.path.dirname(path), "images")
    by_phrase = list(open_dataset(f"grandf:{path}|keys=phrase|images={img}"))
    assert by_phrase[0].answer is None
    assert sorted(by_phrase[0].masks) == sorted(t for t, _ in GrandfDataset(path).phrases(0))
    for bad, msg in [("grandf:", "expected grandf:PATH"),
                     (f"grandf:{path}|keys=colour", "keys='colour'"),
                     (f"grandf:{path}|size=3", "option 'size=3'"),
                     (f"grandf:{path}|keys=head|keys=phrase", "at most once")]:
        with pytest.raises(ValueError, match=msg):
            open_dataset(bad)
    with pytest.raises(ValueError, match="GranD-f dataset takes None"):
        open_dataset(f"grandf:{path}", answer="gold")
    with pytest.raises(FileNotFoundError):
        open_dataset(f"grandf:{path}|images=/nonexistent/folder")
