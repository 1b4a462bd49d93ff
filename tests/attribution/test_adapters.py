"""GenericAdapter and the tiny in-process test models (diffcam.testing)."""

import numpy as np
import pytest
import torch

from diffcam.adapters import Adapter, GenerationConfig, load
from diffcam.adapters.generic import GenericAdapter
from diffcam.attribution.layout import ImageLayout, single_grid_layout
from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl
from diffcam.testing.tiny import IMAGE_PLACEHOLDER, WordTokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread.  On a loaded 2-core machine, OpenMP thread contention
    makes millisecond forwards take seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_transformers():
    # the tiny models need transformers >= 5.5 (config.is_causal=False); install diffcam[models]
    pytest.importorskip("transformers", minversion="5.5")


@pytest.fixture(scope="module")
def llava():
    _need_transformers()
    return tiny_llava_anyres(seed=0)


@pytest.fixture(scope="module")
def qwen():
    _need_transformers()
    return tiny_qwen2vl(seed=0)


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


IMGS = [_img(30, 50, 1), _img(40, 24, 2)]


def test_tokenizer_roundtrip():
    tok = WordTokenizer()
    assert 50 <= len(tok) <= 80
    ids = tok.encode("there is a red cat on the box .")
    assert tok.decode(ids) == "there is a red cat on the box ."
    assert tok.convert_ids_to_tokens(ids)[4] == "cat"
    assert tok.encode("zebra") == [tok.unk_token_id]
    assert tok.decode([tok.mask_token_id, 10], skip_special_tokens=True) == tok.vocab[10]


# ------------------------------------------------------------------- LLaVA anyres packing
@pytest.mark.parametrize("n_images", [1, 2])
def test_anyres_layout_matches_splice(llava, n_images):
    tok, tower = llava.tokenizer, llava.vision
    prompt = "describe <image> the image" + (" and <image> this one" if n_images == 2 else "")
    images = IMGS[:n_images]
    s = llava.prepare(images, prompt)
    feats = [f for f, _ in tower(images)]
    # expected positions, computed from the text pieces independently of the adapter
    pieces = prompt.split("<image>")
    start, expect = 0, []
    for i in range(n_images):
        start += len(tok.encode(pieces[i]))
        expect.append(start)
        start += feats[i].shape[0]
    assert len(s.layouts) == n_images
    assert s.inputs_embeds.shape[0] == s.input_ids.shape[0] == start + len(tok.encode(pieces[-1]))
    newline = tower.image_newline
    for i, lay in enumerate(s.layouts):
        assert isinstance(lay, ImageLayout) and lay.image_index == i
        assert lay.span_start == expect[i] and lay.span_length == feats[i].shape[0]
        assert (s.input_ids[lay.span_start:lay.span_end] == -1).all()
        torch.testing.assert_close(s.inputs_embeds[lay.span_start:lay.span_end], feats[i])
        base, hires = lay.grid("base"), lay.grid("hires")
        h, w = tower.hires_grid(*images[i].shape[:2])
        assert base.shape == (4, 4) and hires.shape == (h, w) and hires.row_stride == w + 1
        assert lay.span_length == 16 + h * (w + 1)
        # the newline column holds the learned newline embedding, grid cells never do
        for r in range(h):
            nl_pos = lay.span_start + hires.offset + r * (w + 1) + w
            torch.testing.assert_close(s.inputs_embeds[nl_pos], newline)
        cells = torch.as_tensor(hires.positions(lay.span_start)).flatten()
        assert not torch.isclose(s.inputs_embeds[cells], newline).all(-1).any()
    # text positions hold the token embeddings
    n0 = len(tok.encode(pieces[0]))
    torch.testing.assert_close(s.inputs_embeds[:n0], llava.embed_tokens(tok.encode(pieces[0])))
    assert s.input_ids[:n0].tolist() == tok.encode(pieces[0])


def test_anyres_placeholder_ids_path(llava):
    tok = llava.tokenizer
    ids = tok.encode("the") + [IMAGE_PLACEHOLDER] + tok.encode("a cat")
    s = llava.prepare_ids(IMGS[:1], ids)
    assert s.layouts[0].span_start == 1
    assert s.input_ids[-2:].tolist() == tok.encode("a cat")


