"""diffcam.attribution.fastvjp: the hand-written batched backward against autograd."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, Qwen2Config                          # noqa: E402
from transformers.models.llama.modeling_llama import (                     # noqa: E402
    LlamaDecoderLayer, LlamaRotaryEmbedding)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer     # noqa: E402

from diffcam.attribution import Explainer, fastvjp                       # noqa: E402
from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl              # noqa: E402

PROMPT = "<image> describe the image"


def _layer(kind, heads=4, kv=2, hidden=32, impl="eager", seed=0):
    cls, Layer = {"llama": (LlamaConfig, LlamaDecoderLayer),
                  "qwen2": (Qwen2Config, Qwen2DecoderLayer)}[kind]
    cfg = cls(hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads,
              num_key_value_heads=kv, max_position_embeddings=256, attn_implementation=impl)
    torch.manual_seed(seed)
    layer = Layer(cfg, layer_idx=0).eval()
    with torch.no_grad():       # non-trivial norm weights and biases
        for n, p in layer.named_parameters():
            if n.endswith("layernorm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return layer, cfg


def _inputs(cfg, B, L, mask_kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, cfg.hidden_size, generator=g)
    pos = torch.arange(L)[None].expand(B, L)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)
    if mask_kind is None:
        return x, None, cos, sin
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[-1, L - 3:] = False                       # padding at the end of the last row
    allowed = keep[:, None, None, :].expand(B, 1, L, L)
    if mask_kind == "causal":
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if mask_kind == "bool":
        return x, allowed, cos, sin
    add = torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return x, add, cos, sin


def _autograd(layer, x, mask, cos, sin, G):
    x = x.clone().requires_grad_(True)
    y = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
    y = y[0] if isinstance(y, tuple) else y
    return y.detach(), torch.autograd.grad(y, x, G, is_grads_batched=True)[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", [None, "additive", "causal", "bool", "sdpa-none"])
def test_block_forward_and_vjp_equal_autograd(kind, heads, kv, mask_kind):
    # boolean masks are what the sdpa implementation receives (eager gets additive ones);
    # sdpa without a mask is causal (torch's is_causal), eager without a mask is not
    sdpa = mask_kind in ("bool", "sdpa-none")
    layer, cfg = _layer(kind, heads, kv, impl="sdpa" if sdpa else "eager")
    B, L, K = 2, 11, 5
    x, mask, cos, sin = _inputs(cfg, B, L, None if mask_kind == "sdpa-none" else mask_kind)
    G = torch.randn(K, B, L, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    y_ref, g_ref = _autograd(layer, x, mask, cos, sin, G)
    with torch.no_grad():
        y, saved = fastvjp.block_forward(layer, x, mask, cos, sin)
        g = fastvjp.block_vjp(layer, saved, G)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sparse_rows_equal_dense(kind):
    """A gradient that lives on a few rows (each vector on its own row, as the scores' are) gives
    the same result through the row-restricted path as through the dense one and autograd."""
    layer, cfg = _layer(kind, 4, 2)
    B, L, K = 2, 13, 4
    x, mask, cos, sin = _inputs(cfg, B, L, "additive")
    G = torch.zeros(K, B, L, cfg.hidden_size)
    rows = torch.tensor([1, 4, 7, 12])
    gen = torch.Generator().manual_seed(3)
    for k, r in enumerate(rows):
        G[k, :, r] = torch.randn(B, cfg.hidden_size, generator=gen)
    _, g_ref = _autograd(layer, x, mask, cos, sin, G)
    with torch.no_grad():
        _, saved = fastvjp.block_forward(layer, x, mask, cos, sin)
        dense = fastvjp.block_vjp(layer, saved, G)
        sparse = fastvjp.block_vjp(layer, saved, G, rows)
        # the rows argument may list rows where G is zero too (a superset is allowed)
        superset = fastvjp.block_vjp(layer, saved, G, torch.tensor([0, 1, 4, 7, 9, 12]))
        # the top block's way: the row-wise tensors kept for those rows only
        _, kept_sv = fastvjp.block_forward(layer, x, mask, cos, sin, keep_rows=rows)
        kept = fastvjp.block_vjp(layer, kept_sv, G)
        assert kept_sv["p"].shape[2] == len(rows) and kept_sv["gd"].shape[1] == len(rows)
        with pytest.raises(ValueError, match="rows differ"):
            fastvjp.block_vjp(layer, kept_sv, G, torch.tensor([1, 4]))
    tol = dict(rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
    for got in (dense, sparse, superset, kept):
        torch.testing.assert_close(got, g_ref, **tol)


def test_two_blocks_with_capture_equal_autograd():
    """BlockCapture + prepare + backward over two stacked blocks, as the Explainer uses them:
    the forward runs without a graph in the blocks and hands on a leaf."""
    l1, cfg = _layer("llama", 4, 2, seed=0)
    l2, _ = _layer("llama", 4, 2, seed=1)
    B, L, K = 1, 9, 3
    x, mask, cos, sin = _inputs(cfg, B, L, "additive")
    G = torch.randn(K, B, L, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    xr = x.clone().requires_grad_(True)
    y = l2(l1(xr, attention_mask=mask, position_embeddings=(cos, sin)),
           attention_mask=mask, position_embeddings=(cos, sin))
    ref = torch.autograd.grad(y, xr, G, is_grads_batched=True)[0]
    cap = fastvjp.BlockCapture([l1, l2])
    xin = x.clone().requires_grad_(True)
    with torch.enable_grad(), cap:
        out = l2(l1(xin, attention_mask=mask, position_embeddings=(cos, sin)),
                 attention_mask=mask, position_embeddings=(cos, sin))
        assert torch.is_grad_enabled()                  # restored after the last block
    assert out.requires_grad and out.grad_fn is None    # a fresh leaf: no graph in the blocks
    assert cap.records[-1]["y"] is out
    torch.testing.assert_close(out, y.detach())
    saved = fastvjp.prepare(cap)
    got = fastvjp.backward(cap, saved, G)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_capture_restores_grad_mode_when_the_forward_raises():
    l1, cfg = _layer("llama")
    x, mask, cos, sin = _inputs(cfg, 1, 5, None)

    def boom(module, args, kwargs, out):
        raise RuntimeError("boom")

    h = l1.mlp.register_forward_hook(boom, with_kwargs=True)
    try:
        with torch.enable_grad():
            with pytest.raises(RuntimeError, match="boom"):
                with fastvjp.BlockCapture([l1]):
                    l1(x, attention_mask=mask, position_embeddings=(cos, sin))
            assert torch.is_grad_enabled()
    finally:
        h.remove()
    assert not l1._forward_hooks and not l1._forward_pre_hooks


def test_prepare_rejects_a_block_it_does_not_reproduce(monkeypatch):
    l1, cfg = _layer("llama")
    x, mask, cos, sin = _inputs(cfg, 1, 6, None)
    cap = fastvjp.BlockCapture([l1])
    with torch.enable_grad(), cap:
        l1(x, attention_mask=mask, position_embeddings=(cos, sin))
    real = fastvjp.block_forward
    monkeypatch.setattr(fastvjp, "block_forward",
                        lambda *a: (real(*a)[0] * 1.01, real(*a)[1]))
    with pytest.raises(fastvjp.FastMismatch, match="differs from the real output"):
        fastvjp.prepare(cap)
    cap2 = fastvjp.BlockCapture([l1])                    # never ran
    with pytest.raises(fastvjp.FastMismatch, match="exactly once"):
        fastvjp.prepare(cap2)


def test_unsupported_blocks_are_named():
    layer, _ = _layer("llama")
    assert fastvjp.unsupported_reason(layer) is None
    assert "RMSNorm" in fastvjp.unsupported_reason(torch.nn.Linear(2, 2).eval())
    assert "not a torch module" in fastvjp.unsupported_reason(object())
    layer.train()
    assert "training" in fastvjp.unsupported_reason(layer)
    layer.eval()
    layer.self_attn.q_norm = torch.nn.LayerNorm(8)           # Qwen3 / OLMo style
    assert "q_norm" in fastvjp.unsupported_reason(layer)
    del layer.self_attn.q_norm
    layer.mlp.act_fn = torch.nn.GELU()
    assert "SiLU" in fastvjp.unsupported_reason(layer)


# ------------------------------------------------------------------ through the Explainer
@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
@pytest.mark.parametrize("score,contrast", [("logit", None), ("logprob", None),
                                            ("vocab_sum", None), ("logit", "dog")])
def test_explainer_fast_equals_autograd(factory, img, score, contrast):
    ad = factory(seed=0)
    img2 = img[::-1, ::-1].copy()
    kw = dict(answer=["a red cat sitting on the big box", "the dog"], targets="all",
              score=score, contrast=contrast)
    ex_f, ex_a = Explainer(ad), Explainer(ad, fast_backward=False)
    ef = ex_f.explain([img, img2], PROMPT, **kw)
    ea = ex_a.explain([img, img2], PROMPT, **kw)
    assert ex_f.last_backward == "fast" and ex_a.last_backward == "batched"
    assert ef[0].settings["backward"] == "fast"
    for a, b in zip(ef, ea):
        for g in a.maps[0]:
            np.testing.assert_allclose(a.maps[0][g], b.maps[0][g], atol=2e-5)


def test_explainer_fast_on_another_layer_and_trajectory(img):
    ad = tiny_llava_anyres(seed=1)
    for layer in (0, 2):
        kw = dict(targets="all", states=("final", 1, 3), layer=layer)
        ea = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
        ex = Explainer(ad)
        ef = ex.explain(img, PROMPT, **kw)
        assert ex.last_backward == "fast"
        assert ef.answer == ea.answer
        for g in ef.maps[0]:
            np.testing.assert_allclose(ef.maps[0][g], ea.maps[0][g], atol=2e-5)


def test_explainer_top_layer_uses_autograd(img):
    ad = tiny_llava_anyres(seed=0)
    ex = Explainer(ad, layer=-1)                    # no block above the hook
    ex.explain(img, PROMPT, answer="a red cat", targets="all")
    assert ex.last_backward == "batched" and "no block above" in ex._fast_off[3]


@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
def test_aggregate_map_takes_the_fast_path(factory, img):
    """One backward vector (aggregate_only) also goes through the hand-written backward (no
    autograd graph above the hook: 3-4 % faster, graph memory 0.33-0.39 of a whole-model
    backward instead of 0.52, bench/RESULTS.md) and gives autograd's map, also in a batch."""
    ad = factory(seed=0)
    kw = dict(answer=["a red cat on the box", "the dog"], targets="all", aggregate_only=True)
    img2 = img[::-1].copy()
    ex = Explainer(ad)
    for _ in range(2):                  # checked, then run in place of the blocks
        got = ex.explain([img, img2], PROMPT, **kw)
        assert ex.last_backward == "fast"
    ea = Explainer(ad, fast_backward=False)
    ref = ea.explain([img, img2], PROMPT, **kw)
    assert ea.last_backward == "loop"               # one vector: a plain backward
    for a, b in zip(got, ref):
        for g in b.maps[0]:
            assert a.maps[0][g].shape[0] == 1
            np.testing.assert_allclose(a.maps[0][g], b.maps[0][g], atol=2e-5)


def test_explainer_falls_back_when_the_check_fails(img, monkeypatch):
    """A model whose blocks the re-run does not reproduce gets autograd's maps, and the reason
    is kept so that later calls go to autograd directly."""
    ad = tiny_qwen2vl(seed=0)
    kw = dict(answer="a red cat on the box", targets="all")
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    real = fastvjp.block_forward
    monkeypatch.setattr(fastvjp, "block_forward", lambda *a: (real(*a)[0] + 0.1, real(*a)[1]))
    ex = Explainer(ad)
    got = ex.explain(img, PROMPT, **kw)
    assert ex.last_backward == "batched"
    assert "differs from the real output" in ex._fast_off[ex.layer]
    for g in got.maps[0]:
        np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=1e-6)
    calls = []
    monkeypatch.setattr(fastvjp, "prepare", lambda *a, **k: calls.append(1))
    ex.explain(img, PROMPT, **kw)
    assert not calls and ex.last_backward == "batched"


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_bundled_models_take_the_fast_path(kind):
    """The bundled diffusion model (bidirectional) and its causal twin (sdpa, no mask): the
    hand-written backward runs and gives autograd's maps."""
    import diffcam
    from diffcam.data import shapes

    ad = diffcam.load("bundled", kind=kind)
    sc = shapes.scene("test", 1)
    qa = shapes.question(sc, "describe")
    ex_f, ex_a = Explainer(ad), Explainer(ad, fast_backward=False)
    ef = ex_f.explain(sc.image, qa.prompt, targets="all", answer=qa.answer)
    ea = ex_a.explain(sc.image, qa.prompt, targets="all", answer=qa.answer)
    assert ex_f.last_backward == "fast", ex_f._fast_off
    # the truth: autograd on a float64 copy; both float32 backwards round (up to 3e-5 here,
    # a Grad-CAM sum with cancellation), the hand-written one no worse than autograd
    ad.model.double()
    e64 = Explainer(ad, fast_backward=False).explain(sc.image, qa.prompt, targets="all",
                                                      answer=qa.answer)
    for g in ef.maps[0]:
        err_f = np.abs(ef.maps[0][g] - e64.maps[0][g]).max()
        err_a = np.abs(ea.maps[0][g] - e64.maps[0][g]).max()
        assert err_f < 1e-4 and err_f <= 4 * err_a + 1e-5, (g, err_f, err_a)


