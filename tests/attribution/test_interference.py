"""SICD's interference maps computed by the Explainer (``explain(interference="auto")``):
the per-token maps of the answer's repeated function words and of its padding, kept apart from
the targets and out of the aggregate (method.md 2.4, docs/attribution.md)."""

import numpy as np
import pytest

import diffcam
from diffcam.attribution import Explainer, Explanation
from diffcam.attribution.targets import Word, interference_tokens
from diffcam.refine import RefineConfig

PROMPT = "<image> describe the image"
ANS = "the red cat on the box <eos> <eos> <eos> <eos>"     # positions 6..9 are padding
CFG = RefineConfig.paper().replace(gate=False)             # SICD on every map


def test_interference_tokens_rule():
    ws = [Word("a", (0,)), Word("cat", (1,)), Word(",", (2,)), Word("a", (3,)),
          Word("dog", (4,)), Word(",", (5,))]
    ids = [7, 8, 9, 7, 10, 9] + [2] * 10 + [3]          # 10 x <eos>, then the mask token
    special = [False] * 6 + [True] * 11
    got = interference_tokens(ws, ids, special, mask_id=3, max_padding=4)
    assert [t.tokens for t in got] == [(0,), (2,), (3,), (5,), (6,), (9,), (12,), (15,)]
    # evenly spaced over the 10 padding positions, both ends included; the mask never counts
    assert [t.tokens for t in interference_tokens(ws, ids, special, mask_id=3,
                                                  max_padding=100)][4:] == \
        [(j,) for j in range(6, 16)]
    assert [t.tokens for t in interference_tokens(ws, ids, special, mask_id=3,
                                                  max_padding=1)][4:] == [(6,)]
    assert len(interference_tokens(ws, ids, special, mask_id=3, max_padding=0)) == 4
    # one padding token is not repeated: no padding map
    assert interference_tokens(ws[:2], [7, 8, 2], [False, False, True]) == []
    with pytest.raises(ValueError, match="max_padding"):
        interference_tokens(ws, ids, special, max_padding=-1)


@pytest.mark.parametrize("model", ["anyres", "qwen"])
@pytest.mark.parametrize("fast", [False, "auto"])
def test_interference_maps_are_per_token_maps_outside_the_aggregate(request, img, model, fast):
    ad = request.getfixturevalue(model)
    ex = Explainer(ad, fast_backward=fast, max_padding_maps=3)
    e = ex.explain(img, PROMPT, answer=ANS)                 # targets: the nouns
    assert [t.name for t in e.targets] == ["red", "cat", "box"]
    assert [t.tokens for t in e.interference] == [(0,), (4,), (6,), (8,), (9,)]
    assert e.settings["interference"] == "auto"
    plain = ex.explain(img, PROMPT, answer=ANS, interference=None)
    assert plain.interference == [] and plain.interference_maps == []
    # the same per-token maps of the same tokens, explained as targets
    by_hand = ex.explain(img, PROMPT, answer=ANS, targets=[0, 4, 6, 8, 9], interference=None)
    for g in e.maps[0]:
        # targets and aggregate unchanged by the extra backward vectors
        np.testing.assert_allclose(e.maps[0][g], plain.maps[0][g], atol=1e-5)
        assert e.maps[0][g].shape[0] == 4
        np.testing.assert_allclose(e.interference_maps[0][g], by_hand.maps[0][g][:5],
                                   atol=1e-5)
        # the padding maps are not the aggregate's business: it differs from by_hand's
        assert not np.allclose(e.maps[0][g][-1], by_hand.maps[0][g][-1], atol=1e-3)


def test_targets_that_are_interference_tokens_are_reused(anyres, img):
    e = Explainer(anyres).explain(img, PROMPT, answer=ANS, targets="all")
    assert [t.name for t in e.targets] == ["the", "red", "cat", "on", "the", "box"]
    assert [t.tokens for t in e.interference][:2] == [(0,), (4,)]
    for g in e.maps[0]:
        np.testing.assert_array_equal(e.interference_maps[0][g][:2], e.maps[0][g][[0, 4]])


@pytest.mark.parametrize("model", ["anyres", "qwen"])
@pytest.mark.parametrize("chunk", [1, 2, None])
def test_batch_and_chunks_equal_one_by_one(request, img, img2, model, chunk):
    # answers with different numbers of targets and of padding maps (rows padded to the
    # largest), backward vectors split into passes that straddle the real/extra boundary
    ad = request.getfixturevalue(model)
    answers = [ANS, "a dog and a cat <eos> <eos>"]
    ex = Explainer(ad, backward_chunk=chunk, fast_backward=False)
    batch = ex.explain([img, img2], PROMPT, answer=answers)
    ref = Explainer(ad, fast_backward=False)
    for im, ans, eb in zip([img, img2], answers, batch):
        e1 = ref.explain(im, PROMPT, answer=ans)
        assert [t.tokens for t in eb.interference] == [t.tokens for t in e1.interference]
        for g in e1.maps[0]:
            np.testing.assert_allclose(eb.maps[0][g], e1.maps[0][g], atol=1e-4)
            np.testing.assert_allclose(eb.interference_maps[0][g],
                                       e1.interference_maps[0][g], atol=1e-4)


