"""A dataset run through a family adapter (the LLaDA-V structural twin, no download): anyres
grids with newline columns, generated and given answers, the family loader's arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", minversion="5.5")

import diffcam                                                    # noqa: E402
from diffcam.data.sample import Sample                            # noqa: E402
from diffcam.run import RunStore, run_dataset, summarize          # noqa: E402
from diffcam.testing.twins.llada_v import build_llada_v_twin      # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _samples():
    rng = np.random.default_rng(3)
    out = []
    for i, (h, w) in enumerate(((40, 40), (24, 40), (40, 24))):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        mask[: h // 2, : w // 2] = True
        out.append(Sample(f"twin-{i}", img, "<image> describe the image",
                          answer="a red cat on the box" if i != 1 else None,
                          masks={"cat": mask}, meta={"kind": "given" if i != 1 else "generated"}))
    return out


def test_run_through_the_llada_v_loader(tmp_path):
    tw = build_llada_v_twin(seed=0)
    out = str(tmp_path / "twin")
    stats = run_dataset("llada-v", _samples(), out, model_path=tw.model,
                        model_kwargs=tw.load_kwargs(), targets="all", batch_size=3,
                        progress=False)
    assert (stats["done"], stats["errors"]) == (3, 0)
    store = RunStore.open(out)
    assert store.settings["model"]["adapter"] == "llada-v"
    ad = diffcam.load("llada-v", tw.model, **tw.load_kwargs())
    for rec, arrays in store.iter_maps():
        s = next(x for x in _samples() if x.id == rec["id"])
        with diffcam.Explainer(ad) as ex:
            exp = ex.explain(s.image, s.prompt, answer=rec["answer"] if s.answer else None,
                             targets="all")
        assert exp.answer == rec["answer"]
        for g, a in exp.maps[0].items():
            np.testing.assert_allclose(arrays[f"{rec['id']}/0/{g}"], a, rtol=1e-4,
                                       atol=1e-6 * float(np.abs(a).max()))
        if s.answer is not None:
            assert "cat" in rec["scores"] and rec["scores"]["cat"]["mask"] == "cat"
    assert summarize(out)["raw"]["n_maps"] >= 2
    with pytest.raises(TypeError, match="name for diffcam.load"):
        run_dataset(ad, _samples(), str(tmp_path / "x"), model_path="somewhere", progress=False)
