"""The baselines of method.md section 4 (LLaVA-CAM and the Token Activation Map) against slow
float64 computations written from the spec, on the tiny in-process models."""

import numpy as np
import pytest
import torch

from diffcam import Explainer
from diffcam.baselines import eci, llava_cam, mlp_input_norm
from diffcam.refine import reference
from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl
from fakes import FakeAdapter

PROMPT = " describe the red car in the image"
ANSWER = "a red car and a red ball on the grass"
TARGETS = [[1], [2], [5], [1, 2]]           # red, car, red (again), "red car"


@pytest.fixture(scope="module", params=["anyres", "qwen2vl"])
def adapter(request):
    return tiny_llava_anyres(seed=1) if request.param == "anyres" else tiny_qwen2vl(seed=1)


def _prompt(ad):
    return ad.image_marker + PROMPT


def _full_logits(ad, img, requires_grad=False, hook_module=None):
    """Logits (L, V) of [prompt | ANSWER] by a plain forward (no diffcam hook), the prepared
    sample, the answer ids and, with ``hook_module``, that module's output (in the graph)."""
    sample = ad.prepare([img], _prompt(ad))
    ids = torch.tensor(ad.tokenizer.encode(ANSWER))
    x = torch.cat([sample.inputs_embeds.detach(), ad.embed_tokens(ids).detach()])[None]
    L = x.shape[1]
    store = {}
    h = None
    if hook_module is not None:
        h = hook_module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(requires_grad)
            z = ad.forward(x, None, ad.extend_extras(sample, L))[0]
    finally:
        if h is not None:
            h.remove()
    return z, sample, ids, store.get("a")


# ------------------------------------------------------------------------------ LLaVA-CAM
def _llava_ref(a, g, threshold=0.5):
    a, g = a.astype(np.float64), g.astype(np.float64)
    w = np.maximum(g, 0).mean(axis=(0, 1))
    m = np.maximum((a * w).mean(-1), 0)
    m = m / (m.max() + 1e-8)
    if threshold is not None:
        m = np.where(m >= threshold, m, 0.0)
    return m


@pytest.mark.parametrize("threshold", [0.5, 0.2, None])
def test_llava_cam_formula_random(threshold):
    rng = np.random.default_rng(0)
    for h, w, d in [(1, 1, 3), (3, 5, 8), (12, 12, 16)]:
        A = rng.normal(size=(h, w, d))
        G = rng.normal(size=(4, h, w, d))            # one gradient per target, broadcast on A
        out = llava_cam(torch.tensor(A), torch.tensor(G), threshold=threshold).numpy()
        assert out.shape == (4, h, w)
        for k in range(4):
            np.testing.assert_allclose(out[k], _llava_ref(A, G[k], threshold), atol=1e-6)
        assert out.min() >= 0 and out.max() <= 1


def test_llava_cam_adversarial():
    A = torch.ones(3, 3, 4)
    assert float(llava_cam(A, -torch.ones(3, 3, 4)).abs().max()) == 0   # no positive gradient
    assert float(llava_cam(-A, torch.ones(3, 3, 4)).abs().max()) == 0   # negative activations
    A = torch.zeros(2, 2, 2)
    A[0, 0] = 1.0
    A[1, 1] = 0.4
    m = llava_cam(A, torch.ones(2, 2, 2))
    # the peak is 1, 0.4 falls under the threshold and is zeroed; nothing is NaN
    assert m.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    m = llava_cam(A, torch.ones(2, 2, 2), threshold=None)
    assert abs(float(m[1, 1]) - 0.4) < 1e-6
    with pytest.raises(ValueError, match="threshold"):
        llava_cam(A, A, threshold=1.5)


def test_mlp_input_norm_names():
    llama_block = tiny_llava_anyres(seed=0).blocks()[0]
    name, mod = mlp_input_norm(llama_block)
    assert name == "post_attention_layernorm" and mod is llama_block.post_attention_layernorm

    class GemmaLike(torch.nn.Module):     # both norms: the MLP's input is pre_feedforward
        def __init__(self):
            super().__init__()
            self.post_attention_layernorm = torch.nn.LayerNorm(4)
            self.pre_feedforward_layernorm = torch.nn.LayerNorm(4)

    g = GemmaLike()
    assert mlp_input_norm(g) == ("pre_feedforward_layernorm", g.pre_feedforward_layernorm)
    assert mlp_input_norm(g, "post_attention_layernorm")[1] is g.post_attention_layernorm
    with pytest.raises(ValueError, match="no module 'nope'"):
        mlp_input_norm(g, "nope")
    with pytest.raises(ValueError, match="llava_cam_norm"):
        mlp_input_norm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("layer", [1, 2])   # (at block 0 the tiny Qwen2 maps are all zero)
