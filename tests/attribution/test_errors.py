"""Clear errors for the cases users hit (issue 3 item 7), and image conversion warnings."""

import numpy as np
import pytest
import torch

from diffcam.attribution import Explainer, load_image
from fakes import FakeAdapter


@pytest.fixture
def ad():
    return FakeAdapter(seed=0)


def test_layer_out_of_range(ad, img):
    with pytest.raises(ValueError, match=r"layer=40 but the model has 4 blocks"):
        Explainer(ad, layer=40)
    with pytest.raises(ValueError, match=r"layer=-5 but the model has 4 blocks"):
        Explainer(ad).explain(img, "p", layer=-5)
    assert Explainer(ad, layer=-1).layer == 3


def test_infeasible_state(img):
    ad = FakeAdapter(hidden_has_image=[True, False, False, False, False])
    ex = Explainer(ad)
    with pytest.raises(ValueError, match=r"step=2 is not feasible.*image span"):
        ex.explain(img, "p", states=("final", 2))
    assert ex.explain(img, "p", states=(0, "final")).states == [0, "final"]
    with pytest.raises(ValueError, match=r"step=9 is out of range"):
        ex.explain(img, "p", states=(9,))
    with pytest.raises(ValueError, match="teacher forcing"):
        ex.explain(img, "p", answer="a b", states=(1,))
    with pytest.raises(ValueError, match="state 'middle'"):
        ex.explain(img, "p", states=("middle",))


def test_target_not_in_answer(ad, img):
    with pytest.raises(ValueError, match=r"'zebra' is not in the answer.*\['tokf', 'tokj', 'tokh'\]"):
        Explainer(ad).explain(img, "p", targets=["zebra"])
    with pytest.raises(ValueError, match="out of range"):
        Explainer(ad).explain(img, "p", targets=[7])


def test_empty_prompt_and_bad_options(ad, img):
    with pytest.raises(ValueError, match="prompt is empty"):
        Explainer(ad).explain(img, "  ")
    with pytest.raises(ValueError, match="score="):
        Explainer(ad).explain(img, "p", score="prob")
    with pytest.raises(ValueError, match="contrast"):
        Explainer(ad).explain(img, "p", score="vocab_sum", contrast=3)
    with pytest.raises(ValueError, match="2 prompts for 3"):
        Explainer(ad).explain([img, img, img], ["p", "q"])


def test_gradients_cannot_flow(img):
    class NoGrad(FakeAdapter):
        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            with torch.no_grad():
                return super().forward(inputs_embeds, attention_mask, extras)

    ad = NoGrad()
    with pytest.raises(RuntimeError, match="gradients cannot flow"):
        Explainer(ad).explain(img, "p")
    assert all(len(b._forward_hooks) == 0 for b in ad.blocks())
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            Explainer(FakeAdapter()).explain(img, "p")
    # frozen weights, frozen inputs and an outer no_grad are fine: the graph starts at the hook
    with torch.no_grad():
        e = Explainer(FakeAdapter()).explain(img, "p")
    assert np.isfinite(e.maps[0]["base"]).all()


def test_block_never_runs(img):
    class Skip(FakeAdapter):
        def blocks(self):
            return list(self.model.blocks) + [torch.nn.Linear(2, 2)]

    with pytest.raises(RuntimeError, match="never ran"):
        Explainer(Skip(), layer=4).explain(img, "p")


def test_unreadable_and_corrupt_files(ad, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match="nope.png"):
        Explainer(ad).explain(str(missing), "p")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        Explainer(ad).explain(bad, "p")


def test_image_conversions_warn(ad, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (24, 32), dtype=np.uint8)
    with pytest.warns(UserWarning, match="grayscale"):
        a = load_image(gray)
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    with pytest.warns(UserWarning, match="RGBA"):
        assert load_image(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8)).shape == (24, 32, 3)
    with pytest.warns(UserWarning, match="16-bit"):
        a = load_image(np.full((24, 32, 3), 65535, np.uint16))
    assert a.dtype == np.uint8 and a.max() == 255
    p16 = tmp_path / "g16.png"
    Image.fromarray(np.full((24, 32), 30000, np.uint16)).save(p16)
    with pytest.warns(UserWarning) as seen:             # a 16-bit grayscale file: both
        a = load_image(str(p16))
    msgs = [str(w.message) for w in seen]
    assert any("16-bit" in m for m in msgs) and any("grayscale" in m for m in msgs), msgs
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    prgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (24, 32, 4), dtype=np.uint8), "RGBA").save(prgba)
    with pytest.warns(UserWarning, match="RGBA"):
        e = Explainer(ad).explain(prgba, "p")
    assert e.images[0].shape == (24, 32, 3)
    with pytest.warns(UserWarning, match="grayscale"):
        Explainer(ad).explain(Image.fromarray(gray), "p")


def test_hooked_sequence_without_image_span():
    from diffcam.attribution import BlockHook
    block = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="does not contain the whole image span"):
        with BlockHook(block, "block 0", positions=torch.tensor([2, 9])):
            block(torch.randn(1, 5, 4))
    assert len(block._forward_hooks) == 0
    with BlockHook(block, positions=torch.tensor([1, 3])) as h:
        y = block(torch.randn(1, 5, 4))
    assert h.leaf.shape == (1, 2, 4) and h.output.shape == (1, 5, 4)
    (g,) = torch.autograd.grad(y.sum(), h.leaf)
    assert g.shape == (1, 2, 4)
