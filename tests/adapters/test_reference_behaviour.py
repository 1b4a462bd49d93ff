"""The released Diffusion-CAM reference code's packing, reproduced on the LaViDa twin
(``reference_quirks``), and how far it moves the maps (docs/reference_comparison.md).

* ``sheared_slice``: the high-resolution grid read as h*w contiguous tokens -- checked against a
  hand Grad-CAM over exactly that slice, and a marker drifts to the cell the shear predicts;
* ``unexpanded_positions``: target logits read at the targets' positions in the unexpanded id
  sequence -- checked against a hand Grad-CAM at those rows, which lie inside the image span.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5.5")

import diffcam                                                         # noqa: E402
from diffcam.adapters._llava_family import IMAGE_TOKEN_INDEX           # noqa: E402
from diffcam.attribution import Explainer                              # noqa: E402
from diffcam.testing.twins.lavida import build_lavida_twin, reference_comparison   # noqa: E402
from diffcam.testing.twins.llada_v import hand_gradcam                 # noqa: E402

PROMPT = "<image> describe the image"
ANSWER = "a red cat on the box"
IMG = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)   # 8x8 hires grid
W = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tw():
    return build_lavida_twin("llada", seed=0)


@pytest.fixture(scope="module")
def ads(tw):
    q = {"correct": (), "sheared": ("sheared_slice",), "unexpanded": ("unexpanded_positions",)}
    return {k: diffcam.load("lavida", tw.model, reference_quirks=v, **tw.load_kwargs())
            for k, v in q.items()}


def _by_hand(tw, positions, targets, unexpanded: bool, layer=2):
    """Hand Grad-CAM on the twin: the twin's own splice, plain autograd; target j scored at row
    P + j, or at its unexpanded position P0 + j (P0 = prompt length with one token per image)."""
    from PIL import Image
    tok, inner = tw.tokenizer, tw.model.model
    pre, post = tw.template(PROMPT).split("<image>")
    ids = tok.encode(pre) + [IMAGE_TOKEN_INDEX] + tok.encode(post)
    pix = tw.process_images([Image.fromarray(IMG)], tw.image_processor, tw.model.config)
    with torch.no_grad():
        emb = tw.model.prepare_inputs_labels_for_multimodal(
            torch.tensor([ids]), None, None, None, None, list(pix), image_sizes=[(40, 40)])[4]
    y = tok.encode(ANSWER)
    full = torch.cat([emb, inner.transformer.wte(torch.tensor(y))[None]], 1)
    start = len(ids) if unexpanded else emb.shape[1]
    pairs = [[(start + j, y[j]) for j in t] for t in targets]
    return hand_gradcam(inner.transformer.blocks[layer],
                        lambda x: inner(None, input_embeddings=x).logits, full, positions, pairs)


def test_sheared_slice_is_the_contiguous_slice(tw, ads):
    with Explainer(ads["sheared"], layer=2) as ex:
        e = ex.explain(IMG, PROMPT, answer=ANSWER, targets=[[1]])
    lay = e.layouts[0]
    g = lay.grid("hires")
    assert (g.rows, g.cols, g.row_stride, g.offset) == (8, 8, 8, 16)
    s0 = len(tw.tokenizer.encode(tw.template(PROMPT).split("<image>")[0]))
    assert lay.span_start == s0
    slice_ = s0 + 16 + np.arange(64).reshape(8, 8)       # 64 tokens after the 4x4 base grid
    want = _by_hand(tw, {"hires": slice_}, [[1]], unexpanded=False)
    np.testing.assert_allclose(e.maps[0]["hires"][:, 0], want["hires"], atol=2e-5)
    # the slice holds 7 newline tokens and misses the last 8 tokens of the real grid
    newlines = [(r, c) for r in range(8) for c in range(8) if (r * 8 + c) % 9 == 8]
    assert len(newlines) == 7


def _marker_cell(tw, ad, cell, sign):
    u = torch.randn(tw.model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def hook(i, name, grid):
        if name == "hires":
            grid = grid.clone()
            grid[cell] = grid[cell] + sign * 60.0 * u
        return grid

    tw.model.model.grid_hook = hook
    try:
        with Explainer(ad, layer=1) as ex:
            m = ex.explain(IMG, PROMPT, answer=ANSWER, targets=[[1]]).map(None, grid="hires")
    finally:
        tw.model.model.grid_hook = None
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))


def test_marker_drifts_where_the_shear_predicts(tw, ads):
    cell = (6, 5)
    flat = cell[0] * (W + 1) + cell[1]            # its offset in the hires span, newlines counted
    drifted = divmod(flat, W)                     # where the h*w contiguous reading puts it
    assert drifted == (7, 3)
    correct = [_marker_cell(tw, ads["correct"], cell, s) for s in (1.0, -1.0)]
    sheared = [_marker_cell(tw, ads["sheared"], cell, s) for s in (1.0, -1.0)]
    assert cell in correct and drifted in sheared and cell not in sheared


def test_unexpanded_positions_score_inside_the_image(tw, ads):
    targets = [[1], [3]]
    with Explainer(ads["unexpanded"], layer=2) as ex:
        e = ex.explain(IMG, PROMPT, answer=ANSWER, targets=targets)
    with Explainer(ads["correct"], layer=2) as ex:
        ok = ex.explain(IMG, PROMPT, answer=ANSWER, targets=targets)
    lay = e.layouts[0]
    pre, post = tw.template(PROMPT).split("<image>")
    P0 = len(tw.tokenizer.encode(pre)) + 1 + len(tw.tokenizer.encode(post))
    assert all(lay.span_start <= P0 + j < lay.span_end for t in targets for j in t)
    s0, g = lay.span_start, lay.grid("hires")
    positions = {"base": s0 + np.arange(16).reshape(4, 4),
                 "hires": s0 + 16 + np.arange(8)[:, None] * 9 + np.arange(8)[None]}
    want = _by_hand(tw, positions, targets, unexpanded=True)
    for name in ("base", "hires"):
        np.testing.assert_allclose(e.maps[0][name][:, 0], want[name], atol=2e-5)
    assert g.row_stride == 9                                   # the packing itself is correct
    assert np.abs(e.maps[0]["hires"] - ok.maps[0]["hires"]).max() > 0.1


def test_reference_maps_move_away_from_the_correct_ones():
    r = reference_comparison(cells=[(3, 2), (6, 5)], n_images=2)
    hit = r["marker_hit_rate"]
    assert hit["correct"] == 1.0 and hit["sheared"] == 0.0 and hit["both"] == 0.0
    assert r["correlation"]["sheared"] < 0.5 and r["mean_abs_diff"]["sheared"] > 0.1
    assert r["correlation"]["unexpanded"] < 0.99 and r["mean_abs_diff"]["unexpanded"] > 0.02
    assert r["unexpanded_rows_in_image_span"]
    assert r["unexpanded_target_rows"][0] < r["setup"]["image_span"][1] <= \
        r["correct_target_rows"][0]