def test_llava_cam_equals_hand_computation(adapter, img, layer):
    """method="llava-cam" equals LLaVA-CAM computed by hand: the norm's output captured by a
    plain hook inside a full-graph forward, its gradients by autograd, the formula in float64."""
    ad = adapter
    norm = ad.blocks()[layer].post_attention_layernorm
    z, sample, ids, A = _full_logits(ad, img, requires_grad=True, hook_module=norm)
    P, shift = sample.prompt_length, ad.logit_shift
    scores = [sum(z[P + j - shift, ids[j]] for j in t) for t in TARGETS]
    scores.append(sum(scores))
    want = {g.name: [] for lay in sample.layouts for g in lay.grids}
    for s in scores:
        (G,) = torch.autograd.grad(s, A, retain_graph=True)
        for lay in sample.layouts:
            for g in lay.grids:
                pos = torch.as_tensor(g.positions(lay.span_start))
                want[g.name].append(_llava_ref(A[0, pos].detach().numpy(),
                                               G[0, pos].numpy()))
    with Explainer(ad, layer=layer) as ex:
        e = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="llava-cam")
    assert e.settings["method"] == "llava-cam"
    for name, maps in want.items():
        got = e.maps[0][name][:, 0]
        assert got.shape == (len(TARGETS) + 1,) + maps[0].shape
        np.testing.assert_allclose(got, np.stack(maps), atol=2e-5)
    assert any(e.maps[0][n].max() > 0 for n in want)        # not trivially all zero
    assert not norm._forward_hooks and not ad.blocks()[layer]._forward_hooks


def test_llava_cam_threshold_setting_and_errors(img):
    ad = tiny_llava_anyres(seed=1)
    with Explainer(ad, layer=1, llava_cam_threshold=None) as ex:
        full = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="llava-cam")
    Explainer(ad, llava_cam_threshold=np.float32(0.25))          # numpy scalars are fine
    with Explainer(ad, layer=1) as ex:
        cut = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="llava-cam")
    for name in full.maps[0]:
        f, c = full.maps[0][name], cut.maps[0][name]
        np.testing.assert_allclose(c, np.where(f >= 0.5, f, 0), atol=1e-6)
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="llava_cam_threshold"):
            Explainer(ad, llava_cam_threshold=bad)
    # a block without the norm fails before anything is generated, naming the way out
    fake = FakeAdapter(seed=0)
    with Explainer(fake, layer=0) as ex:
        with pytest.raises(ValueError, match="llava_cam_norm"):
            ex.explain(img, "p", method="llava-cam")
    with Explainer(ad, layer=1, llava_cam_norm="input_layernorm") as ex:
        e = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="llava-cam")
    assert not any(np.allclose(e.maps[0][n], cut.maps[0][n]) for n in e.maps[0])


# ------------------------------------------------------------------------------ TAM
def test_eci_least_squares():
    rng = np.random.default_rng(3)
    I = rng.random(20)
    r = rng.normal(size=20)
    r -= r @ I / (I @ I) * I                     # residual orthogonal to the interference
    A = 2.5 * I + r
    out, lam = eci(torch.tensor(A), torch.tensor(np.stack([I, 3 * I])),
                   torch.tensor([1.0, 1.0]))
    # I_hat = (I + 3 I) / 2 = 2 I, so lambda = 2.5 / 2
    assert abs(float(lam) - 1.25) < 1e-9
    np.testing.assert_allclose(out.numpy(), np.maximum(r, 0), atol=1e-12)
    # negative weights are clipped: only the second map counts
    out, lam = eci(torch.tensor(A), torch.tensor(np.stack([rng.random(20), I])),
                   torch.tensor([-4.0, 2.0]))
    assert abs(float(lam) - 2.5) < 1e-9
    # no context, or weights all <= 0: A unchanged (clipped), lambda 0, no NaN
    for ctx, w in [(np.zeros((0, 20)), np.zeros(0)), (np.stack([I]), np.array([-1.0]))]:
        out, lam = eci(torch.tensor(A), torch.tensor(ctx), torch.tensor(w))
        assert float(lam) == 0 and np.allclose(out.numpy(), np.maximum(A, 0))


