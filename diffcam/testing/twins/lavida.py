"""Structural twins of LaViDa (jacklishufan/LaViDa) with the LLaDA and the Dream backbones, and
of LaViDa-O, built in process with random weights.

What is reproduced (docs/models.md sections 1, 4), so that :mod:`diffcam.adapters.lavida` runs
the same code on the twin as on the real checkpoints:

* **LLaDA backbone** (``LlavaLladaForMaskedDiffusion``): the OLMo-style inner model
  ``model.model.transformer`` = ``{wte, blocks, ln_f, ff_out}`` (blocks return ``(x, cache)``),
  called as ``model.get_model()(input_ids, input_embeddings=..., attention_mask=...,
  attention_bias=..., past_key_values=..., use_cache=...)`` and returning ``LLaDAOutput(logits,
  attn_key_values, hidden_states)``; the prefix KV cache is a list of per-block ``(k, v)``
  tuples that later calls read without changing.  Activation checkpointing is switched on in
  ``__init__`` (``set_activation_checkpointing("whole_layer")``), as LaViDa does.  Token ids of
  LLaDA (mask 126336).
* **Dream backbone** (``LlavaDreamForMaskedDiffusion``): Qwen2-style ``model.model.layers``
  (layers return a 1-tuple), ``model.lm_head``, a transformers ``DynamicCache`` (a cached call
  appends to it), logits shifted by one (row j predicts token j + 1); Dream's ids (mask 151666,
  EOS 151643, vocabulary 152064).
* **Packing**: the LLaVA-NeXT ``-200`` splice and anyres layout of
  :mod:`diffcam.testing.twins.llada_v`, with every crop 2x2-pooled (bilinear, ceil: a 7 x 7
  patch grid becomes 4 x 4, as 27 x 27 becomes 14 x 14 in LaViDa); LaViDa-O
  (``variant="lavida-o"``) keeps the unpooled 7 x 7 grid.
* the trap: the top-level ``forward`` is the training forward: it changes ``labels`` in place
  and returns logits for a *doubled* batch.

>>> twin = build_lavida_twin(backbone="llada", seed=0)                  # doctest: +SKIP
>>> adapter = diffcam.load("lavida", twin.model, **twin.load_kwargs())  # doctest: +SKIP

Markers: ``crop_hook`` / ``grid_hook`` / ``packing_log`` on ``twin.model.get_model()`` as in the
LLaDA-V twin; ``crop_hook`` sees the crops *before* pooling.

:func:`reference_comparison` measures how far the released reference code's packing (sheared
slice, unexpanded target positions) moves the maps on this twin (``python -m
diffcam.testing.twins.lavida`` prints it; the numbers are in docs/reference_comparison.md).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ...adapters.base import cache_kwarg

from .llada_v import (LLADA_SPECIAL_IDS, LLADA_VOCAB, LlavaMetaForCausalLMTwin, LlavaMetaModelTwin,
                      Twin, TwinImageProcessor, TwinTokenizer, _finalize, _focus_head,
                      _llama_config, _size_overrides, llada_chat, process_images)
from .llada_v import attention_bias as _mask_bias

__all__ = ["DREAM_SPECIAL_IDS", "DREAM_VOCAB", "LLaDAOutput", "LlavaLladaModel",
           "LlavaLladaForMaskedDiffusion", "LlavaDreamModel", "LlavaDreamForMaskedDiffusion",
           "build_lavida_twin", "dream_chat", "reference_comparison"]

DREAM_VOCAB = 152064
DREAM_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                     "<|mask|>": 151666}
LAVIDA_PINPOINTS = [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)]


def dream_chat(prompt: str) -> str:
    """Qwen-style chat layout for the Dream backbone (template callable)."""
    return ("<|im_start|>system you are a helpful assistant .<|im_end|><|im_start|>user " +
            prompt + "<|im_end|><|im_start|>assistant")


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor
    attn_key_values: Optional[list]
    hidden_states: Optional[tuple]


class _TupleKV:
    """The OLMo-style cache semantics with transformers attention layers: ``past`` is a list of
    per-block (k, v); a call concatenates it in front of its own keys/values without changing it,
    and with ``record`` keeps the concatenation as the new cache."""

    def __init__(self, past=None, record: bool = False):
        self.past = list(past) if past else None
        self.record = record
        self.present: dict = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.past is not None:
            pk, pv = self.past[layer_idx]
            key, value = torch.cat([pk, key], -2), torch.cat([pv, value], -2)
        if self.record:
            self.present[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if not self.past else int(self.past[0][0].shape[-2])

    def tuples(self) -> list:
        return [self.present[i] for i in sorted(self.present)]


@functools.lru_cache(maxsize=None)
def _block_classes():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    # the KV cache goes to transformers' layers under the name the installed release uses
    # (``past_key_values`` became ``cache``)
    llama_kv, qwen2_kv = cache_kwarg(LlamaDecoderLayer.forward), cache_kwarg(Qwen2DecoderLayer.forward)

    class LLaDALlamaBlock(LlamaDecoderLayer):
        """LLaDA's block: returns ``(hidden_states, cache)``."""

        def forward(self, *args, past_key_values=None, **kwargs):
            if past_key_values is not None:      # (the checkpointed call passes it by position)
                kwargs[llama_kv] = past_key_values
            return super().forward(*args, **kwargs), None

    class DreamDecoderLayer(Qwen2DecoderLayer):
        """Dream's decoder layer: returns ``(hidden_states,)``."""

        def forward(self, *args, past_key_values=None, **kwargs):
            if past_key_values is not None:      # (the checkpointed call passes it by position)
                kwargs[qwen2_kv] = past_key_values
            return (super().forward(*args, **kwargs),)

    return LLaDALlamaBlock, DreamDecoderLayer


