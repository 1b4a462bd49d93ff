"""A structural twin of Dream-VL (Dream-org/Dream-VL-7B), built in process with random weights.

Dream-VL is ``trust_remote_code`` (transformers does not ship it); the twin assembles it from
transformers' Qwen2-VL building blocks, reproducing what the adapter relies on (docs/models.md
6.2):

* attribute paths: ``model.visual`` (a Qwen2-VL ViT with its 2x2 patch merger, transformers'
  ``Qwen2VisionTransformerPretrainedModel``), ``model.projector`` (2-layer GELU MLP),
  ``model.model`` (``embed_tokens``, ``layers``, ``norm``, mRoPE ``rotary_emb``), ``model.lm_head``;
* block return type: the layers (transformers' ``Qwen2VLDecoderLayer`` with ``is_causal=False``)
  return a 1-tuple ``(hidden,)`` as the remote code's layers do; the visual returns the merged
  features as a tensor (4.5x-era behaviour);
* bidirectional attention; ``attention_mask`` is ``None`` (full) or a 4D boolean pairwise mask
  (B, 1, L, L) handed to SDPA as is -- a 2D mask raises (Dream's code would mis-broadcast it);
* positions: ``position_ids`` (3, B, L) mRoPE from :meth:`DreamVLTwin.get_rope_index`
  (Qwen2-VL rule, 4.5x signature ``(input_ids, image_grid_thw, video_grid_thw, attention_mask)``);
  **without** ``position_ids`` the base model silently falls back to 1D positions, like the real
  one;
* logits predict the *next* token (the Dream convention: response token j is scored on row
  j - 1; the twin has no training, only the convention matters for where scores are read);
* token ids: ``<|vision_start|>`` 151652, ``<|image_pad|>`` 151655 (one per merged token),
  ``<|vision_end|>`` 151653, mask 151666, ``<|endoftext|>`` 151643, vocabulary 152064;
* image packing: transformers' ``Qwen2VLImageProcessor`` (smart resize to multiples of 28,
  patches of 14 with temporal patch 2, merge 2) and a Qwen2-VL-style processor
  (:class:`DreamVLTwinProcessor`) that expands each ``<|image_pad|>`` to t*h*w/4 pads.

>>> model, processor = dream_vl_twin(seed=0)
>>> type(model.model.layers[0]).__name__, model.config.image_token_id
('DreamVLDecoderLayer', 151655)
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from torch import nn

from .mmada import TwinTokenizer

__all__ = ["DreamVLTwin", "DreamVLTwinProcessor", "DreamVLDecoderLayer", "dream_vl_twin",
           "DREAM_VL_IDS"]

#: Qwen2-VL / Dream token ids (docs/models.md 6.1, 6.2)
DREAM_VL_IDS = dict(eos=151643, im_start=151644, im_end=151645, vision_start=151652,
                    vision_end=151653, image_pad=151655, video_pad=151656, mask=151666,
                    vocab=152064)


from transformers.models.qwen2_vl import modeling_qwen2_vl as _m
from transformers.models.qwen2_vl.configuration_qwen2_vl import (Qwen2VLTextConfig,
                                                                 Qwen2VLVisionConfig)


class DreamVLDecoderLayer(_m.Qwen2VLDecoderLayer):
    """transformers' Qwen2-VL decoder layer, bidirectional, returning ``(hidden,)``."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = False

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kw):
        out = super().forward(hidden_states, attention_mask=attention_mask,
                              position_embeddings=position_embeddings, **kw)
        return (out,)


class _Output(SimpleNamespace):
    def __getitem__(self, i):
        return (self.last_hidden_state,)[i] if hasattr(self, "last_hidden_state") else \
            (self.logits,)[i]


