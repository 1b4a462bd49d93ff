"""The LLaDA-V adapter on its structural twin (diffcam.testing.twins.llada_v).

Everything the adapter must get right is compared with something computed here by hand: the
image spans from the tokenizer and the twin's own packing record, markers planted in the twin's
grids (before the newline column exists), Grad-CAM with plain autograd, the sampler's commits
re-derived step by step.
"""

import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5.5")   # bidirectional Llama via is_causal=False

import diffcam                                                         # noqa: E402
from diffcam.adapters import llada_v                                   # noqa: E402
from diffcam.adapters._llava_family import IMAGE_TOKEN_INDEX, check_transformers   # noqa: E402
from diffcam.adapters.base import GenerationConfig                     # noqa: E402
from diffcam.attribution import Explainer                              # noqa: E402
from diffcam.testing.twins.llada_v import (build_llada_v_twin, expected_commits,  # noqa: E402
                                           hand_gradcam, llada_chat)

PROMPT = "<image> describe the image"
ANSWER = "a red cat on the box"


def _img(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# 40x40: pinpoint 56x56 = 2x2 crops of 7x7 patches -> 14x14; nothing to unpad; 196 tokens exceed
# 1.1 * anyres_max_2 * 49, so it shrinks by sqrt(196 / 98): int(14 // 1.414) = 9 -> 9x9.
SQUARE = _img(40, 40, 0)
# 24x40 (H x W): pinpoint 56x28 = 1x2 crops -> 7x14; unpad: int(40 * 7 / 24) = 11 columns of
# image, (14 - 11) // 2 = 1 column of padding cut on each side -> 7x12; 84 tokens: no shrink.
WIDE = _img(24, 40, 1)
GRIDS = {"square": (9, 9), "wide": (7, 12)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def twin():
    return build_llada_v_twin(seed=0)


@pytest.fixture(scope="module")
def adapter(twin):
    return diffcam.load("llada-v", twin.model, **twin.load_kwargs())


def _span_start(tok, prompt):
    return len(tok.encode(llada_chat(prompt).split("<image>")[0]))


# ----------------------------------------------------------------------------- structure
def test_structure_and_block_return_type(twin, adapter):
    assert isinstance(adapter, llada_v.LLaDAVAdapter)
    assert adapter.blocks() is twin.model.model.layers
    assert adapter.default_layer == 1                        # round(4 * 10 / 32)
    assert (adapter.mask_token_id, adapter.logit_shift) == (126336, 0)
    assert adapter.head_module() is twin.model.lm_head
    assert adapter.probe_result == {"bidirectional": True, "padding_mode": "mask", "mask": "ok"}
    seen = []
    h = adapter.blocks()[2].register_forward_hook(lambda m, i, o: seen.append(type(o)))
    try:
        adapter.forward(adapter.embed_tokens([1000, 1001, 1002])[None])
    finally:
        h.remove()
    assert seen == [tuple]                                   # LLaDA-V layers return tuples
    info = adapter.info()
    assert info["family"] == "llada-v" and info["blocks"] == "model.model.layers"


# ----------------------------------------------------------------------------- packing
def test_layout_read_from_the_splice(twin, adapter):
    tok, inner = twin.tokenizer, twin.model.model
    prompt = "<image> and <image> describe the image"
    inner.packing_log.clear()
    s = adapter.prepare([SQUARE, WIDE], prompt)
    logged = [info for _, info in inner.packing_log[:2]]        # the full-prompt splice
    assert [d["hires"] for d in logged] == [GRIDS["square"], GRIDS["wide"]]
    pieces = llada_chat(prompt).split("<image>")
    n = [49 + 9 * 10, 49 + 7 * 13]                              # base 7x7, h x (w + 1)
    start0 = len(tok.encode(pieces[0]))
    start1 = start0 + n[0] + len(tok.encode(pieces[1]))
    assert [lay.span_start for lay in s.layouts] == [start0, start1]
    assert [lay.span_length for lay in s.layouts] == n
    assert s.prompt_length == sum(len(tok.encode(p)) for p in pieces) + sum(n)
    assert s.unexpanded_ids.count(IMAGE_TOKEN_INDEX) == 2
    assert (s.input_ids[start0:start0 + n[0]] == -1).all()
    newline = inner.image_newline
    for lay, (h, w) in zip(s.layouts, [GRIDS["square"], GRIDS["wide"]]):
        base, hires = lay.grid("base"), lay.grid("hires")
        assert (base.offset, base.shape, base.row_stride) == (0, (7, 7), 7)
        assert (hires.offset, hires.shape, hires.row_stride) == (49, (h, w), w + 1)
        for r in range(h):                                     # the newline column
            torch.testing.assert_close(s.inputs_embeds[lay.span_start + 49 + r * (w + 1) + w],
                                       newline)
        cells = torch.as_tensor(hires.positions(lay.span_start)).flatten()
        assert not torch.isclose(s.inputs_embeds[cells], newline).all(-1).any()
    # text around the images holds the token embeddings
    torch.testing.assert_close(s.inputs_embeds[:start0],
                               inner.embed_tokens(torch.tensor(tok.encode(pieces[0]))))


def _marker_argmax(twin, adapter, img, grid, cell, sign):
    u = torch.randn(twin.model.config.hidden_size, generator=torch.Generator().manual_seed(5))

    def hook(i, name, g):
        if name != grid:
            return g
        g = g.clone()
        g[cell] = g[cell] + sign * 60.0 * u
        return g

    twin.model.model.grid_hook = hook
    try:
        with Explainer(adapter, layer=0) as ex:
            e = ex.explain(img, PROMPT, answer=ANSWER, targets="all")
    finally:
        twin.model.model.grid_hook = None
    m = e.map(None, grid=grid)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


@pytest.mark.parametrize("img,grid,cell", [(SQUARE, "hires", (0, 3)), (SQUARE, "hires", (5, 8)),
                                           (WIDE, "hires", (6, 2)), (WIDE, "base", (4, 1))])
def test_marker_lands_in_its_cell(twin, adapter, img, grid, cell):
    # the marker is planted in the twin's grid before the newline column is appended; Grad-CAM
    # keeps the sign of w . a, so one of the two signs makes it the map's maximum
    hits = [_marker_argmax(twin, adapter, img, grid, cell, s) for s in (1.0, -1.0)]
    assert cell in hits, hits


# ----------------------------------------------------------------------------- Grad-CAM by hand
@pytest.mark.parametrize("layer", [3])
def test_raw_map_equals_hand_gradcam(twin, adapter, layer):
    with Explainer(adapter, layer=layer) as ex:
        e = ex.explain(WIDE, PROMPT, answer=ANSWER, targets=[[1], [2, 4]])
    # by hand: ids from the tokenizer, the twin's own splice, positions from its packing record
    from PIL import Image
    tok, inner = twin.tokenizer, twin.model.model
    pre, post = llada_chat(PROMPT).split("<image>")
    ids = tok.encode(pre) + [IMAGE_TOKEN_INDEX] + tok.encode(post)
    pix = twin.process_images([Image.fromarray(WIDE)], twin.image_processor, twin.model.config)
    inner.packing_log.clear()
    with torch.no_grad():
        emb = twin.model.prepare_inputs_labels_for_multimodal(
            torch.tensor([ids]), None, None, None, None, list(pix), image_sizes=[(40, 24)])[4]
    h, w = inner.packing_log[-1][1]["hires"]
    y = tok.encode(ANSWER)
    full = torch.cat([emb, inner.embed_tokens(torch.tensor(y))[None]], 1)
    P, s0 = emb.shape[1], len(tok.encode(pre))
    positions = {"base": s0 + np.arange(49).reshape(7, 7),
                 "hires": s0 + 49 + np.arange(h)[:, None] * (w + 1) + np.arange(w)[None]}
    want = hand_gradcam(inner.layers[layer],
                        lambda x: twin.model.lm_head(inner(inputs_embeds=x).last_hidden_state),
                        full, positions, [[(P + 1, y[1])], [(P + 2, y[2]), (P + 4, y[4])]])
    for name in ("base", "hires"):
        got = e.maps[0][name][:, 0]
        assert got.shape == want[name].shape == (3,) + positions[name].shape
        np.testing.assert_allclose(got, want[name], atol=2e-5)


# ----------------------------------------------------------------------------- generation
def test_generation_trajectory_matches_the_rule(twin, adapter):
    cfg = GenerationConfig(steps=4, gen_length=8, block_length=4)
    s = adapter.prepare([WIDE], PROMPT)
    inner, P = twin.model.model, s.prompt_length
    memo = {}

    def rows(state):
        key = tuple(state.tolist())
        if key not in memo:
            x = torch.cat([s.inputs_embeds, inner.embed_tokens(state)])[None]
            with torch.no_grad():
                memo[key] = twin.model.lm_head(inner(inputs_embeds=x).last_hidden_state)[0, P:P + 8]
        return memo[key]

    # make EOS (suppressed by LLaDA-V's sampler) the model's favourite: its head row becomes
    # 3x the row of the token that wins position 0 of the all-mask state
    W = twin.model.lm_head.weight
    eos = 126081
    saved = W[eos].clone()
    first = rows(torch.full((8,), adapter.mask_token_id))[0]
    first[adapter.mask_token_id] = float("-inf")
    with torch.no_grad():
        W[eos] = 3.0 * W[int(first.argmax())]
    memo.clear()
    try:
        res = adapter.generate(s, cfg)
        y, masked = res.response_ids, res.masked
        assert res.hidden_has_image is None                   # full sequence every step
        assert masked.shape == (5, 8) and masked[0].all() and not masked[-1].any()
        assert (masked[1:] <= masked[:-1]).all()              # committed stays committed
        banned = set(llada_v.SUPPRESSED_TOKEN_IDS) | {adapter.mask_token_id}
        assert not banned & set(y.tolist())
        want = expected_commits(rows, y, masked, 8, 4, 4, adapter.mask_token_id,
                                llada_v.SUPPRESSED_TOKEN_IDS)
        for step, (chosen, toks) in enumerate(want):
            got = sorted((masked[step] & ~masked[step + 1]).nonzero().flatten().tolist())
            assert got == chosen, step
            assert y[got].tolist() == toks, step
        # without the suppression the rule would have committed EOS: the check above can fail
        unsuppressed = expected_commits(rows, y, masked, 8, 4, 4, adapter.mask_token_id)
        assert any(eos in toks for _, toks in unsuppressed)
        again = adapter.generate(s, cfg)
        assert torch.equal(again.response_ids, y) and torch.equal(again.masked, masked)
    finally:
        with torch.no_grad():
            W[eos] = saved


def test_training_forward_is_never_called(twin, adapter):
    def refuse(module, args, kwargs):
        raise AssertionError("the training forward was called")

    h = twin.model.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        with Explainer(adapter) as ex:
            e = ex.explain(SQUARE, PROMPT, states=("final", 2),
                           generation=GenerationConfig(steps=4, gen_length=4))
        assert e.maps[0]["hires"].shape[1:] == (2,) + GRIDS["square"]
    finally:
        h.remove()
    # the trap is real: the training forward needs labels and masks at random
    x = adapter.prepare([SQUARE], PROMPT).inputs_embeds[None]
    with pytest.raises(AttributeError):
        twin.model(inputs_embeds=x)
    labels = torch.zeros(x.shape[:2], dtype=torch.long)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        assert not torch.allclose(twin.model(inputs_embeds=x, labels=labels),
                                  twin.model(inputs_embeds=x, labels=labels))


# ----------------------------------------------------------------------------- checks
def test_feature_cache_refused(twin):
    attn = twin.model.model.layers[2].self_attn
    attn.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), attn)
    try:
        with pytest.raises(ValueError, match=r"blocks\[2\]\.self_attn\.forward.*dLLM-Cache"):
            diffcam.load("llada-v", twin.model, **twin.load_kwargs())
        ad = diffcam.load("llada-v", twin.model, allow_patched_forward=True, **twin.load_kwargs())
        assert ad.blocks() is twin.model.model.layers
    finally:
        del attn.forward