class _LaViDaMeta(LlavaMetaForCausalLMTwin):
    """LaViDa's splice: LLaVA-NeXT's, with every crop 2D-pooled when ``pool_2d`` is on (the
    ALWASY_DO_2DPOOL default)."""

    def _pool_crops(self, f):
        inner = self.get_model()
        if not inner.pool_2d:
            return f
        stride = int(self.config.mm_spatial_pool_stride)
        x = f.permute(0, 3, 1, 2)
        side = x.shape[-1]
        if self.config.mm_spatial_pool_mode == "bilinear":
            x = F.interpolate(x, size=[math.ceil(side / stride)] * 2, mode="bilinear")
        else:
            x = F.avg_pool2d(x, stride)
        return x.permute(0, 2, 3, 1)

    def _training_forward(self, inputs_embeds, attention_mask, labels):
        """Forward process of the objective on a doubled batch ([noised, complement])."""
        if labels is None:
            labels = torch.full(inputs_embeds.shape[:2], -100, dtype=torch.long,
                                device=inputs_embeds.device)
        sup = labels.ne(-100)
        t = torch.rand(inputs_embeds.shape[0], 1, device=inputs_embeds.device)
        m = (torch.rand(sup.shape, device=sup.device) < t) & sup
        mask_emb = self.get_input_embeddings().weight[self.config.mask_token_id].to(inputs_embeds.dtype)
        noised = torch.where(m[..., None], mask_emb, inputs_embeds)
        inverse = torch.where((~m & sup)[..., None], mask_emb, inputs_embeds)
        labels[~m] = -100                                   # in place, like the real class
        x = torch.cat([noised, inverse], 0)
        am = None if attention_mask is None else torch.cat([attention_mask, attention_mask], 0)
        return x, am

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, images=None,
                image_sizes=None, **kwargs):
        """Training forward (doubles the batch); not for attribution."""
        if inputs_embeds is None:
            _, _, attention_mask, _, inputs_embeds, labels = \
                self.prepare_inputs_labels_for_multimodal(input_ids, position_ids,
                                                          attention_mask, None, labels, images,
                                                          image_sizes=image_sizes)
        x, am = self._training_forward(inputs_embeds, attention_mask, labels)
        return self._logits_of(x, am)


