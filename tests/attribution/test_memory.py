"""No hook and no growth in memory after 200 explanations, also when half of them raise."""

import gc

import numpy as np
import torch

from diffcam.attribution import Explainer
from fakes import FakeAdapter


class Flaky(FakeAdapter):
    """Raises after the hooked block ran (inside the grad-enabled forward) when ``fail``."""

    fail = False

    def forward(self, inputs_embeds, attention_mask=None, extras=None):
        out = super().forward(inputs_embeds, attention_mask, extras)
        if self.fail:
            raise RuntimeError("boom")
        return out


def _live_tensors() -> int:
    n = 0
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o):
                n += 1
        except Exception:
            pass
    return n


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_no_hooks_no_growth_after_200(img):
    ad = Flaky(answer=(5, 9, 7, 11))
    ex = Explainer(ad, layer=1)

    def run(k):
        ad.fail = bool(k % 2)
        try:
            with ex:
                ex.explain(img, "p", targets="all", states=("final", 2))
        except RuntimeError as e:
            assert "boom" in str(e)

    for k in range(10):          # warm-up (lazy state in torch)
        run(k)
    gc.collect()
    t0, o0 = _live_tensors(), len(gc.get_objects())
    for k in range(200):
        run(k)
    gc.collect()
    t1, o1 = _live_tensors(), len(gc.get_objects())
    assert _hooks(ad.model) == 0 and not ex._hooks
    assert t1 <= t0, (t0, t1)
    assert o1 - o0 < 200, (o0, o1)        # no per-call growth (200 calls)
    # the next explanation still works
    ad.fail = False
    e = ex.explain(img, "p", targets="all")
    assert np.isfinite(e.maps[0]["base"]).all()