def test_padded_batch_equals_one_by_one(adapter):
    with Explainer(adapter, layer=1) as ex:
        both = ex.explain([SQUARE, WIDE], PROMPT, answer=ANSWER, targets="all")
        one = [ex.explain(im, PROMPT, answer=ANSWER, targets="all") for im in (SQUARE, WIDE)]
    assert both[0].layouts[0].span_length != both[1].layouts[0].span_length    # padding needed
    for b, o in zip(both, one):
        for g in ("base", "hires"):
            np.testing.assert_allclose(b.maps[0][g], o.maps[0][g], atol=1e-5)


def test_padding_that_turns_attention_causal_is_refused():
    tw = build_llada_v_twin(seed=1, attention_mode="causal_with_padding")
    with pytest.warns(UserWarning, match="padded batches are refused"):
        ad = diffcam.load("llada-v", tw.model, **tw.load_kwargs())
    assert ad.padding_mode is None and "causal" in ad.probe_result["mask"]
    with Explainer(ad, layer=1) as ex:
        with pytest.raises(ValueError, match="one sample per call"):
            ex.explain([SQUARE, WIDE], PROMPT, answer=ANSWER, targets="all")
        e = ex.explain(WIDE, PROMPT, answer=ANSWER, targets="all")      # one at a time works
    assert np.isfinite(e.maps[0]["hires"]).all()


