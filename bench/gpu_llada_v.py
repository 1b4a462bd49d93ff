"""GPU benchmark of the attribution pass on a full-size LLaDA-V-architecture model (issue 3,
item 9, last paragraph): random weights, bf16, no download.

Run on the device (one H100/H200; about 2-4 minutes including the two 8B builds)::

    python bench/gpu_llada_v.py --json $OUT/llada_v.json 2>&1 | tee $OUT/llada_v.txt

It needs torch with CUDA, transformers (the twins use its Llama layers), numpy and Pillow, and
runs this checkout's ``diffcam`` (the repository root goes first on ``sys.path``).  Give the
device command a ``timeout_s`` of ~600; ``--family lavida`` halves the run (the LaViDa twin has
every case, including the prefix-cache generation).

Smoke test on a CPU (a few seconds; tests/attribution/test_gpu_bench_script.py runs it)::

    python bench/gpu_llada_v.py --tiny --device cpu --dtype float32 --threads 1

What it checks (targets of the issue, against the paper's 4880.8 ms and 83.21 GB on an H20 for
generation plus backward):

* **attribution pass**, 16 per-token maps, at the family's default layer (block 10 of 32):
  ``diffcam.Explainer.explain(image, prompt, answer=..., targets=[16 answer tokens])`` -- the real
  engine: prepare, grad-enabled forward with the hook on the block, one batched backward of
  16 vectors (``is_grads_batched``; the aggregate map's gradient is their sum), Grad-CAM of
  both grids -- with ``backward_chunk`` None,
  8 and 4 (``--chunks``); target <= 150 ms and peak GPU memory <= 20 GB (weights included);
* the same at ``--extra-layers`` (default 24, see the estimate below), and the aggregate map
  alone (one backward vector);
* the aggregate and the one-pass 16 maps again with ``Explainer(fast_backward=True)``
  (``--fast-backward both``, the default): the hand-written backward of
  ``diffcam.attribution.fastvjp`` (the CPU default, never run on a GPU yet; its blocks are
  checked against the real ones, a mismatch falls back to autograd and shows in ``backward``);
* the baselines of method.md 4 on the same 16 targets (``--no-baselines`` skips them): LLaVA-CAM
  (the norm feeding block ``--layer``'s MLP, autograd's batched backward) and TAM (one no-grad
  forward, no backward); no target;
* a plain no-grad forward of the full sequence (the reference the pass is compared with);
* **generation** of 64 tokens in 32 steps with LaViDa's prefix KV cache
  (``diffcam.adapters.lavida.prefix_cache_generate``): target <= 350 ms; for LLaDA-V, whose
  sampler re-runs the full sequence every step (no cache), the same generation is reported
  without a target;
* peak GPU memory of every case (``torch.cuda.max_memory_allocated``, reset before each case;
  GB = 1e9 bytes; "base" is what was allocated before the case: the weights).

Reading the output: the table (case, median and min ms, peak GB, peak above the weights,
``backward`` -- ``Explainer.last_backward``: "batched" is one vmapped backward, "fast" the
hand-written one, "loop (...)" the fallback after an error --, target, met?); the JSON adds every time, the wall-clock medians,
the map shapes and finiteness, the warnings each case raised (e.g. a vmap "performance drop"
warning names an op without a batching rule, such as an SDPA backward kernel), the build times,
the estimate, and a ``torch.profiler`` table of one 16-map call per family.  The attribution
rows time the whole ``explain`` call (prepare with the random features, ~1 ms, included; the
``prepare`` row gives it alone).

Times: CUDA events around each call (every call ends with a synchronisation: explain copies the
maps to the host), ``--warmup`` calls, then the median of ``--repeats``; on a CPU
``time.perf_counter`` and no memory numbers.

The models (docs/models.md sections 2-4).  Both families share the LLaDA-8B language model:
hidden 4096, 32 layers, 32 heads, 32 KV heads (no GQA), MLP 12288 (SwiGLU), vocabulary 126464,
bidirectional attention; about 8.0B parameters = 16.0 GB in bf16.  ``--family both`` (default)
builds them one after the other, freeing the first:

* ``llada-v``: :func:`diffcam.testing.twins.llada_v.build_llada_v_twin` (LLaDA-V's Llama-style
  layers, ``model.model.layers``) behind the real :class:`~diffcam.adapters.llada_v.LLaDAVAdapter`;
* ``lavida``: :func:`diffcam.testing.twins.lavida.build_lavida_twin` with the LLaDA backbone
  (OLMo-style ``model.model.transformer.blocks``, prefix KV cache) behind the real
  :class:`~diffcam.adapters.lavida.LaViDaAdapter`.

Both are built directly on the GPU in bf16 (``with torch.device(...)`` and a bf16 default dtype,
so no CPU or float32 copy exists), with SDPA attention (``--attn``; the twins pass LLaDA's
all-zero additive mask, so PyTorch picks the memory-efficient kernel, as LLaDA-V's own code
does).  The vision tower is not run: the attribution pass starts at the hooked block, so the
adapter's splice is given seeded random image features of the real count and layout instead
(the rest of ``prepare`` -- template, tokenizer, placeholder arithmetic, and reading the layout
from the newline tokens -- is the adapter's own code).  Chosen layout (``--image-tokens 805
--base-side 14``): LaViDa's 2x2-pooled SigLIP-so400m/14 @ 384 px crops (27 x 27 -> 14 x 14 =
196 tokens) for a 640 x 480 image, which LaViDa puts on its 768 x 768 pinpoint (2 x 2 crops ->
28 x 28 pooled cells, unpadded to 4:3 -> 21 x 28) plus one newline token per row: 196 +
21 x 29 = **805 image tokens**; with 131 text tokens of prompt (LLaDA's chat template, the image
after the system turn) and 64 answer tokens the sequence is **1000 tokens**.

Estimate (dense bf16 FLOPs, L = 1000 tokens, D = 4096, I = 12288, V = 126464).  Per token and
block the matmuls are 2 (4 D^2 + 3 D I) = 436 MFLOP and the attention 4 L D = 16 MFLOP.

* no-grad forward: 32 blocks x 1000 x 453 MFLOP + full logits 2 D V L (1.04 TFLOP) = 15.5 TFLOP
  = 15.7 ms at the H100's ~990 TFLOP/s dense bf16 peak;
* a vector-Jacobian product from the logits to block 10's output (frozen weights: no weight
  gradients) runs back through the 21 blocks above it: per token and block the input
  gradients cost what the forward matmuls cost (436 MFLOP) and the attention backward about
  twice its forward (33 MFLOP; a fused kernel also recomputes the probabilities, +16), so
  ~9.9-10.2 TFLOP per vector;
* 16 per-token maps (the aggregate's gradient is the sum of theirs, no vector of its own) = 16
  vectors: 15.5 + 16 x 9.9 = **~174 TFLOP = ~176 ms at 100 % of peak**, ~250-350 ms at a
  realistic 50-70 %.  **The 150 ms target cannot be met at the default layer (10) on an H100**,
  whatever the implementation, as long as the 16 maps need 16 full backward passes through 21
  blocks.  The aggregate map alone (15.5 + 9.9 = 25.4 TFLOP, ~26 ms at peak) fits easily.
  Solving 15.5 + 16 x 0.469 n TFLOP <= 150 ms x peak for the n blocks above the hook: n <= 17
  (layer >= 14) at 100 % of peak, n <= 9 (layer >= 22) at 60 %, n <= 7 (layer >= 24) at 50 % --
  hence ``--extra-layers 24``;
* memory: weights 16.0 GB; the graph from block 10 keeps ~7 L D + 4 L I bf16 values per block
  (~156 MB) x 21 = ~3.3 GB; gradient buffers 16 x 805 x D x 2 B = 0.11 GB; full logits 0.25 GB;
  the batched backward's transients ~16 L I x 2 B = 0.39 GB per MLP tensor: a peak of ~20-21 GB
  (the target is 20), less with ``backward_chunk``;
* generation: the prefill (936 tokens, 13.5 TFLOP, ~15-25 ms) and 32 steps of 64 tokens, each of
  which reads all 16 GB of weights (memory-bound: ~4.8 ms per step at 3.35 TB/s on an H100 SXM,
  ~3.3 ms at 4.8 TB/s on an H200) plus launch overhead: ~200-300 ms expected (target 350).

The script prints these estimates for the sizes it runs (``estimate`` in the JSON).

Flags: sizes ``--hidden --layers --heads --kv-heads --intermediate --vocab --image-tokens
--base-side --prompt-tokens --answer-tokens --targets --gen-steps``, measurement ``--repeats
--warmup --chunks --layer --extra-layers --attn --family --no-profile``, ``--device --dtype
--threads --json``, ``--estimate-only`` (print the estimate, build nothing); ``--tiny``
presets a model that runs on a CPU in seconds (explicit flags still win).  ``--device cuda`` without CUDA exits with a message (exit code 2); a case that
fails (e.g. out of memory) is recorded with its error and the run goes on (exit code 1).

This file is not a pytest module: bench/conftest.py collects ``bench_*.py`` only and pytest's
default pattern is ``test_*.py``; importing it imports only the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]

FULL = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=12288, vocab=126464,
            image_tokens=805, base_side=14, prompt_tokens=131, answer_tokens=64, targets=16,
            gen_steps=32, repeats=10, warmup=2, device="cuda", dtype="bfloat16", layer=None,
            extra_layers="24", chunks="none,8,4")
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=126464,
            image_tokens=100, base_side=4, prompt_tokens=24, answer_tokens=16, targets=16,
            gen_steps=4, repeats=2, warmup=1, device="cpu", dtype="float32", layer=0,
            extra_layers="", chunks="none,8,4")
# (tiny: layer 0, since the default layer of a 2-block model is its last block, where the image
# positions no longer influence the answer's logits and every map is 0)

#: the issue's targets (H100, full size) and the paper's numbers (H20, generation + backward)
TARGET_PASS_MS = 150.0
TARGET_PASS_GB = 20.0
TARGET_GEN_MS = 350.0
PAPER_MS, PAPER_GB = 4880.8, 83.21
H100_BF16_DENSE_TFLOPS = 990.0
LLADA_MIN_VOCAB = 126349          # LLaDA's special ids go up to 126348 (EOT)


class BenchError(Exception):
    """A setup problem reported as a message (no traceback)."""


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_llada_v.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="small preset for a CPU smoke test: " +
                   ", ".join(f"{k}={v}" for k, v in TINY.items()))
    p.add_argument("--family", choices=("both", "llada-v", "lavida"), default="both")
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "image_tokens",
              "base_side", "prompt_tokens", "answer_tokens", "targets", "gen_steps", "repeats",
              "warmup"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"default {FULL[k]} (tiny {TINY[k]})")
    p.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                   help="attention implementation of the twins' layers (default sdpa)")
    p.add_argument("--layer", type=int, default=None,
                   help="hooked block (default: the adapter's default layer, 10 of 32; tiny 0)")
    p.add_argument("--extra-layers", default=None,
                   help="comma list of further layers for the 16-map pass (default '24'; "
                        "out-of-range ones are skipped)")
    p.add_argument("--chunks", default=None,
                   help="comma list of Explainer(backward_chunk=...) values for the 16-map pass "
                        "('none' = one pass; default 'none,8,4')")
    p.add_argument("--fast-backward", default="both", choices=("auto", "both"),
                   help="'both' (default): also time the aggregate and the one-pass 16-map "
                        "attribution with Explainer(fast_backward=True), the hand-written "
                        "backward of diffcam.attribution.fastvjp (checked against the real "
                        "blocks; 'auto' uses it on the CPU only); 'auto': the defaults only")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the LLaVA-CAM and TAM cases (16 per-token maps each)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true",
                   help="skip the torch.profiler breakdown of one 16-map call (CUDA only)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--estimate-only", action="store_true",
                   help="print the FLOP / memory estimate for the sizes and exit (no model)")
    a = p.parse_args(argv)
    preset = TINY if a.tiny else FULL
    for k, v in preset.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    return a


def _check_sizes(a) -> None:
    def need(cond, msg):
        if not cond:
            raise BenchError(msg)

    need(a.hidden % a.heads == 0, f"--hidden {a.hidden} is not divisible by --heads {a.heads}")
    need(a.heads % a.kv_heads == 0, f"--heads {a.heads} is not divisible by --kv-heads "
                                    f"{a.kv_heads}")
    need(a.layers >= 1 and a.intermediate >= 1, "--layers and --intermediate must be >= 1")
    need(a.vocab >= LLADA_MIN_VOCAB, f"--vocab {a.vocab}: LLaDA's token ids need at least "
                                     f"{LLADA_MIN_VOCAB} (the model has 126464)")
    need(a.base_side >= 1, "--base-side must be >= 1")
    need(a.targets >= 1 and a.answer_tokens >= a.targets,
         f"--targets {a.targets} must be between 1 and --answer-tokens {a.answer_tokens}")
    need(a.repeats >= 1 and a.warmup >= 0, "--repeats must be >= 1 and --warmup >= 0")
    need(a.gen_steps >= 1 and a.answer_tokens % a.gen_steps == 0,
         f"--gen-steps {a.gen_steps} must divide --answer-tokens {a.answer_tokens}")


def image_layout(image_tokens: int, base_side: int) -> dict:
    """LaViDa-style packing with about ``image_tokens`` tokens: a base_side^2 base grid, then an
    h x w high-resolution grid (w = 2 x base_side: two pooled crops across) with a newline
    token after every row; h is chosen so the count is as close as possible."""
    b = int(base_side)
    w = 2 * b
    rest = image_tokens - b * b
    h = int(round(rest / (w + 1)))
    if h < 2:
        raise BenchError(f"--image-tokens {image_tokens} leaves no room for a high-resolution "
                         f"grid of at least 2 rows after the {b}x{b} base grid (need >= "
                         f"{b * b + 2 * (w + 1)})")
    return {"base": [b, b], "hires": [h, w], "newline_tokens": h,
            "image_tokens": b * b + h * (w + 1)}


def _chunk_list(text: str) -> list:
    out = []
    for t in str(text).split(","):
        t = t.strip().lower()
        if not t:
            continue
        out.append(None if t in ("none", "0", "all") else int(t))
    return out or [None]


def _int_list(text: str) -> list:
    return [int(t) for t in str(text or "").split(",") if t.strip()]


# ----------------------------------------------------------------------------- estimate
def flop_estimate(a, seq_len: int, n_image: int, layer: int, layers_extra=()) -> dict:
    """Dense FLOPs of the cases (module docstring), and what they mean at an H100's peak."""
    D, I, V, L = a.hidden, a.intermediate, a.vocab, seq_len
    hd = D // a.heads
    kvd = a.kv_heads * hd
    mm = 2 * (D * D + 2 * D * kvd + D * D + 3 * D * I)          # per token and block
    att = 4 * L * D                                            # QK^T and PV, per token
    fwd = L * a.layers * (mm + att) + 2 * D * V * L            # + full logits
    peak = H100_BF16_DENSE_TFLOPS * 1e12

    def vjp(lay):       # one vector back to block lay's output (blocks above it)
        return L * (a.layers - 1 - lay) * (mm + 2 * att)

    K = a.targets       # backward vectors: the aggregate's gradient is the targets' sum
    out = {"per_token_block_matmul_flop": mm, "per_token_attention_flop": att,
           "forward_tflop": fwd / 1e12, "forward_ms_at_peak": fwd / peak * 1e3,
           "peak_tflops_assumed": H100_BF16_DENSE_TFLOPS, "vectors": K, "layers": {}}
    for lay in [layer] + [x for x in layers_extra if x != layer]:
        v = vjp(lay)
        t16 = fwd + K * v
        tag = fwd + v
        out["layers"][str(lay)] = {
            "blocks_above": a.layers - 1 - lay, "vjp_tflop": v / 1e12,
            "pass16_tflop": t16 / 1e12, "pass16_ms_at_peak": t16 / peak * 1e3,
            "aggregate_tflop": tag / 1e12, "aggregate_ms_at_peak": tag / peak * 1e3}
    budget = TARGET_PASS_MS * 1e-3 * peak
    per_block = L * (mm + 2 * att)
    reach = {}
    for mfu in (1.0, 0.7, 0.6, 0.5):
        n = max(0, math.floor((budget * mfu - fwd) / (K * per_block)))
        reach[f"{int(mfu * 100)}%"] = {"max_blocks_above": n,
                                       "min_layer": max(0, a.layers - 1 - n)}
    out["target_150ms_reachable_from"] = reach
    bytes_w = 2 * (2 * V * D + a.layers * (2 * D * D + 2 * D * kvd + 3 * D * I))
    out["weights_gb_bf16"] = bytes_w / 1e9
    saved = (7 * L * D + 4 * L * I) * 2 * (a.layers - 1 - layer)
    out["graph_gb_bf16"] = saved / 1e9
    out["grad_buffers_gb_bf16"] = K * n_image * D * 2 / 1e9
    return out


