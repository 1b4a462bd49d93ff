"""A structural twin of MMaDA (Gen-Verse/MMaDA), built in process with random weights.

MMaDA's language model is LLaDA's OLMo-style remote code (``MMadaModelLM`` subclasses
``LLaDAModelLM``), which transformers does not ship, so this twin is written here with plain torch
modules that reproduce what the adapter relies on (facts from docs/models.md section 5):

* attribute paths: ``model.model.transformer`` is a ``ModuleDict`` with ``wte`` (embeddings),
  ``blocks`` (the block list), ``ln_f`` and ``ff_out`` (untied LM head); block submodules are named
  ``attn_norm q_proj k_proj v_proj attn_out ff_norm ff_proj up_proj ff_out``;
* block return type: every block returns ``(hidden, cache_or_None)``;
* the inner forward ``model.model(input_ids=None, input_embeddings=..., attention_mask=...,
  attention_bias=..., use_cache=...)`` computes the logits itself (through ``transformer.ff_out``)
  and returns an object with ``.logits``;
* attention is bidirectional unless a mask is passed: a boolean ``attention_bias`` (B, 1, L, L)
  is honoured as given, but a bare ``attention_mask`` turns attention **causal** plus padding (the
  MMaDA-copy pitfall of models.md 1.6), and ``config.use_cache`` is missing as on transformers 5.x
  (the forward reads it when ``use_cache`` is not passed);
* token ids: text vocabulary 126349 (the tokenizer length), mask 126336, ``<|mmu|>`` 126089,
  ``<|soi|>`` 126084, ``<|eoi|>`` 126085, BOS 126080, EOS 126081; image token = VQ code + 126349;
  model vocabulary 134656 = 126464 + 8192 codes;
* image packing: a MAGVIT-v2-like quantiser (``get_code(pixel_values) -> (B, n)``, lookup-free
  quantisation of 13 sign bits = 8192 codes, row-major over the latent grid).  The real one maps
  512x512 to 32x32; the twin maps ``resolution`` pixels with a non-overlapping ``downsample``
  convolution (default 32 px / 4 = 8x8 grid), so a pixel change in one cell changes only that
  cell's code (the tests use this to locate cells independently of the adapter).

The LLaDA internals that do not matter for attribution (rotary variant details, exact norm
epsilons, weight init) are simplified.

>>> from diffcam.testing.twins.mmada import mmada_twin
>>> model, tokenizer, vq = mmada_twin(seed=0)
>>> type(model.model.transformer.blocks[0]).__name__
'LLaDALlamaBlock'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["TwinTokenizer", "LLaDAConfig", "LLaDALlamaBlock", "LLaDAModel", "MMadaModelLM",
           "TwinMagvit", "mmada_twin", "MMADA_IDS"]

#: MMaDA's token ids (docs/models.md section 5)
MMADA_IDS = dict(bos=126080, eos=126081, mask=126336, mmu=126089, soi=126084, eoi=126085,
                 start_header=126346, end_header=126347, eot=126348, text_vocab=126349,
                 llm_vocab=126464, vocab=134656, codebook=8192)

_WORDS = ("a the of on in and is there are with to it this what image picture photo describe "
          "left right top bottom near next small big large user assistant "
          "cat dog box ball tree car bird house person table chair cup flower sky grass "
          "red green blue yellow black white orange brown "
          "one two three sitting standing , . ? :").split()


class TwinTokenizer:
    """A word-level tokenizer whose special tokens carry a real family's ids.

    ``specials`` maps token strings (e.g. ``"<|mdm_mask|>"``) to ids; the words of a small fixed
    list get ids ``word_base + i``.  ``length`` is what ``len(tokenizer)`` reports (MMaDA derives
    its image-token offset from it).  Unknown words map to ``unk_id``; ids the tokenizer does not
    know decode as ``<id:N>``.  ``bos_token_id`` is prepended by ``encode`` when
    ``add_special_tokens=True`` and ``add_bos`` is set.

    >>> tok = TwinTokenizer({"<|eot_id|>": 9}, word_base=100, length=500, unk_id=3)
    >>> tok.decode(tok.encode("a red cat<|eot_id|>"))
    'a red cat <|eot_id|>'
    """

    def __init__(self, specials: dict, word_base: int, length: int, unk_id: int,
                 bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, mask_token_id: Optional[int] = None,
                 add_bos: bool = False):
        self.specials = {str(k): int(v) for k, v in specials.items()}
        self.words = list(_WORDS)
        self.word_base = int(word_base)
        self.length = int(length)
        self.unk_id = int(unk_id)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.add_bos = add_bos
        self._id_to_tok = {v: k for k, v in self.specials.items()}
        for i, w in enumerate(self.words):
            self._id_to_tok[self.word_base + i] = w
        self._tok_to_id = {v: k for k, v in self._id_to_tok.items()}
        if max(self._id_to_tok) >= max(self.length, max(self.specials.values()) + 1):
            raise ValueError("word ids run past the tokenizer length")
        self.all_special_ids = sorted(set(self.specials.values()))
        alts = sorted(self.specials, key=len, reverse=True)
        self._pattern = re.compile("|".join([re.escape(s) for s in alts] +
                                            [r"[a-z]+", r"[^\sa-z]"]))

    def __len__(self) -> int:
        return self.length

    def tokenize(self, text: str) -> list:
        out = []
        for m in self._pattern.finditer(text):
            out.append(m.group(0) if m.group(0) in self.specials else m.group(0).lower())
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        ids = []
        for m in self._pattern.finditer(text if text else ""):
            t = m.group(0)
            ids.append(self.specials[t] if t in self.specials else
                       self._tok_to_id.get(t.lower(), self.unk_id))
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [int(self.bos_token_id)] + ids
        return ids

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok_to_id.get(tokens, self.unk_id)
        return [self._tok_to_id.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self._tok(int(ids))
        return [self._tok(int(i)) for i in ids]

    def _tok(self, i: int) -> str:
        return self._id_to_tok.get(i, f"<id:{i}>")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if torch.is_tensor(ids):
            ids = ids.reshape(-1).tolist()
        toks = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.specials.values():
                continue
            toks.append(self._tok(i))
        return " ".join(toks)


def mmada_tokenizer() -> TwinTokenizer:
    """The twin of MMaDA's text tokenizer (LLaDA's, with ``use_reserved_token`` specials)."""
    i = MMADA_IDS
    specials = {"<|startoftext|>": i["bos"], "<|endoftext|>": i["eos"], "<|mdm_mask|>": i["mask"],
                "<|mmu|>": i["mmu"], "<|soi|>": i["soi"], "<|eoi|>": i["eoi"],
                "<|start_header_id|>": i["start_header"], "<|end_header_id|>": i["end_header"],
                "<|eot_id|>": i["eot"]}
    return TwinTokenizer(specials, word_base=1000, length=i["text_vocab"], unk_id=3,
                         bos_token_id=i["bos"], eos_token_id=i["eos"], pad_token_id=i["eos"],
                         mask_token_id=i["mask"], add_bos=True)


class LLaDAConfig:
    """The fields of LLaDA's/MMaDA's config that the adapter reads (a plain object, like the
    remote ``LLaDAConfig`` on transformers 5.x it has no ``use_cache`` attribute)."""

    model_type = "llada"

    def __init__(self, d_model=32, n_layers=3, n_heads=4, mlp_hidden_size=64,
                 vocab_size=MMADA_IDS["vocab"], embedding_size=MMADA_IDS["vocab"],
                 max_sequence_length=1024, rope_theta=500000.0,
                 mask_token_id=MMADA_IDS["mask"], llm_vocab_size=MMADA_IDS["llm_vocab"],
                 codebook_size=MMADA_IDS["codebook"], num_vq_tokens=64, weight_tying=False,
                 input_emb_norm=False, rms_norm_eps=1e-5):
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.n_kv_heads = n_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        self.llm_vocab_size, self.new_vocab_size = llm_vocab_size, embedding_size
        self.codebook_size, self.num_vq_tokens = codebook_size, num_vq_tokens
        self.weight_tying = weight_tying
        self.input_emb_norm = input_emb_norm
        self.rms_norm_eps = rms_norm_eps
        self.transformers_version = "4.46.2"

    # LLaDAConfig exposes these read-only HF names (models.md 2c)
    @property
    def hidden_size(self):
        return self.d_model

    @property
    def num_hidden_layers(self):
        return self.n_layers

    @property
    def num_attention_heads(self):
        return self.n_heads


class _RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def _rope(x, theta: float):
    """Rotary embedding over (B, H, L, d) with positions 0..L-1 (rotate-half convention)."""
    L, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    f = torch.arange(L, dtype=torch.float32, device=x.device)[:, None] * inv[None]
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LLaDALlamaBlock(nn.Module):
    """One LLaDA block (pre-norm attention + SwiGLU MLP); returns ``(hidden, cache_or_None)``."""

    def __init__(self, config: LLaDAConfig, layer_id: int):
        super().__init__()
        d, self.n_heads = config.d_model, config.n_heads
        self.layer_id = layer_id
        self.theta = config.rope_theta
        self.attn_norm = _RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = _RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, attention_bias=None, layer_past=None, use_cache: bool = False):
        B, L, D = x.shape
        h = self.attn_norm(x)

        def heads(t):
            return t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        q, k = _rope(q, self.theta), _rope(k, self.theta)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, L, D))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, ((k, v) if use_cache else None)


@dataclass
class LLaDAOutput:
    logits: torch.Tensor
    attn_key_values: Optional[list] = None
    hidden_states: Optional[tuple] = None


class LLaDAModel(nn.Module):
    """The OLMo-style inner model: ``transformer = ModuleDict(wte, blocks, ln_f, ff_out)``; its
    forward returns the logits (``LLaDAOutput``)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList([LLaDALlamaBlock(config, i) for i in range(config.n_layers)]),
            ln_f=_RMSNorm(config.d_model, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size,
                                                   bias=False)

    def forward(self, input_ids=None, input_embeddings=None, attention_mask=None,
                attention_bias=None, past_key_values=None, use_cache=None,
                last_logits_only: bool = False, output_hidden_states=None):
        if use_cache is None:
            use_cache = self.config.use_cache   # AttributeError on tf 5.x configs (models.md 1.10)
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        if self.config.input_emb_norm:
            x = x * (self.config.d_model ** 0.5)
        B, L = x.shape[:2]
        neg = torch.finfo(x.dtype).min
        bias = None
        if attention_bias is not None:
            if attention_bias.dtype in (torch.bool, torch.int8, torch.int32, torch.int64):
                bias = torch.zeros(attention_bias.shape, dtype=x.dtype, device=x.device)
                bias = bias.masked_fill(attention_bias == 0, neg)
            else:
                bias = attention_bias.to(x.dtype)
        elif attention_mask is not None:
            # the MMaDA-copy behaviour of models.md 1.6: a bare attention_mask builds a causal
            # bias plus the padding mask
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            keep = causal[None, None] & attention_mask.bool()[:, None, None, :]
            bias = torch.zeros(B, 1, L, L, dtype=x.dtype, device=x.device).masked_fill(~keep, neg)
        hidden = [] if output_hidden_states else None
        caches = [] if use_cache else None
        for blk in self.transformer.blocks:
            if hidden is not None:
                hidden.append(x)
            x, c = blk(x, attention_bias=bias, use_cache=use_cache)
            if caches is not None:
                caches.append(c)
        if last_logits_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if hidden is not None:
            hidden.append(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        return LLaDAOutput(logits=logits, attn_key_values=caches,
                           hidden_states=tuple(hidden) if hidden is not None else None)


@dataclass
class _LMOutput:
    logits: torch.Tensor


class MMadaModelLM(nn.Module):
    """``MMadaModelLM`` (subclass of ``LLaDAModelLM``): ``.model`` is the :class:`LLaDAModel`.
    Its ``forward`` mirrors the HF wrapper (``inputs_embeds`` -> ``input_embeddings``)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                use_cache=None, **kwargs):
        out = self.model(input_ids=input_ids, input_embeddings=inputs_embeds,
                         attention_mask=attention_mask, attention_bias=attention_bias,
                         use_cache=use_cache)
        return _LMOutput(logits=out.logits)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer["ff_out"] if not self.config.weight_tying else None


class TwinMagvit(nn.Module):
    """MAGVIT-v2-like quantiser: a non-overlapping conv encoder to 13 channels, lookup-free
    quantisation (code = sum of 2^i over positive channels i), codes flattened row-major.

    >>> vq = TwinMagvit(resolution=32, downsample=4)
    >>> vq.get_code(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 64])
    """

    def __init__(self, resolution: int = 32, downsample: int = 4, bits: int = 13):
        super().__init__()
        if resolution % downsample:
            raise ValueError("resolution must be a multiple of downsample")
        self.resolution, self.downsample, self.bits = resolution, downsample, bits
        self.encoder = nn.Conv2d(3, bits, kernel_size=downsample, stride=downsample)

    @torch.no_grad()
    def get_code(self, pixel_values: torch.Tensor) -> torch.Tensor:
        z = self.encoder(pixel_values.to(self.encoder.weight.dtype))         # (B, bits, h, w)
        powers = (2 ** torch.arange(self.bits, device=z.device)).view(1, -1, 1, 1)
        codes = ((z > 0).long() * powers).sum(1)                              # (B, h, w)
        return codes.flatten(1)


def mmada_twin(seed: int = 0, d_model: int = 32, n_layers: int = 3, n_heads: int = 4,
               resolution: int = 32, downsample: int = 4, dtype=torch.float32):
    """(model, tokenizer, vq_model): a frozen, eval-mode MMaDA twin with the real token ids and
    vocabulary (134656), a (resolution / downsample)^2 VQ grid (default 8x8) and random weights.

    >>> model, tok, vq = mmada_twin()
    >>> model.config.num_vq_tokens, len(tok)
    (64, 126349)
    """
    side = resolution // downsample
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          mlp_hidden_size=2 * d_model, num_vq_tokens=side * side)
        model = MMadaModelLM(cfg)
        nn.init.normal_(model.model.transformer.wte.weight, std=1.0)
        vq = TwinMagvit(resolution, downsample)
    model = model.to(dtype).eval()
    vq = vq.eval()
    for p in list(model.parameters()) + list(vq.parameters()):
        p.requires_grad_(False)
    return model, mmada_tokenizer(), vq