def test_causal_model_refused():
    tw = build_llada_v_twin(seed=1, attention_mode="causal")
    with pytest.raises(ValueError, match="attention is causal"):
        diffcam.load("llada-v", tw.model, **tw.load_kwargs())


def test_transformers_version_policy(twin, monkeypatch):
    check_transformers("llada-v", version="4.57.6", real=True)
    with pytest.raises(RuntimeError, match="randomly initialised"):
        check_transformers("llada-v", version="5.3.0", real=True)
    with pytest.warns(UserWarning, match="newer than"):
        check_transformers("llada-v", version="5.23.0", real=True)
    check_transformers("llada-v", twin.model, version="5.3.0")      # not the family's code
    import transformers
    orig = type(twin.model)
    twin.model.__class__ = type(orig.__name__, (orig,),
                                {"__module__": "llava.model.language_model.llava_llada"})
    try:
        monkeypatch.setattr(transformers, "__version__", "5.3.0")
        with pytest.raises(RuntimeError, match="transformers 5.3.0"):
            diffcam.load("llada-v", twin.model, **twin.load_kwargs())
        ad = diffcam.load("llada-v", twin.model, check_versions=False, **twin.load_kwargs())
        assert ad.info()["model_module"].startswith("llava.")
    finally:
        twin.model.__class__ = orig