def _tam_ref(ad, img, groups, k=3):
    """TAM from the spec in float64 NumPy, on a plain forward's logits."""
    z, sample, ids, _ = _full_logits(ad, img)
    Z = z.detach().double().numpy()
    P = sample.prompt_length
    ids = ids.tolist()
    seq = sample.input_ids.tolist() + ids
    special = set(ad.tokenizer.all_special_ids) | {ad.mask_token_id}
    in_span = np.zeros(len(seq), bool)
    for lay in sample.layouts:
        in_span[lay.span_start:lay.span_end] = True
    ctx = [q for q, t in enumerate(seq) if not in_span[q] and t >= 0 and t not in special
           and t != ad.image_token_id]
    strings = ad.tokenizer.convert_ids_to_tokens(seq[q] for q in ctx)
    img_pos = np.unique(np.concatenate([g.positions(lay.span_start).ravel()
                                        for lay in sample.layouts for g in lay.grids]))
    tok_str = ad.tokenizer.convert_ids_to_tokens(ids)

    def token(j):
        p, c = P + j, ids[j]
        A = np.maximum(Z[img_pos, c], 0)
        before = [n for n, q in enumerate(ctx) if q < p]
        other = [n for n in before if strings[n] != tok_str[j]]
        if other:
            w = np.maximum(np.array([Z[ctx[n], c] for n in other]), 0)
            if w.sum() > 0:
                w = w / w.sum()
                I = sum(wn * np.maximum(Z[img_pos, seq[ctx[n]]], 0) for wn, n in zip(w, other))
                if I @ I > 0:
                    A = np.maximum(A - (A @ I) / (I @ I) * I, 0)
        text = {ctx[n]: max(Z[ctx[n], c], 0.0) for n in before}
        return A, text

    out = {g.name: [] for lay in sample.layouts for g in lay.grids}
    for grp in groups:
        A = 0
        text = {}
        for j in grp:
            a, t = token(j)
            A = A + a
            for q, v in t.items():
                text[q] = text.get(q, 0.0) + v
        vals = np.concatenate([A, list(text.values())])
        A = (A - vals.min()) / (vals.max() - vals.min() + 1e-8)
        for lay in sample.layouts:
            for g in lay.grids:
                m = A[np.searchsorted(img_pos, g.positions(lay.span_start))]
                out[g.name].append(m if k is None else reference.rank_gaussian_filter_2d(m, k))
    return {n: np.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("k", [3, None])
def test_tam_equals_hand_computation(adapter, img, k):
    ad = adapter
    with Explainer(ad, tam_kernel=k) as ex:
        e = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="tam")
    # the aggregate adds every target's tokens, a token of two targets twice (as the gradient
    # methods' aggregate score, the sum of the target scores, does)
    groups = TARGETS + [[j for t in TARGETS for j in t]]
    want = _tam_ref(ad, img, groups, k)
    for name, w in want.items():
        got = e.maps[0][name][:, 0]
        np.testing.assert_allclose(got, w, atol=1e-5)
        assert got.min() >= 0 and got.max() <= 1 + 1e-6
    assert e.settings["method"] == "tam" and e.settings["backward"] is None
    # ECI matters here: the same maps without it differ (the test would notice its loss)
    assert not all(np.allclose(e.maps[0][n][:, 0], _tam_no_eci(ad, img, groups, k)[n],
                               atol=1e-5) for n in want)


def _tam_no_eci(ad, img, groups, k):
    import diffcam.baselines.tam as tam

    real = tam.eci
    tam.eci = lambda A, ctx, w: (torch.relu(A), A.new_zeros(()))
    try:
        with Explainer(ad, tam_kernel=k) as ex:
            e = ex.explain(img, _prompt(ad), targets=TARGETS, answer=ANSWER, method="tam")
    finally:
        tam.eci = real
    return {n: v[:, 0] for n, v in e.maps[0].items()}


