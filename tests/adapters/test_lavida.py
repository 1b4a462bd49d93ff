"""The LaViDa adapter (LLaDA and Dream backbones, LaViDa-O) on its structural twins
(diffcam.testing.twins.lavida): pooled grids, the logit shift, the prefix-cache sampler and its
feasibility rule, activation checkpointing, padding -- each against a hand computation.
"""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5.5")   # bidirectional Llama/Qwen2 via is_causal

import diffcam                                                         # noqa: E402
from diffcam.adapters import lavida                                    # noqa: E402
from diffcam.adapters._llava_family import IMAGE_TOKEN_INDEX           # noqa: E402
from diffcam.adapters.base import GenerationConfig                     # noqa: E402
from diffcam.attribution import Explainer                              # noqa: E402
from diffcam.testing.twins.lavida import build_lavida_twin             # noqa: E402
from diffcam.testing.twins.llada_v import expected_commits, hand_gradcam   # noqa: E402

PROMPT = "<image> describe the image"
ANSWER = "a red cat on the box"
# 40x40: pinpoint 56x56 -> 2x2 crops (row-major: crop 1 top-left ... crop 4 bottom-right) of
# 7x7 patches, each pooled bilinearly to ceil(7 / 2) = 4 -> an 8x8 high-resolution grid (no
# unpadding: the image is square), base 4x4.  LaViDa-O: 7x7 base, 14x14 grid.
IMG = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
IMG2 = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def twins():
    return {"llada": build_lavida_twin("llada", seed=0),
            "dream": build_lavida_twin("dream", seed=0)}


@pytest.fixture(scope="module")
def adapters(twins):
    return {k: diffcam.load("lavida", t.model, **t.load_kwargs()) for k, t in twins.items()}