class LlavaLladaModel(LlavaMetaModelTwin, nn.Module):
    """LaViDa's inner LLaDA model (OLMo-style ``transformer`` ModuleDict + vision modules)."""

    def __init__(self, config, attention_mode: str = "bidirectional", bias_mode: str = "honoured",
                 pool_2d: bool = True):
        nn.Module.__init__(self)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
        block, _ = _block_classes()
        D = config.hidden_size
        self.config = config
        self.attention_mode = attention_mode
        self.bias_mode = bias_mode
        self.pool_2d = pool_2d
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, D),
            blocks=nn.ModuleList([block(config, i) for i in range(config.num_hidden_layers)]),
            ln_f=LlamaRMSNorm(D, eps=config.rms_norm_eps),
            ff_out=nn.Linear(D, config.vocab_size, bias=False)))
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.activation_checkpointing_strategy = None
        self._init_vision(config, D)

    def set_activation_checkpointing(self, strategy):
        self.activation_checkpointing_strategy = strategy

    def forward(self, input_ids=None, input_embeddings=None, attention_mask=None,
                attention_bias=None, past_key_values=None, use_cache: bool = False,
                last_logits_only: bool = False, output_hidden_states=None):
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        B, L = x.shape[:2]
        kv = _TupleKV(past_key_values, record=use_cache)
        past = kv.get_seq_length()
        pos = (torch.arange(L, device=x.device) + past)[None].expand(B, L)
        bias = _mask_bias(self.attention_mode, attention_mask, B, L, past + L, x.dtype,
                              x.device, past)
        if attention_bias is not None and self.bias_mode == "honoured":
            ab = attention_bias.to(x.device)
            if ab.dtype == torch.bool:
                ab = torch.where(ab, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
            bias = bias + ab[..., past:past + L, :past + L]
        pe = self.rotary_emb(x, pos)
        ckpt = self.activation_checkpointing_strategy is not None and torch.is_grad_enabled()
        for blk in self.transformer.blocks:
            if ckpt:
                from torch.utils.checkpoint import checkpoint
                x = checkpoint(blk, x, bias, pos, kv, False, pe, use_reentrant=False)[0]
            else:
                x = blk(x, attention_mask=bias, position_ids=pos, past_key_values=kv,
                        position_embeddings=pe)[0]
        x = self.transformer.ln_f(x)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.transformer.ff_out(x)
        return LLaDAOutput(logits, kv.tuples() if use_cache else None, None)


class LlavaLladaForMaskedDiffusion(_LaViDaMeta, nn.Module):
    """LaViDa with the LLaDA backbone (``model_type`` ``llava_llada``)."""

    def __init__(self, config, **kw):
        nn.Module.__init__(self)
        self.config = config
        self.model = LlavaLladaModel(config, **kw)
        self.model.set_activation_checkpointing("whole_layer")     # as LaViDa's __init__ does

    def get_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def _logits_of(self, x, am):
        return self.model(None, input_embeddings=x, attention_mask=am).logits


class LlavaDreamModel(LlavaMetaModelTwin, nn.Module):
    """LaViDa's inner Dream model (Qwen2-style layers returning 1-tuples + vision modules)."""

    def __init__(self, config, attention_mode: str = "bidirectional", pool_2d: bool = True,
                 bias_mode: str = "honoured"):
        nn.Module.__init__(self)
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding
        _, layer = _block_classes()
        D = config.hidden_size
        self.config = config
        self.attention_mode = attention_mode
        self.pool_2d = pool_2d
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList([layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(D, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self._init_vision(config, D)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=x.device) + past)[None].expand(B, L)
        bias = _mask_bias(self.attention_mode, attention_mask, B, L, past + L, x.dtype,
                              x.device, past)
        pe = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=bias, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=use_cache,
                      position_embeddings=pe)[0]
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x,
                                       past_key_values=past_key_values if use_cache else None)


class LlavaDreamForMaskedDiffusion(_LaViDaMeta, nn.Module):
    """LaViDa with the Dream backbone (``model_type`` ``llava_dream``)."""

    def __init__(self, config, **kw):
        nn.Module.__init__(self)
        self.config = config
        self.model = LlavaDreamModel(config, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def _logits_of(self, x, am):
        return self.lm_head(self.model(inputs_embeds=x, attention_mask=am).last_hidden_state)


def _qwen2_config(vocab, hidden, layers, heads, **extra):
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                      rope_theta=1e6, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                      tie_word_embeddings=False)
    cfg.is_causal = False
    cfg._attn_implementation = "eager"
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


