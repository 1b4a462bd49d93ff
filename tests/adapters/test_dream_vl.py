"""The Dream-VL adapter on its structural twin (diffcam.testing.twins.dream_vl): merged
(h/2)x(w/2) grid in the processor's order, markers land in their cell, mRoPE positions, logits
read one row early (logit shift), raw map = hand Grad-CAM, Dream's sampler with trajectory."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffcam
from diffcam.adapters.dream_vl import DreamVLAdapter
from diffcam.testing.twins.dream_vl import DREAM_VL_IDS, dream_vl_twin

PROMPT = "<image> describe the image"
H, W = 112, 168         # multiples of 28 inside the pixel budget: no resize, 4x6 merged


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def twin():
    return dream_vl_twin(seed=0)


@pytest.fixture(scope="module")
def ad(twin):
    model, proc = twin
    return diffcam.load("dream-vl", model, processor=proc)


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _gradcam(a, g, variant="paper"):
    """Grad-CAM by hand; "reference": weights from the clamped gradient, channel mean of ReLU."""
    if variant == "reference":
        m = torch.relu(a * g.clamp_min(0).mean((0, 1))).mean(-1)
        return ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()
    m = torch.relu((a * g.mean((0, 1))).sum(-1))
    return ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()


def _model_inputs(ad, proc, img, answer_ids=()):
    """ids / pixels / grid from the processor directly (the model's own path)."""
    text = proc.apply_chat_template(ad._messages(PROMPT, 1), tokenize=False,
                                    add_generation_prompt=True)
    b = proc(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
    ids = torch.cat([b["input_ids"][0], torch.as_tensor(answer_ids, dtype=torch.long)])[None]
    return ids, b["pixel_values"], b["image_grid_thw"]


def test_merged_grid_follows_the_processor_order(ad, twin):
    """Each 28x28 block of the image is painted with (row, col) in its red/green channels; the
    Qwen2-VL image processor's patches, taken four by four (one merged token each), must carry the
    colours of the cell the adapter's layout assigns to that token."""
    model, proc = twin
    rows, cols = H // 28, W // 28
    a = np.zeros((H, W, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            a[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = (40 + 60 * r, 40 + 30 * c, 128)
    s = ad.prepare([a], PROMPT)
    (lay,) = s.layouts
    assert lay.grids[0].shape == (rows, cols) and lay.span_length == rows * cols
    ids = s.input_ids.tolist()
    assert ids[lay.span_start - 1] == DREAM_VL_IDS["vision_start"]
    assert ids[lay.span_end] == DREAM_VL_IDS["vision_end"]
    assert set(ids[lay.span_start:lay.span_end]) == {DREAM_VL_IDS["image_pad"]}
    pv = proc.image_processor(images=[Image.fromarray(a)], return_tensors="pt")["pixel_values"]
    groups = pv.reshape(rows * cols, 4, 3, -1)            # (token, 4 patches, C, T*14*14)
    mean = np.array(proc.image_processor.image_mean)[:2]
    std = np.array(proc.image_processor.image_std)[:2]
    rgb = (groups[:, :, :2].mean((1, 3)).numpy() * std + mean) * 255
    pos = lay.grid("merged").positions(0)
    for r in range(rows):
        for c in range(cols):
            t = int(pos[r, c])
            np.testing.assert_allclose(rgb[t], [40 + 60 * r, 40 + 30 * c], atol=1.5)


def _marker_argmax(ad, img, cell, sign):
    lay = ad.prepare([img], PROMPT).layouts[0]
    k = int(lay.grid("merged").positions(0)[cell])
    u = torch.randn(ad.model.config.hidden_size, generator=torch.Generator().manual_seed(5))

    def hook(mod, inp, out):
        out = out.clone()
        out[k] += sign * 60.0 * u
        return out

    h = ad.model.projector.register_forward_hook(hook)
    try:
        e = diffcam.Explainer(ad, layer=0).explain(img, PROMPT, answer="a red cat on the box",
                                                   targets="all")
    finally:
        h.remove()
    m = e.map(None, grid="merged")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


@pytest.mark.parametrize("cell", [(0, 4), (3, 1)])
def test_marker_lands_in_its_cell(ad, img, cell):
    hits = [_marker_argmax(ad, img, cell, s) for s in (1, -1)]
    assert tuple(cell) in hits, hits


def test_forward_uses_mrope_positions(ad, twin, img):
    """The adapter's forward on the prepared embeddings equals the twin's own forward from ids
    (feature scatter + get_rope_index), and refuses to run without positions."""
    model, proc = twin
    s = ad.prepare([img], PROMPT)
    ans = ad.tokenizer.encode("a red cat")
    ids, pv, thw = _model_inputs(ad, proc, img, ans)
    L = ids.shape[1]
    ex = ad.extend_extras(s, L)
    pos, _ = model.get_rope_index(torch.cat([s.input_ids, torch.full((3,), ad.mask_token_id)])[None],
                                  thw)
    torch.testing.assert_close(ex["position_ids"], pos)
    assert not torch.equal(pos[1], pos[2])               # real 2D positions on the image
    with torch.no_grad():
        x = torch.cat([s.inputs_embeds, ad.embed_tokens(ans)])[None]
        got = ad.forward(x, None, ex)
        ref = model(input_ids=ids, pixel_values=pv, image_grid_thw=thw).logits
        flat = model(input_ids=ids, pixel_values=pv, image_grid_thw=thw,
                     position_ids=torch.arange(L)[None]).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (flat - ref).abs().max() > 1e-4                # 1D positions would change the logits
    with pytest.raises(ValueError, match="position_ids"):
        ad.forward(x, None, {})


@pytest.mark.parametrize("layer", [0, 1])   # the last block cannot see the image: zero grads
def test_raw_map_equals_hand_gradcam_with_logit_shift(ad, twin, img, layer):
    model, proc = twin
    got = {}
    for variant in ("paper", "reference"):
        with diffcam.Explainer(ad, layer=layer) as ex:
            e = ex.explain(img, PROMPT, answer="a red cat on the box", targets=[[0], [1, 2]],
                           gradcam=variant)
        got[variant] = e.maps[0]["merged"][:, 0]
    ans = e.token_ids
    ids, pv, thw = _model_inputs(ad, proc, img, ans)
    P = ids.shape[1] - len(ans)
    lay = e.layouts[0]
    span = slice(lay.span_start, lay.span_end)
    rows, cols = lay.grids[0].shape
    store = {}

    def hook(mod, inp, out):
        store["a"] = out[0].detach().requires_grad_(True)
        return (store["a"],) + tuple(out[1:])

    h = model.model.layers[layer].register_forward_hook(hook)
    want = {}
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=thw).logits[0]
            A = store["a"]
            for shift in (1, 0):
                sc = [sum(logits[P + j - shift, ans[j]] for j in t) for t in ([0], [1, 2])]
                sc.append(sc[0] + sc[1])
                for v in ("paper", "reference"):
                    want[shift, v] = []
                for s_ in sc:
                    (g,) = torch.autograd.grad(s_, A, retain_graph=True)
                    a_, g_ = (A[0, span].detach().reshape(rows, cols, -1),
                              g[0, span].reshape(rows, cols, -1))
                    for v in ("paper", "reference"):
                        want[shift, v].append(_gradcam(a_, g_, v))
    finally:
        h.remove()
    assert (got["reference"].max((1, 2)) > 0.5).all()    # non-trivial maps
    for v in ("paper", "reference"):     # float32 rounding of two backward passes: <= 3e-5
        np.testing.assert_allclose(got[v], np.stack(want[1, v]), atol=5e-5)
    # reading the unshifted rows would give other maps
    assert np.abs(got["reference"] - np.stack(want[0, "reference"])).max() > 1e-2


def test_dream_sampler_on_ids_and_trajectory(ad, twin, img):
    """Generation through the adapter = Dream's maskgit_plus schedule on token ids through the
    model (rows shifted by one); the trajectory is returned and the last state is the final."""
    model, proc = twin
    S, G = 4, 4
    e = diffcam.Explainer(ad, layer=1).explain(
        img, PROMPT, targets="all", states=("final", 0, 2, S),
        generation=diffcam.GenerationConfig(steps=S, gen_length=G))
    mask = DREAM_VL_IDS["mask"]
    ids, pv, thw = _model_inputs(ad, proc, img, [mask] * G)
    P = ids.shape[1] - G
    ts = torch.linspace(1, 1e-3, S + 1, dtype=torch.float64)
    hist = [(ids[0, P:] == mask).clone()]
    with torch.no_grad():
        for i in range(S):
            m = ids[0, P:] == mask
            logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=thw).logits[0]
            rows = logits[P - 1:P - 1 + G].double()[m]
            rows[:, mask] = -float("inf")
            conf, x0 = torch.softmax(rows, -1).max(-1)
            k = int(m.sum()) if i == S - 1 else int(int(m.sum()) * (1 - ts[i + 1] / ts[i]))
            idx = m.nonzero()[:, 0]
            pick = torch.topk(conf, k).indices
            ids[0, P + idx[pick]] = x0[pick]
            hist.append((ids[0, P:] == mask).clone())
    assert e.token_ids == ids[0, P:].tolist()
    np.testing.assert_array_equal(e.masked, torch.stack(hist).numpy())
    for arr in e.maps[0].values():
        np.testing.assert_allclose(arr[:, 3], arr[:, 0], atol=1e-6)
    # several states of one sample run as one batched forward (broadcast_extras); one forward
    # per state gives the same maps
    # (autograd on both sides, so the comparison is of the batching alone; the batched forward
    # otherwise takes the hand-written backward, whose float32 rounding differs from autograd's:
    # both lie 4-5e-5 from a float64 copy's maps)
    kw = dict(targets="all", states=("final", 2), aggregate_only=True,
              generation=diffcam.GenerationConfig(steps=S, gen_length=G))
    e_b = diffcam.Explainer(ad, layer=1, fast_backward=False).explain(img, PROMPT, **kw)
    ex_fast = diffcam.Explainer(ad, layer=1)
    e_fast = ex_fast.explain(img, PROMPT, **kw)
    ad.broadcast_extras = False
    try:
        e_rows = diffcam.Explainer(ad, layer=1, fast_backward=False).explain(img, PROMPT, **kw)
    finally:
        del ad.broadcast_extras
    assert type(ad).broadcast_extras is True
    np.testing.assert_allclose(e_rows.maps[0]["merged"], e_b.maps[0]["merged"], atol=1e-5)
    assert ex_fast.last_backward == "fast"
    np.testing.assert_allclose(e_fast.maps[0]["merged"], e_b.maps[0]["merged"], atol=1e-4)
    with pytest.raises(ValueError, match="blocks"):
        ad.generate(ad.prepare([img], PROMPT),
                    diffcam.GenerationConfig(steps=4, gen_length=4, block_length=2))


def test_padding_is_a_4d_pairwise_mask(ad, img):
    s = ad.prepare([img], PROMPT)
    a = torch.tensor(ad.tokenizer.encode("a red cat on the box"))
    b = a[:3]
    xa = torch.cat([s.inputs_embeds, ad.embed_tokens(a)])
    xb = torch.cat([s.inputs_embeds, ad.embed_tokens(b)])
    L = xa.shape[0]
    batch = torch.zeros(2, L, xa.shape[1])
    batch[0], batch[1, :xb.shape[0]] = xa, xb
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, xb.shape[0]:] = 0
    with torch.no_grad():
        out = ad.forward(batch, mask, ad.extend_extras(s, L))
        solo = ad.forward(xb[None], None, ad.extend_extras(s, xb.shape[0]))
    torch.testing.assert_close(out[1, :xb.shape[0]], solo[0], atol=1e-5, rtol=1e-5)


def test_probe_and_load_errors(twin):
    model, proc = twin

    class Causal(DreamVLAdapter):
        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            L = inputs_embeds.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]
            out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=causal,
                                   position_ids=extras["position_ids"])
            return self.model.lm_head(out.last_hidden_state)

    with pytest.raises(RuntimeError, match="causal"):
        Causal(model, proc).check()
    with pytest.raises(TypeError, match="processor"):
        diffcam.load("dream-vl", model)
    with pytest.raises(ValueError, match="marker"):
        DreamVLAdapter(model, proc).prepare([np.zeros((56, 56, 3), np.uint8)] * 2, "<image> two")
