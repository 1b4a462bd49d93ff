"""The attribution pass on the tiny in-process models (through the generic adapter)."""

import numpy as np
import pytest
import torch

from diffcam.adapters.base import GenerationConfig
from diffcam.attribution import Explainer, Explanation

PROMPTS = {"anyres": "<image> describe the image", "merged": "<image> describe the image"}
GEN = GenerationConfig(steps=4, gen_length=4)


def _marker_argmax(ad, img, grid, cell, sign):
    lay = ad.prepare([img], "<image> describe the image").layouts[0]
    k = int(lay.grid(grid).positions(0)[cell])
    u = torch.randn(ad.model.config.hidden_size, generator=torch.Generator().manual_seed(5))

    def hook(i, f):
        f = f.clone()
        f[k] = f[k] + sign * 60.0 * u
        return f

    ad.vision.feature_hook = hook
    try:
        e = Explainer(ad, layer=0).explain(img, "<image> describe the image",
                                           answer="a red cat on the box", targets="all")
    finally:
        ad.vision.feature_hook = None
    m = e.map(None, grid=grid)
    return np.unravel_index(int(np.argmax(m)), m.shape), m


@pytest.mark.parametrize("model,grid,cell", [("anyres", "hires", (2, 5)),
                                             ("anyres", "hires", (4, 7)),
                                             ("anyres", "base", (1, 3)),
                                             ("qwen", "merged", (1, 2)),
                                             ("qwen", "merged", (2, 3))])
def test_marker_lands_in_its_cell(request, img, model, grid, cell):
    ad = request.getfixturevalue(model)
    # Grad-CAM keeps the sign of w . a: one of the two marker signs is the map's maximum
    hits = [_marker_argmax(ad, img, grid, cell, s)[0] for s in (1, -1)]
    assert tuple(cell) in [tuple(map(int, h)) for h in hits], hits


def test_anyres_newline_column_not_in_map(anyres, img):
    e = Explainer(anyres).explain(img, PROMPTS["anyres"], answer="a red cat", targets="all")
    lay = e.layouts[0]
    g = lay.grid("hires")
    assert g.row_stride == g.cols + 1
    assert e.maps[0]["hires"].shape[-2:] == (g.rows, g.cols)
    assert e.maps[0]["base"].shape[-2:] == lay.grid("base").shape


@pytest.mark.parametrize("fast", [False, "auto"])
@pytest.mark.parametrize("model", ["anyres", "qwen"])
def test_batched_backward_equals_loop(request, img, model, fast):
    # autograd's vmapped backward, and (on the CPU, the default) the hand-written one of
    # diffcam.attribution.fastvjp, against a loop of ordinary backwards
    ad = request.getfixturevalue(model)
    kw = dict(answer="a red cat on the box", targets="all", states=("final",))
    ex_b = Explainer(ad, batched_backward=True, fast_backward=fast)
    eb = ex_b.explain(img, "<image> describe the image", **kw)
    ex_l = Explainer(ad, batched_backward=False)
    el = ex_l.explain(img, "<image> describe the image", **kw)
    assert ex_b.last_backward == ("fast" if fast else "batched")
    assert ex_l.last_backward == "loop"
    for g in eb.maps[0]:
        np.testing.assert_allclose(eb.maps[0][g], el.maps[0][g], atol=1e-5)