# ------------------------------------------------------------------- Qwen2-VL packing
@pytest.mark.parametrize("n_images", [1, 2])
def test_merged_layout_matches_splice(qwen, n_images):
    tok, tower = qwen.tokenizer, qwen.vision
    prompt = "<image> what is this" + (" <image> and this ?" if n_images == 2 else "")
    images = IMGS[:n_images]
    s = qwen.prepare(images, prompt)
    ids = s.input_ids.tolist()
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == tok.image_pad_id:
            j = i
            while j < len(ids) and ids[j] == tok.image_pad_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    assert len(runs) == n_images == len(s.layouts)
    feats = [f for f, _ in tower(images)]
    for k, (lay, (start, n)) in enumerate(zip(s.layouts, runs)):
        assert (lay.span_start, lay.span_length) == (start, n) == (start, feats[k].shape[0])
        assert ids[start - 1] == tok.vision_start_id and ids[start + n] == tok.vision_end_id
        pr, pc = tower.patch_grid(*images[k].shape[:2])
        assert lay.grids[0].name == "merged" and lay.grids[0].shape == (pr // 2, pc // 2)
        torch.testing.assert_close(s.inputs_embeds[start:start + n], feats[k])
    assert qwen.logit_shift == 1
    assert qwen.image_token_id == tok.image_pad_id


def test_merged_prepare_ids_preexpanded(qwen):
    tok = qwen.tokenizer
    n = qwen.vision(IMGS[:1])[0][0].shape[0]
    ids = tok.encode("the") + [tok.vision_start_id] + [tok.image_pad_id] * n + \
        [tok.vision_end_id] + tok.encode("cat")
    s = qwen.prepare_ids(IMGS[:1], ids)
    assert s.layouts[0].span_start == 2 and s.layouts[0].span_length == n
    with pytest.raises(ValueError, match="image-pad"):
        qwen.prepare_ids(IMGS[:1], ids[:3] + ids[4:])          # run one token short


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("images,prompt,match", [
    (IMGS[:1], "", "empty"),
    (IMGS[:1], "   ", "empty"),
    (IMGS[:1], "describe the image", "marker"),
    (IMGS[:1], "<image> and <image>", "marker"),
    ([], "<image> a cat", "marker"),
    ([np.zeros((8, 8), np.uint8)], "<image> a cat", "RGB"),
    ([np.zeros((8, 8, 4), np.uint8)], "<image> a cat", "RGB"),
    ([np.zeros((8, 8, 3), np.uint16)], "<image> a cat", "RGB"),
])
def test_bad_inputs_raise(llava, qwen, images, prompt, match):
    for ad in (llava, qwen):
        with pytest.raises(ValueError, match=match):
            ad.prepare(images, prompt)


def test_inconsistent_vision_info_raises(llava):
    orig = llava.vision

    def bad(images):
        return [(f, {"base": (4, 4), "hires": (2, 2)}) for f, _ in orig(images)]

    ad = GenericAdapter(llava.model, llava.tokenizer, mask_token_id=llava.mask_token_id,
                        placeholder_id=IMAGE_PLACEHOLDER, vision=bad, layout="anyres")
    with pytest.raises(ValueError, match="does not match"):
        ad.prepare(IMGS[:1], "<image> a cat")


# ------------------------------------------------------------------- forward
@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_forward_is_inner_and_logits_shape(request, which):
    ad = request.getfixturevalue(which)
    s = ad.prepare(IMGS[:1], "<image> a red cat")

    def training_forward(*a, **k):
        raise AssertionError("the training forward must never be called")

    ad.model.forward = training_forward
    try:
        with torch.no_grad():
            logits = ad.forward(s.inputs_embeds[None])
        assert logits.shape == (1, s.prompt_length, len(ad.tokenizer))
        res = ad.generate(s, GenerationConfig(steps=4, gen_length=4))
        assert res.response_ids.shape == (4,) and res.masked.shape == (5, 4)
    finally:
        del ad.model.forward
    assert len(ad.blocks()) == 4 and ad.default_layer == 1


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_bidirectional(request, which):
    """transformers >= 5.5 with config.is_causal=False: position 0 sees the last token."""
    ad = request.getfixturevalue(which)
    s = ad.prepare(IMGS[:1], "<image> a red cat on the box")
    e = s.inputs_embeds.clone()
    e2 = e.clone()
    e2[-1] += 1.0
    with torch.no_grad():
        d = (ad.forward(e[None])[0, 0] - ad.forward(e2[None])[0, 0]).abs().max()
        assert d > 1e-5
        ad.model.config.is_causal = True
        try:
            dc = (ad.forward(e[None])[0, 0] - ad.forward(e2[None])[0, 0]).abs().max()
        finally:
            ad.model.config.is_causal = False
    assert dc == 0


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_generation_deterministic(request, which):
    ad = request.getfixturevalue(which)
    s = ad.prepare(IMGS[:1], "<image> describe the image")
    cfg = GenerationConfig(steps=4, gen_length=4, block_length=2, temperature=0.7, seed=3)
    a, b = ad.generate(s, cfg), ad.generate(s, cfg)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.masked, b.masked)
    assert a.masked[0].all() and not a.masked[-1].any()