def test_refined_uses_the_interference_maps(anyres, img, tmp_path):
    e = Explainer(anyres).explain(img, PROMPT, answer=ANS)
    r = e.refined(CFG)
    names = [t.name for t in e.interference]
    assert r.settings["refine_interference_maps"] == names
    assert r.settings["refine_interference"] == []
    raw = e.maps[0]["hires"][:, 0]
    stack = e.interference_maps[0]["hires"][:, 0]
    up, sup = diffcam.resize(raw, img.shape[:2]), diffcam.resize(stack, img.shape[:2])
    want = diffcam.refine(up, config=CFG, tokens=list(e.token_ids),
                          interference=[sup] * len(up))
    np.testing.assert_array_equal(r.maps[0]["hires"][:, 0], want)
    np.testing.assert_array_equal(e.map("cat", refined=True, config=CFG), r.map("cat"))
    uniform = diffcam.refine(up, config=CFG, tokens=list(e.token_ids))
    assert not np.array_equal(want, uniform)
    # interference=None and the reference preset do not use them
    np.testing.assert_array_equal(
        e.refined(CFG, interference=None).maps[0]["hires"][:, 0], uniform)
    assert e.refined("reference").settings["refine_interference_maps"] == []
    # saved and loaded with the explanation
    back = Explanation.load(e.save(tmp_path / "e"))
    assert [(t.name, t.tokens) for t in back.interference] == \
        [(t.name, t.tokens) for t in e.interference]
    for g in e.interference_maps[0]:
        np.testing.assert_array_equal(back.interference_maps[0][g], e.interference_maps[0][g])
    np.testing.assert_array_equal(back.refined(CFG).maps[0]["hires"], r.maps[0]["hires"])


def test_no_interference_maps_where_they_do_not_apply(anyres, img):
    ex = Explainer(anyres)
    assert ex.explain(img, PROMPT, answer=ANS, aggregate_only=True).interference_maps == []
    assert ex.explain(img, PROMPT, answer=ANS, method="grad-cam").interference_maps == []
    assert Explainer(anyres, max_padding_maps=0).explain(
        img, PROMPT, answer="the red cat <eos> <eos>").interference_maps == []
    with pytest.raises(ValueError, match="interference="):
        ex.explain(img, PROMPT, answer=ANS, interference="all")
    with pytest.raises(ValueError, match="max_padding_maps"):
        Explainer(anyres, max_padding_maps=-1)
    with pytest.raises(ValueError, match="max_padding_maps"):
        Explainer(anyres, max_padding_maps=True)


def test_refined_takes_each_states_interference_maps():
    """Several states: the maps of state s are refined with the interference maps of state s."""
    from diffcam.attribution.layout import single_grid_layout
    from diffcam.attribution.targets import Target

    rng = np.random.default_rng(3)
    maps = rng.random((3, 2, 8, 8)).astype(np.float32)             # 2 targets + aggregate
    inter = rng.random((4, 2, 8, 8)).astype(np.float32) ** 4        # 4 maps, 2 states
    ids = [5, 6, 7, 2, 2, 2, 2]
    e = Explanation("a b c", ids, ["a", "b", "c"] + ["<eos>"] * 4, [],
                    [Target("a", (0,)), Target("b", (1,))], ["final", 0], [{"base": maps}],
                    [single_grid_layout(1, 8, 8)],
                    interference=[Target("<eos>", (j,)) for j in range(3, 7)],
                    interference_maps=[{"base": inter}])
    r = e.refined(CFG)
    for s in range(2):
        want = diffcam.refine(maps[:, s], config=CFG, tokens=ids,
                              interference=[inter[:, s]] * 3)
        np.testing.assert_array_equal(r.maps[0]["base"][:, s], want)
        np.testing.assert_array_equal(e.map("b", state=["final", 0][s], refined=True,
                                            config=CFG), want[1])
    # another state's interference gives another map: the states are not mixed up
    other = diffcam.refine(maps[:, 0], config=CFG, tokens=ids, interference=[inter[:, 1]] * 3)
    assert not np.array_equal(r.maps[0]["base"][:, 0], other)
