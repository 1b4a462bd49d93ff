"""Interleaved A/B timing of the attribution pass on the tiny in-process models.

    OPENBLAS_NUM_THREADS=1 python bench/ab_attribution.py <checkout> <label>

``<checkout>``: a source tree of diffcam (e.g. a ``git worktree`` of an older commit) that is
put first on ``sys.path``; run it alternately for two trees.  In each of 41 rounds it times, one
after the other, the no-grad forward of the full sequence, ``adapter.prepare``, the aggregate
explain and the 16-map explain, so that a slow minute of a shared host hits every case alike;
it prints the medians and ratio = (explain - prepare) / forward per model.  (The forward then
runs with the caches the explains left behind, so these ratios are lower than those of
bench_attribution.py, which times each function in a loop of its own.)
"""

import statistics
import sys
import time

tree = sys.argv[1] if len(sys.argv) > 1 else "."
label = sys.argv[2] if len(sys.argv) > 2 else tree
sys.path.insert(0, tree)

import numpy as np                                            # noqa: E402
import torch                                                  # noqa: E402

from diffcam.attribution import Explainer                     # noqa: E402
from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl  # noqa: E402

PROMPT = "<image> describe the image"
ANSWER = "a red cat and a dog sitting on the box near the big tree with a"   # 16 tokens
IMG = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def main(rounds: int = 41) -> None:
    torch.set_num_threads(1)
    out = []
    for name, factory in [("llava", tiny_llava_anyres), ("qwen", tiny_qwen2vl)]:
        ad = factory(seed=0)
        s = ad.prepare([IMG], PROMPT)
        ids = torch.tensor(ad.tokenizer.encode(ANSWER))
        with torch.no_grad():
            emb = torch.cat([s.inputs_embeds, ad.embed_tokens(ids)])[None]

        def fwd():
            with torch.no_grad():
                ad.forward(emb)

        cases = {"agg": (Explainer(ad), dict(answer=ANSWER, targets="all", aggregate_only=True)),
                 "16": (Explainer(ad), dict(answer=ANSWER, targets="all"))}
        fns = {"fwd": fwd, "prep": lambda: ad.prepare([IMG], PROMPT)}
        for k, (ex, kw) in cases.items():
            fns[k] = (lambda ex=ex, kw=kw: ex.explain(IMG, PROMPT, **kw))
        for fn in fns.values():
            fn()
            fn()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        r = {k: (m[k] - m["prep"]) / m["fwd"] for k in ("agg", "16")}
        out.append(f"{name}: fwd {m['fwd']:.2f} prep {m['prep']:.2f} agg {m['agg']:.2f} "
                   f"({r['agg']:.2f}) 16 {m['16']:.2f} ({r['16']:.2f}) "
                   f"[{cases['16'][0].last_backward}]")
    print(label, " | ".join(out))


if __name__ == "__main__":
    main()
