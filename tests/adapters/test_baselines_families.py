"""LLaVA-CAM and TAM run through every family adapter (on its structural twin), with the same
answer and targets as Grad-CAM: right shapes, finite maps in [0, 1], no hook left behind, and
LLaVA-CAM's hook on the norm that feeds the block's MLP."""

import numpy as np
import pytest

pytest.importorskip("transformers", minversion="5.5")

import diffcam                                                          # noqa: E402
from diffcam.baselines import mlp_input_norm                           # noqa: E402

PROMPT = "<image> describe the image"
ANSWER = "a red cat on the box"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llada_v():
    from diffcam.testing.twins.llada_v import build_llada_v_twin

    tw = build_llada_v_twin(seed=0)
    return diffcam.load("llada-v", tw.model, **tw.load_kwargs())


def _lavida(lm):
    def make():
        from diffcam.testing.twins.lavida import build_lavida_twin

        tw = build_lavida_twin(lm, seed=0)
        return diffcam.load("lavida", tw.model, **tw.load_kwargs())
    return make


def _dream_vl():
    from diffcam.testing.twins.dream_vl import dream_vl_twin

    model, proc = dream_vl_twin(seed=0)
    return diffcam.load("dream-vl", model, processor=proc)


def _diffusion_gemma():
    from diffcam.testing.twins.diffusion_gemma import diffusion_gemma_twin

    model, proc = diffusion_gemma_twin(seed=0)
    return diffcam.load("diffusion-gemma", model, processor=proc)


FAMILIES = {"llada-v": _llada_v, "lavida-llada": _lavida("llada"),
            "lavida-dream": _lavida("dream"), "dream-vl": _dream_vl,
            "diffusion-gemma": _diffusion_gemma}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_baselines_on_family(family):
    ad = FAMILIES[family]()
    img = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    layer = 1
    block = ad.blocks()[layer]
    name, norm = mlp_input_norm(block)
    seen = []
    h = norm.register_forward_hook(lambda m, i, o: seen.append(len(m._forward_hooks)))
    try:
        with diffcam.Explainer(ad, layer=layer) as ex:
            out = {m: ex.explain(img, PROMPT, answer=ANSWER, targets="all", method=m)
                   for m in ("grad-cam", "llava-cam", "tam")}
    finally:
        h.remove()
    # Grad-CAM's forward ran first with one hook on the norm (ours), LLaVA-CAM's with two
    assert 2 in seen, f"LLaVA-CAM did not hook {name}"
    assert not norm._forward_hooks and not block._forward_hooks
    ref = out["grad-cam"]
    for m, e in out.items():
        assert e.settings["method"] == m and e.targets == ref.targets
        for g, arr in e.maps[0].items():
            assert arr.shape == ref.maps[0][g].shape
            assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1 + 1e-6
        assert any(arr.max() > 0 for arr in e.maps[0].values())
