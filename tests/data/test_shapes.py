"""The shapes world: determinism, pixel-exact masks, deterministic answers, COCO export."""

import json

import numpy as np
import pytest

from diffcam.data import shapes

N = 120


@pytest.fixture(scope="module")
def scenes():
    return [shapes.scene("test", i) for i in range(N)]


def test_deterministic_and_split_disjoint():
    a, b = shapes.scene("val", 7), shapes.scene("val", 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    c = shapes.scene("train", 7)
    assert not np.array_equal(a.image, c.image)
    with pytest.raises(ValueError, match="split"):
        shapes.scene("dev", 0)
    with pytest.raises(ValueError, match="index"):
        shapes.scene("test", -1)


def test_scene_structure(scenes):
    counts = set()
    seen_shapes, seen_colours = set(), set()
    n_distractor_scenes = 0
    for sc in scenes:
        assert sc.image.shape == (96, 96, 3) and sc.image.dtype == np.uint8
        n = sc.n_named
        counts.add(n)
        assert 1 <= n <= 4
        assert sc.masks.shape == (len(sc.shapes), 96, 96) and sc.masks.dtype == bool
        assert all(s in shapes.SHAPES for s in sc.shapes[:n])
        assert all(s == "distractor" for s in sc.shapes[n:])
        n_distractor_scenes += len(sc.shapes) > n
        seen_shapes.update(sc.shapes[:n])
        seen_colours.update(sc.colours[:n])
        xs = [c[0] for c in sc.centres[:n]]
        assert xs == sorted(xs), "named objects must be stored left to right"
        # visible masks are pixel-exact and disjoint
        assert (sc.masks.sum(0) <= 1).all()
        assert all(m.any() for m in sc.masks)
    assert counts == {1, 2, 3, 4}
    assert seen_shapes == set(shapes.SHAPES) and seen_colours == set(shapes.COLOURS)
    assert n_distractor_scenes > N // 4


def test_mask_pixels_have_the_object_colour(scenes):
    for sc in scenes[:40]:
        for k in sc.named:
            px = sc.image[sc.masks[k]].astype(float)
            ref = np.asarray(shapes.COLOURS[sc.colours[k]], float)
            assert np.abs(px.mean(0) - ref).max() < 25, (sc.index, k)
        # and the background (outside every mask) is not saturated: grey-ish
        bg = sc.image[~sc.masks.any(0)].astype(float)
        assert (bg.max(1) - bg.min(1)).mean() < 45


def test_partial_occlusion_happens_and_is_bounded(scenes):
    fractions = []
    for sc in scenes:
        for k in sc.named:
            full = shapes.shape_mask(sc.shapes[k], 96, *sc.centres[k], sc.radii[k], sc.angles[k])
            assert not (sc.masks[k] & ~full).any(), "visible pixels outside the shape"
            fractions.append(sc.masks[k].sum() / full.sum())
    fractions = np.array(fractions)
    assert fractions.min() >= 0.6
    assert (fractions < 0.98).sum() >= 5, "some objects should be partially occluded"


def test_backgrounds_are_textured(scenes):
    stds = [sc.image[~sc.masks.any(0)].std(0).mean() for sc in scenes[:30]]
    assert min(stds) > 2.0


def test_answers(scenes):
    for sc in scenes:
        d = shapes.question(sc, "describe")
        words = d.answer.split()
        assert d.answer == shapes.describe(sc)
        for w, k in d.grounding:
            assert words[w] in (sc.colours[k], sc.shapes[k])
        assert [words[w] for w, _ in d.grounding[1::2]] == sc.shapes[:sc.n_named]
        q = shapes.question(sc, "colour")
        if q.kind == "colour":
            shp = q.prompt.split()[-2]
            ks = [k for k in sc.named if sc.shapes[k] == shp]
            assert len(ks) == 1 and q.answer == sc.colours[ks[0]]
        p = shapes.question(sc, "presence")
        shp = p.prompt.split()[-2]
        assert p.answer == ("yes" if shp in sc.shapes[:sc.n_named] else "no")
        c = shapes.question(sc, "count")
        target = c.prompt.split()[3]
        n = sc.n_named if target == "shapes" else \
            sum(shapes.PLURALS[s] == target for s in sc.shapes[:sc.n_named])
        assert c.answer == shapes.NUMBERS[n]
        assert sorted(k for _, k in c.grounding) == sorted(
            k for k in sc.named if target == "shapes" or shapes.PLURALS[sc.shapes[k]] == target)


def test_question_mix_and_vocabulary():
    vocab = set(shapes.vocabulary())
    kinds = []
    for sc, qa in shapes.samples("train", 0, 200):
        kinds.append(qa.kind)
        assert set(qa.prompt.split()[1:]) <= vocab and set(qa.answer.split()) <= vocab
    assert set(kinds) == set(shapes.KINDS)
    # presence answers are balanced
    yes = [shapes.question(shapes.scene("val", i), "presence").answer for i in range(100)]
    assert 30 <= yes.count("yes") <= 70
    with pytest.raises(ValueError, match="kind"):
        shapes.question(shapes.scene("val", 0), "why")


def test_coco_export_round_trip(tmp_path):
    path = shapes.export_coco(str(tmp_path), split="val", n=4)
    inst = json.load(open(path))
    caps = json.load(open(tmp_path / "captions.json"))
    assert len(inst["images"]) == 4 and len(caps["annotations"]) == 4
    names = {c["id"]: c["name"] for c in inst["categories"]}
    for img in inst["images"]:
        sc = shapes.scene("val", img["id"])
        anns = [a for a in inst["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == len(sc.shapes)
        for k, a in enumerate(anns):
            m = shapes.rle_decode(a["segmentation"])
            assert np.array_equal(m, sc.masks[k])
            assert names[a["category_id"]] == sc.shapes[k]
            assert a["area"] == int(sc.masks[k].sum())
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(sc.masks[k])
            assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                    ys.max() - ys.min() + 1)
        cap = caps["annotations"][img["id"]]
        assert cap["caption"] == shapes.describe(sc)
        assert (tmp_path / "images" / img["file_name"]).stat().st_size > 0


def test_rle_edge_cases():
    for m in (np.zeros((3, 4), bool), np.ones((3, 4), bool), np.eye(4, dtype=bool)):
        r = shapes._rle(m)
        assert sum(r["counts"]) == m.size
        assert np.array_equal(shapes.rle_decode(r), m)


def test_object_scale_grows_the_objects_and_is_checked():
    import numpy as np
    from diffcam.data import shapes as S
    small = S.render_scene(np.random.default_rng(3), n_objects=1)
    big = S.render_scene(np.random.default_rng(3), n_objects=1, object_scale=2.0)
    assert big.radii[0] > 1.9 * small.radii[0] and big.masks[0].sum() > 3 * small.masks[0].sum()
    with pytest.raises(ValueError, match="object_scale"):
        S.render_scene(np.random.default_rng(3), object_scale=5.0)