@pytest.mark.parametrize("model", ["anyres", "qwen"])
@pytest.mark.parametrize("fast", [False, "auto"])
@pytest.mark.parametrize("chunk,batched", [(1, True), (2, True), (3, False), (100, True)])
def test_backward_chunks_give_the_same_maps(request, img, img2, model, chunk, batched, fast):
    # two images, answers of different lengths (rows with padding columns), every trajectory
    # state: the maps must not depend on how the backward vectors are split into passes
    ad = request.getfixturevalue(model)
    kw = dict(answer=["a red cat on the box", "the dog"], targets="all")
    full = Explainer(ad, fast_backward=False).explain([img, img2], "<image> describe the image",
                                                      **kw)
    ex = Explainer(ad, backward_chunk=chunk, batched_backward=batched, fast_backward=fast)
    part = ex.explain([img, img2], "<image> describe the image", **kw)
    assert part[0].settings["backward_chunk"] == chunk
    # 2 rows x up to 5 word vectors (the aggregate's gradient is their sum): passes of
    # `chunk`, a 1-vector pass loops (autograd) or runs the hand-written backward (fast)
    K = len(part[0].targets)
    sizes = [min(chunk, K - k0) for k0 in range(0, K, chunk)]
    fast_on = fast and batched
    expect = ["fast" if fast_on else "batched" if (batched and n > 1) else "loop"
              for n in sizes]
    assert ex.last_backward == "+".join(dict.fromkeys(expect))
    for ef, ep in zip(full, part):
        assert ef.maps[0].keys() == ep.maps[0].keys()
        for g in ef.maps[0]:
            assert ef.maps[0][g].shape == ep.maps[0][g].shape
            np.testing.assert_allclose(ep.maps[0][g], ef.maps[0][g], atol=1e-5)


def test_backward_chunk_is_checked(anyres):
    with pytest.raises(ValueError, match="backward_chunk must be >= 1"):
        Explainer(anyres, backward_chunk=0)
    with pytest.raises(TypeError, match="backward_chunk must be an int"):
        Explainer(anyres, backward_chunk=2.5)
    with pytest.raises(TypeError, match="backward_chunk must be an int"):
        Explainer(anyres, backward_chunk=True)


@pytest.mark.parametrize("model", ["anyres", "qwen"])
def test_batch_equals_one_by_one(request, img, img2, model):
    ad = request.getfixturevalue(model)
    ex = Explainer(ad)
    answers = ["a red cat", "the dog on the big box"]          # different lengths: padding
    batch = ex.explain([img, img2], "<image> describe the image", answer=answers, targets="all")
    assert isinstance(batch, list) and len(batch) == 2
    for im, ans, eb in zip([img, img2], answers, batch):
        e1 = ex.explain(im, "<image> describe the image", answer=ans, targets="all")
        assert e1.answer == eb.answer and [t.name for t in e1.targets] == \
            [t.name for t in eb.targets]
        for g in e1.maps[0]:
            np.testing.assert_allclose(eb.maps[0][g], e1.maps[0][g], atol=1e-4)


@pytest.mark.parametrize("model", ["anyres", "qwen"])
def test_trajectory_last_step_equals_final(request, img, model):
    ad = request.getfixturevalue(model)
    e = Explainer(ad).explain(img, "<image> describe the image", targets="all",
                              states=("final", 0, 2, GEN.steps), generation=GEN)
    assert e.states == ["final", 0, 2, GEN.steps]
    assert e.masked.shape == (GEN.steps + 1, GEN.gen_length) and not e.masked[-1].any()
    for g, arr in e.maps[0].items():
        assert arr.shape[:2] == (len(e.targets) + 1, 4)
        np.testing.assert_allclose(arr[:, 3], arr[:, 0], atol=1e-6)
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1


def test_generated_answer_and_words(anyres, img):
    e = Explainer(anyres).explain(img, "<image> describe the image", generation=GEN,
                                  targets="all")
    assert len(e.token_ids) == GEN.gen_length
    assert all(max(t.tokens) < len(e.token_ids) for t in e.targets)
    assert e.settings["generation"]["steps"] == GEN.steps
    assert e.versions["torch"] == torch.__version__ and "transformers" in e.versions


def test_multi_image_sample(anyres, img, img2):
    e = Explainer(anyres).explain([[img, img2]], "<image> and <image> describe", answer="a cat",
                                  targets="all")[0]
    assert len(e.maps) == 2 and len(e.layouts) == 2
    assert e.layouts[1].span_start >= e.layouts[0].span_end