def test_tam_batch_states_and_aggregate_only(img, img2):
    ad = tiny_llava_anyres(seed=2)
    p = _prompt(ad)
    with Explainer(ad) as ex:
        one = [ex.explain(im, p, method="tam", targets="all") for im in (img, img2)]
        both = ex.explain([img, img2], p, method="tam", targets="all")
        traj = ex.explain(img, p, method="tam", targets="all", states=("final", 0, 4))
        agg = ex.explain(img, p, method="tam", targets="all", aggregate_only=True)
    for a, b in zip(one, both):
        assert a.answer == b.answer
        for n in a.maps[0]:
            np.testing.assert_allclose(a.maps[0][n], b.maps[0][n], atol=1e-6)
    steps = traj.settings["generation"]["steps"]
    assert traj.maps[0]["hires"].shape[1] == 3
    for n in traj.maps[0]:
        np.testing.assert_allclose(traj.maps[0][n][:, 0], one[0].maps[0][n][:, 0], atol=1e-6)
        # step 0 re-masks the whole answer: the context is the prompt only, so maps differ
        assert not np.allclose(traj.maps[0][n][:, 1], traj.maps[0][n][:, 0])
        np.testing.assert_allclose(agg.maps[0][n][:, 0], one[0].maps[0][n][-1:, 0], atol=1e-6)
    assert steps >= 4
    with Explainer(ad) as ex:
        last = ex.explain(img, p, method="tam", targets="all", states=(steps,))
    for n in last.maps[0]:
        np.testing.assert_allclose(last.maps[0][n][:, 0], one[0].maps[0][n][:, 0], atol=1e-6)


def test_tam_kernel_validation():
    ad = tiny_llava_anyres(seed=0)
    for bad in (2, 1, 33, 3.0, True):
        with pytest.raises(ValueError, match="tam_kernel"):
            Explainer(ad, tam_kernel=bad)


def test_tam_refuses_zero_logits_at_the_image(img):
    """An adapter whose forward scores the response only (zero rows elsewhere) and has no
    lens_logits: TAM says so instead of returning empty maps."""
    ad = tiny_llava_anyres(seed=0)
    real = ad.forward

    def response_only(embeds, attn=None, extras=None):
        z = real(embeds, attn, extras)
        z = z.clone()
        z[:, :-len(ANSWER.split())] = 0
        return z

    ad.forward = response_only
    with Explainer(ad) as ex:
        with pytest.raises(RuntimeError, match="lens_logits"):
            ex.explain(img, _prompt(ad), targets="all", answer=ANSWER, method="tam")
    # a lens_logits method is what TAM reads
    ad.lens_logits = real
    with Explainer(ad) as ex:
        e = ex.explain(img, _prompt(ad), targets="all", answer=ANSWER, method="tam")
    assert max(m.max() for m in e.maps[0].values()) > 0


def test_llava_cam_chunks_batches_and_states(img, img2):
    """LLaVA-CAM goes through the same pass as Grad-CAM: backward chunks, a batch of images and
    trajectory states give the maps of the plain call."""
    ad = tiny_llava_anyres(seed=4)
    p = _prompt(ad)
    with Explainer(ad, layer=1) as ex:
        one = [ex.explain(im, p, method="llava-cam", targets="all") for im in (img, img2)]
        both = ex.explain([img, img2], p, method="llava-cam", targets="all")
        steps = one[0].settings["generation"]["steps"]
        traj = ex.explain(img, p, method="llava-cam", targets="all", states=("final", steps))
    with Explainer(ad, layer=1, backward_chunk=2) as ex:
        chunked = ex.explain(img, p, method="llava-cam", targets="all")
    for n in one[0].maps[0]:
        for a, b in zip(one, both):
            np.testing.assert_allclose(a.maps[0][n], b.maps[0][n], atol=1e-5)
        np.testing.assert_allclose(chunked.maps[0][n], one[0].maps[0][n], atol=1e-5)
        np.testing.assert_allclose(traj.maps[0][n][:, 1], one[0].maps[0][n][:, 0], atol=1e-5)
        np.testing.assert_allclose(traj.maps[0][n][:, 0], one[0].maps[0][n][:, 0], atol=1e-5)