class DreamVLBaseModel(nn.Module):
    """``model.model``: embeddings, bidirectional Qwen2-VL layers, norm, mRoPE."""

    def __init__(self, text_config):
        super().__init__()
        self.config = text_config
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.hidden_size)
        self.layers = nn.ModuleList([DreamVLDecoderLayer(text_config, i)
                                     for i in range(text_config.num_hidden_layers)])
        self.norm = _m.Qwen2VLRMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.rotary_emb = _m.Qwen2VLRotaryEmbedding(text_config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache: bool = False, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        if position_ids is None:          # the silent 1D fallback of the real base model
            position_ids = torch.arange(L, device=x.device)[None].expand(B, L)
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, B, L)
        if isinstance(attention_mask, str) or attention_mask is None:
            mask = None
        elif attention_mask.ndim == 4:
            mask = attention_mask.bool()
        else:
            raise ValueError("Dream-VL's attention takes None or a 4D pairwise mask (B, 1, L, L); "
                             f"got a {attention_mask.ndim}D mask")
        pe = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_embeddings=pe)[0]
        return _Output(last_hidden_state=self.norm(x))


class _Visual(nn.Module):
    """Wraps transformers' Qwen2-VL ViT so that it returns the merged features as a tensor."""

    def __init__(self, vision_config):
        super().__init__()
        self.vit = _m.Qwen2VisionTransformerPretrainedModel(vision_config)
        self.spatial_merge_size = vision_config.spatial_merge_size

    def forward(self, pixel_values, grid_thw):
        out = self.vit(pixel_values, grid_thw=grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out


class DreamVLTwin(nn.Module):
    """``DreamVLModel``: ``visual``, ``projector``, ``model`` (base), ``lm_head``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.visual = _Visual(config.vision_config)
        self.projector = nn.Sequential(nn.Linear(config.vision_config.hidden_size,
                                                 config.hidden_size), nn.GELU(),
                                       nn.Linear(config.hidden_size, config.hidden_size))
        self.model = DreamVLBaseModel(config.text_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def device(self):
        return self.lm_head.weight.device

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None):
        """Qwen2-VL 3D positions: text tokens advance all three axes together; the tokens of an
        image (t, h/merge, w/merge grid, after ``<|vision_start|>``) take (t, row, col) offsets
        from the position reached so far; text after it continues at max + 1.  Padding (0 in
        ``attention_mask``) gets position 1.  Returns ``(position_ids (3, B, L), deltas (B, 1))``.
        """
        B, L = input_ids.shape
        dev = input_ids.device
        merge = self.config.vision_config.spatial_merge_size
        pos = torch.ones(3, B, L, dtype=torch.long, device=dev)
        deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
        thw = [] if image_grid_thw is None else [tuple(int(v) for v in r) for r in image_grid_thw]
        k = 0
        for b in range(B):
            valid = (torch.ones(L, dtype=torch.bool, device=dev) if attention_mask is None
                     else attention_mask[b].bool())
            ids = input_ids[b][valid].tolist()
            out, nxt, i = [], 0, 0
            while i < len(ids):
                if ids[i] == self.config.image_token_id:
                    t, h, w = thw[k]
                    k += 1
                    h, w = h // merge, w // merge
                    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                                indexing="ij")
                    grid = torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + nxt
                    out.append(grid)
                    nxt = int(grid.max()) + 1
                    i += t * h * w
                else:
                    out.append(torch.full((3, 1), nxt, dtype=torch.long))
                    nxt += 1
                    i += 1
            p = torch.cat(out, 1).to(dev) if out else torch.zeros(3, 0, dtype=torch.long)
            pos[:, b, valid] = p
            deltas[b, 0] = (int(p.max()) + 1 if p.numel() else 0) - L
        return pos, deltas

    def image_features(self, pixel_values, image_grid_thw):
        return self.projector(self.visual(pixel_values, grid_thw=image_grid_thw))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None,
                image_grid_thw=None, inputs_embeds=None, **kwargs):
        """Full forward from ids: splice the image features into the ``<|image_pad|>`` positions
        (masked scatter), mRoPE positions from :meth:`get_rope_index` when not given, logits."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            if pixel_values is not None:
                feats = self.image_features(pixel_values, image_grid_thw)
                m = (input_ids == self.config.image_token_id)[..., None]
                inputs_embeds = inputs_embeds.masked_scatter(m, feats.to(inputs_embeds.dtype))
            if position_ids is None:
                position_ids, _ = self.get_rope_index(input_ids, image_grid_thw, None, None)
        h = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids).last_hidden_state
        return _Output(logits=self.lm_head(h))