def build_lavida_twin(backbone: str = "llada", variant: str = "lavida", seed: int = 0,
                      hidden: int = 32, layers: int = 4, heads: int = 4,
                      attention_mode: str = "bidirectional", bias_mode: str = "honoured",
                      dtype=torch.float32, *, intermediate_size: Optional[int] = None,
                      kv_heads: Optional[int] = None, vocab: Optional[int] = None,
                      attn_implementation: Optional[str] = None) -> Twin:
    """Build a LaViDa twin.

    backbone        "llada" (LlavaLladaForMaskedDiffusion) or "dream" (LlavaDreamForMaskedDiffusion)
    variant         "lavida" (2x2-pooled crops) or "lavida-o" (unpooled, LLaDA backbone)
    attention_mode  how a padding ``attention_mask`` acts (see
                    :func:`diffcam.testing.twins.llada_v.attention_bias`)
    bias_mode       "honoured" or "ignored": whether the LLaDA backbone applies ``attention_bias``
    intermediate_size, kv_heads, vocab, attn_implementation
                    optional sizes (None keeps the twin's defaults: ``2 * hidden``,
                    ``heads // 2``, the backbone's vocabulary, ``"eager"``); the modules are
                    created on the current default device and dtype, then cast to ``dtype``
    """
    if backbone not in ("llada", "dream"):
        raise ValueError(f"backbone={backbone!r}: expected 'llada' or 'dream'")
    if variant not in ("lavida", "lavida-o"):
        raise ValueError(f"variant={variant!r}: expected 'lavida' or 'lavida-o'")
    crop = 28
    vision = dict(image_aspect_ratio="anyres", image_grid_pinpoints=LAVIDA_PINPOINTS,
                  mm_patch_merge_type="spatial_unpad", mm_vision_select_layer=-2,
                  mm_hidden_size=16, mm_projector_type="mlp2x_gelu", mm_spatial_pool_stride=2,
                  mm_spatial_pool_mode="bilinear", twin_crop_px=crop, twin_patch_px=4)
    pool = variant == "lavida"
    vision.update(_size_overrides(intermediate_size, kv_heads, attn_implementation))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "llada":
            cfg = _llama_config(LLADA_VOCAB if vocab is None else int(vocab), hidden, layers,
                                heads, model_type="llava_llada",
                                mask_token_id=LLADA_SPECIAL_IDS["<|mdm_mask|>"], **vision)
            model = LlavaLladaForMaskedDiffusion(cfg, attention_mode=attention_mode,
                                                 bias_mode=bias_mode, pool_2d=pool)
            head = model.model.transformer.ff_out.weight
            tok = TwinTokenizer(LLADA_SPECIAL_IDS, mask="<|mdm_mask|>", bos="<|startoftext|>",
                                eos="<|endoftext|>")
            template = llada_chat
        else:
            cfg = _qwen2_config(DREAM_VOCAB if vocab is None else int(vocab), hidden, layers,
                                heads, model_type="llava_dream",
                                mask_token_id=DREAM_SPECIAL_IDS["<|mask|>"], **vision)
            model = LlavaDreamForMaskedDiffusion(cfg, attention_mode=attention_mode, pool_2d=pool)
            head = model.lm_head.weight
            tok = TwinTokenizer(DREAM_SPECIAL_IDS, mask="<|mask|>", bos=None,
                                eos="<|endoftext|>")
            template = dream_chat
    _focus_head(head, tok)
    return Twin(_finalize(model, dtype), tok, TwinImageProcessor(crop), process_images, template,
                extra={"backbone": backbone, "variant": variant})


# ----------------------------------------------------------------------------- item 4
def _hires_argmax(exp) -> tuple:
    m = exp.map(None, grid="hires")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape)), m


