"""diffcam.metrics.faithfulness: deletion / insertion curves through the model."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffcam.metrics import faithfulness as fm  # noqa: E402


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_box_blur_against_brute_force():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 13, 3)).astype(np.float64)
    for r in (1, 2, 5, 12):
        want = np.zeros_like(img)
        H, W = img.shape[:2]
        for y in range(H):
            for x in range(W):
                ys = np.clip(np.arange(y - r, y + r + 1), 0, H - 1)
                xs = np.clip(np.arange(x - r, x + r + 1), 0, W - 1)
                want[y, x] = img[ys][:, xs].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(fm._box_blur(img, r), want, atol=1e-9)


def test_baselines_and_errors():
    img = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.allclose(fm.baseline_image(img, "zero"), 0)
    mean = fm.baseline_image(img, "mean")
    assert np.allclose(mean[5, 7], img.reshape(-1, 3).mean(0))
    blur = fm.baseline_image(img, "blur")
    assert blur.shape == img.shape and blur.std() < img.astype(float).std()
    own = np.full(img.shape, 7.0)
    assert np.array_equal(fm.baseline_image(img, own), own)
    with pytest.raises(ValueError, match="baseline"):
        fm.baseline_image(img, "noise")
    with pytest.raises(ValueError, match="shape"):
        fm.baseline_image(img, np.zeros((2, 2, 3)))


def test_order_and_perturbed_images():
    m = np.array([[0.1, 0.9], [0.9, 0.3]], np.float32)
    assert fm.perturbation_order(m, (2, 2)).tolist() == [1, 2, 3, 0]   # ties: row-major
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    base = np.zeros(img.shape)
    order = rng.permutation(30)
    fr = np.arange(6) / 5
    dele = fm._images(img, base, order, fr, insertion=False)
    ins = fm._images(img, base, order, fr, insertion=True)
    for f, d, i in zip(fr, dele, ins):
        k = int(round(f * 30))
        gone = np.zeros(30, bool)
        gone[order[:k]] = True
        d, i, flat = d.reshape(30, 3), i.reshape(30, 3), img.reshape(30, 3)
        assert (d[gone] == 0).all() and (d[~gone] == flat[~gone]).all()
        assert (i[gone] == flat[gone]).all() and (i[~gone] == 0).all()


@pytest.mark.parametrize("mask", [True, False])
def test_target_probability_by_hand(img, mask):
    from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl

    for ad in (tiny_llava_anyres(seed=3), tiny_qwen2vl(seed=3)):
        prompt = ad.image_marker + " describe the image"
        ids = ad.tokenizer.encode("a red car on the grass")
        toks = [1, 2]
        imgs = [img, img[::-1].copy(), np.zeros_like(img)]
        got = fm.target_probability(ad, imgs, prompt, ids, toks, mask_targets=mask, batch=2)
        for im, g in zip(imgs, got):
            s = ad.prepare([im], prompt)
            r = torch.tensor(ids)
            if mask:
                r[toks] = ad.mask_token_id
            x = torch.cat([s.inputs_embeds, ad.embed_tokens(r)])[None]
            with torch.no_grad():
                z = ad.forward(x, None, ad.extend_extras(s, x.shape[1]))[0].double()
            P, sh = s.prompt_length, ad.logit_shift
            p = [torch.softmax(z[P + j - sh], -1)[ids[j]] for j in toks]
            assert abs(g - float((p[0] * p[1]).sqrt())) < 1e-6
    with pytest.raises(ValueError, match="answer positions"):
        fm.target_probability(ad, [img], prompt, ids, [len(ids)])


def test_argument_errors(img):
    from diffcam.testing import tiny_llava_anyres

    ad = tiny_llava_anyres(seed=0)
    p = ad.image_marker + " describe"
    m = np.ones((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        fm.deletion_insertion(ad, img.astype(np.float32), p, [5, 6], m, [[0], [1]])
    with pytest.raises(ValueError, match="2 maps for 1 targets"):
        fm.deletion_insertion(ad, img, p, [5, 6], m, [[0]])
    with pytest.raises(ValueError, match="steps"):
        fm.deletion_insertion(ad, img, p, [5, 6], m, [[0], [1]], steps=0)
    with pytest.raises(ValueError, match="finite"):
        fm.deletion_insertion(ad, img, p, [5, 6], m * np.nan, [[0], [1]])


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_oracle_map_is_more_faithful_than_its_inverse(kind):
    """On the shipped models, the gold object mask as a map deletes the word's evidence faster
    and restores it faster than the inverted mask (3 held-out descriptions)."""
    import diffcam
    from diffcam.data import shapes
    from diffcam.models.evaluate import grounding_for

    ad = diffcam.load("bundled", kind=kind)
    res = {"oracle": [], "inverse": []}
    for i in range(3):
        sc = shapes.scene("test", i)
        qa = shapes.question(sc, "describe")
        ids = ad.tokenizer.encode(qa.answer, add_special_tokens=False)
        ids += [ad.eos_token_id] * (ad.default_generation.gen_length - len(ids))
        ground = grounding_for(sc, qa)
        maps = np.stack([np.any(sc.masks[k], 0) for _, k in ground]).astype(np.float32)
        tg = [[w] for w, _ in ground]
        for name, m in (("oracle", maps), ("inverse", 1 - maps)):
            s = fm.deletion_insertion(ad, sc.image, qa.prompt, ids, m, tg, steps=6)
            assert s.deletion.shape == (len(tg), 7) and np.allclose(s.fractions[[0, -1]], [0, 1])
            # both curves start (or end) at the untouched image
            np.testing.assert_allclose(s.deletion[:, 0], s.insertion[:, -1], atol=1e-6)
            res[name].append(np.stack([s.deletion_auc, s.insertion_auc], 1))
    o, v = (np.concatenate(res[k]).mean(0) for k in ("oracle", "inverse"))
    assert o[0] < v[0] - 0.1 and o[1] > v[1] + 0.1, (o, v)
