"""The raw map equals a Grad-CAM computed by hand (autograd by hand) on the small fake model."""

import numpy as np
import pytest
import torch

from diffcam.attribution import Explainer, grad_cam, minmax
from fakes import FakeAdapter


def hand_cam(ad, img, layer, token_sets, score="logit", contrast=None, variant="paper"):
    sample = ad.prepare([img], "p")
    ids = torch.tensor(ad.answer)
    P = sample.prompt_length
    x = torch.cat([sample.inputs_embeds, ad.model.emb(ids)])[None]
    with torch.no_grad():
        for blk in ad.model.blocks[:layer + 1]:
            x = blk(x)[0]
    A = x.detach().requires_grad_(True)
    y = A
    for blk in ad.model.blocks[layer + 1:]:
        y = blk(y)[0]
    logits = ad.model.head(y)[0]
    lay = sample.layouts[0]
    out = []
    scores = []
    for toks in token_sets:
        s = 0
        for j in toks:
            z = logits[P + j]
            if score == "logprob":
                z = torch.log_softmax(z, -1)
            s = s + z[ids[j]] - (z[contrast] if contrast is not None else 0)
        scores.append(s)
    scores.append(sum(scores))
    a = A[0, lay.span_start:lay.span_start + 12].reshape(3, 4, -1).detach()
    for s in scores:
        (g,) = torch.autograd.grad(s, A, retain_graph=True)
        g = g[0, lay.span_start:lay.span_start + 12].reshape(3, 4, -1)
        if variant == "paper":
            w = g.mean((0, 1))
            m = torch.relu((a * w).sum(-1))
        else:
            w = g.clamp_min(0).mean((0, 1))
            m = torch.relu(a * w).mean(-1)
        m = (m - m.min()) / (m.max() - m.min() + 1e-8)
        out.append(m.numpy())
    return np.stack(out)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("score,contrast,variant", [("logit", None, "paper"),
                                                     ("logprob", 3, "paper"),
                                                     ("logit", None, "reference")])
def test_raw_map_equals_hand_gradcam(img, layer, score, contrast, variant):
    ad = FakeAdapter(seed=3)
    with Explainer(ad, layer=layer) as ex:
        e = ex.explain(img, "p", targets=[[0], [1, 2]], score=score, contrast=contrast,
                       gradcam=variant)
    want = hand_cam(ad, img, layer, [[0], [1, 2]], score, contrast, variant)
    got = e.maps[0]["base"][:, 0]
    assert got.shape == (3, 3, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(e.map(None), want[-1], atol=2e-5)
    np.testing.assert_allclose(e.map(1), want[1], atol=2e-5)


def test_grad_cam_function_by_hand():
    A = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[3.0, -1.0], [1.0, 1.0]]])   # (2, 2, D=2)
    G = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[-1.0, 2.0], [3.0, 0.0]]])
    w = np.array([1.0, 1.0])                                                 # means of G
    raw = np.maximum(np.einsum("ijc,c->ij", A.numpy(), w), 0)
    want = (raw - raw.min()) / (raw.max() - raw.min() + 1e-8)
    np.testing.assert_allclose(grad_cam(A, G).numpy(), want, atol=1e-6)
    wr = np.clip(G.numpy(), 0, None).mean((0, 1))
    rawr = np.maximum(A.numpy() * wr, 0).mean(-1)
    np.testing.assert_allclose(grad_cam(A, G, "reference").numpy(),
                               (rawr - rawr.min()) / (rawr.max() - rawr.min() + 1e-8), atol=1e-6)
    # a constant map min-maxes to 0, not NaN
    assert torch.all(minmax(torch.ones(1, 3, 3)) == 0)
