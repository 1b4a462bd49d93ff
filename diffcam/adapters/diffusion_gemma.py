"""DiffusionGemma (``google/diffusiongemma-26B-A4B-it``; native in transformers >= 5.13):
block diffusion with an encoder that fills a KV cache and a bidirectional decoder that denoises
canvases of uniform noise.

>>> adapter = diffcam.load("diffusion-gemma", "google/diffusiongemma-26B-A4B-it",
...                        device_map="auto")                                     # doctest: +SKIP
>>> with diffcam.Explainer(adapter) as ex:                                         # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "<image> Describe the image.")

Why the map goes through the **encoder** (docs/models.md 7, 9): the image only ever enters the
encoder pass (``model.model.encoder``: vision tower, ``embed_vision``, then
``language_model.layers``), whose keys and values the decoder reads from the cache; the decoder's
hidden sequence is the canvas alone.  So the hooked blocks are the encoder text layers
(``model.model.encoder.language_model.layers``, bare-tensor outputs), and gradients flow from the
canvas logits through the cached keys/values back to the image positions.

The attribution forward over ``[prompt | response]`` (length L = P + G) reproduces generation:

* one encoder pass over the whole sequence with the masks of the model's own
  ``create_masks_for_generate`` (causal text, bidirectional within each image when
  ``use_bidirectional_attention == "vision"``) into a cache that keeps every position -- with a
  causal encoder this gives exactly the keys/values the incremental encoder calls of ``generate``
  produce, and the hooked block runs once over all L positions;
* per canvas k (``canvas_length`` tokens, the last one padded with the pad id) a fresh
  ``DynamicCache(config)`` is filled with the keys/values of positions ``[0, P + k C)`` (its
  sliding-window layers keep their last window, as in ``generate``), and the decoder runs on the
  canvas tokens with positions ``P + k C ...``, no self-conditioning signal;
* logits are ``lm_head`` + the final soft-capping (rows < P are zero: the encoder predicts
  nothing); ``logit_shift = 0`` (canvas row j scores canvas token j).

Trajectory states: the image is in the hooked sequence only at the prefill (step 0); every
denoising step is a decoder pass, so states 1..S are infeasible (method.md 1.8) and the Explainer
says so.  DiffusionGemma has no mask token: the state-0 canvas is filled with ``mask_token_id``
(the tokenizer's ``<mask>``, else the pad id), a stand-in for "nothing decided yet"; the sampler's
real start is uniform noise.  Generation runs the model's own ``generate`` (entropy-bound sampler,
temperature schedule, adaptive stopping) on the prepared prompt embeddings; a position counts as
masked at step s until the argmax canvas holds its final token from s on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .generic import GenericAdapter
from .base import Adapter, GenerationConfig, GenerationResult, PreparedSample, cache_kwarg

__all__ = ["DiffusionGemmaAdapter", "load", "CHECKPOINTS", "MIN_TRANSFORMERS"]

CHECKPOINTS = ("google/diffusiongemma-26B-A4B-it",)
MIN_TRANSFORMERS = "5.13"


class _SoftcapHead(nn.Module):
    """``lm_head`` followed by DiffusionGemma's final-logit soft-capping, in float32."""

    def __init__(self, lm_head, cap):
        super().__init__()
        self.lm_head = lm_head
        self.cap = cap

    def forward(self, h):
        z = self.lm_head(h).float()
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        return z


class _Recorder:
    """A ``generate`` streamer that keeps the argmax canvas of every denoising step."""

    def __init__(self):
        self.canvas_steps = [[]]

    def put(self, value):
        if self.canvas_steps[-1]:          # a finished canvas arrives after its drafts
            self.canvas_steps.append([])

    def put_draft(self, value=None, logits=None):
        self.canvas_steps[-1].append(torch.as_tensor(value)[0].clone())

    def end(self):
        if not self.canvas_steps[-1]:
            self.canvas_steps.pop()


