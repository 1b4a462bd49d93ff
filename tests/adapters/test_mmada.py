"""The MMaDA adapter on its structural twin (diffcam.testing.twins.mmada): VQ grid located from
the ids, markers land in their cell, logits read unshifted, raw map = hand Grad-CAM, generation
= LLaDA's algorithm on token ids, padding through attention_bias (never the causal mask)."""

import numpy as np
import pytest
import torch

import diffcam
from diffcam.adapters.mmada import MMaDAAdapter, mmada_pixels
from diffcam.testing.twins.mmada import MMADA_IDS, mmada_twin

PROMPT = "<image> describe the image"
SIDE = 8        # 32 px / 4: the twin's VQ grid


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def twin():
    return mmada_twin(seed=0)


@pytest.fixture(scope="module")
def ad(twin):
    model, tok, vq = twin
    return diffcam.load("mmada", model, tokenizer=tok, vq_model=vq, resolution=32)


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def _gradcam(a, g, variant="paper"):
    """Grad-CAM by hand; "reference": weights from the clamped gradient, channel mean of ReLU."""
    if variant == "reference":
        m = torch.relu(a * g.clamp_min(0).mean((0, 1))).mean(-1)
        return ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()
    """Grad-CAM by hand: a, g (h, w, D) -> min-max of ReLU(sum_c mean(g_c) a_c)."""
    m = torch.relu((a * g.mean((0, 1))).sum(-1))
    return ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()


def test_sequence_layout_from_ids(ad, img):
    s = ad.prepare([img], PROMPT)
    ids = s.input_ids.tolist()
    assert ids[:2] == [MMADA_IDS["mmu"], MMADA_IDS["soi"]]
    assert ids[2 + SIDE * SIDE] == MMADA_IDS["eoi"]
    assert all(MMADA_IDS["text_vocab"] <= t < MMADA_IDS["text_vocab"] + 8192
               for t in ids[2:2 + SIDE * SIDE])
    (lay,) = s.layouts
    assert (lay.span_start, lay.span_length) == (2, SIDE * SIDE)
    assert lay.grids[0].shape == (SIDE, SIDE)
    # the image run is found from the ids: a prefix before <|mmu|> moves it
    assert ad.locate_image([7, 7] + ids) == (4, SIDE * SIDE)
    with pytest.raises(ValueError, match="eoi"):
        ad.locate_image(ids[:2 + SIDE * SIDE] + ids[3 + SIDE * SIDE:])


@pytest.mark.parametrize("cell", [(1, 6), (5, 2)])
def test_pixel_change_in_a_cell_changes_that_grid_token(ad, img, cell):
    """Independent of the layout code: the twin's VQ encoder is local, so painting the pixels
    of cell (r, c) of the 32x32 input changes only the code the layout puts at (r, c)."""
    r, c = cell
    a = img.copy()
    a[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 255 - a[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]
    s0, s1 = ad.prepare([img], PROMPT), ad.prepare([a], PROMPT)
    changed = (s0.input_ids != s1.input_ids).nonzero()[:, 0].tolist()
    pos = int(s0.layouts[0].grid("vq").positions(s0.layouts[0].span_start)[r, c])
    assert changed == [pos]


def _marker_argmax(ad, img, cell, sign):
    r, c = cell
    k = r * SIDE + c
    special = 8191                                   # a code the random image does not use
    wte = ad._inner.transformer.wte.weight
    row = MMADA_IDS["text_vocab"] + special
    saved = wte[row].clone()
    orig = ad.vq_model.get_code

    def get_code(x):
        codes = orig(x).clone()
        assert (codes != special).all()
        codes[:, k] = special
        return codes

    u = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(5))
    ad.vq_model.get_code = get_code
    wte[row] = sign * 60.0 * u
    try:
        e = diffcam.Explainer(ad, layer=0).explain(img, PROMPT, answer="a red cat on the box",
                                                   targets="all")
    finally:
        ad.vq_model.get_code = orig
        wte[row] = saved
    m = e.map(None, grid="vq")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