def test_top_gradients_from_one_backward_are_checked(img, monkeypatch):
    """The K top-block gradients come from one backward of the token scores when the final norm
    and head work row by row (checked against vmapped vectors on the first call per layer).
    A model whose final norm mixes rows fails the check and keeps the vmapped vectors: its maps
    still equal autograd's."""
    ad = tiny_llava_anyres(seed=0)
    kw = dict(answer="a red cat on the box", targets="all")
    ex = Explainer(ad)
    ex.explain(img, PROMPT, **kw)
    assert ex._rows_local == {ex.layer: True}

    norm = ad.model.model.norm
    real = norm.forward
    monkeypatch.setattr(norm, "forward", lambda h: real(h + 0.5 * h.mean(1, keepdim=True)))
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    ex = Explainer(ad)
    got = ex.explain(img, PROMPT, **kw)
    assert ex._rows_local == {ex.layer: False} and ex.last_backward == "fast"
    got2 = ex.explain(img, PROMPT, **kw)
    for g in ref.maps[0]:
        np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=2e-5)
        np.testing.assert_allclose(got2.maps[0][g], ref.maps[0][g], atol=2e-5)


@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
def test_bfloat16_model(factory, img):
    """A bfloat16 model: the hand-written backward (float32 inside) is no further from the
    float32 model's maps than autograd's bfloat16 backward (measured 0.043-0.058 against
    0.044-0.071)."""
    ad = factory(seed=0, dtype=torch.bfloat16)
    kw = dict(answer="a red cat on the box", targets="all")
    ex = Explainer(ad)
    ef = ex.explain(img, PROMPT, **kw)
    ea = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    e32 = Explainer(factory(seed=0), fast_backward=False).explain(img, PROMPT, **kw)
    assert ex.last_backward == "fast"
    assert ex._rows_local == {ex.layer: True}      # the one-backward top gradients, also here
    for g in ef.maps[0]:
        err_f = np.abs(ef.maps[0][g] - e32.maps[0][g]).max()
        err_a = np.abs(ea.maps[0][g] - e32.maps[0][g]).max()
        assert err_f <= 1.5 * err_a + 0.02, (g, err_f, err_a)


