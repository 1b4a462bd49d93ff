"""Attribution-pass benchmarks on the tiny in-process models (issue 3 item 9, CPU part).

Run: ``python -m pytest bench/bench_attribution.py --benchmark-only``

Time.  ``benchmark`` times ``Explainer.explain(image, prompt, answer=...)`` (teacher forcing, so
no sampling; prepare + grad-enabled forward + backward + Grad-CAM).  Also measured with the same
loop: the plain no-grad forward of the same full sequence (``adapter.forward``) and
``adapter.prepare``.  extra_info records

    ratio_pass   (explain - prepare) / no-grad forward   (targets: <= 3 aggregate, <= 4 for 16 maps)
    ratio_total  explain / (prepare + no-grad forward)

Memory.  CPU torch has no allocator statistics, so the graph's memory is measured exactly with
``torch.autograd.graph.saved_tensors_hooks``: the bytes of every distinct non-parameter tensor
saved for backward during the forward, plus the gradient buffers the backward returns
(K x n_image x D for K backward vectors: the leaf is the image positions only; with
``backward_chunk=C`` only C vectors' gradients exist at a time, so C replaces K) and, with
per-token maps, the running sum of the target gradients that makes the aggregate map (one more
n_image x D buffer: 16 vectors + 1 = 17, or 4 + 1 with chunks of 4).  The baseline is a
backward through the whole model (inputs embeddings requiring grad, so every block saves its
activations) for the aggregate score.
``mem_ratio`` = attribution / whole-model (target <= 0.6).  Transient buffers inside one backward
op are not counted in either.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from diffcam.attribution import Explainer, fastvjp             # noqa: E402
from diffcam.testing import tiny_llava_anyres, tiny_qwen2vl   # noqa: E402

MODELS = {"tiny-llava-anyres": tiny_llava_anyres, "tiny-qwen2vl": tiny_qwen2vl}
PROMPT = "<image> describe the image"
# 16 answer tokens, every one a target for the per-token case
ANSWER = "a red cat and a dog sitting on the box near the big tree with a"
IMG = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def _median_times(*fns, rounds=7, per=5):
    """Median seconds of each function over ``rounds`` rounds in which each function runs
    ``per`` + 1 times in a row (the first call of a run is a warm-up, not timed).  Runs in a row
    keep each function's own caches warm (timing the functions strictly interleaved made the
    no-grad forward ~15 % slower, cold after an explain, which flatters the ratio); the rounds
    spread a slow minute of a shared host over every function (timing each in one loop of its
    own let the ratio swing by a third)."""
    ts = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, ts):
            fn()
            for _ in range(per):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in ts]


class SavedBytes:
    """Bytes of distinct non-parameter tensors saved for backward inside the context."""

    def __init__(self, params):
        self.params = {p.data_ptr() for p in params}
        self.seen = set()
        self.bytes = 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _full_sequence(ad):
    sample = ad.prepare([IMG], PROMPT)
    ids = torch.tensor(ad.tokenizer.encode(ANSWER))
    with torch.no_grad():
        emb = torch.cat([sample.inputs_embeds, ad.embed_tokens(ids)])[None]
    return sample, ids, emb


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # a shared 2-core box: OpenMP spinning distorts timings
    yield
    torch.set_num_threads(n)


# "-autograd": the same 16 maps through autograd's vmapped backward (fast_backward=False), so
# both backward paths stay tracked now that the CPU default is the hand-written one
MAPS = ["aggregate", "aggregate-autograd", "16-per-token", "16-per-token-chunk4",
        "16-per-token-autograd"]


# the baselines of method.md 4 on the same 16 targets (time only): LLaVA-CAM (one forward and a
# batched autograd backward from the hooked norm) and TAM (one no-grad forward, no backward)
BASELINE_MAPS = ["16-per-token-llava-cam", "16-per-token-tam"]


def _method(maps):
    """``explain(method=...)`` of a case."""
    for m in ("llava-cam", "tam"):
        if maps.endswith(m):
            return m
    return "diffusion-cam"


def _fast(maps):
    """``Explainer(fast_backward=...)`` of a case."""
    return False if maps.endswith("autograd") else "auto"


def _chunk(maps):
    """``Explainer(backward_chunk=...)`` of a case: None, or 4 vectors per backward pass."""
    return 4 if maps.endswith("chunk4") else None


@pytest.mark.parametrize("maps", MAPS + BASELINE_MAPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_attribution_pass_time(benchmark, model, maps):
    ad = MODELS[model](seed=0)
    sample, ids, emb = _full_sequence(ad)
    assert len(ids) == 16
    ex = Explainer(ad, backward_chunk=_chunk(maps), fast_backward=_fast(maps))
    kw = dict(answer=ANSWER, targets="all", aggregate_only=maps.startswith("aggregate"),
              method=_method(maps))

    def explain():
        return ex.explain(IMG, PROMPT, **kw)

    def fwd():
        with torch.no_grad():
            ad.forward(emb)

    def prep():
        ad.prepare([IMG], PROMPT)

    e = explain()
    assert e.maps[0][e.default_grid()].shape[0] == (1 if maps.startswith("aggregate") else 17)
    t_fwd, t_prep, t_exp = _median_times(fwd, prep, explain)
    benchmark.group = f"attribution {model}"
    benchmark(explain)
    benchmark.extra_info.update({
        "model": model, "maps": maps, "method": _method(maps),
        "sequence_length": int(emb.shape[1]),
        "threads": torch.get_num_threads(), "backward": ex.last_backward,
        "backward_chunk": ex.backward_chunk,
        "no_grad_forward_ms": t_fwd * 1e3, "prepare_ms": t_prep * 1e3,
        "explain_ms": t_exp * 1e3,
        "ratio_pass": (t_exp - t_prep) / t_fwd, "ratio_total": t_exp / (t_prep + t_fwd),
        "target_ratio": (None if _method(maps) != "diffusion-cam" else
                         3.0 if maps.startswith("aggregate") else 4.0)})


@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("model", list(MODELS))
def test_attribution_memory(benchmark, model, maps, monkeypatch):
    ad = MODELS[model](seed=0)
    sample, ids, emb = _full_sequence(ad)
    params = list(ad.model.parameters())
    L, D = emb.shape[1], emb.shape[2]
    K = 1 if maps.startswith("aggregate") else 16
    if _chunk(maps):            # one chunk's gradients exist at a time (maps made in between)
        K = min(K, _chunk(maps))
    if not maps.startswith("aggregate"):   # + the running sum of the target gradients (aggregate)
        K += 1

    # the hand-written backward (fastvjp, the CPU default for per-token maps) keeps its own
    # tensors instead of autograd's: count what its re-run saves, per distinct storage
    fast_saved = []
    real_prepare = fastvjp.prepare
    ptrs = {p.untyped_storage().data_ptr() for p in params}

    def counting_prepare(cap, *a, **kw):
        saved = real_prepare(cap, *a, **kw)
        seen = set()
        for sv in saved:
            for t in sv.values():
                if torch.is_tensor(t):
                    st = t.untyped_storage()
                    if st.data_ptr() not in ptrs:
                        seen.add((st.data_ptr(), st.nbytes()))
        fast_saved.append(sum(n for _, n in seen))
        return saved

    monkeypatch.setattr(fastvjp, "prepare", counting_prepare)
    ex = Explainer(ad, backward_chunk=_chunk(maps), fast_backward=_fast(maps))
    with SavedBytes(params) as attr:
        ex.explain(IMG, PROMPT, answer=ANSWER, targets="all",
                   aggregate_only=maps.startswith("aggregate"))
    n_img = sum(lay.span_length for lay in sample.layouts)   # the gradient leaf: image tokens
    attr_bytes = attr.bytes + K * n_img * D * emb.element_size()
    if ex.last_backward == "fast":
        # + its saved tensors.  Its gradients between blocks (vectors x L x D, float32) are
        # not counted, like autograd's between backward ops in both measurements
        attr_bytes += sum(fast_saved)

    def whole_model():
        x = emb.detach().clone().requires_grad_(True)
        with SavedBytes(params) as full:
            with torch.enable_grad():
                logits = ad.forward(x)
                P = sample.prompt_length
                rows = torch.arange(len(ids)) + P - ad.logit_shift
                score = logits[0, rows].gather(-1, ids[:, None]).sum()
        (g,) = torch.autograd.grad(score, x)
        return full.bytes + g.numel() * g.element_size()

    full_bytes = whole_model()
    benchmark.group = f"attribution memory {model}"
    benchmark.pedantic(whole_model, rounds=1, iterations=1)
    benchmark.extra_info.update({
        "model": model, "maps": maps, "sequence_length": int(L), "image_tokens": int(n_img),
        "layer": Explainer(ad).layer, "num_blocks": len(ad.blocks()),
        "attribution_bytes": int(attr_bytes), "whole_model_backward_bytes": int(full_bytes),
        "mem_ratio": attr_bytes / full_bytes, "target_mem_ratio": 0.6,
        "backward": ex.last_backward, "fast_saved_bytes": int(sum(fast_saved)),
        "method": "saved_tensors_hooks (non-parameter saved tensors) + gradient buffers "
                  "(+ the hand-written backward's saved tensors)"})


# SICD's interference maps (explain(interference="auto"), the default): the answer padded with
# 8 <eos> as a diffusion sampler pads it, the nouns as targets.  "auto" adds one backward vector
# per repeated function word and per padding position (up to Explainer.max_padding_maps)
PADDED = ANSWER + " <eos>" * 8


@pytest.mark.parametrize("interference", ["auto", None])
@pytest.mark.parametrize("model", list(MODELS))
def test_interference_maps_cost(benchmark, model, interference):
    ad = MODELS[model](seed=0)
    ex = Explainer(ad)
    kw = dict(answer=PADDED, targets="nouns", interference=interference)

    def explain():
        return ex.explain(IMG, PROMPT, **kw)

    e = explain()
    assert (len(e.interference) > 0) == (interference == "auto")
    (t_exp,) = _median_times(explain)
    benchmark.group = f"interference maps {model}"
    benchmark(explain)
    benchmark.extra_info.update({
        "model": model, "interference": interference, "targets": len(e.targets),
        "interference_maps": len(e.interference),
        "extra_backward_vectors": len({t.tokens for t in e.interference}
                                      - {t.tokens for t in e.targets}),
        "explain_ms": t_exp * 1e3, "backward": ex.last_backward})