class DreamVLTwinProcessor:
    """A Qwen2-VL-style processor: ``apply_chat_template`` writes
    ``<|vision_start|><|image_pad|><|vision_end|>`` for each image entry, ``__call__`` runs the
    image processor and expands every ``<|image_pad|>`` to t*h*w / merge^2 pads."""

    def __init__(self, image_processor, tokenizer, merge_size: int = 2):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.merge_size = merge_size

    def apply_chat_template(self, messages, tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        parts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"]
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            body = "".join("<|vision_start|><|image_pad|><|vision_end|>" if c["type"] == "image"
                           else c["text"] for c in content)
            parts.append(f"<|im_start|>{msg['role']}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def __call__(self, text, images=None, return_tensors="pt", **kwargs):
        if isinstance(text, str):
            text = [text]
        if len(text) != 1:
            raise ValueError("the twin processor takes one text")
        out = {}
        n_per_image = []
        if images:
            ip = self.image_processor(images=list(images), return_tensors="pt")
            out["pixel_values"] = ip["pixel_values"]
            out["image_grid_thw"] = ip["image_grid_thw"]
            n_per_image = [int(t * h * w) // self.merge_size ** 2
                           for t, h, w in ip["image_grid_thw"].tolist()]
        pieces = text[0].split("<|image_pad|>")
        if len(pieces) - 1 != len(n_per_image):
            raise ValueError(f"{len(pieces) - 1} <|image_pad|> in the text for "
                             f"{len(n_per_image)} images")
        s = pieces[0]
        for n, p in zip(n_per_image, pieces[1:]):
            s += "<|image_pad|>" * n + p
        ids = self.tokenizer.encode(s)
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out


def dream_vl_tokenizer() -> TwinTokenizer:
    i = DREAM_VL_IDS
    specials = {"<|endoftext|>": i["eos"], "<|im_start|>": i["im_start"],
                "<|im_end|>": i["im_end"], "<|vision_start|>": i["vision_start"],
                "<|vision_end|>": i["vision_end"], "<|image_pad|>": i["image_pad"],
                "<|video_pad|>": i["video_pad"], "<|mask|>": i["mask"]}
    return TwinTokenizer(specials, word_base=2000, length=151665 + 1, unk_id=30,
                         eos_token_id=i["eos"], pad_token_id=i["eos"], mask_token_id=i["mask"])


def dream_vl_twin(seed: int = 0, hidden: int = 32, layers: int = 3, heads: int = 4,
                  max_pixels: int = 28 * 28 * 24, dtype=torch.float32):
    """(model, processor): a frozen, eval-mode Dream-VL twin (real ids and vocabulary 152064,
    Qwen2-VL ViT of depth 1, patch 14, merge 2; images resized to at most ``max_pixels``).

    >>> model, processor = dream_vl_twin()
    >>> model.config.vision_config.spatial_merge_size
    2
    """
    import transformers

    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    tc = Qwen2VLTextConfig(vocab_size=DREAM_VL_IDS["vocab"], hidden_size=hidden,
                    intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                    max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                     "mrope_section": section})
    tc._attn_implementation = "sdpa"
    vc = Qwen2VLVisionConfig(depth=1, embed_dim=16, hidden_size=24, num_heads=2, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    vc._attn_implementation = "sdpa"
    i = DREAM_VL_IDS
    cfg = SimpleNamespace(model_type="dreamvl", vocab_size=i["vocab"], hidden_size=hidden,
                          num_hidden_layers=layers, text_config=tc, vision_config=vc,
                          image_token_id=i["image_pad"], video_token_id=i["video_pad"],
                          vision_start_token_id=i["vision_start"],
                          vision_end_token_id=i["vision_end"], mask_token_id=i["mask"],
                          pad_token_id=i["eos"], eos_token_id=i["eos"], full_attn_mask=True,
                          transformers_version="4.51.3")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DreamVLTwin(cfg)
        nn.init.normal_(model.model.embed_tokens.weight, std=1.0)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        import torchvision  # noqa: F401
        ip_cls = transformers.Qwen2VLImageProcessor
    except ImportError:   # the PIL backend, chosen explicitly (no fallback warning)
        ip_cls = transformers.Qwen2VLImageProcessorPil
    ip = ip_cls(min_pixels=28 * 28 * 4, max_pixels=max_pixels)
    return model, DreamVLTwinProcessor(ip, dream_vl_tokenizer(), vc.spatial_merge_size)