def test_fast_backward_argument_is_checked():
    with pytest.raises(ValueError, match="fast_backward"):
        Explainer(tiny_llava_anyres(seed=0), fast_backward="yes")


def test_no_hook_left_after_fast_calls(img):
    ad = tiny_llava_anyres(seed=0)
    with Explainer(ad) as ex:
        for _ in range(3):
            ex.explain(img, PROMPT, answer="a red cat", targets="all")
    assert ex.last_backward == "fast" and ex._fast_trusted[ex.layer]
    for b in ad.blocks():
        assert not b._forward_hooks and not b._forward_pre_hooks
        assert "forward" not in b.__dict__              # the in-place forward is undone
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------ the family twins
def _family_adapters():
    import diffcam
    from diffcam.testing.twins.lavida import build_lavida_twin
    from diffcam.testing.twins.llada_v import build_llada_v_twin

    out = {}
    tw = build_llada_v_twin(seed=0)
    out["llada-v"] = diffcam.load("llada-v", tw.model, **tw.load_kwargs())
    for backbone in ("llada", "dream"):
        tw = build_lavida_twin(backbone, seed=0)
        out[f"lavida-{backbone}"] = diffcam.load("lavida", tw.model, **tw.load_kwargs())
    try:
        from diffcam.testing.twins.dream_vl import dream_vl_twin
        model, proc = dream_vl_twin(seed=0)
        out["dream-vl"] = diffcam.load("dream-vl", model, processor=proc)
    except ImportError:            # pragma: no cover - the twin needs Qwen2-VL classes
        pass
    return out