def _pooled_cell(p, side=7, out=4):
    """The pooled cells a patch reaches under bilinear resizing side -> out (align_corners=False):
    output i samples input coordinate (i + 0.5) * side / out - 0.5."""
    return [i for i in range(out) if abs((i + 0.5) * side / out - 0.5 - p) < 1]


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_structure(twins, adapters, backbone):
    tw, ad = twins[backbone], adapters[backbone]
    inner = tw.model.model
    if backbone == "llada":
        assert ad.blocks() is inner.transformer.blocks and ad.head_module() is inner.transformer.ff_out
        assert (ad.mask_token_id, ad.logit_shift, ad.name) == (126336, 0, "lavida-llada")
    else:
        assert ad.blocks() is inner.layers and ad.head_module() is tw.model.lm_head
        assert (ad.mask_token_id, ad.logit_shift, ad.name) == (151666, 1, "lavida-dream")
    seen = []
    h = ad.blocks()[1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        ad.forward(ad.embed_tokens([1000, 1001, 1002])[None])
    finally:
        h.remove()
    assert isinstance(seen[0], tuple) and len(seen[0]) == (2 if backbone == "llada" else 1)
    assert ad.default_layer == 1 and ad.info()["sampler"] == "prefix"


def test_activation_checkpointing_is_switched_off():
    tw = build_lavida_twin("llada", seed=2)
    inner = tw.model.model
    assert inner.activation_checkpointing_strategy == "whole_layer"       # as LaViDa builds it
    ad = diffcam.load("lavida", tw.model, **tw.load_kwargs())
    assert inner.activation_checkpointing_strategy is None
    calls = [0] * len(ad.blocks())
    hs = [b.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
          for k, b in enumerate(ad.blocks())]
    try:
        with Explainer(ad, layer=1) as ex:
            a = ex.explain(IMG, PROMPT, answer=ANSWER, targets="all")
        assert calls == [1, 1, 1, 1]                       # one forward, nothing re-run
        # control: left on, checkpointing re-runs blocks in autograd's backward and the pass
        # breaks (autograd's backward: the CPU's hand-written one would first try its own)
        inner.set_activation_checkpointing("whole_layer")
        calls[:] = [0] * len(calls)
        from torch.utils.checkpoint import CheckpointError
        with Explainer(ad, layer=1, fast_backward=False) as ex, pytest.raises(CheckpointError):
            ex.explain(IMG, PROMPT, answer=ANSWER, targets="all")
        assert calls[0] == 1 and max(calls) > 1
    finally:
        for h in hs:
            h.remove()
        inner.set_activation_checkpointing(None)
    assert np.isfinite(a.maps[0]["hires"]).all()


# ----------------------------------------------------------------------------- packing
def test_pooled_layout(twins, adapters):
    tw, ad = twins["llada"], adapters["llada"]
    tw.model.model.packing_log.clear()
    s = ad.prepare([IMG], PROMPT)
    lay = s.layouts[0]
    assert tw.model.model.packing_log[-1][1] == {"base": (4, 4), "hires": (8, 8)}
    pre = tw.template(PROMPT).split("<image>")[0]
    assert lay.span_start == len(tw.tokenizer.encode(pre))
    assert lay.span_length == 16 + 8 * 9
    assert [(g.name, g.offset, g.rows, g.cols, g.row_stride) for g in lay.grids] == \
        [("base", 0, 4, 4, 4), ("hires", 16, 8, 8, 9)]


def _crop_marker_argmax(tw, ad, grid, crop, patch, sign):
    u = torch.randn(tw.model.config.hidden_size, generator=torch.Generator().manual_seed(7))

    def hook(i, f):                      # (n_crops, 7, 7, D), before pooling
        f = f.clone()
        f[(crop,) + patch] = f[(crop,) + patch] + sign * 60.0 * u
        return f

    tw.model.model.crop_hook = hook
    try:
        with Explainer(ad, layer=0) as ex:
            e = ex.explain(IMG, PROMPT, answer=ANSWER, targets="all")
    finally:
        tw.model.model.crop_hook = None
    m = e.map(None, grid=grid)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


@pytest.mark.parametrize("grid,crop,patch", [("base", 0, (2, 6)), ("base", 0, (6, 0)),
                                             ("hires", 4, (2, 6)), ("hires", 2, (5, 1))])
def test_marker_before_pooling_lands_in_pooled_cell(twins, adapters, grid, crop, patch):
    tw, ad = twins["llada"], adapters["llada"]
    (pr,), (pc,) = _pooled_cell(patch[0]), _pooled_cell(patch[1])
    if grid == "base":
        want = (pr, pc)
    else:                                 # crop k >= 1 covers rows/cols ((k-1)//2, (k-1)%2) * 4
        want = (((crop - 1) // 2) * 4 + pr, ((crop - 1) % 2) * 4 + pc)
    hits = [_crop_marker_argmax(tw, ad, grid, crop, patch, s) for s in (1.0, -1.0)]
    assert want in hits, (want, hits)


def test_lavida_o_unpooled_grid():
    tw = build_lavida_twin("llada", variant="lavida-o", seed=0)
    ad = diffcam.load("lavida", tw.model, **tw.load_kwargs())
    lay = ad.prepare([IMG], PROMPT).layouts[0]
    assert [(g.name, g.rows, g.cols, g.row_stride) for g in lay.grids] == \
        [("base", 7, 7, 7), ("hires", 14, 14, 15)]
    # bottom-right crop, patch (2, 6): unpooled -> cell (7 + 2, 7 + 6), the last column
    hits = [_crop_marker_argmax(tw, ad, "hires", 4, (2, 6), s) for s in (1.0, -1.0)]
    assert (9, 13) in hits, hits


# ----------------------------------------------------------------------------- Grad-CAM by hand
def _hand(tw, backbone, layer, targets, shift):
    from PIL import Image
    tok, inner = tw.tokenizer, tw.model.model
    pre, post = tw.template(PROMPT).split("<image>")
    ids = tok.encode(pre) + [IMAGE_TOKEN_INDEX] + tok.encode(post)
    pix = tw.process_images([Image.fromarray(IMG)], tw.image_processor, tw.model.config)
    inner.packing_log.clear()
    with torch.no_grad():
        emb = tw.model.prepare_inputs_labels_for_multimodal(
            torch.tensor([ids]), None, None, None, None, list(pix), image_sizes=[(40, 40)])[4]
    (b, _), (h, w) = inner.packing_log[-1][1]["base"], inner.packing_log[-1][1]["hires"]
    y = tok.encode(ANSWER)
    full = torch.cat([emb, tw.model.get_input_embeddings()(torch.tensor(y))[None]], 1)
    P, s0 = emb.shape[1], len(tok.encode(pre))
    positions = {"base": s0 + np.arange(b * b).reshape(b, b),
                 "hires": s0 + b * b + np.arange(h)[:, None] * (w + 1) + np.arange(w)[None]}
    if backbone == "llada":
        block = inner.transformer.blocks[layer]
        run = lambda x: inner(None, input_embeddings=x).logits             # noqa: E731
    else:
        block = inner.layers[layer]
        run = lambda x: tw.model.lm_head(inner(inputs_embeds=x).last_hidden_state)  # noqa: E731
    if shift is None:                     # targets of (token, shift) pairs
        pairs = [[(P + j - sh, y[j]) for j, sh in t] for t in targets]
    else:
        pairs = [[(P + j - shift, y[j]) for j in t] for t in targets]
    return hand_gradcam(block, run, full, positions, pairs)


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_raw_map_equals_hand_gradcam(twins, adapters, backbone):
    tw, ad = twins[backbone], adapters[backbone]
    targets = [[1], [2, 4]]
    with Explainer(ad, layer=2) as ex:
        e = ex.explain(IMG, PROMPT, answer=ANSWER, targets=targets)
    if backbone == "llada":
        want = _hand(tw, backbone, 2, targets, 0)
        for name in ("base", "hires"):
            np.testing.assert_allclose(e.maps[0][name][:, 0], want[name], atol=2e-5)
        return
    # Dream: token j is scored on row P + j - 1; the same targets read at rows P + j (the
    # unshifted reading) give different maps -- the shift is what makes them equal
    both = _hand(tw, backbone, 2, [[(j, 1) for j in t] for t in targets] +
                 [[(j, 0) for j in t] for t in targets], None)
    for name in ("base", "hires"):
        np.testing.assert_allclose(e.maps[0][name][:2, 0], both[name][:2], atol=2e-5)
    assert np.abs(both["hires"][2:4] - both["hires"][:2]).max() > 0.05


# ----------------------------------------------------------------------------- prefix sampler
@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_prefix_cache_trajectory_matches_the_rule(twins, adapters, backbone):
    tw, ad = twins[backbone], adapters[backbone]
    inner = tw.model.model
    G, S = 8, 4
    cfg = GenerationConfig(steps=S, gen_length=G, block_length=4)
    s = ad.prepare([IMG], PROMPT)
    P = s.prompt_length
    res = ad.generate(s, cfg)
    y, masked = res.response_ids, res.masked
    assert res.hidden_has_image.tolist() == [True] + [False] * S
    assert masked[0].all() and not masked[-1].any() and (masked[1:] <= masked[:-1]).all()
    assert ad.mask_token_id not in y.tolist()
    # by hand, without any cache: one full forward in which the prompt does not see the response
    allowed = torch.ones(P + G, P + G, dtype=torch.bool)
    allowed[:P, P:] = False
    emb = tw.model.get_input_embeddings()

    def rows(state):
        x = torch.cat([s.inputs_embeds, emb(state)])[None]
        with torch.no_grad():
            if backbone == "llada":
                return inner(None, input_embeddings=x, attention_bias=allowed[None, None]).logits[
                    0, P:P + G]
            h = inner(inputs_embeds=x, attention_mask=allowed[None, None]).last_hidden_state
            return tw.model.lm_head(h)[0, P - 1:P + G - 1]          # logit shift 1

    want = expected_commits(rows, y, masked, G, S, 4, ad.mask_token_id)
    for step, (chosen, toks) in enumerate(want):
        got = sorted((masked[step] & ~masked[step + 1]).nonzero().flatten().tolist())
        assert got == chosen, step
        assert y[got].tolist() == toks, step


def test_prefix_cache_states_feasibility(twins, adapters):
    tw, ad = twins["dream"], adapters["dream"]
    cfg = GenerationConfig(steps=4, gen_length=4)
    with Explainer(ad) as ex:
        with pytest.raises(ValueError, match=r"step=2 is not feasible.*prefix KV cache"):
            ex.explain(IMG, PROMPT, states=("final", 2), generation=cfg, targets="all")
        e = ex.explain(IMG, PROMPT, states=("final", 0), generation=cfg, targets="all")
    assert e.maps[0]["hires"].shape[1] == 2
    full = diffcam.load("lavida", tw.model, sampler="full", **tw.load_kwargs())
    assert full.generate(full.prepare([IMG], PROMPT), cfg).hidden_has_image is None
    with Explainer(full) as ex:
        e = ex.explain(IMG, PROMPT, states=(2,), generation=cfg, targets="all")
    assert np.isfinite(e.maps[0]["hires"]).all()


def test_training_forward_is_never_called(twins, adapters):
    tw, ad = twins["llada"], adapters["llada"]

    def refuse(module, args, kwargs):
        raise AssertionError("the training forward was called")

    h = tw.model.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        with Explainer(ad) as ex:
            ex.explain(IMG, PROMPT, generation=GenerationConfig(steps=2, gen_length=4),
                       targets="all")
    finally:
        h.remove()
    x = ad.prepare([IMG], PROMPT).inputs_embeds[None]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        assert tw.model(inputs_embeds=x).shape[0] == 2           # the trap: a doubled batch


# ----------------------------------------------------------------------------- padding
def test_padding_through_attention_bias(twins):
    tw = build_lavida_twin("llada", seed=3, attention_mode="causal_with_padding")
    ad = diffcam.load("lavida", tw.model, **tw.load_kwargs())
    assert "causal" in ad.probe_result["mask"] and ad.padding_mode == "bias"
    with Explainer(ad, layer=1) as ex:
        both = ex.explain([IMG, IMG2], PROMPT, answer=ANSWER, targets="all")
        one = [ex.explain(im, PROMPT, answer=ANSWER, targets="all") for im in (IMG, IMG2)]
    assert both[0].layouts[0].span_length != both[1].layouts[0].span_length
    for b, o in zip(both, one):
        for g in ("base", "hires"):
            np.testing.assert_allclose(b.maps[0][g], o.maps[0][g], atol=1e-5)
    # neither way works: padded batches are refused, with the reason
    tw2 = build_lavida_twin("llada", seed=3, attention_mode="causal_with_padding",
                            bias_mode="ignored")
    with pytest.warns(UserWarning, match="padded batches are refused"):
        ad2 = diffcam.load("lavida", tw2.model, **tw2.load_kwargs())
    assert ad2.padding_mode is None and "ignored" in ad2.probe_result["bias"]
    with Explainer(ad2, layer=1) as ex, pytest.raises(ValueError, match="one sample per call"):
        ex.explain([IMG, IMG2], PROMPT, answer=ANSWER, targets="all")


# ----------------------------------------------------------------------------- loading
def test_load_errors(twins, monkeypatch):
    with pytest.raises(ValueError, match="backbone='llada' but the model has the 'dream'"):
        diffcam.load("lavida", twins["dream"].model, backbone="llada",
                     **twins["dream"].load_kwargs())
    with pytest.raises(TypeError, match="not a LaViDa model"):
        diffcam.load("lavida", torch.nn.Linear(2, 2), tokenizer=twins["llada"].tokenizer,
                     image_processor=twins["llada"].image_processor)
    from diffcam.testing.twins.llada_v import build_llada_v_twin
    lv = build_llada_v_twin(seed=0)                # same attribute names as the Dream backbone
    with pytest.raises(TypeError, match=r"this is LLaDA-V.*load\('llada-v'"):
        diffcam.load("lavida", lv.model, **lv.load_kwargs())
    with pytest.raises(TypeError, match=r"Dream backbone; use diffcam.load\('lavida'"):
        diffcam.load("llada-v", twins["dream"].model, **twins["dream"].load_kwargs())
    with pytest.raises(ValueError, match="sampler='cached'"):
        diffcam.load("lavida", twins["llada"].model, sampler="cached",
                     **twins["llada"].load_kwargs())
    monkeypatch.setitem(sys.modules, "llava", None)           # the family's package is missing
    monkeypatch.setenv("NOT_ALWASY_DO_2DPOOL", "unset-by-test")
    with pytest.raises(ImportError, match="github.com/jacklishufan/LaViDa"):
        diffcam.load("lavida", "jacklishufan/LaViDa-O-v1.0", check_versions=False)
    import os
    assert os.environ["NOT_ALWASY_DO_2DPOOL"] == "1"          # LaViDa-O: pooling off
    with pytest.raises(ImportError):
        diffcam.load("lavida", "jacklishufan/lavida-llada-v1.0-instruct", check_versions=False)
    assert "NOT_ALWASY_DO_2DPOOL" not in os.environ            # LaViDa: pooling on
    assert lavida.CHECKPOINTS["dream"] == ("jacklishufan/lavida-dream-v1.0-instruct",)


@pytest.mark.parametrize("backbone", ["llada", "dream"])
def test_twin_blocks_take_the_cache_under_the_current_keyword(adapters, backbone):
    """The twins' blocks are transformers' Llama / Qwen2 decoder layers; they get the KV cache
    of the prefix-cache sampler under the keyword the installed release takes (``cache``
    since transformers renamed it; ``past_key_values`` is deprecated there and goes in 5.40),
    so a cached generation raises no deprecation warning about it."""
    import warnings

    ad = adapters[backbone]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = ad.generate(ad.prepare([IMG], PROMPT), GenerationConfig(steps=2, gen_length=4))
    assert res.hidden_has_image.tolist() == [True, False, False]    # the cache was used
    msgs = [str(w.message) for w in seen if "past_key_values" in str(w.message)]
    assert msgs == [], msgs