def test_save_load_round_trip(anyres, img, tmp_path):
    e = Explainer(anyres).explain(img, "<image> describe the image",
                                  answer="a red cat on the box", targets="nouns")
    assert [t.name for t in e.targets] == ["red", "cat", "box"]
    d = tmp_path / "exp"
    e.save(d)
    with pytest.raises(FileExistsError):
        e.save(d)
    e.save(d, overwrite=True)
    f = Explanation.load(d)
    assert f.answer == e.answer and f.targets == e.targets and f.states == e.states
    assert f.layouts == e.layouts and f.words == e.words
    for g in e.maps[0]:
        np.testing.assert_array_equal(f.maps[0][g], e.maps[0][g])
    np.testing.assert_array_equal(f.images[0], img)
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert len(pngs) == len(e.targets) + 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left
    im = f.overlay("cat")
    assert im.size == (img.shape[1], img.shape[0]) and im.mode == "RGB"
    # refined at the image's resolution by default (grid maps upsampled first), or on the grid
    h, w = img.shape[:2]
    r = e.refined()
    assert r.maps[0]["hires"].shape == e.maps[0]["hires"].shape[:2] + (h, w)
    assert r.settings["refine_size"] == [[h, w]] and "refine" in r.settings
    assert e.map("cat", refined=True).shape == (h, w)
    g = e.refined(size="grid")
    assert g.maps[0]["hires"].shape == e.maps[0]["hires"].shape
    assert g.settings["refine_size"] == [None]
    np.testing.assert_array_equal(e.map("cat", refined=True, size="grid"), g.map("cat"))
    assert e.refined(size=(20, 30)).map("cat").shape == (20, 30)
    with pytest.raises(ValueError, match="size"):
        e.refined(size="pixels")
    bare = e.__class__(**{**e.__dict__, "images": []})
    assert bare.refined().settings["refine_size"] == [None]      # "auto": no pixels, the grid
    with pytest.raises(ValueError, match="size='image'"):
        bare.refined(size="image")


def test_refined_uses_repeated_function_word_maps(anyres, img):
    """SICD's M_rep (method.md 2.4): with targets="all" the maps of the repeated "the" are the
    interference; refined() equals diffcam.refine called by hand with them, map() agrees, the
    reference preset and interference=None use the uniform constant, and nouns-only
    explanations have no interference maps."""
    import diffcam
    from diffcam.refine import RefineConfig

    ans = "the red cat on the box"
    # interference=None: no maps of its own, so refined() picks the repeated words' targets
    e = Explainer(anyres).explain(img, "<image> describe the image", answer=ans, targets="all",
                                  interference=None)
    assert e.interference == [] and e.interference_maps == []
    words = [w.text for w in e.words]
    assert words.count("the") == 2
    rep = e.interference_targets()
    assert [e.targets[k].name.strip() for k in rep] == ["the", "the"]
    cfg = RefineConfig.paper().replace(gate=False)          # SICD on every map
    r = e.refined(cfg, size="grid")
    assert r.settings["refine_interference"] == rep
    raw = e.maps[0]["hires"][:, 0]
    want = diffcam.refine(raw, config=cfg, tokens=list(e.token_ids),
                          interference=[raw[rep]] * len(raw))
    np.testing.assert_array_equal(r.maps[0]["hires"][:, 0], want)
    np.testing.assert_array_equal(e.map("cat", refined=True, config=cfg, size="grid"),
                                  r.map("cat"))
    uniform = diffcam.refine(raw, config=cfg, tokens=list(e.token_ids))
    np.testing.assert_array_equal(
        e.refined(cfg, interference=None, size="grid").maps[0]["hires"][:, 0], uniform)
    # at the image's resolution: maps and interference maps upsampled, then refined
    up = diffcam.resize(raw, img.shape[:2])
    want_up = diffcam.refine(up, config=cfg, tokens=list(e.token_ids),
                             interference=[up[rep]] * len(up))
    np.testing.assert_array_equal(e.refined(cfg).maps[0]["hires"][:, 0], want_up)
    np.testing.assert_array_equal(e.map("cat", refined=True, config=cfg),
                                  e.refined(cfg).map("cat"))
    assert not np.array_equal(want, uniform)                # the maps change SICD's result
    assert e.refined("reference").settings["refine_interference"] == []
    # by hand: one of the two "the" maps
    one = e.refined(cfg, interference=[rep[0]], size="grid")
    np.testing.assert_array_equal(
        one.maps[0]["hires"][:, 0],
        diffcam.refine(raw, config=cfg, tokens=list(e.token_ids),
                       interference=[raw[rep[:1]]] * len(raw)))
    with pytest.raises(ValueError, match="aggregate"):
        e.refined(cfg, interference=[None])
    with pytest.raises(ValueError, match="interference"):
        e.refined(cfg, interference="maybe")
    nouns = Explainer(anyres).explain(img, "<image> describe the image", answer=ans)
    assert nouns.interference_targets() == []