def test_family_twins_per_token_maps(img):
    """The structural twins of the named families: blocks that are LLaMA/Qwen2 layers with
    another return type take the hand-written backward; Dream-VL's multimodal rotary tables
    (and any other block it cannot re-run) fall back to autograd with the reason kept.  The
    maps equal autograd's either way."""
    torch.manual_seed(0)
    seen = {}
    for name, ad in _family_adapters().items():
        kw = dict(answer="a red cat on the box", targets="all")
        ex = Explainer(ad)
        got = ex.explain(img, PROMPT, **kw)
        ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
        seen[name] = ex.last_backward
        for i, grids in enumerate(ref.maps):
            for g in grids:
                scale = float(np.abs(grids[g]).max())
                np.testing.assert_allclose(got.maps[i][g], grids[g],
                                           atol=3e-5 * max(scale, 1.0), err_msg=name)
    assert seen["llada-v"] == seen["lavida-llada"] == "fast"
    assert seen["lavida-dream"] == "fast"
    assert all(v in ("fast", "batched") for v in seen.values()), seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
def test_fast_backward_on_cuda(factory, img):
    """fast_backward=True on a GPU (off by default there, not yet measured): the same maps as
    autograd on the GPU and as the CPU."""
    ad = factory(seed=0)
    kw = dict(answer=["a red cat sitting on the big box", "the dog"], targets="all")
    cpu = Explainer(ad, fast_backward=False).explain([img, img[::-1].copy()], PROMPT, **kw)
    ad.model.cuda()
    ex_f, ex_a = Explainer(ad, fast_backward=True), Explainer(ad)
    ef = ex_f.explain([img, img[::-1].copy()], PROMPT, **kw)
    ea = ex_a.explain([img, img[::-1].copy()], PROMPT, **kw)
    assert ex_f.last_backward == "fast" and ex_a.last_backward == "batched"
    for f, a, c in zip(ef, ea, cpu):
        for g in f.maps[0]:
            np.testing.assert_allclose(f.maps[0][g], a.maps[0][g], atol=5e-5)
            np.testing.assert_allclose(f.maps[0][g], c.maps[0][g], atol=5e-5)