class DiffusionGemmaAdapter(Adapter):
    """Adapter for ``DiffusionGemmaForBlockDiffusion``.

    model           ``DiffusionGemmaForBlockDiffusion`` (transformers >= 5.13)
    processor       the checkpoint's processor (``AutoProcessor``): ``apply_chat_template`` and
                    ``__call__`` giving ``input_ids``, ``pixel_values``, ``image_position_ids``
                    (and ``mm_token_type_ids``)
    mask_token_id   the id filling undecided canvas positions of state 0 (default: the
                    tokenizer's ``mask_token_id``, else the pad id)
    chat_template   True: ``processor.apply_chat_template`` with one image entry per marker
    generate_kwargs extra ``generate`` settings (``t_min``, ``t_max``, ``sampler_config``,
                    ``stability_threshold``, ``confidence_threshold``, ...)
    default_layer   hooked encoder layer when the Explainer is given none
    """

    name = "diffusion-gemma"
    logit_shift = 0
    broadcast_extras = True

    def __init__(self, model, processor, *, mask_token_id: Optional[int] = None,
                 chat_template: bool = True, image_marker: str = "<image>",
                 generate_kwargs: Optional[dict] = None, default_layer: Optional[int] = None):
        inner = getattr(model, "model", None)
        if not (hasattr(inner, "encoder") and hasattr(inner, "decoder")
                and hasattr(model, "lm_head")):
            raise TypeError(f"{type(model).__name__} is not a DiffusionGemmaForBlockDiffusion: "
                            "expected model.model.encoder, model.model.decoder and model.lm_head")
        if processor is None:
            raise TypeError("DiffusionGemma needs its processor (AutoProcessor.from_pretrained"
                            "(path)): pass processor=")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise TypeError("the processor has no .tokenizer")
        self.encoder = inner.encoder
        self.decoder = inner.decoder
        self.config = model.config
        self.text_config = self.config.get_text_config()
        self.canvas_length = int(self.config.canvas_length)
        self.image_token_id = int(self.config.image_token_id)
        self.pad_token_id = int(self.text_config.pad_token_id or 0)
        tok_mask = getattr(self.tokenizer, "mask_token_id", None)
        self.mask_token_id = int(mask_token_id if mask_token_id is not None else
                                 tok_mask if tok_mask is not None else self.pad_token_id)
        self.mode = getattr(self.text_config, "use_bidirectional_attention", None)
        if self.mode == "all":
            raise NotImplementedError(
                "use_bidirectional_attention='all': the encoder prefill is then bidirectional "
                "over the prompt, which one pass over [prompt | response] cannot reproduce; "
                "only causal and 'vision' encoders are supported")
        self.chat_template = bool(chat_template)
        self.image_marker = image_marker
        self.generate_kwargs = dict(generate_kwargs or {})
        self._default_layer = default_layer
        self._head = _SoftcapHead(model.lm_head,
                                  getattr(self.text_config, "final_logit_softcapping", None))
        self.default_generation = GenerationConfig(steps=48, gen_length=self.canvas_length)

    # ------------------------------------------------------------------ protocol
    def blocks(self):
        return self.encoder.language_model.layers

    @property
    def default_layer(self) -> int:
        if self._default_layer is not None:
            return int(self._default_layer)
        return super().default_layer

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def embed_tokens(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.decoder.embed_tokens(ids)

    def head_module(self):
        return self._head

    def extend_extras(self, sample: PreparedSample, total_length: int) -> dict:
        P = sample.prompt_length
        tt = sample.extras["mm_token_type_ids"]
        if total_length > P:
            tt = torch.cat([tt, tt.new_zeros(1, total_length - P)], 1)
        return {"prompt_length": P, "mm_token_type_ids": tt[:, :total_length]}

    @contextlib.contextmanager
    def _canvas_embeddings(self, embeds):
        """Make the decoder's ``embed_tokens`` return ``embeds`` (the decoder has no
        ``inputs_embeds`` path; the canvas is given as embeddings)."""
        h = self.decoder.embed_tokens.register_forward_hook(lambda m, a, out: embeds)
        try:
            yield
        finally:
            h.remove()

    def encode(self, inputs_embeds, extras: dict, return_hidden: bool = False):
        """The encoder pass over the whole sequence; returns the cache (every position kept),
        and with ``return_hidden`` also the encoder's final hidden states (after its norm)."""
        from transformers import DynamicCache

        B, L = inputs_embeds.shape[:2]
        pos = torch.arange(L, device=inputs_embeds.device)[None].expand(B, L)
        tt = extras["mm_token_type_ids"].to(inputs_embeds.device)
        if tt.shape[0] != B:
            tt = tt.expand(B, -1)
        make_masks, lm = self.encoder.create_masks_for_generate, self.encoder.language_model
        masks = make_masks(config=self.config, inputs_embeds=inputs_embeds, attention_mask=None,
                           position_ids=pos, mm_token_type_ids=tt,
                           **{cache_kwarg(make_masks): None})
        cache = DynamicCache()
        out = lm(inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=pos,
                 **{cache_kwarg(lm.forward): cache})
        return (cache, out.last_hidden_state) if return_hidden else cache

    def _prefix_cache(self, full, upto: int):
        from transformers import DynamicCache

        c = DynamicCache(config=self.text_config)
        for i, layer in enumerate(full.layers):
            c.update(layer.keys[:, :, :upto], layer.values[:, :, :upto], i)
        return c

    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        return self._forward(inputs_embeds, attention_mask, extras, lens=False)

    def lens_logits(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        """Logits of every position's own final hidden state, the logit lens the Token
        Activation Map reads (``Explainer.explain(method="tam")``): for the prompt rows the
        encoder's final hidden states through the same head (``forward`` leaves them zero: the
        encoder predicts nothing), for the canvas rows the decoder's, as ``forward``."""
        return self._forward(inputs_embeds, attention_mask, extras, lens=True)

    def _forward(self, inputs_embeds, attention_mask, extras, lens: bool):
        if extras is None or "prompt_length" not in extras:
            raise ValueError("DiffusionGemma's forward needs extras from extend_extras() (the "
                             "prompt length splits encoder prefix and canvases)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("padded batches are not supported by the DiffusionGemma "
                                      "adapter; explain one sample at a time")
        B, L, D = inputs_embeds.shape
        P = int(extras["prompt_length"])
        G, C = L - P, self.canvas_length
        if lens:
            full, enc = self.encode(inputs_embeds, extras, return_hidden=True)
            hidden = [enc[:, :P].to(inputs_embeds.dtype)]
        else:
            full = self.encode(inputs_embeds, extras)
            hidden = [inputs_embeds.new_zeros(B, P, D)]
        for k in range((G + C - 1) // C):
            lo = P + k * C
            canvas = inputs_embeds[:, lo:min(lo + C, L)]
            if canvas.shape[1] < C:
                pad = self.embed_tokens(torch.full((C - canvas.shape[1],), self.pad_token_id))
                canvas = torch.cat([canvas, pad[None].expand(B, -1, -1).to(canvas.dtype)], 1)
            ids = torch.full((B, C), self.pad_token_id, dtype=torch.long, device=canvas.device)
            pos = torch.arange(lo, lo + C, device=canvas.device)[None]
            with self._canvas_embeddings(canvas):
                out = self.decoder(decoder_input_ids=ids, decoder_position_ids=pos,
                                   **{cache_kwarg(self.decoder.forward):
                                      self._prefix_cache(full, lo)})
            hidden.append(out.last_hidden_state[:, :min(C, L - lo)])
        return self._head(torch.cat(hidden, 1))

    # ------------------------------------------------------------------ prompts
    def _messages(self, prompt: str, n_images: int) -> list:
        pieces = prompt.split(self.image_marker)
        content = []
        for i, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if i < n_images:
                content.append({"type": "image"})
        return [{"role": "user", "content": content}]

    def soft_grid(self, position_ids: torch.Tensor) -> tuple:
        """(rows, cols) of one image's soft-token grid from its patch positions (x, y), padding
        (-1, -1) ignored: the vision pooler averages k x k patches, row-major."""
        k = int(self.config.vision_config.pooling_kernel_size)
        valid = (position_ids >= 0).all(-1)
        p = position_ids[valid]
        pw, ph = int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1
        if pw % k or ph % k:
            raise ValueError(f"a {ph}x{pw} patch grid is not divisible by the pooling kernel {k}")
        return ph // k, pw // k

    def prepare(self, images, prompt: str) -> PreparedSample:
        from PIL import Image
        from ..attribution.layout import single_grid_layout

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        images = GenericAdapter._check_images(images)
        n_markers = prompt.count(self.image_marker)
        if n_markers == 0 and len(images) == 1:
            prompt = self.image_marker + prompt
        elif n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} image marker(s) {self.image_marker!r} but "
                             f"{len(images)} image(s) were given; put one marker per image")
        if self.chat_template:
            text = self.processor.apply_chat_template(self._messages(prompt, len(images)),
                                                      tokenize=False, add_generation_prompt=True)
        else:
            text = prompt.replace(self.image_marker, self.tokenizer.image_token)
        pil = [Image.fromarray(np.ascontiguousarray(a)) for a in images]
        batch = self.processor(text=[text], images=pil or None, return_tensors="pt")
        ids = torch.as_tensor(batch["input_ids"])[0].to(self.device)
        runs = _runs(ids.tolist(), self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(f"the processor's ids hold {len(runs)} run(s) of image token "
                             f"{self.image_token_id} for {len(images)} image(s)")
        tt = batch.get("mm_token_type_ids") if hasattr(batch, "get") else None
        tt = ((ids == self.image_token_id).long()[None] if tt is None
              else torch.as_tensor(tt).to(self.device).long())
        layouts = []
        with torch.no_grad():
            embeds = self.encoder.get_input_embeddings()(ids).clone()
            if images:
                pv = batch["pixel_values"].to(self.device)
                ipos = batch["image_position_ids"].to(self.device)
                feats = self.encoder.get_image_features(pv.to(embeds.dtype), ipos).pooler_output
                off = 0
                for k, (start, n) in enumerate(runs):
                    rows, cols = self.soft_grid(ipos[k])
                    if rows * cols != n:
                        raise ValueError(f"image {k}: {n} image tokens but the patch positions "
                                         f"give a {rows}x{cols} soft-token grid")
                    embeds[start:start + n] = feats[off:off + n].to(embeds.dtype)
                    off += n
                    layouts.append(single_grid_layout(start, rows, cols, "soft", k))
                if off != feats.shape[0]:
                    raise ValueError(f"the vision tower produced {feats.shape[0]} soft tokens for "
                                     f"{off} image tokens")
        return PreparedSample(input_ids=ids, inputs_embeds=embeds.detach(), layouts=layouts,
                              extras={"mm_token_type_ids": tt}, images=list(images),
                              prompt=prompt)

    # ------------------------------------------------------------------ generation
    def generate(self, sample: PreparedSample, config: GenerationConfig) -> GenerationResult:
        """The model's own ``generate`` on the prepared prompt embeddings, trajectory recorded.

        ``gen_length`` must be a multiple of ``canvas_length``; ``steps`` is the maximum number
        of denoising steps per canvas (the adaptive stopping may end a canvas earlier);
        ``seed`` seeds the torch RNG the sampler draws from.  ``temperature``/``remasking`` do not
        apply (DiffusionGemma has its own temperature schedule, ``generate_kwargs``)."""
        C, G = self.canvas_length, int(config.gen_length)
        if G % C:
            raise ValueError(f"DiffusionGemma denoises whole canvases of {C} tokens: set "
                             f"GenerationConfig(gen_length=...) to a multiple of {C}")
        if config.block_length not in (None, G, C):
            raise ValueError(f"block_length={config.block_length}: DiffusionGemma's blocks are "
                             f"its canvases ({C} tokens)")
        ids = sample.input_ids[None].to(self.device)
        P = ids.shape[1]
        rec = _Recorder()
        emb = sample.inputs_embeds[None]
        state = {"first": True}

        def inject(module, args, out):
            if state["first"] and out.shape[1] == P:
                state["first"] = False
                return emb.to(out.dtype)
            return out

        hook = self.encoder.get_input_embeddings().register_forward_hook(inject)
        devices = [self.device] if self.device.type == "cuda" else []
        quiet = logging.getLogger("transformers.models.diffusion_gemma.generation_diffusion_gemma")
        level = quiet.level
        try:
            quiet.setLevel(logging.ERROR)
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(int(config.seed))
                kw = dict(self.generate_kwargs)
                kw.setdefault("max_denoising_steps", int(config.steps))
                out = self.model.generate(input_ids=ids, max_new_tokens=G, streamer=rec,
                                          mm_token_type_ids=sample.extras["mm_token_type_ids"],
                                          **kw)
        finally:
            hook.remove()
            quiet.setLevel(level)
        if state["first"]:
            raise RuntimeError("generate() never embedded the prompt: the prepared embeddings "
                               "were not used")
        seq = out.sequences if hasattr(out, "sequences") else out
        resp = seq[0, P:P + G].clone()
        if resp.numel() < G:   # every sequence stopped early: the rest is padding
            resp = torch.cat([resp, resp.new_full((G - resp.numel(),), self.pad_token_id)])
        return _trajectory(rec.canvas_steps, resp, C)

    def info(self) -> dict:
        d = super().info()
        d.update({"blocks": "model.model.encoder.language_model.layers",
                  "canvas_length": self.canvas_length, "image_token_id": self.image_token_id,
                  "bidirectional": self.mode})
        return d


def _runs(ids: list, tok: int) -> list:
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == tok:
            j = i
            while j < len(ids) and ids[j] == tok:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _trajectory(canvas_steps: list, resp: torch.Tensor, C: int) -> GenerationResult:
    """masked[s, j]: response position j is not yet settled after s denoising steps (all steps of
    all canvases in order).  Settled = the argmax canvas holds the final token from that step to
    the end of its canvas; a canvas is wholly settled after its last step (a canvas never
    generated because every sequence had ended is padding, settled at the last step)."""
    G = resp.numel()
    n_canvas = (G + C - 1) // C
    steps = [list(s) for s in canvas_steps[:n_canvas]]
    while len(steps) < n_canvas:
        steps.append([])
    S = sum(len(s) for s in steps)
    masked = torch.ones(S + 1, G, dtype=torch.bool)
    hhi = torch.zeros(S + 1, dtype=torch.bool)
    hhi[0] = True
    g = 0
    final = resp.cpu()
    for k, drafts in enumerate(steps):
        lo, hi = k * C, min((k + 1) * C, G)
        if not drafts:     # generation stopped (EOS) before this canvas: padding, final at S
            masked[S, lo:hi] = False
            continue
        same = torch.stack([d.cpu()[:hi - lo] == final[lo:hi] for d in drafts])   # (n, w)
        # stable_from[j]: first draft index from which all later drafts equal the final token
        n = same.shape[0]
        tail_ok = torch.flip(torch.cumprod(torch.flip(same.int(), [0]), 0), [0]).bool()
        for m in range(n):
            masked[g + m + 1, lo:hi] = ~tail_ok[m]
        masked[g + n, lo:hi] = False
        masked[g + n + 1:, lo:hi] = False
        g += n
    return GenerationResult(response_ids=resp, masked=masked, steps=S, hidden_has_image=hhi)


# ---------------------------------------------------------------------- loading
def _require_transformers():
    try:
        import transformers
        from packaging.version import Version
    except ImportError as e:
        raise ImportError(f"DiffusionGemma is native in transformers >= {MIN_TRANSFORMERS}: "
                          f"pip install 'transformers>={MIN_TRANSFORMERS}'") from e
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS) or \
            not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        raise ImportError(f"transformers {transformers.__version__} has no DiffusionGemma: "
                          f"pip install 'transformers>={MIN_TRANSFORMERS}'")
    return transformers


def prepare_model(model, freeze: bool = True):
    """eval mode and frozen parameters (``freeze``)."""
    if model.training:
        model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def load(path_or_model=None, *, processor=None, torch_dtype=torch.bfloat16, device_map=None,
         device=None, attn_implementation: Optional[str] = "sdpa", freeze: bool = True,
         **adapter_kwargs: Any) -> DiffusionGemmaAdapter:
    """``diffcam.load("diffusion-gemma", path_or_model, ...)``.

    path_or_model   a checkpoint path or hub id (``"google/diffusiongemma-26B-A4B-it"``) loaded
                    with ``DiffusionGemmaForBlockDiffusion.from_pretrained``, or the model you
                    already loaded
    processor       required with a model object (``AutoProcessor`` of the checkpoint otherwise)
    torch_dtype     bfloat16 (the 26B MoE needs about 52 GB of weights)
    device_map      passed to ``from_pretrained`` (e.g. ``"auto"`` over several GPUs)
    device          move the loaded model there (single device)
    attn_implementation  passed to ``from_pretrained`` ("sdpa": flash attention cannot express
                    the encoder's bidirectional image blocks)
    freeze          eval mode and ``requires_grad=False`` on every parameter
    adapter_kwargs  :class:`DiffusionGemmaAdapter` options
    """
    if path_or_model is None:
        raise TypeError("diffcam.load('diffusion-gemma', path_or_model): give a checkpoint path / "
                        f"hub id (one of {CHECKPOINTS}) or the model you loaded")
    tf = _require_transformers()
    if isinstance(path_or_model, (str, os.PathLike)):
        kw = {"torch_dtype": torch_dtype}
        if attn_implementation is not None:
            kw["attn_implementation"] = attn_implementation
        if device_map is not None:
            kw["device_map"] = device_map
        model = tf.DiffusionGemmaForBlockDiffusion.from_pretrained(str(path_or_model), **kw)
        if processor is None:
            processor = tf.AutoProcessor.from_pretrained(str(path_or_model))
        if device is not None:
            model = model.to(device)
    else:
        model = path_or_model
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a path or a torch module, got {type(model).__name__}")
        if processor is None:
            raise TypeError("diffcam.load('diffusion-gemma', model, ...) needs processor= (the "
                            "checkpoint's AutoProcessor)")
    impl = getattr(model.config.get_text_config(), "_attn_implementation", None)
    if impl and "flash" in str(impl) and \
            getattr(model.config.get_text_config(), "use_bidirectional_attention", None) == "vision":
        warnings.warn("flash attention cannot express the bidirectional image blocks of the "
                      "encoder mask; load with attn_implementation='sdpa' for faithful maps",
                      UserWarning, stacklevel=2)
    prepare_model(model, freeze)
    return DiffusionGemmaAdapter(model, processor, **adapter_kwargs)