@pytest.mark.parametrize("cell", [(2, 5), (6, 1)])
def test_marker_code_lands_in_its_cell(ad, img, cell):
    # Grad-CAM keeps the sign of w . a: one of the two marker signs is the map's maximum
    hits = [_marker_argmax(ad, img, cell, s) for s in (1, -1)]
    assert tuple(cell) in hits, hits


def test_forward_equals_model_on_ids(ad, twin, img):
    """The adapter's forward (embeddings, inner model) gives the model's own logits on ids,
    row j scoring token j (no shift)."""
    model = twin[0]
    s = ad.prepare([img], PROMPT)
    ans = torch.tensor(ad._encode("a red cat")[1:])
    with torch.no_grad():
        x = torch.cat([s.inputs_embeds, ad.embed_tokens(ans)])[None]
        got = ad.forward(x)
        ref = model(input_ids=torch.cat([s.input_ids, ans])[None], use_cache=False).logits
    torch.testing.assert_close(got, ref)
    assert ad.logit_shift == 0


@pytest.mark.parametrize("layer", [0, 1])   # the last block cannot see the image: zero grads
def test_raw_map_equals_hand_gradcam(ad, twin, img, layer):
    model = twin[0]
    answer = "a red cat on the box"
    got = {}
    for variant in ("paper", "reference"):
        with diffcam.Explainer(ad, layer=layer) as ex:
            e = ex.explain(img, PROMPT, answer=answer, targets=[[0], [1, 2]], gradcam=variant)
        got[variant] = e.maps[0]["vq"][:, 0]
    # by hand: ids through the model, a leaf at block `layer`, autograd, Grad-CAM
    s = ad.prepare([img], PROMPT)
    ans = e.token_ids
    ids = torch.cat([s.input_ids, torch.tensor(ans)])[None]
    P = s.input_ids.numel()
    store = {}

    def hook(mod, inp, out):
        leaf = out[0].detach().requires_grad_(True)
        store["a"] = leaf
        return (leaf,) + tuple(out[1:])

    h = model.model.transformer.blocks[layer].register_forward_hook(hook)
    want = {"paper": [], "reference": []}
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]
            scores = [sum(logits[P + j, ans[j]] for j in t) for t in ([0], [1, 2])]
            scores.append(scores[0] + scores[1])
            A = store["a"]
            img_pos = slice(2, 2 + SIDE * SIDE)       # after <|mmu|> <|soi|>
            for sc in scores:
                (g,) = torch.autograd.grad(sc, A, retain_graph=True)
                a_, g_ = (A[0, img_pos].detach().reshape(SIDE, SIDE, -1),
                          g[0, img_pos].reshape(SIDE, SIDE, -1))
                for v in want:
                    want[v].append(_gradcam(a_, g_, v))
    finally:
        h.remove()
    assert (got["reference"].max((1, 2)) > 0.5).all()    # non-trivial maps
    for v in want:
        np.testing.assert_allclose(got[v], np.stack(want[v]), atol=2e-5)


def test_generation_is_llada_on_ids_and_returns_trajectory(ad, twin, img):
    """Generation through the adapter = LLaDA low-confidence remasking with blocks run on token
    ids through the model (what MMaDA's mmu_generate does); the trajectory is returned."""
    model = twin[0]
    cfg = diffcam.GenerationConfig(steps=4, gen_length=4, block_length=2)
    e = diffcam.Explainer(ad, layer=1).explain(img, PROMPT, targets="all",
                                               states=("final", 0, 2, 4), generation=cfg)
    s = ad.prepare([img], PROMPT)
    P, mask = s.input_ids.numel(), MMADA_IDS["mask"]
    x = torch.cat([s.input_ids, torch.full((4,), mask)])[None]
    masked_hand = [(x[0, P:] == mask).clone()]
    with torch.no_grad():
        for b in range(2):
            for _ in range(2):
                logits = model(input_ids=x, use_cache=False).logits[0, P:].double()
                logits[:, mask] = -float("inf")
                p = torch.softmax(logits, -1)
                conf, x0 = p.max(-1)
                inblock = (torch.arange(4) >= 2 * b) & (torch.arange(4) < 2 * b + 2)
                conf = torch.where((x[0, P:] == mask) & inblock, conf, -torch.inf)
                j = int(conf.argmax())
                x[0, P + j] = x0[j]
                masked_hand.append((x[0, P:] == mask).clone())
    assert e.token_ids == x[0, P:].tolist()
    np.testing.assert_array_equal(e.masked, torch.stack(masked_hand).numpy())
    assert e.masked[0].all() and not e.masked[-1].any()
    for arr in e.maps[0].values():
        np.testing.assert_allclose(arr[:, 3], arr[:, 0], atol=1e-6)   # step 4 == final