# ------------------------------------------------------------------ checked once per kind of call
def _count_real_calls(blocks):
    """Wrap each block's forward (an instance attribute, as a user's patch would be) to count
    the calls that reach the real block."""
    calls = [0] * len(blocks)
    for n, b in enumerate(blocks):
        real = b.forward

        def fwd(*a, _n=n, _real=real, **k):
            calls[_n] += 1
            return _real(*a, **k)
        b.forward = fwd
    return calls


@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
def test_checked_kind_of_call_runs_in_place_of_the_blocks(factory, img):
    """fast_check="once": the first call runs the real blocks above the hook and checks the
    re-run against them; later calls of the same kind run the re-implementation instead (the
    real blocks are not called) and still give autograd's maps.  "always" runs them every
    call."""
    ad = factory(seed=0)
    kw = dict(answer="a red cat on the box", targets="all")
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    ex = Explainer(ad)
    above = ad.blocks()[ex.layer + 1:]
    calls = _count_real_calls(above)
    outs = [ex.explain(img, PROMPT, **kw) for _ in range(3)]
    assert calls == [1] * len(above) and ex.last_backward == "fast"
    assert [len(d) for d in ex._fast_trusted[ex.layer]] == [1] * len(above)
    for got in outs:
        for g in ref.maps[0]:
            np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=2e-5)
    ex2 = Explainer(ad, fast_check="always")
    for _ in range(3):
        ex2.explain(img, PROMPT, **kw)
    assert calls == [4] * len(above) and ex2._fast_trusted == {}
    assert outs[0].settings["fast_check"] == "once"