def reference_comparison(n_cells: int = 12, n_images: int = 6, seed: int = 0,
                         layer: int = 1, answer: str = "a red cat on the box",
                         image_hw=(40, 40), target: int = 1, cells=None) -> dict:
    """How far the released reference code's packing moves the maps (LLaDA-backbone twin).

    One target, answer token ``target`` (the reference code explains the 2nd generated token),
    teacher-forced with ``answer``, paper Grad-CAM and logit score, so that only the packing
    differs.  Variants: ``correct``; ``sheared`` (h*w contiguous tokens read as the high-resolution grid);
    ``unexpanded`` (target logits read at the targets' positions in the unexpanded sequence);
    ``both``.  Two measurements on the high-resolution grid:

    * marker hits: a marker added to one cell's features (``cells``, default ``n_cells`` random
      cells; both signs, the better sign counts) -- the fraction of cells where the map's
      maximum is that cell;
    * map agreement on random images (``n_images``): Pearson correlation with the correct map,
      mean absolute difference (maps are min-max normalised), and the fraction of images whose
      maximum falls in the same cell.

    Returns ``{"setup": ..., "marker_hit_rate": {variant: rate}, "marker_hits": {variant: [hit
    per cell]}, "correlation": {...},
    "mean_abs_diff": {...}, "same_argmax": {...}, "unexpanded_rows_in_image_span": bool}``.
    """
    from ...adapters.lavida import load
    from ...attribution import Explainer

    twin = build_lavida_twin(backbone="llada", seed=seed)
    kw = twin.load_kwargs()
    variants = {"correct": (), "sheared": ("sheared_slice",),
                "unexpanded": ("unexpanded_positions",),
                "both": ("sheared_slice", "unexpanded_positions")}
    adapters = {k: load(twin.model, reference_quirks=q, **kw) for k, q in variants.items()}
    rng = np.random.default_rng(seed)
    prompt = "<image> describe the image"
    inner = twin.model.get_model()
    img = rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    ad0 = adapters["correct"]
    s0 = ad0.prepare([img], prompt)
    lay = s0.layouts[0]
    g = lay.grid("hires")
    D = twin.model.config.hidden_size
    u = torch.randn(D, generator=torch.Generator().manual_seed(seed + 1))
    if cells is None:
        cells = [(int(rng.integers(0, g.rows)), int(rng.integers(0, g.cols)))
                 for _ in range(n_cells)]
    cells = [tuple(int(v) for v in c) for c in cells]
    n_cells = len(cells)
    hits = {k: 0 for k in variants}
    per_cell = {k: [] for k in variants}
    for cell in cells:
        found = {k: False for k in variants}
        for sign in (1.0, -1.0):
            def hook(i, name, grid, cell=cell, sign=sign):
                if name != "hires":
                    return grid
                grid = grid.clone()
                grid[cell] = grid[cell] + sign * 60.0 * u
                return grid
            inner.grid_hook = hook
            try:
                for k, ad in adapters.items():
                    with Explainer(ad, layer=layer) as ex:
                        e = ex.explain(img, prompt, answer=answer, targets=[[target]])
                    found[k] |= _hires_argmax(e)[0] == cell
            finally:
                inner.grid_hook = None
        for k in variants:
            hits[k] += int(found[k])
            per_cell[k].append(bool(found[k]))
    corr = {k: [] for k in variants if k != "correct"}
    mad = {k: [] for k in corr}
    same = {k: [] for k in corr}
    for _ in range(n_images):
        im = rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)
        maps = {}
        for k, ad in adapters.items():
            with Explainer(ad, layer=layer) as ex:
                maps[k] = ex.explain(im, prompt, answer=answer,
                                     targets=[[target]]).map(None, grid="hires")
        a = maps["correct"].ravel()
        for k in corr:
            b = maps[k].ravel()
            c = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float("nan")
            corr[k].append(float(c))
            mad[k].append(float(np.abs(a - b).mean()))
            same[k].append(float(np.argmax(a) == np.argmax(b)))
    P, unexp = s0.prompt_length, len(s0.unexpanded_ids)
    rows = [unexp + target]
    return {
        "setup": {"twin": "LaViDa twin, LLaDA backbone, seed %d" % seed, "layer": layer,
                  "image_hw": list(image_hw), "hires_grid": [g.rows, g.cols],
                  "base_grid": list(lay.grid("base").shape), "prompt_length": P,
                  "image_span": [lay.span_start, lay.span_end], "answer": answer,
                  "target": f"answer token {target}", "cells": cells,
                  "n_images": n_images},
        "marker_hit_rate": {k: hits[k] / n_cells for k in variants},
        "marker_hits": per_cell,
        "correlation": {k: float(np.nanmean(v)) for k, v in corr.items()},
        "mean_abs_diff": {k: float(np.mean(v)) for k, v in mad.items()},
        "same_argmax": {k: float(np.mean(v)) for k, v in same.items()},
        "unexpanded_target_rows": rows, "correct_target_rows": [P + target],
        "unexpanded_rows_in_image_span": all(lay.span_start <= r < lay.span_end for r in rows),
    }


if __name__ == "__main__":  # pragma: no cover
    import json
    torch.set_num_threads(1)
    print(json.dumps(reference_comparison(), indent=2))