@pytest.mark.parametrize("which,grid", [("llava", "hires"), ("qwen", "merged")])
def test_feature_hook_plants_marker(request, which, grid):
    ad = request.getfixturevalue(which)
    images = IMGS[:2]
    prompt = "<image> a <image> cat"
    lay = ad.prepare(images, prompt).layouts[1]
    g = lay.grid(grid)
    k = int(g.positions(0)[g.rows - 1, g.cols - 1])       # span-relative, newlines skipped

    def hook(i, f):
        if i == 1:
            f = f.clone()
            f[k] = 7.0
        return f

    ad.vision.feature_hook = hook
    try:
        s = ad.prepare(images, prompt)
    finally:
        ad.vision.feature_hook = None
    pos = int(g.positions(lay.span_start)[g.rows - 1, g.cols - 1])
    hits = (s.inputs_embeds == 7.0).all(-1).nonzero().flatten().tolist()
    assert hits == [pos]


# ------------------------------------------------------------------- custom models
class _TupleBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return (x + torch.tanh(self.lin(x)), None)


class _Inner(torch.nn.Module):
    def __init__(self, vocab, d, n):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(_TupleBlock(d) for _ in range(n))

    def forward(self, inputs_embeds=None, attention_mask=None):
        x = inputs_embeds
        for b in self.blocks:
            x = b(x)[0]
        return (x,)


class _Outer(torch.nn.Module):
    def __init__(self, vocab=66, d=8, n=3):
        super().__init__()
        self.net = _Inner(vocab, d, n)
        self.head = torch.nn.Linear(d, vocab)

    def get_input_embeddings(self):
        return self.net.wte

    def forward(self, *a, **k):
        raise AssertionError("training forward")


def test_custom_model_tuple_blocks_single_and_callable_layout():
    torch.manual_seed(0)
    tok = WordTokenizer()
    model = _Outer(len(tok))

    def vision(images):
        return [(torch.randn(6, 8), {"grid": (2, 3)}) for _ in images]

    for layout in ("single", lambda start, info, i: single_grid_layout(start, *info["grid"],
                                                                        image_index=i)):
        ad = load(model, tokenizer=tok, blocks="net.blocks", inner="net", lm_head="head",
                  mask_token_id=tok.mask_token_id, image_token_id=tok.image_pad_id,
                  vision=vision, layout=layout)
        assert isinstance(ad, GenericAdapter) and "use_cache" not in ad.forward_kwargs
        s = ad.prepare(IMGS[:1], "a <image> cat")
        assert s.layouts[0].span_start == 1 and s.layouts[0].grids[0].shape == (2, 3)
        assert ad.forward(s.inputs_embeds[None]).shape == (1, 8, len(tok))
        assert len(ad.blocks()) == 3
        res = ad.generate(s, GenerationConfig(steps=2, gen_length=4))
        assert not res.masked[-1].any()


def test_load_dispatch(llava):
    assert load(llava) is llava
    with pytest.raises(TypeError):
        load(llava, blocks="x")
    with pytest.raises(TypeError, match="other arguments"):
        load(llava, "some/path")
    with pytest.raises(ValueError, match="unknown"):
        load("gpt-2")
    with pytest.raises(TypeError, match="tokenizer"):
        load(llava.model)
    with pytest.raises(AttributeError, match="no attribute path"):
        load(llava.model, tokenizer=llava.tokenizer, mask_token_id=2, blocks="model.blocks",
             placeholder_id=-200, vision=llava.vision)
    assert isinstance(llava, Adapter)


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_batched_generation_matches_single(request, which):
    from diffcam.generation import masked_diffusion_generate_batch

    ad = request.getfixturevalue(which)
    samples = [ad.prepare([_img(32, 32, k)], "<image> describe the image") for k in (5, 6)]
    cfg = GenerationConfig(steps=4, gen_length=4, block_length=2)
    batch = masked_diffusion_generate_batch(ad, samples, cfg)
    for s, rb in zip(samples, batch):
        r1 = ad.generate(s, cfg)
        assert torch.equal(r1.response_ids, rb.response_ids) and torch.equal(r1.masked, rb.masked)


def test_extras_fn_reaches_the_inner_forward(llava):
    seen = []

    def extras_fn(sample, total):
        seen.append(total)
        return {"position_ids": torch.arange(total)[None]}

    ad = GenericAdapter(llava.model, llava.tokenizer, mask_token_id=llava.mask_token_id,
                        placeholder_id=IMAGE_PLACEHOLDER, vision=llava.vision, extras_fn=extras_fn)
    s = ad.prepare(IMGS[:1], "<image> a cat")
    res = ad.generate(s, GenerationConfig(steps=2, gen_length=2))
    assert seen == [s.prompt_length + 2] and not res.masked[-1].any()
