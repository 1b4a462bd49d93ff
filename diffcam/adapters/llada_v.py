"""LLaDA-V (ML-GSAI/LLaDA-V): the adapter and its loader.

LLaDA-V is LLaDA-8B rewritten as a Llama-style bidirectional model plus a SigLIP tower and a
LLaVA-NeXT anyres splice (docs/models.md section 3, docs/families/llada_v.md):

* blocks ``model.model.layers`` (32, Llama-style, each returns a tuple), LM head
  ``model.lm_head``, embeddings ``model.model.embed_tokens``;
* the image replaces the ``-200`` placeholder: a 27 x 27 base grid (the image squashed to
  384 px), then the high-resolution grid of h rows of w cells each followed by the learned
  ``image_newline`` (``anyres_max_4``: shrunk when larger than 4 crops);
* the attribution forward is the *inner* forward ``model.model(inputs_embeds=...)`` followed by
  ``model.lm_head`` -- ``LlavaLLaDAModelLM.forward`` is the training forward, which masks the
  embeddings at random;
* sampling: LLaDA's low-confidence remasking with semi-autoregressive blocks over the full
  sequence every step (no KV cache); EOS, BOS and the header tokens are never committed, like
  LLaDA-V's ``generate_with_embeds``;
* mask token 126336, logit shift 0.

>>> import diffcam
>>> adapter = diffcam.load("llada-v", "GSAI-ML/LLaDA-V")                 # doctest: +SKIP
>>> with diffcam.Explainer(adapter) as ex:                               # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "<image>\\nWhat is in the picture?",
...                      generation=diffcam.GenerationConfig(steps=64, gen_length=64,
...                                                          block_length=32))

or with a model loaded by the family's own code::

    from llava.model.builder import load_pretrained_model
    tok, model, proc, _ = load_pretrained_model(path, None, "llava_llada",
                                                attn_implementation="sdpa", device_map="cuda:0",
                                                torch_dtype="bfloat16")
    adapter = diffcam.load("llada-v", model, tokenizer=tok, image_processor=proc)
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from ..generation import masked_diffusion_generate
from ._llava_family import (LlavaFamilyAdapter, _SamplerView, check_transformers, import_family)
from .base import GenerationConfig, GenerationResult

__all__ = ["LLaDAVAdapter", "load", "INSTALL", "CHECKPOINTS", "SUPPRESSED_TOKEN_IDS"]

INSTALL = ("git clone https://github.com/ML-GSAI/LLaDA-V && cd LLaDA-V/train && pip install -e . "
           "(installs the package 'llava'; it cannot share an environment with LaViDa's 'llava')")
CHECKPOINTS = ("GSAI-ML/LLaDA-V",)
#: EOS, BOS, <|start_header_id|>, <|end_header_id|>: never committed by LLaDA-V's sampler
SUPPRESSED_TOKEN_IDS = (126081, 126080, 126346, 126347)


class LLaDAVAdapter(LlavaFamilyAdapter):
    """Adapter of LLaDA-V (``LlavaLLaDAModelLM``).  See :class:`LlavaFamilyAdapter` for the
    shared parameters; ``suppress_token_ids`` are the ids the sampler never commits (default:
    :data:`SUPPRESSED_TOKEN_IDS`, those inside the vocabulary).

    >>> from diffcam.testing.twins.llada_v import build_llada_v_twin
    >>> twin = build_llada_v_twin(seed=0)
    >>> ad = LLaDAVAdapter(twin.model, **twin.load_kwargs())
    >>> ad.blocks() is twin.model.model.layers, ad.mask_token_id, ad.logit_shift
    (True, 126336, 0)
    """

    family = "llada-v"
    conv_template = "llava_llada"
    family_mask_token_id = 126336
    transformers_pin = "the 4.x release of LLaDA-V's train/pyproject.toml"
    install_advice = INSTALL
    padding_modes = ("mask",)

    def __init__(self, model, tokenizer=None, image_processor=None, *,
                 suppress_token_ids: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(model, tokenizer, image_processor, **kwargs)
        vocab = int(self.model.get_input_embeddings().weight.shape[0])
        ids = SUPPRESSED_TOKEN_IDS if suppress_token_ids is None else suppress_token_ids
        self.suppress_token_ids = tuple(int(i) for i in ids if 0 <= int(i) < vocab)

    def _check_structure(self) -> None:
        m = self.model
        missing = []
        if not callable(getattr(m, "get_model", None)):
            missing.append("get_model()")
        else:
            inner = m.get_model()
            for a in ("layers", "embed_tokens", "image_newline", "vision_tower", "mm_projector"):
                if not hasattr(inner, a):
                    missing.append(f"model.model.{a}")
        for a in ("lm_head", "prepare_inputs_labels_for_multimodal", "get_vision_tower"):
            if not hasattr(m, a):
                missing.append(a)
        model_type = str(getattr(getattr(m, "config", None), "model_type", ""))
        if not missing and "dream" in model_type:
            raise TypeError(f"llada-v: {type(m).__name__} has model_type {model_type!r}: this is "
                            "LaViDa with the Dream backbone; use diffcam.load('lavida', ...)")
        if missing:
            raise TypeError(f"llada-v: {type(m).__name__} is not a LLaDA-V model (missing "
                            f"{', '.join(missing)}); load it with llava.model.builder."
                            f"load_pretrained_model(path, None, 'llava_llada') from {INSTALL}")

    def _prepare_model(self) -> None:
        super()._prepare_model()
        if self.dtype == torch.float16:
            warnings.warn("llada-v: the model is in float16 (LLaDA-V's loader default); the "
                          "backward pass can overflow -- load it with torch_dtype='bfloat16'",
                          UserWarning, stacklevel=4)

    def blocks(self):
        return self.model.get_model().layers

    def head_module(self):
        return self.model.lm_head

    def _logits(self, inputs_embeds, attention_mask=None, padding_mode=None, rows=None):
        out = self.model.get_model()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if rows is not None:
            hidden = hidden[:, rows]
        return self.model.lm_head(hidden)

    def generate(self, sample, config: GenerationConfig) -> GenerationResult:
        """LLaDA-V's sampler: the full sequence every step (so every step is feasible for
        attribution), low-confidence remasking, :attr:`suppress_token_ids` never committed."""
        return masked_diffusion_generate(_SamplerView(self, self.suppress_token_ids), sample,
                                         config)

    def info(self) -> dict:
        d = super().info()
        d.update({"blocks": "model.model.layers", "sampler": "full-sequence",
                  "suppressed_token_ids": list(self.suppress_token_ids)})
        return d


def load(path_or_model=None, *, tokenizer=None, image_processor=None, process_images=None,
         template="auto", device_map="auto", torch_dtype: str = "bfloat16",
         attn_implementation: str = "sdpa", check_versions: bool = True,
         **kwargs) -> LLaDAVAdapter:
    """``diffcam.load("llada-v", path_or_model, ...)``.

    path_or_model
        a local checkpoint directory or hub id (``"GSAI-ML/LLaDA-V"``), loaded with LLaDA-V's
        own ``llava.model.builder.load_pretrained_model(path, None, "llava_llada", ...)`` in
        ``torch_dtype`` (bfloat16: the loader's float16 default can overflow in the backward),
        put in eval mode with frozen weights; or the model object itself (then pass
        ``tokenizer=`` and ``image_processor=``); or the ``(tokenizer, model, image_processor,
        context_len)`` tuple the loader returns.
    device_map, attn_implementation
        passed to the loader
    other keyword arguments
        :class:`LLaDAVAdapter` (``template``, ``process_images``, ``mask_token_id``,
        ``suppress_token_ids``, ``reference_quirks``, ``probe``, ``allow_patched_forward``,
        ``default_layer``, ``check_versions``)
    """
    if path_or_model is None:
        raise TypeError("llada-v: give a checkpoint path or hub id (e.g. 'GSAI-ML/LLaDA-V') or "
                        "the model loaded with the family's code")
    if isinstance(path_or_model, tuple) and len(path_or_model) >= 3:
        tok, model, proc = path_or_model[:3]
        tokenizer = tokenizer or tok
        image_processor = image_processor or proc
        path_or_model = model
    if isinstance(path_or_model, (str, os.PathLike)):
        if check_versions:
            check_transformers("llada-v", real=True, pin=LLaDAVAdapter.transformers_pin)
        builder = import_family("llava.model.builder", "llada-v", f"Install it: {INSTALL}")
        tok, model, proc, _ = builder.load_pretrained_model(
            str(path_or_model), None, "llava_llada", attn_implementation=attn_implementation,
            device_map=device_map, torch_dtype=torch_dtype)
        model.eval()
        model.requires_grad_(False)
        tokenizer = tokenizer or tok
        image_processor = image_processor or proc
        path_or_model = model
        check_versions = False          # checked above, before loading
    return LLaDAVAdapter(path_or_model, tokenizer, image_processor, process_images=process_images,
                         template=template, check_versions=check_versions, **kwargs)
