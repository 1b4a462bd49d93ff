"""LaViDa (jacklishufan/LaViDa) with the LLaDA or the Dream backbone, and LaViDa-O: the adapter
and its loader.

LaViDa couples a SigLIP tower and a LLaVA-NeXT anyres splice with a masked-diffusion LM
(docs/models.md section 4, docs/families/lavida.md):

* **LLaDA backbone** (``LlavaLladaForMaskedDiffusion``): blocks
  ``model.model.transformer.blocks`` (32, each returns ``(x, cache)``), the inner call
  ``model.get_model()(None, input_embeddings=...)`` returns the logits (LM head
  ``transformer.ff_out``); mask 126336, logit shift 0.
* **Dream backbone** (``LlavaDreamForMaskedDiffusion``): blocks ``model.model.layers`` (28),
  ``model.model(inputs_embeds=...)`` then ``model.lm_head``; mask 151666 and **logit shift 1**
  (row j - 1 scores token j).
* **Packing**: every crop is 2x2-pooled (``ALWASY_DO_2DPOOL``, on by default): a 14 x 14 base
  grid, then the high-resolution grid with its newline column; LaViDa-O is not pooled (27 x 27).
  The adapter reads the layout from the spliced features, so both work unchanged.
* **Sampler**: LaViDa's ``prefix_lm`` sampling -- one prefill call over the prompt (with the
  image) that builds a KV cache, then every step feeds only the response.  Only the prefill
  holds the image, so of the trajectory states only state 0 (and ``"final"``, which is always
  re-run over the full sequence) can be explained (method.md 1.8); ``sampler="full"`` re-runs
  the whole sequence every step instead, and every state is feasible.  With the Dream backbone
  the prefill's last row predicts the first response token (logit shift).
* **Activation checkpointing**, which LaViDa switches on in ``__init__`` (blocks re-run in the
  backward, hooks fire twice), is switched off.
* The top-level ``forward`` is the training forward (random masking, doubled batch); it is never
  called.

``reference_quirks`` reproduces the released Diffusion-CAM code's packing bugs (sheared slice,
unexpanded target positions) for comparisons only (docs/reference_comparison.md).

>>> import diffcam
>>> adapter = diffcam.load("lavida", "jacklishufan/lavida-llada-v1.0-instruct")  # doctest: +SKIP
>>> with diffcam.Explainer(adapter) as ex:                                       # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "<image>\\nDescribe the image.",
...                      generation=diffcam.GenerationConfig(steps=32, gen_length=64))
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from ..generation import masked_diffusion_generate
from ..generation.sampler import _gumbel_max_scores, num_transfer_tokens
from ._llava_family import (LlavaFamilyAdapter, _SamplerView, check_transformers, import_family)
from .base import GenerationConfig, GenerationResult

__all__ = ["LaViDaAdapter", "load", "prefix_cache_generate", "INSTALL", "CHECKPOINTS",
           "VISION_KWARGS"]

INSTALL = ("git clone https://github.com/jacklishufan/LaViDa && cd LaViDa && pip install -e .[train] "
           "(installs the package 'llava' and deepspeed, pins torch 2.6.0 / transformers 4.50.3; "
           "LaViDa-O: https://github.com/adobe-research/LaVida-O)")
CHECKPOINTS = {
    "llada": ("jacklishufan/lavida-llada-v1.0-instruct", "jacklishufan/lavida-llada-1.0-fim",
              "jacklishufan/lavida-llada-1.0-lowres", "hbXNov/lavida-llada-reason"),
    "dream": ("jacklishufan/lavida-dream-v1.0-instruct",),
    "lavida-o": ("jacklishufan/LaViDa-O-v1.0",),
}
#: the vision settings LaViDa's demo passes to load_pretrained_model
VISION_KWARGS = {"mm_vision_tower": "google/siglip-so400m-patch14-384",
                 "mm_resampler_type": None, "mm_projector_type": "mlp2x_gelu",
                 "mm_hidden_size": 1152, "use_mm_proj": True}


class LaViDaAdapter(LlavaFamilyAdapter):
    """Adapter of LaViDa / LaViDa-O (LLaDA or Dream backbone, found from the model's attributes).

    sampler   "prefix" (LaViDa's prefix-KV-cache sampling, the default) or "full"
    See :class:`~diffcam.adapters._llava_family.LlavaFamilyAdapter` for the other parameters.

    >>> from diffcam.testing.twins.lavida import build_lavida_twin
    >>> twin = build_lavida_twin(backbone="dream", seed=0)
    >>> ad = LaViDaAdapter(twin.model, **twin.load_kwargs())
    >>> ad.backbone, ad.logit_shift, ad.mask_token_id, ad.blocks() is twin.model.model.layers
    ('dream', 1, 151666, True)
    """

    family = "lavida"
    transformers_pin = "4.50.3"
    #: the released predict.py's length: 64 tokens in one block, step_ratio 0.5 -> 32 steps
    default_generation = GenerationConfig(steps=32, gen_length=64, block_length=64)
    install_advice = INSTALL

    def __init__(self, model, tokenizer=None, image_processor=None, *, sampler: str = "prefix",
                 **kwargs):
        if sampler not in ("prefix", "full"):
            raise ValueError(f"sampler={sampler!r}: expected 'prefix' (LaViDa's prefix_lm) or "
                             "'full'")
        self.sampler = sampler
        self.backbone = self._detect_backbone(model)
        if self.backbone == "llada":
            self.conv_template = "llada"
            self.family_mask_token_id = 126336
            self.logit_shift = 0
            self.padding_modes = ("mask", "bias")
        else:
            self.conv_template = None
            self.family_mask_token_id = 151666
            self.logit_shift = 1
            self.padding_modes = ("mask",)
        super().__init__(model, tokenizer, image_processor, **kwargs)
        self.name = f"lavida-{self.backbone}"

    @staticmethod
    def _detect_backbone(model) -> str:
        get = getattr(model, "get_model", None)
        inner = get() if callable(get) else None
        if inner is not None and hasattr(getattr(inner, "transformer", None), "blocks"):
            return "llada"
        if inner is not None and hasattr(inner, "layers") and hasattr(model, "lm_head"):
            model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
            if "llada" in model_type:
                raise TypeError(f"lavida: {type(model).__name__} has Llama-style layers and "
                                f"model_type {model_type!r}: this is LLaDA-V, not LaViDa; use "
                                "diffcam.load('llada-v', ...)")
            return "dream"
        raise TypeError(f"lavida: {type(model).__name__} is not a LaViDa model (neither "
                        "model.model.transformer.blocks (LLaDA backbone) nor model.model.layers + "
                        "model.lm_head (Dream backbone)); load it with llava.model.builder."
                        f"load_pretrained_model(path, None, 'llava_llada' | 'llava_dream') from "
                        f"{INSTALL}")

    def _check_structure(self) -> None:
        inner = self.model.get_model()
        missing = [f"model.model.{a}" for a in ("image_newline", "vision_tower", "mm_projector")
                   if not hasattr(inner, a)]
        missing += [a for a in ("prepare_inputs_labels_for_multimodal", "get_vision_tower")
                    if not hasattr(self.model, a)]
        if missing:
            raise TypeError(f"lavida: {type(self.model).__name__} lacks {', '.join(missing)}; "
                            f"load it with the family's code ({INSTALL})")

    def _prepare_model(self) -> None:
        super()._prepare_model()
        inner = self.model.get_model()
        if callable(getattr(inner, "set_activation_checkpointing", None)):
            inner.set_activation_checkpointing(None)
        if getattr(inner, "activation_checkpointing_strategy", None) is not None:
            raise RuntimeError("lavida: activation checkpointing is still on after "
                               "set_activation_checkpointing(None) (blocks would re-run in the "
                               "backward and hooks fire twice); switch it off before explaining")
        for m in (self.model, inner):
            if getattr(m, "is_gradient_checkpointing", False) and \
                    callable(getattr(m, "gradient_checkpointing_disable", None)):
                m.gradient_checkpointing_disable()
            if getattr(m, "gradient_checkpointing", False) is True:
                m.gradient_checkpointing = False

    # ------------------------------------------------------------------ protocol
    def blocks(self):
        inner = self.model.get_model()
        return inner.transformer.blocks if self.backbone == "llada" else inner.layers

    def head_module(self):
        if self.backbone == "dream":
            return self.model.lm_head
        return self._llada_head()

    def _llada_head(self):
        inner = self.model.get_model()
        if getattr(inner.config, "weight_tying", False):
            return None                       # logits = x @ wte.weight, no head module
        return getattr(inner.transformer, "ff_out", None)

    def _logits(self, inputs_embeds, attention_mask=None, padding_mode=None, rows=None):
        inner = self.model.get_model()
        if self.backbone == "dream":
            out = inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return self.model.lm_head(hidden if rows is None else hidden[:, rows])
        kw = {}
        if attention_mask is not None:
            if padding_mode == "bias":            # keys masked for every query
                m = attention_mask.bool()
                L = m.shape[1]
                kw["attention_bias"] = m[:, None, None, :].expand(m.shape[0], 1, L, L)
            else:
                kw["attention_mask"] = attention_mask
        if rows is None:
            return inner(None, input_embeddings=inputs_embeds, **kw).logits
        head = self._llada_head()
        if head is None:
            return inner(None, input_embeddings=inputs_embeds, **kw).logits[:, rows]
        # the head is inside the backbone: re-index its input, ahead of any other pre-hook
        handle = head.register_forward_pre_hook(
            lambda mod, args: (args[0][:, rows],) + tuple(args[1:]), prepend=True)
        try:
            return inner(None, input_embeddings=inputs_embeds, **kw).logits
        finally:
            handle.remove()

    # ------------------------------------------------------------------ prefix KV cache
    def _prefill(self, prompt_embeds):
        """One call over the prompt: (cache, logits of the prompt's last row (1, V))."""
        inner = self.model.get_model()
        if self.backbone == "llada":
            out = inner(None, input_embeddings=prompt_embeds, use_cache=True)
            return out.attn_key_values, out.logits[:, -1]
        out = inner(inputs_embeds=prompt_embeds, use_cache=True)
        return out.past_key_values, self.model.lm_head(out.last_hidden_state[:, -1])

    def _step(self, response_embeds, cache, prompt_length: int):
        """Logits (1, G, V) of the response rows, the prompt read from the cache only."""
        inner = self.model.get_model()
        if self.backbone == "llada":
            return inner(None, input_embeddings=response_embeds, past_key_values=cache,
                         use_cache=False).logits
        out = inner(inputs_embeds=response_embeds, past_key_values=cache, use_cache=True)
        logits = self.model.lm_head(out.last_hidden_state)
        _restore_cache(cache, prompt_length)
        return logits

    def generate(self, sample, config: GenerationConfig) -> GenerationResult:
        """``sampler="prefix"``: :func:`prefix_cache_generate`; ``"full"``: the full sequence
        every step."""
        if self.sampler == "full":
            return masked_diffusion_generate(_SamplerView(self), sample, config)
        return prefix_cache_generate(self, sample, config)

    def info(self) -> dict:
        d = super().info()
        d.update({"backbone": self.backbone, "sampler": self.sampler,
                  "blocks": "model.model.transformer.blocks" if self.backbone == "llada"
                  else "model.model.layers"})
        return d


def _restore_cache(cache, length: int) -> None:
    """Cut a transformers Cache that a cached call extended back to ``length`` entries (tuple
    caches are never changed by a call)."""
    if cache is None or isinstance(cache, (list, tuple)):
        return
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return
    n = int(get())
    if n != length:
        cache.crop(length - n)        # negative: drop that many (transformers 4.4x and 5.x)
    if int(get()) != length:
        raise RuntimeError(f"lavida: could not cut the prefix KV cache back to {length} entries "
                           f"(it holds {int(get())})")


def prefix_cache_generate(adapter: LaViDaAdapter, sample, config: GenerationConfig
                          ) -> GenerationResult:
    """LaViDa's prefix-LM sampling with LLaDA's low-confidence remasking, recording the
    trajectory.

    1. prefill: one call over the prompt embeddings (image included) builds the KV cache;
    2. every step feeds only the response embeddings (current state, masks included), reading
       the prompt from the cache (the prompt never sees the response), and commits the most
       confident masked positions of the current block (LLaDA's linear schedule,
       ``num_transfer_tokens``); Gumbel-max sampling for ``temperature > 0``;
    3. with logit shift 1 (Dream) token 0 is predicted by the prefill's last row, token j > 0 by
       response row j - 1.

    ``hidden_has_image`` is True for state 0 only: the prefill, which holds the image, runs
    while the response is all masks; later steps' hooked sequences hold only the response.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    G = int(config.gen_length)
    block_len = G if config.block_length is None else int(config.block_length)
    n_blocks = G // block_len
    per_block = config.steps // n_blocks
    S = int(config.steps)
    shift = int(adapter.logit_shift)
    mask_id = int(adapter.mask_token_id)
    P = sample.prompt_length
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(config.seed))
    with torch.inference_mode():
        prompt = sample.inputs_embeds[None]
        device = prompt.device
        cache, last = adapter._prefill(prompt)
        response = torch.full((G,), mask_id, dtype=torch.long, device=device)
        is_masked = torch.ones(G, dtype=torch.bool, device=device)
        masked = torch.zeros(S + 1, G, dtype=torch.bool)
        masked[0] = True
        positions = torch.arange(G, device=device)
        step = 0
        for b in range(n_blocks):
            lo, hi = b * block_len, (b + 1) * block_len
            schedule = num_transfer_tokens(int(is_masked[lo:hi].sum()), per_block)
            for t in range(per_block):
                r = adapter.embed_tokens(response)[None].to(prompt.dtype)
                logits = adapter._step(r, cache, P)[0]
                if logits.shape[0] != G:
                    raise RuntimeError(f"lavida: a cached step returned {logits.shape[0]} rows for "
                                       f"{G} response positions")
                rows = torch.cat([last, logits[:-1]], 0) if shift else logits
                rows = rows.to(torch.float64).clone()
                rows[:, mask_id] = float("-inf")
                x0 = _gumbel_max_scores(rows, config.temperature, gen).argmax(-1)
                if config.remasking == "low_confidence":
                    conf = torch.softmax(rows, -1).gather(-1, x0[:, None])[:, 0]
                else:
                    conf = torch.rand(G, generator=gen, dtype=torch.float64).to(device)
                conf = torch.where(is_masked & (positions < hi), conf,
                                   torch.full_like(conf, float("-inf")))
                k = schedule[t]
                if k > 0:
                    chosen = torch.topk(conf, k).indices
                    response[chosen] = x0[chosen]
                    is_masked[chosen] = False
                step += 1
                masked[step] = is_masked.cpu()
    has_image = torch.zeros(S + 1, dtype=torch.bool)
    has_image[0] = True
    return GenerationResult(response_ids=response.clone(), masked=masked, steps=S,
                            hidden_has_image=has_image)


def load(path_or_model=None, *, backbone: Optional[str] = None, tokenizer=None,
         image_processor=None, process_images=None, template="auto", sampler: str = "prefix",
         device_map="auto", torch_dtype: str = "bfloat16", vision_kwargs: Optional[dict] = None,
         pool_2d: Optional[bool] = None, check_versions: bool = True, **kwargs) -> LaViDaAdapter:
    """``diffcam.load("lavida", path_or_model, ...)``.

    path_or_model
        a checkpoint directory or hub id (see :data:`CHECKPOINTS`), loaded with LaViDa's own
        ``llava.model.builder.load_pretrained_model(path, None, "llava_llada" | "llava_dream",
        device_map=..., vision_kwargs=VISION_KWARGS, torch_dtype="bfloat16")`` followed by
        ``tie_weights()``, the cast to ``torch_dtype``, eval mode and frozen weights; or the
        model object (then pass ``tokenizer=`` and ``image_processor=``); or the loader's
        ``(tokenizer, model, image_processor, context_len)`` tuple.
    backbone
        "llada" or "dream" for a path (default: "dream" when the path names it); a model object
        says itself
    pool_2d
        for a path: True/False sets LaViDa's ``NOT_ALWASY_DO_2DPOOL`` environment switch before
        loading (default: pooled, except for LaViDa-O paths, whose demo turns pooling off)
    other keyword arguments
        :class:`LaViDaAdapter` (``sampler``, ``template``, ``process_images``,
        ``reference_quirks``, ``mask_token_id``, ``probe``, ``default_layer``, ...)
    """
    if path_or_model is None:
        raise TypeError("lavida: give a checkpoint path or hub id (e.g. "
                        "'jacklishufan/lavida-llada-v1.0-instruct') or the model loaded with the "
                        "family's code")
    if isinstance(path_or_model, tuple) and len(path_or_model) >= 3:
        tok, model, proc = path_or_model[:3]
        tokenizer = tokenizer or tok
        image_processor = image_processor or proc
        path_or_model = model
    if isinstance(path_or_model, (str, os.PathLike)):
        path = str(path_or_model)
        if backbone is None:
            backbone = "dream" if "dream" in path.lower() else "llada"
        if backbone not in ("llada", "dream"):
            raise ValueError(f"backbone={backbone!r}: expected 'llada' or 'dream'")
        if check_versions:
            check_transformers("lavida", real=True, pin=LaViDaAdapter.transformers_pin)
        if pool_2d is None:
            pool_2d = "lavida-o" not in path.lower()
        if pool_2d:
            os.environ.pop("NOT_ALWASY_DO_2DPOOL", None)
        else:
            os.environ["NOT_ALWASY_DO_2DPOOL"] = "1"
        builder = import_family("llava.model.builder", "lavida", f"Install it: {INSTALL}")
        tok, model, proc, _ = builder.load_pretrained_model(
            path, None, "llava_dream" if backbone == "dream" else "llava_llada",
            device_map=device_map, vision_kwargs=dict(vision_kwargs or VISION_KWARGS),
            torch_dtype=torch_dtype)
        if callable(getattr(model, "tie_weights", None)):
            model.tie_weights()
        model.to(getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
        model.eval()
        model.requires_grad_(False)
        tokenizer = tokenizer or tok
        image_processor = image_processor or proc
        path_or_model = model
        check_versions = False          # checked above, before loading
    elif backbone is not None and LaViDaAdapter._detect_backbone(path_or_model) != backbone:
        raise ValueError(f"backbone={backbone!r} but the model has the "
                         f"{LaViDaAdapter._detect_backbone(path_or_model)!r} backbone")
    return LaViDaAdapter(path_or_model, tokenizer, image_processor, process_images=process_images,
                         template=template, sampler=sampler, check_versions=check_versions,
                         **kwargs)