def test_load_errors_and_forms(twin, monkeypatch):
    with pytest.raises(TypeError, match="checkpoint path"):
        diffcam.load("llada-v")
    with pytest.raises(TypeError, match="tokenizer= and image_processor="):
        diffcam.load("llada-v", twin.model)
    with pytest.raises(TypeError, match="not a LLaDA-V model"):
        diffcam.load("llada-v", torch.nn.Linear(2, 2), tokenizer=twin.tokenizer,
                     image_processor=twin.image_processor)
    monkeypatch.setitem(sys.modules, "llava", None)           # the family's package is missing
    with pytest.raises(ImportError, match="git clone https://github.com/ML-GSAI/LLaDA-V"):
        diffcam.load("llada-v", "GSAI-ML/LLaDA-V", check_versions=False)
    with pytest.raises(ImportError, match="process_images"):
        diffcam.load("llada-v", twin.model, tokenizer=twin.tokenizer,
                     image_processor=twin.image_processor)
    with pytest.warns(UserWarning, match="no conversation template"):
        ad = diffcam.load("llada-v", (twin.tokenizer, twin.model, twin.image_processor, 4096),
                          process_images=twin.process_images)
    assert ad.prompt_text(PROMPT) == PROMPT
    with pytest.raises(ValueError, match="2 image marker"):
        ad.prepare([WIDE], "<image> and <image>")