# ----------------------------------------------------------------------------- model
@contextlib.contextmanager
def _build_on(device, dtype):
    """Create modules directly on ``device`` in ``dtype`` (no CPU / float32 copy)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _bench_adapter_class(base):
    """``base`` (a LLaVA-family adapter class) with the vision tower replaced by seeded random
    image features of a fixed LaViDa-style layout; everything else is the adapter's code."""
    import torch

    from diffcam.adapters._llava_family import IMAGE_TOKEN_INDEX

    class BenchAdapter(base):
        def __init__(self, model, *, layout: dict, feature_seed: int = 0, **kw):
            self._bench_layout = layout
            self._bench_seed = int(feature_seed)
            self._bench_feats = None
            super().__init__(model, **kw)

        def _image_tensors(self, pil):
            return [None] * len(pil)           # no pixels: the features are made in _splice

        def _base_sides(self):
            return (int(self._bench_layout["base"][0]),)

        def _features(self):
            if self._bench_feats is None:
                b = self._bench_layout["base"][0]
                h, w = self._bench_layout["hires"]
                emb = self.model.get_input_embeddings().weight
                D = emb.shape[1]
                g = torch.Generator(device=emb.device).manual_seed(self._bench_seed)
                base = torch.randn(b * b, D, generator=g, device=emb.device)
                cells = torch.randn(h, w, D, generator=g, device=emb.device)
                nl = self._newline().detach().float().reshape(1, 1, D).expand(h, 1, D)
                hires = torch.cat([cells, nl], 1).reshape(h * (w + 1), D)
                self._bench_feats = torch.cat([base, hires], 0).to(emb.dtype)
            return self._bench_feats

        def _splice(self, ids, tensors, sizes):
            if len(tensors) != 1 or ids.count(IMAGE_TOKEN_INDEX) != 1:
                raise ValueError("the benchmark adapter takes exactly one image")
            k = ids.index(IMAGE_TOKEN_INDEX)
            parts = []
            if k:
                parts.append(self.embed_tokens(ids[:k]))
            parts.append(self._features())
            if k + 1 < len(ids):
                parts.append(self.embed_tokens(ids[k + 1:]))
            return torch.cat(parts, 0)

    BenchAdapter.__name__ = f"Bench{base.__name__}"
    return BenchAdapter


