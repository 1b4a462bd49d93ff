"""The DiffusionGemma adapter on transformers' own DiffusionGemmaForBlockDiffusion at toy size
(diffcam.testing.twins.diffusion_gemma): the attribution forward reproduces the logits of the
model's own ``generate`` (encoder KV cache, sliding window, two canvases), soft-token grid in the
vision pooler's order, markers land in their cell, raw map = hand Grad-CAM through the encoder's
hidden states, generation returns the trajectory, trajectory states after the prefill are
rejected as infeasible."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffcam
from transformers import LogitsProcessor, LogitsProcessorList
from diffcam.adapters.base import cache_kwarg
from diffcam.adapters.diffusion_gemma import DiffusionGemmaAdapter
from diffcam.testing.twins.diffusion_gemma import GEMMA_IDS, diffusion_gemma_twin

PROMPT = "<image> describe the image"
C = 8            # the twin's canvas length


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def twin():
    return diffusion_gemma_twin(seed=0)


@pytest.fixture(scope="module")
def ad(twin):
    model, proc = twin
    return diffcam.load("diffusion-gemma", model, processor=proc)


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


def _gradcam(a, g, variant="paper"):
    if variant == "reference":
        m = torch.relu(a * g.clamp_min(0).mean((0, 1))).mean(-1)
    else:
        m = torch.relu((a * g.mean((0, 1))).sum(-1))
    return ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()


def _processor_inputs(ad, proc, img):
    text = proc.apply_chat_template(ad._messages(PROMPT, 1), tokenize=False,
                                    add_generation_prompt=True)
    return proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")


def test_forward_reproduces_generate_over_two_canvases(ad, twin, img):
    """The first denoising call of each canvas in the model's own ``generate`` (image spliced
    from pixel_values by the model, prefill + one incremental encoder call, evicting sliding
    cache, no self-conditioning yet) equals the adapter's forward rows of that canvas."""
    model, proc = twin
    b = _processor_inputs(ad, proc, img)
    P = b["input_ids"].shape[1]
    assert P > model.config.text_config.sliding_window     # the sliding cache does evict
    calls, scores = [], []

    def rec(mod, args, kwargs):        # the decoder's inputs of every denoising call
        calls.append((int(kwargs["decoder_position_ids"][0, 0]),
                      kwargs["decoder_input_ids"][0].clone(),
                      kwargs.get("self_conditioning_logits") is None))

    class Raw(LogitsProcessor):        # first processor: the raw logits of that call
        def __call__(self, input_ids, s, cur_step=None):
            scores.append(s[0].clone())
            return s

    start = torch.randint(0, GEMMA_IDS["vocab"], (1, C), generator=torch.Generator().manual_seed(1))
    h = model.model.decoder.register_forward_pre_hook(rec, with_kwargs=True)
    try:
        torch.manual_seed(0)
        out = model.generate(b["input_ids"], pixel_values=b["pixel_values"],
                             image_position_ids=b["image_position_ids"],
                             mm_token_type_ids=b["mm_token_type_ids"], decoder_input_ids=start,
                             max_new_tokens=2 * C, max_denoising_steps=2,
                             logits_processor=LogitsProcessorList([Raw()]))
    finally:
        h.remove()
    assert len(calls) == len(scores)
    calls = [c + (lg,) for c, lg in zip(calls, scores)]
    first = {pos: (ids, lg) for pos, ids, fresh, lg in calls if fresh}
    assert sorted(first) == [P, P + C]
    s = ad.prepare([img], PROMPT)
    assert torch.equal(s.input_ids, b["input_ids"][0])
    canvas1_final = out.sequences[0, P:P + C]
    with torch.no_grad():
        for resp, lo in ((first[P][0], P), (torch.cat([canvas1_final, first[P + C][0]]), P + C)):
            x = torch.cat([s.inputs_embeds, ad.embed_tokens(resp)])[None]
            lg = ad.forward(x, None, ad.extend_extras(s, x.shape[1]))
            assert lg.shape[1] == x.shape[1] and not lg[0, :P].any()
            torch.testing.assert_close(lg[0, lo:lo + C], first[lo][1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(24, 32), (48, 16)])