def test_a_new_kind_of_call_is_checked_again(img):
    """A batch with padding hands the blocks an attention mask the single calls did not have:
    the real blocks run and are checked again, once; the maps stay autograd's."""
    ad = tiny_llava_anyres(seed=0)
    one = dict(answer="a red cat on the box", targets="all")
    two = dict(answer=["a red cat sitting on the big box", "the dog"], targets="all")
    img2 = img[::-1].copy()
    ex = Explainer(ad)
    calls = _count_real_calls(ad.blocks()[ex.layer + 1:])
    ex.explain(img, PROMPT, **one)
    ex.explain(img, PROMPT, **one)
    assert calls == [1, 1]
    got = [ex.explain([img, img2], PROMPT, **two) for _ in range(2)]
    assert calls == [2, 2] and ex.last_backward == "fast"
    assert [len(d) for d in ex._fast_trusted[ex.layer]] == [2, 2]
    ref = Explainer(ad, fast_backward=False).explain([img, img2], PROMPT, **two)
    for run in got:
        for a, b in zip(run, ref):
            for g in b.maps[0]:
                np.testing.assert_allclose(a.maps[0][g], b.maps[0][g], atol=2e-5)


def test_a_swapped_submodule_or_changed_weights_after_the_check(img):
    """The check vouches for the block's structure, not its numbers: weights changed in place
    are read afresh (no new check needed, maps follow the new weights), a replaced projection
    makes the next call a new kind (checked again)."""
    ad = tiny_qwen2vl(seed=0)
    kw = dict(answer="a red cat on the box", targets="all")
    ex = Explainer(ad)
    top = ad.blocks()[-1]
    calls = _count_real_calls(ad.blocks()[ex.layer + 1:])
    ex.explain(img, PROMPT, **kw)
    with torch.no_grad():
        top.self_attn.o_proj.weight.mul_(-1.5)
    got = ex.explain(img, PROMPT, **kw)
    assert calls == [1] * len(calls)                       # no new check
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    for g in ref.maps[0]:
        np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=2e-5)
    n = list(calls)
    lin = top.mlp.up_proj
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    torch.nn.init.normal_(new.weight, std=0.2, generator=torch.Generator().manual_seed(3))
    top.mlp.up_proj = new
    got = ex.explain(img, PROMPT, **kw)
    assert calls[-1] == n[-1] + 1 and ex.last_backward == "fast"
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    for g in ref.maps[0]:
        np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=2e-5)
    n = list(calls)
    top.self_attn.is_causal = not top.self_attn.is_causal        # a flag flipped: checked again
    ex.explain(img, PROMPT, **kw)
    ex.explain(img, PROMPT, **kw)
    assert calls[-1] == n[-1] + 1 and ex.last_backward == "fast"