def test_padding_goes_through_attention_bias(ad, img, img2=None):
    """A right-padded batch gives each row its unpadded logits (bidirectional + padding), which a
    bare attention_mask would not (MMaDA's copy then turns causal)."""
    s = ad.prepare([img], PROMPT)
    a = torch.tensor(ad._encode("a red cat on the box")[1:])
    b = a[:3]
    with torch.no_grad():
        xa = torch.cat([s.inputs_embeds, ad.embed_tokens(a)])
        xb = torch.cat([s.inputs_embeds, ad.embed_tokens(b)])
        L = xa.shape[0]
        batch = torch.zeros(2, L, xa.shape[1])
        batch[0], batch[1, :xb.shape[0]] = xa, xb
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, xb.shape[0]:] = 0
        out = ad.forward(batch, mask)
        solo = ad.forward(xb[None])
        torch.testing.assert_close(out[1, :xb.shape[0]], solo[0], atol=1e-5, rtol=1e-5)
        causal = ad._inner(input_embeddings=batch, attention_mask=mask, use_cache=False).logits
    assert (causal[1, 0] - solo[0, 0]).abs().max() > 1e-3


def test_probe_detects_causal_attention(twin):
    model, tok, vq = twin

    class Causal(MMaDAAdapter):
        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            m = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
            if attention_mask is not None:
                m = attention_mask
            return self._inner(input_embeddings=inputs_embeds, attention_mask=m,
                               use_cache=False).logits

    with pytest.raises(RuntimeError, match="causal"):
        Causal(model, tok, vq, resolution=32).check()


def test_load_settings_and_errors(twin, img):
    model, tok, vq = twin
    assert model.config.use_cache is False          # set by load (lost on tf 5.x configs)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(TypeError, match="vq_model"):
        diffcam.load("mmada", model, tokenizer=tok)
    ad = MMaDAAdapter(model, tok, vq, resolution=64)            # 16x16 codes, checkpoint: 64
    with pytest.raises(ValueError, match="num_vq_tokens"):
        ad.prepare([img], PROMPT)
    ad = MMaDAAdapter(model, tok, vq, resolution=32)
    with pytest.raises(ValueError, match="exactly one image"):
        ad.prepare([img, img], "<image> <image> two")
    assert mmada_pixels(np.zeros((20, 50, 3), np.uint8), 32).shape == (1, 3, 32, 32)


def test_baselines_run_on_llada_blocks(ad, img):
    """LLaDA/MMaDA blocks feed their MLP from ``ff_norm``: LLaVA-CAM hooks it (and nothing is
    left hooked); TAM reads the logit lens of the VQ grid."""
    block = ad.blocks()[1]
    seen = []
    # during LLaVA-CAM's forward, diffcam's own hook sits next to this one on ff_norm
    h = block.ff_norm.register_forward_hook(
        lambda m, i, o: seen.append(len(m._forward_hooks)))
    try:
        with diffcam.Explainer(ad, layer=1) as ex:
            e = ex.explain(img, PROMPT, answer="a red cat on the box", targets="all",
                           method="llava-cam")
            t = ex.explain(img, PROMPT, answer="a red cat on the box", targets="all",
                           method="tam")
    finally:
        h.remove()
    from diffcam.baselines import mlp_input_norm

    assert mlp_input_norm(block)[0] == "ff_norm"
    assert seen[0] == 2 and seen[-1] == 1          # LLaVA-CAM hooked ff_norm; TAM hooks nothing
    assert not block.ff_norm._forward_hooks and not block._forward_hooks
    for x in (e, t):
        m = x.maps[0][x.default_grid()]
        assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6 and m.max() > 0
    assert e.settings["method"] == "llava-cam" and t.settings["method"] == "tam"