def test_aggregate_only_equals_aggregate(anyres, img, tmp_path):
    kw = dict(answer="a red cat on the box", targets="all")
    ex = Explainer(anyres)
    full = ex.explain(img, "<image> describe the image", **kw)
    agg = ex.explain(img, "<image> describe the image", aggregate_only=True, **kw)
    assert agg.maps[0]["hires"].shape[0] == 1 and agg.target_names == ["<aggregate>"]
    np.testing.assert_allclose(agg.map(None), full.map(None), atol=1e-5)
    with pytest.raises(KeyError, match="aggregate_only"):
        agg.map("cat")
    assert Explanation.load(agg.save(tmp_path / "a")).aggregate_only


@pytest.mark.parametrize("model", ["anyres", "qwen"])
def test_head_rows_only_equals_full_logits(request, img, model):
    ad = request.getfixturevalue(model)
    kw = dict(answer="a red cat on the box", targets="all", score="logprob")
    ex = Explainer(ad)
    a = ex.explain(img, "<image> describe the image", **kw)
    assert ex._head_module() is not None and getattr(ex, "_head_ok", True)
    b = Explainer(ad, head_rows_only=False).explain(img, "<image> describe the image", **kw)
    for g in a.maps[0]:
        np.testing.assert_allclose(a.maps[0][g], b.maps[0][g], atol=1e-5)


def test_head_mismatch_falls_back(img):
    from fakes import FakeAdapter

    class Scaled(FakeAdapter):          # the logits are not head(hidden) row-wise
        lm_head = property(lambda self: self.model.head)

        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            return 2.0 * super().forward(inputs_embeds, attention_mask, extras)

    ad = Scaled()
    ex = Explainer(ad)
    a = ex.explain(img, "p", targets="all")
    assert ex._head_ok is False
    b = Explainer(ad, head_rows_only=False).explain(img, "p", targets="all")
    np.testing.assert_allclose(a.maps[0]["base"], b.maps[0]["base"], atol=1e-5)


def test_unbatchable_extras_run_per_row(img, img2):
    """Extras the engine cannot collate (e.g. mRoPE ids) -> one forward per row, same maps."""
    from fakes import FakeAdapter

    class WithExtras(FakeAdapter):
        def extend_extras(self, sample, total_length):
            return {"positions": torch.arange(total_length)[None]}

        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            assert extras["positions"].shape[-1] == inputs_embeds.shape[1]
            return super().forward(inputs_embeds, attention_mask, None)

    ad = WithExtras()
    ex = Explainer(ad)
    batch = ex.explain([img, img2], "p", targets="all", states=("final", 1))
    for im, eb in zip([img, img2], batch):
        e1 = ex.explain(im, "p", targets="all", states=("final", 1))
        np.testing.assert_allclose(eb.maps[0]["base"], e1.maps[0]["base"], atol=1e-5)