def test_always_catches_what_once_trusts(img, monkeypatch):
    """What "once" gives up: a re-implementation that goes wrong after its kind was checked is
    not caught (here: block_forward patched to add 0.1 after the first call); "always" catches
    it on every call and falls back to autograd."""
    ad = tiny_qwen2vl(seed=0)
    kw = dict(answer="a red cat on the box", targets="all")
    ex = Explainer(ad, fast_check="always")
    ex.explain(img, PROMPT, **kw)
    real = fastvjp.block_forward
    monkeypatch.setattr(fastvjp, "block_forward",
                        lambda *a: (real(*a)[0] + 0.1, real(*a)[1]))
    ex.explain(img, PROMPT, **kw)
    assert ex.last_backward == "batched" and "differs" in ex._fast_off[ex.layer]


def test_fast_check_argument_is_checked():
    with pytest.raises(ValueError, match="fast_check"):
        Explainer(tiny_llava_anyres(seed=0), fast_check="never")


def test_blocks_restored_when_a_substituted_pass_raises(img):
    """An exception inside a forward whose blocks run the re-implementation leaves no patched
    forward, no hook and gradient mode as it was."""
    ad = tiny_llava_anyres(seed=0)
    ex = Explainer(ad)
    kw = dict(answer="a red cat", targets="all")
    ex.explain(img, PROMPT, **kw)
    top = ad.blocks()[-1]

    def boom(module, args, out):
        raise RuntimeError("boom")
    h = top.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        ex.explain(img, PROMPT, **kw)
    h.remove()
    for b in ad.blocks():
        assert "forward" not in b.__dict__
        assert not b._forward_hooks and not b._forward_pre_hooks
    assert torch.is_grad_enabled()
    got = ex.explain(img, PROMPT, **kw)
    ref = Explainer(ad, fast_backward=False).explain(img, PROMPT, **kw)
    for g in ref.maps[0]:
        np.testing.assert_allclose(got.maps[0][g], ref.maps[0][g], atol=2e-5)


@pytest.mark.parametrize("factory", [tiny_llava_anyres, tiny_qwen2vl])
def test_checked_once_over_a_random_sequence_of_calls(factory, img):
    """One Explainer through a random sequence of calls that change what the blocks above the
    hook see (batch size, padding, answer length, layer, per-token or aggregate maps): every
    call's maps equal autograd's, whether its kind was new (real blocks, checked) or already
    checked (re-implementation in place of the blocks)."""
    ad, ad_ref = factory(seed=2), factory(seed=2)
    rng = np.random.default_rng(5)
    words = "a red cat and the dog on big box near tree".split()
    imgs = [img, img[::-1].copy(), img[:, ::-1].copy()]
    ex = Explainer(ad)
    ref_ex = Explainer(ad_ref, fast_backward=False)
    calls = _count_real_calls(ad.blocks())
    kinds_seen = []
    for _ in range(8):
        n = int(rng.integers(1, 4))
        answers = [" ".join(rng.choice(words, int(rng.integers(1, 7)))) for _ in range(n)]
        kw = dict(answer=answers, targets="all", layer=int(rng.integers(0, 2)),
                  aggregate_only=bool(rng.random() < 0.3))
        got = ex.explain(imgs[:n], PROMPT, **kw)
        ref = ref_ex.explain(imgs[:n], PROMPT, **kw)
        assert ex.last_backward == "fast"
        for a, b in zip(got, ref):
            for g in b.maps[0]:
                np.testing.assert_allclose(a.maps[0][g], b.maps[0][g], atol=3e-5)
        kinds_seen.append(sum(len(d) for v in ex._fast_trusted.values() for d in v))
    assert kinds_seen[-1] >= 2                 # more than one kind of call was checked
    # the top block (above the hook at layers 0 and 1) ran for real once per kind checked
    # (per layer), and the other calls ran the re-implementation in its place
    checked = sum(len(v[-1]) for v in ex._fast_trusted.values())
    assert calls[-1] == checked < 8, (calls, checked)