def test_soft_grid_follows_the_vision_pooler(ad, twin, shape):
    """Feeding each patch's (x, y) through the vision tower's own pooler tells which patches each
    soft token averages; the adapter's grid must put soft token t at that cell."""
    model, proc = twin
    a = np.zeros(shape + (3,), np.uint8)
    s = ad.prepare([a], PROMPT)
    (lay,) = s.layouts
    ip = proc.image_processor([Image.fromarray(a)], return_tensors="pt")
    pos = ip["image_position_ids"]
    pad = (pos == -1).all(-1)
    pooler = model.model.encoder.vision_tower.pooler
    k = model.config.vision_config.pooling_kernel_size
    xy, valid = pooler(pos.float().clamp_min(0), pos, pad, output_length=pos.shape[1] // k ** 2)
    xy = xy[valid] / pooler.root_hidden_size                # mean patch (x, y) per soft token
    rows, cols = lay.grids[0].shape
    assert xy.shape[0] == rows * cols == lay.span_length
    grid = lay.grid("soft").positions(0)
    for t in range(rows * cols):
        r, c = int(xy[t, 1]) // k, int(xy[t, 0]) // k
        assert int(grid[r, c]) == t
    if shape[0] > shape[1]:
        assert rows > cols


def _marker_argmax(ad, img, cell, sign):
    lay = ad.prepare([img], PROMPT).layouts[0]
    k = int(lay.grid("soft").positions(0)[cell])
    u = torch.randn(ad.model.config.text_config.hidden_size,
                    generator=torch.Generator().manual_seed(5))

    def hook(mod, inp, out):
        out = out.clone()
        out[k] += sign * 60.0 * u
        return out

    h = ad.encoder.embed_vision.register_forward_hook(hook)
    try:
        e = diffcam.Explainer(ad, layer=0).explain(img, PROMPT, answer="a red cat on the box",
                                                   targets="all", gradcam="reference")
    finally:
        h.remove()
    m = e.map(None, grid="soft")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


@pytest.mark.parametrize("cell", [(1, 7), (5, 2)])
def test_marker_lands_in_its_cell(ad, img, cell):
    # Gemma's layers normalise queries, keys, values and every residual update, so the sign of
    # w . a at the marker is not tied to the marker's sign; the reference aggregation (clamped
    # weights, mean of ReLU(w_c a_c)) puts either sign of the marker at the maximum
    hits = [_marker_argmax(ad, img, cell, s) for s in (1, -1)]
    assert hits == [tuple(cell)] * 2, hits


@pytest.mark.parametrize("layer", [0, 1])
def test_raw_map_equals_hand_gradcam_through_the_encoder(ad, twin, img, layer):
    """By hand with the model's public modules: prefill of the prompt by the encoder (the masks
    generate builds, an evicting DynamicCache), a leaf at encoder layer ``layer``, the model's
    forward on the answer canvas (ids, padded with the pad id) reading that cache, autograd."""
    from transformers import DynamicCache

    model, proc = twin
    got = {}
    for variant in ("paper", "reference"):
        e = diffcam.Explainer(ad, layer=layer).explain(img, PROMPT, answer="a red cat",
                                                       targets=[[0], [1, 2]], gradcam=variant)
        got[variant] = e.maps[0]["soft"][:, 0]
    ans = e.token_ids
    assert len(ans) == 3
    s = ad.prepare([img], PROMPT)
    P = s.prompt_length
    enc = model.model.encoder
    store = {}

    def hook(mod, inp, out):
        store["a"] = out.detach().requires_grad_(True)
        return store["a"]

    h = enc.language_model.layers[layer].register_forward_hook(hook)
    want = {"paper": [], "reference": []}
    try:
        with torch.enable_grad():
            x = s.inputs_embeds[None]
            pos = torch.arange(P)[None]
            cache = DynamicCache(config=model.config.get_text_config())
            masks = enc.create_masks_for_generate(
                config=model.config, inputs_embeds=x, attention_mask=torch.ones(1, P).bool(),
                position_ids=pos, mm_token_type_ids=s.extras["mm_token_type_ids"],
                **{cache_kwarg(enc.create_masks_for_generate): cache})
            enc(inputs_embeds=x, attention_mask=masks, position_ids=pos,
                **{cache_kwarg(enc.forward): cache})
            canvas = torch.tensor([ans + [GEMMA_IDS["pad"]] * (C - len(ans))])
            logits = model(decoder_input_ids=canvas, decoder_position_ids=torch.arange(P, P + C)[None],
                           **{cache_kwarg(model.forward): cache}).logits[0]
            sc = [sum(logits[j, ans[j]] for j in t) for t in ([0], [1, 2])]
            sc.append(sc[0] + sc[1])
            A = store["a"]
            lay = s.layouts[0]
            run = (s.input_ids == GEMMA_IDS["image"]).nonzero()[:, 0]
            rows, cols = lay.grids[0].shape
            for s_ in sc:
                (g,) = torch.autograd.grad(s_, A, retain_graph=True)
                a_, g_ = (A[0, run].detach().reshape(rows, cols, -1),
                          g[0, run].reshape(rows, cols, -1))
                for v in want:
                    want[v].append(_gradcam(a_, g_, v))
    finally:
        h.remove()
    assert (got["reference"].max((1, 2)) > 0.5).all()
    for v in want:
        np.testing.assert_allclose(got[v], np.stack(want[v]), atol=5e-5)


def test_generation_trajectory_and_state_feasibility(ad, twin, img):
    model, proc = twin
    cfg = diffcam.GenerationConfig(steps=3, gen_length=C, seed=0)
    e = diffcam.Explainer(ad, layer=1).explain(img, PROMPT, targets="all",
                                               states=("final", 0), generation=cfg)
    # the answer is the model's own generate from pixel values with the same seed
    b = _processor_inputs(ad, proc, img)
    torch.manual_seed(0)
    out = model.generate(b["input_ids"], pixel_values=b["pixel_values"],
                         image_position_ids=b["image_position_ids"],
                         mm_token_type_ids=b["mm_token_type_ids"], max_new_tokens=C,
                         max_denoising_steps=3)
    P = b["input_ids"].shape[1]
    assert e.token_ids == out.sequences[0, P:P + C].tolist()
    S = e.masked.shape[0] - 1
    assert 1 <= S <= 3 and e.masked.shape[1] == C
    assert e.masked[0].all() and not e.masked[-1].any()
    assert (np.diff(e.masked.astype(int), axis=0) <= 0).all()    # settles monotonically
    assert e.maps[0]["soft"].shape[1] == 2
    gen = ad.generate(ad.prepare([img], PROMPT), cfg)
    assert gen.hidden_has_image.tolist() == [True] + [False] * gen.steps
    with pytest.raises(ValueError, match="not feasible"):
        diffcam.Explainer(ad).explain(img, PROMPT, states=("final", 1), generation=cfg)
    with pytest.raises(ValueError, match="multiple of"):
        ad.generate(ad.prepare([img], PROMPT), diffcam.GenerationConfig(steps=2, gen_length=5))


def test_settings_and_errors(ad, twin):
    model, proc = twin
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert ad.mask_token_id == GEMMA_IDS["mask"] and ad.logit_shift == 0
    assert ad.blocks() is model.model.encoder.language_model.layers
    with pytest.raises(TypeError, match="processor"):
        diffcam.load("diffusion-gemma", model)
    tc = model.config.text_config
    saved = tc.use_bidirectional_attention
    tc.use_bidirectional_attention = "all"
    try:
        with pytest.raises(NotImplementedError, match="all"):
            DiffusionGemmaAdapter(model, proc)
    finally:
        tc.use_bidirectional_attention = saved


def test_trajectory_from_argmax_drafts():
    """A position is masked until the argmax canvas holds its final token from then on; a
    canvas never generated (all sequences ended) is padding, settled at the last step."""
    from diffcam.adapters.diffusion_gemma import _trajectory

    drafts = [[torch.tensor([1, 2, 3, 4]), torch.tensor([5, 2, 7, 4]), torch.tensor([5, 2, 3, 4])]]
    r = _trajectory(drafts, torch.tensor([5, 2, 3, 9, 0, 0, 0, 0]), 4)
    want = np.array([[1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 0, 1, 1, 1, 1, 1, 1],     # 2 settled at step 1; 4 is replaced later
                     [0, 0, 1, 1, 1, 1, 1, 1],     # 3 changes at step 2, back at step 3
                     [0, 0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(r.masked.numpy(), want)
    assert r.steps == 3 and r.hidden_has_image.tolist() == [True, False, False, False]


def test_no_deprecated_cache_keyword(ad, img):
    """The adapter hands transformers' DiffusionGemma classes their KV cache under the keyword
    the installed release takes (``cache`` since the rename; ``past_key_values`` is deprecated
    there and goes in transformers 5.40), so a forward and a generation raise no deprecation
    warning about it."""
    import warnings

    s = ad.prepare([img], PROMPT)
    x = torch.cat([s.inputs_embeds, ad.embed_tokens(torch.tensor([5, 6, 7]))])[None]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            ad.generate(s, diffcam.GenerationConfig(steps=2, gen_length=C))
            ad.forward(x, None, ad.extend_extras(s, x.shape[1]))
    msgs = [str(w.message) for w in seen if "past_key_values" in str(w.message)]
    assert msgs == [], msgs


def test_lens_logits_read_the_encoder_for_the_prompt(ad, twin, img):
    """TAM's logit lens: the prompt rows are the head applied to the encoder's final hidden
    states (computed here by hand from the prompt alone: the text is causal, so later positions
    cannot change them); the canvas rows are the forward's."""
    from transformers import DynamicCache

    model, proc = twin
    s = ad.prepare([img], PROMPT)
    P = s.prompt_length
    resp = torch.tensor(ad.tokenizer.encode("a red cat on the box", add_special_tokens=False))
    x = torch.cat([s.inputs_embeds, ad.embed_tokens(resp)])[None]
    ex = ad.extend_extras(s, x.shape[1])
    with torch.no_grad():
        lens = ad.lens_logits(x, None, ex)[0]
        fwd = ad.forward(x, None, ex)[0]
        enc = model.model.encoder
        xp, pos = s.inputs_embeds[None], torch.arange(P)[None]
        cache = DynamicCache(config=model.config.get_text_config())
        masks = enc.create_masks_for_generate(
            config=model.config, inputs_embeds=xp, attention_mask=torch.ones(1, P).bool(),
            position_ids=pos, mm_token_type_ids=s.extras["mm_token_type_ids"],
            **{cache_kwarg(enc.create_masks_for_generate): cache})
        h = enc(inputs_embeds=xp, attention_mask=masks, position_ids=pos,
                **{cache_kwarg(enc.forward): cache}).last_hidden_state[0]
        z = model.lm_head(h).float()
        cap = model.config.get_text_config().final_logit_softcapping
        if cap:
            z = torch.tanh(z / cap) * cap
    assert lens.shape == fwd.shape and lens[:P].abs().max() > 0
    torch.testing.assert_close(lens[:P], z, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lens[P:], fwd[P:])
    # TAM runs through it (the forward alone would give all-zero image rows)
    e = diffcam.Explainer(ad, layer=0).explain(img, PROMPT, answer="a red cat", method="tam",
                                               targets="all")
    assert e.maps[0]["soft"].max() > 0