def build_family(family: str, a, device, dtype, layout: dict):
    """(adapter, twin) of ``family`` at the requested sizes, built on ``device``."""
    import torch

    sizes = dict(seed=a.seed, hidden=a.hidden, layers=a.layers, heads=a.heads, dtype=dtype,
                 intermediate_size=a.intermediate, kv_heads=a.kv_heads, vocab=a.vocab,
                 attn_implementation=a.attn)
    with _build_on(device, dtype):
        if family == "llada-v":
            from diffcam.adapters.llada_v import LLaDAVAdapter
            from diffcam.testing.twins.llada_v import build_llada_v_twin
            twin = build_llada_v_twin(**sizes)
            cls = _bench_adapter_class(LLaDAVAdapter)
        else:
            from diffcam.adapters.lavida import LaViDaAdapter
            from diffcam.testing.twins.lavida import build_lavida_twin
            twin = build_lavida_twin(backbone="llada", variant="lavida", **sizes)
            cls = _bench_adapter_class(LaViDaAdapter)
    p = next(twin.model.parameters())
    if p.device.type != torch.device(device).type or p.dtype != dtype:
        raise RuntimeError(f"the twin was built on {p.device} / {p.dtype}, not {device} / {dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # e.g. "padded batches are refused" (bf16 probe)
        ad = cls(twin.model, layout=layout, feature_seed=a.seed + 1, **twin.load_kwargs())
    return ad, twin


def make_prompt(ad, n_text: int) -> str:
    """A prompt whose templated, tokenized form has exactly ``n_text`` text tokens (the image
    placeholder not counted): LLaDA's chat template, the image first in the user turn."""
    words = [w for w in ad.tokenizer.words if w.isalpha()]

    def count(prompt):
        ids = ad._tokenize(ad.prompt_text(prompt))
        return len(ids) - 1

    c0 = count("<image>")
    if n_text < c0:
        raise BenchError(f"--prompt-tokens {n_text}: the chat template alone has {c0} tokens")
    k = n_text - c0
    prompt = "<image> " + " ".join(words[i % len(words)] for i in range(k))
    got = count(prompt)
    if got != n_text:
        raise RuntimeError(f"prompt has {got} text tokens, wanted {n_text}")
    return prompt.strip()


def make_answer(ad, n: int) -> str:
    words = [w for w in ad.tokenizer.words if w.isalpha()]
    ans = " ".join(words[(7 * i + 3) % len(words)] for i in range(n))
    got = len(ad.tokenizer.encode(ans))
    if got != n:
        raise RuntimeError(f"answer has {got} tokens, wanted {n}")
    return ans


# ----------------------------------------------------------------------------- timing
def _sync(cuda):
    if cuda:
        import torch
        torch.cuda.synchronize()


def measure(fn, *, warmup: int, repeats: int, cuda: bool) -> dict:
    """Warm-up calls, then ``repeats`` timed calls; peak memory over all of them (CUDA)."""
    import torch

    res = {}
    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = None
    times, walls = [], []
    with warnings.catch_warnings(record=True) as caught:     # kept in the JSON, not printed
        warnings.simplefilter("default")
        for _ in range(warmup):
            out = None
            out = fn()
        for _ in range(repeats):
            out = None
            if cuda:
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                s.record()
                out = fn()
                e.record()
                torch.cuda.synchronize()
                walls.append((time.perf_counter() - t0) * 1e3)
                times.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                out = fn()
                walls.append((time.perf_counter() - t0) * 1e3)
    res["times_ms"] = times if cuda else walls
    res["median_ms"] = statistics.median(res["times_ms"])
    res["min_ms"] = min(res["times_ms"])
    res["wall_median_ms"] = statistics.median(walls)
    res["timer"] = "cuda events" if cuda else "perf_counter"
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        res.update(peak_gb=peak / 1e9, peak_gib=peak / 2 ** 30, base_gb=base / 1e9,
                   peak_above_base_gb=(peak - base) / 1e9,
                   peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9)
    else:
        res.update(peak_gb=None, peak_gib=None, base_gb=None, peak_above_base_gb=None)
    res["warnings"] = sorted({f"{x.category.__name__}: {str(x.message)[:300]}" for x in caught})
    res["_out"] = out
    return res


def _map_info(exp) -> dict:
    import numpy as np

    grids = exp.maps[0]
    return {"maps": {k: list(v.shape) for k, v in grids.items()},
            "maps_finite": bool(all(np.isfinite(v).all() for v in grids.values())),
            "maps_nonconstant": bool(all(float(v.max() - v.min()) > 0 for v in grids.values())),
            "n_targets": len(exp.targets)}


def _profile(fn, cuda: bool, top: int = 15) -> dict:
    """torch.profiler table of one call: the top ops by self CUDA time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(cuda)
    keys = ["self_device_time_total", "self_cuda_time_total"] if cuda else \
        ["self_cpu_time_total"]
    err = None
    for key in keys:                                        # the name changed in torch 2.4
        try:
            return {"sort_by": key,
                    "table": prof.key_averages().table(sort_by=key, row_limit=top)}
        except Exception as e:
            err = e
    raise err


# ----------------------------------------------------------------------------- cases
def run_family(family: str, a, device, dtype, layout: dict, cuda: bool, log) -> tuple:
    import torch

    from diffcam.adapters.base import GenerationConfig
    from diffcam.attribution import Explainer

    cases = []
    fam = "LLaDA-V" if family == "llada-v" else "LaViDa-LLaDA"

    def case(name, kind, fn, *, target_ms=None, target_gb=None, info=None, on_out=None):
        rec = {"family": family, "case": f"{fam}: {name}", "kind": kind,
               "target_ms": target_ms, "target_gb": target_gb}
        rec.update(info or {})
        log(f"  running {rec['case']} ...")
        try:
            r = measure(fn, warmup=a.warmup, repeats=a.repeats, cuda=cuda)
            out = r.pop("_out")
            rec.update(r)
            if on_out is not None:
                rec.update(on_out(out))
            del out
            rec["error"] = None
        except Exception as e:                     # OOM or anything else: record, go on
            rec.update(median_ms=None, peak_gb=None, error=f"{type(e).__name__}: {e}"[:1000])
        if rec["error"] is not None and cuda:      # after the except block: the traceback's
            gc.collect()                           # frames (and their tensors) are gone
            torch.cuda.empty_cache()
        _judge(rec, cuda)
        cases.append(rec)
        ms = rec.get("median_ms")
        log(f"    -> {'%.2f ms' % ms if ms is not None else rec['error']}"
            + (f", peak {rec['peak_gb']:.2f} GB" if rec.get("peak_gb") else ""))
        return rec

    t0 = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ad, twin = build_family(family, a, device, dtype, layout)
    _sync(cuda)
    build = {"family": family, "build_s": time.perf_counter() - t0,
             "weights_gb": torch.cuda.memory_allocated() / 1e9 if cuda else None,
             "build_peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
             "parameters": sum(p.numel() for p in twin.model.parameters()),
             "model_class": type(twin.model).__name__, "adapter": type(ad).__mro__[1].__name__}
    log(f"  built {build['model_class']} ({build['parameters'] / 1e9:.3f} B parameters) in "
        f"{build['build_s']:.1f} s" + (f", {build['weights_gb']:.2f} GB allocated"
                                      if cuda else ""))
    try:
        image = _image(layout)
        prompt = make_prompt(ad, a.prompt_tokens)
        answer = make_answer(ad, a.answer_tokens)
        T, A = a.targets, a.answer_tokens
        targets = [int(i * A // T) for i in range(T)]
        sample = ad.prepare([image], prompt)
        lay = sample.layouts[0]
        got = {g.name: [g.rows, g.cols] for g in lay.grids}
        if got != {"base": layout["base"], "hires": layout["hires"]} or \
                lay.span_length != layout["image_tokens"]:
            raise RuntimeError(f"the adapter read the layout {got} ({lay.span_length} tokens), "
                               f"not the one spliced in {layout}")
        ids = torch.tensor(ad.tokenizer.encode(answer), device=sample.inputs_embeds.device)
        with torch.no_grad():
            full = torch.cat([sample.inputs_embeds, ad.embed_tokens(ids).to(
                sample.inputs_embeds.dtype)])[None]
        seq = {"prompt_length": sample.prompt_length, "image_span": [lay.span_start,
                                                                   lay.span_end],
               "sequence_length": int(full.shape[1]), "answer_tokens": A, "targets": targets}
        build.update(seq)
        default_layer = Explainer(ad).layer
        layer = default_layer if a.layer is None else a.layer
        build["default_layer"] = default_layer
        build["layer"] = layer
        log(f"  sequence {seq['sequence_length']} tokens (prompt {sample.prompt_length} with "
            f"{lay.span_length} image tokens at {lay.span_start}, answer {A}); layer {layer}")

        def fwd():
            with torch.no_grad():
                return ad.forward(full)

        case(f"no-grad forward ({seq['sequence_length']} tokens)", "forward", fwd,
             on_out=lambda out: {"logits_shape": list(out.shape),
                                 "logits_finite": bool(torch.isfinite(out).all())})
        case("prepare (template + tokenizer + splice of random image features)", "prepare",
             lambda: ad.prepare([image], prompt))

        def explainer_case(name, layer_, chunk, agg, target=True, fast="auto",
                           method="diffusion-cam"):
            ex = Explainer(ad, layer=layer_, backward_chunk=chunk, fast_backward=fast)

            def run():
                # interference=None: the targets are defined for the 16 maps alone (the
                # default also computes SICD's interference maps, one backward vector each)
                return ex.explain(image, prompt, answer=answer, targets=targets,
                                  aggregate_only=agg, method=method, interference=None)

            def on_out(exp):
                d = _map_info(exp)
                d["backward"] = ex.last_backward
                return d

            return case(name, "attribution", run,
                        target_ms=TARGET_PASS_MS if target else None,
                        target_gb=TARGET_PASS_GB if target else None,
                        info={"layer": layer_, "backward_chunk": chunk, "aggregate_only": agg,
                              "fast_backward": fast, "expected_maps": 1 if agg else T + 1,
                              "method": method},
                        on_out=on_out), run

        explainer_case(f"attribution, aggregate map, layer {layer}", layer, None, True)
        prof_fn = None
        for chunk in _chunk_list(a.chunks):
            _, run = explainer_case(f"attribution, {T} per-token maps, layer {layer}, "
                                    f"backward_chunk={chunk}", layer, chunk, False)
            if prof_fn is None:
                prof_fn = run
        if a.fast_backward == "both":
            explainer_case(f"attribution, aggregate map, layer {layer}, hand-written backward",
                           layer, None, True, fast=True)
            explainer_case(f"attribution, {T} per-token maps, layer {layer}, "
                           "backward_chunk=None, hand-written backward", layer, None, False,
                           fast=True)
        if not a.no_baselines:      # method.md 4's baselines on the same 16 targets (no target)
            explainer_case(f"LLaVA-CAM, {T} per-token maps, norm of block {layer}", layer, None,
                           False, target=False, method="llava-cam")
            explainer_case(f"TAM, {T} per-token maps (one no-grad forward)", layer, None, False,
                           target=False, method="tam")
        for extra in _int_list(a.extra_layers):
            if not 0 <= extra < a.layers or extra == layer:
                log(f"  (extra layer {extra} skipped: the model has {a.layers} blocks)")
                continue
            explainer_case(f"attribution, {T} per-token maps, layer {extra}, "
                           "backward_chunk=None", extra, None, False)

        gcfg = GenerationConfig(steps=a.gen_steps, gen_length=A, block_length=A)

        def gen():
            with torch.no_grad():
                return ad.generate(sample, gcfg)

        how = "prefix KV cache" if family == "lavida" else "full sequence every step"
        case(f"generation of {A} tokens in {a.gen_steps} steps, {how}", "generation", gen,
             target_ms=TARGET_GEN_MS if family == "lavida" else None,
             info={"sampler": "diffcam.adapters.lavida.prefix_cache_generate" if family ==
                   "lavida" else "diffcam.generation.masked_diffusion_generate (LLaDA-V)"},
             on_out=lambda g: {"response_tokens": int(g.response_ids.numel()),
                               "steps": int(g.steps)})
        profile = None
        if cuda and not a.no_profile and prof_fn is not None:
            try:
                profile = _profile(prof_fn, cuda)
            except Exception as e:
                profile = {"error": f"{type(e).__name__}: {e}"[:500]}
        build["profile_16_maps"] = profile
    finally:
        del ad, twin
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return build, cases


def _image(layout):
    import numpy as np

    h, w = layout["hires"]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (16 * h, 16 * w, 3), dtype=np.uint8)


def _judge(rec, cuda) -> None:
    ms, gb = rec.get("median_ms"), rec.get("peak_gb")
    tm, tg = rec.get("target_ms"), rec.get("target_gb")
    if tm is None and tg is None:
        rec["met"] = None
        rec["met_text"] = "-"
        return
    if not cuda:
        rec["met"] = None
        rec["met_text"] = "n/a (targets are for an H100, full size)"
        return
    if ms is None:
        rec["met"] = False
        rec["met_text"] = "**no** (failed)"
        return
    ok_t = tm is None or ms <= tm
    ok_m = tg is None or (gb is not None and gb <= tg)
    rec["met"] = ok_t and ok_m
    parts = []
    if tm is not None:
        parts.append(f"time {'yes' if ok_t else 'no'}")
    if tg is not None:
        parts.append(f"memory {'yes' if ok_m else 'no'}")
    rec["met_text"] = ("**yes**" if rec["met"] else "**no**") + f" ({', '.join(parts)})"


def table(cases) -> list:
    lines = ["| case | median ms | min ms | peak GB | peak - base GB | backward | target | met? |",
             "|---|---|---|---|---|---|---|---|"]
    for r in cases:
        ms = r.get("median_ms")
        tg = []
        if r.get("target_ms") is not None:
            tg.append(f"<= {r['target_ms']:g} ms")
        if r.get("target_gb") is not None:
            tg.append(f"<= {r['target_gb']:g} GB")
        peak = r.get("peak_gb")
        above = r.get("peak_above_base_gb")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["case"], f"{ms:.2f}" if ms is not None else f"failed: {r.get('error')}",
            f"{r['min_ms']:.2f}" if r.get("min_ms") is not None else "",
            f"{peak:.2f}" if peak is not None else "n/a",
            f"{above:.2f}" if above is not None else "n/a",
            r.get("backward") or "", ", ".join(tg) or "-", r.get("met_text", "-")))
    return lines


# ----------------------------------------------------------------------------- main
def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def _dtype(name: str):
    import torch

    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
             "fp32": torch.float32, "float": torch.float32}
    if name not in names:
        raise BenchError(f"--dtype {name!r}: expected bfloat16, float16 or float32")
    return names[name]


def run(a, log=print) -> dict:
    """Run the benchmark described by the parsed arguments; returns the results dict."""
    try:
        import torch
    except ImportError as e:
        raise BenchError(f"torch is not importable ({e}); install a CUDA build of torch") from e
    if "diffcam" not in sys.modules and (_ROOT / "diffcam" / "__init__.py").is_file() \
            and str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))         # measure this checkout's code, not an install
    try:
        import diffcam
        import transformers
    except ImportError as e:
        raise BenchError(f"cannot import diffcam / transformers ({e}); run from the repository "
                         "root with transformers installed (the twins use its Llama layers)")
    _check_sizes(a)
    dtype = _dtype(a.dtype)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise BenchError(f"--device {a.device} was asked for but CUDA is not available (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); run on "
                         "the GPU machine, or use --tiny --device cpu for a smoke test")
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    if a.threads:
        torch.set_num_threads(int(a.threads))
    layout = image_layout(a.image_tokens, a.base_side)
    families = ["llada-v", "lavida"] if a.family == "both" else [a.family]
    seq_len = a.prompt_tokens + layout["image_tokens"] + a.answer_tokens
    default_layer = max(0, round(a.layers * 10 / 32))
    layer = default_layer if a.layer is None else a.layer
    if not 0 <= layer < a.layers:
        raise BenchError(f"--layer {layer}: the model has {a.layers} blocks")
    extra = [x for x in _int_list(a.extra_layers) if 0 <= x < a.layers]
    est = flop_estimate(a, seq_len, layout["image_tokens"], layer, extra)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else
        (platform.processor() or platform.machine() or "cpu"),
        "device_kind": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(), "commit": _git_commit(),
        "diffcam_path": str(Path(diffcam.__file__).resolve().parent),
        "cpu_threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": a.attn, "tiny": bool(a.tiny),
        "sizes": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads",
                                            "intermediate", "vocab", "prompt_tokens",
                                            "answer_tokens", "targets", "gen_steps")},
        "image_layout": layout, "sequence_length": seq_len, "layer": layer,
        "repeats": a.repeats, "warmup": a.warmup,
        "paper": {"ms": PAPER_MS, "gb": PAPER_GB, "device": "H20",
                  "what": "generation plus backward"},
        "targets": {"pass_ms": TARGET_PASS_MS, "pass_gb": TARGET_PASS_GB,
                    "generation_ms": TARGET_GEN_MS, "device": "H100"},
    }
    log(f"# diffcam GPU attribution benchmark, {meta['date']}")
    log(f"device {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), transformers "
        f"{meta['transformers']}, dtype {meta['dtype']}, attention {a.attn}, commit "
        f"{meta['commit']}")
    log(f"sizes {meta['sizes']}; image layout {layout}; sequence {seq_len} tokens")
    L0 = est["layers"][str(layer)]
    log(f"estimate: no-grad forward {est['forward_tflop']:.1f} TFLOP "
        f"({est['forward_ms_at_peak']:.1f} ms at {H100_BF16_DENSE_TFLOPS:g} TFLOP/s); "
        f"{a.targets}-map pass at layer {layer}: {L0['pass16_tflop']:.1f} TFLOP "
        f"({L0['pass16_ms_at_peak']:.1f} ms at peak; {est['vectors']} VJPs of "
        f"{L0['vjp_tflop']:.2f} TFLOP through {L0['blocks_above']} blocks); aggregate "
        f"{L0['aggregate_tflop']:.1f} TFLOP ({L0['aggregate_ms_at_peak']:.1f} ms); the "
        f"{TARGET_PASS_MS:g} ms target needs layer >= " + ", ".join(
            f"{v['min_layer']} at {k}" for k, v in est["target_150ms_reachable_from"].items())
        + " of peak")
    builds, cases = [], []
    for fam in families:
        log(f"## {fam}")
        try:
            b, c = run_family(fam, a, device, dtype, layout, cuda, log)
            builds.append(b)
            cases.extend(c)
            gc.collect()                       # the family's model is unreachable now
            if cuda:
                torch.cuda.empty_cache()
        except BenchError:
            raise
        except Exception as e:
            import traceback
            builds.append({"family": fam, "error": f"{type(e).__name__}: {e}"[:1000],
                           "traceback": traceback.format_exc()[-4000:]})
            log(f"  {fam} failed: {type(e).__name__}: {e}")
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
    lines = table(cases)
    return {"meta": meta, "estimate": est, "builds": builds, "cases": cases, "table": lines}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.estimate_only:
        try:
            _check_sizes(a)
            layout = image_layout(a.image_tokens, a.base_side)
        except BenchError as e:
            print(f"gpu_llada_v.py: error: {e}", file=sys.stderr)
            return 2
        layer = max(0, round(a.layers * 10 / 32)) if a.layer is None else a.layer
        seq = a.prompt_tokens + layout["image_tokens"] + a.answer_tokens
        est = flop_estimate(a, seq, layout["image_tokens"], layer,
                            [x for x in _int_list(a.extra_layers) if 0 <= x < a.layers])
        print(json.dumps({"image_layout": layout, "sequence_length": seq, "layer": layer,
                          "estimate": est}, indent=1))
        return 0
    try:
        res = run(a, log=lambda s: print(s, flush=True))
    except BenchError as e:
        print(f"gpu_llada_v.py: error: {e}", file=sys.stderr)
        return 2
    meta = res["meta"]
    print()
    print(f"## Results ({meta['date']}, {meta['device']}, torch {meta['torch']}, "
          f"{meta['dtype']}, {meta['attn_implementation']}, {meta['sequence_length']} tokens, "
          f"median of {a.repeats} after {a.warmup} warm-up)")
    print()
    for line in res["table"]:
        print(line)
    print()
    print(f"Paper (H20, generation + backward): {PAPER_MS} ms, {PAPER_GB} GB. "
          f"Targets (H100): attribution pass <= {TARGET_PASS_MS:g} ms and <= "
          f"{TARGET_PASS_GB:g} GB, generation <= {TARGET_GEN_MS:g} ms.")
    for b in res["builds"]:
        prof = b.get("profile_16_maps")
        if prof and prof.get("table"):
            print(f"\n### {b['family']}: torch.profiler, one {a.targets}-map call\n")
            print(prof["table"])
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str))
        print(f"\nresults written to {path}")
    failed = [b for b in res["builds"] if b.get("error")] + \
        [c for c in res["cases"] if c.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
