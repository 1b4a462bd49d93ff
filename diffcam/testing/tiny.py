"""Tiny diffusion-MLLM stand-ins built in process: a word-level tokenizer, bidirectional
transformers Llama / Qwen2 language models (``config.is_causal = False``, transformers >= 5.5)
and small vision towers packed like LLaVA anyres models and like Qwen2-VL models.  Both factories
return a :class:`~diffcam.adapters.generic.GenericAdapter`, so tests go through the generic
adapter.

>>> from diffcam.testing import tiny_llava_anyres           # doctest: +SKIP
>>> adapter = tiny_llava_anyres(seed=0)                     # doctest: +SKIP
>>> sample = adapter.prepare([img], "<image> describe the image")  # doctest: +SKIP

Planting a marker: both vision modules (``adapter.vision``) have a ``feature_hook`` attribute,
``None`` by default.  When set, it is called as ``feature_hook(image_index, features)`` with the
packed (n_tokens, D) features of each image (index in the prepare call, positions relative to the
image span, newline tokens included) and must return the (possibly modified) features.  The span
offset of grid cell (r, c) is ``layout.grid(name).positions(0)[r, c]``, e.g.::

    lay = adapter.prepare([img], prompt).layouts[0]
    k = int(lay.grid("hires").positions(0)[2, 5])
    def hook(i, f):
        f = f.clone(); f[k] = 10.0; return f
    adapter.vision.feature_hook = hook

Weights are frozen (``requires_grad=False``) and the models are in eval mode.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..adapters.generic import GenericAdapter

__all__ = ["WordTokenizer", "TinyAnyresVision", "TinyMergedVision", "tiny_llava_anyres",
           "tiny_qwen2vl", "IMAGE_PLACEHOLDER"]

IMAGE_PLACEHOLDER = -200

SPECIAL = ["<pad>", "<eos>", "<mask>", "<unk>", "<image>", "<image_pad>", "<vision_start>",
           "<vision_end>"]
WORDS = ("a the of on in and is there are with to it this what image picture photo describe "
         "left right top bottom near next small big large "
         "cat dog box ball tree car bird house person table chair cup flower sky grass "
         "red green blue yellow black white orange brown "
         "one two three sitting standing , . ?").split()


class WordTokenizer:
    """A ~60-word tokenizer with HF-like ``encode`` / ``decode`` / ``convert_ids_to_tokens``.

    Unknown words map to ``<unk>``.  Special tokens: ``<pad> <eos> <mask> <unk> <image>
    <image_pad> <vision_start> <vision_end>``.

    >>> tok = WordTokenizer()
    >>> tok.decode(tok.encode("A red cat, on the box."))
    'a red cat , on the box .'
    """

    def __init__(self):
        self.vocab = list(SPECIAL) + list(WORDS)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self.pad_token_id = self.token_to_id["<pad>"]
        self.eos_token_id = self.token_to_id["<eos>"]
        self.mask_token_id = self.token_to_id["<mask>"]
        self.unk_token_id = self.token_to_id["<unk>"]
        self.image_token_id = self.token_to_id["<image>"]
        self.image_pad_id = self.token_to_id["<image_pad>"]
        self.vision_start_id = self.token_to_id["<vision_start>"]
        self.vision_end_id = self.token_to_id["<vision_end>"]
        self.all_special_ids = [self.token_to_id[t] for t in SPECIAL]

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list:
        return re.findall(r"<[a-z_]+>|[a-z]+|[^\sa-z]", text.lower())

    def encode(self, text: str, add_special_tokens: bool = False) -> list:
        return [self.token_to_id.get(t, self.unk_token_id) for t in self.tokenize(text)]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self._tok(int(ids))
        return [self._tok(int(i)) for i in ids]

    def _tok(self, i: int) -> str:
        if i == IMAGE_PLACEHOLDER:
            return "<image>"
        return self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>"

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if torch.is_tensor(ids):
            ids = ids.reshape(-1).tolist()
        toks = [self._tok(int(i)) for i in ids]
        if skip_special_tokens:
            toks = [t for t in toks if t not in SPECIAL]
        return " ".join(toks)


def _to_tensor(image: np.ndarray, size, device, dtype) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (1, 3, h, w) in [-1, 1], resized to ``size`` = (h, w)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(torch.float32)
    x = x / 127.5 - 1.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.to(device=device, dtype=dtype)


class _Tower(nn.Module):
    def __init__(self, patch: int, vision_dim: int, in_dim: int, hidden: int):
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Conv2d(3, vision_dim, kernel_size=patch, stride=patch)
        self.projector = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.feature_hook: Optional[Callable] = None

    @property
    def _param(self):
        return self.patch_embed.weight

    def _finish(self, outputs):
        if self.feature_hook is None:
            return outputs
        res = []
        for i, (f, info) in enumerate(outputs):
            g = self.feature_hook(i, f)
            if g is None or tuple(g.shape) != tuple(f.shape):
                raise ValueError("feature_hook must return a tensor of the features' shape")
            res.append((g, info))
        return res


class TinyAnyresVision(_Tower):
    """LLaVA-anyres-style packing: base grid (image squashed to ``base`` x ``base`` patches), then
    a high-resolution grid of h x w patches (longer side ``hires`` patches, aspect kept) with the
    learned ``image_newline`` appended to every row: base_r*base_c + h*(w+1) tokens."""

    def __init__(self, hidden: int, patch: int = 4, base: int = 4, hires: int = 8,
                 vision_dim: int = 16):
        super().__init__(patch, vision_dim, vision_dim, hidden)
        self.base, self.hires = base, hires
        self.image_newline = nn.Parameter(torch.randn(hidden) * 0.5)

    def hires_grid(self, height: int, width: int):
        n = self.hires
        if width >= height:
            return max(1, int(round(n * height / width))), n
        return n, max(1, int(round(n * width / height)))

    def _grid(self, x):
        f = self.patch_embed(x)[0]                 # (C, r, c)
        r, c = f.shape[-2:]
        return self.projector(f.flatten(1).T), (int(r), int(c))

    def forward(self, images):
        p, dev, dt = self.patch, self._param.device, self._param.dtype
        out = []
        for im in images:
            base, bshape = self._grid(_to_tensor(im, (self.base * p, self.base * p), dev, dt))
            h, w = self.hires_grid(im.shape[0], im.shape[1])
            hi, _ = self._grid(_to_tensor(im, (h * p, w * p), dev, dt))
            hi = hi.reshape(h, w, -1)
            nl = self.image_newline.to(hi.dtype).expand(h, 1, hi.shape[-1])
            hi = torch.cat([hi, nl], 1).reshape(h * (w + 1), -1)
            out.append((torch.cat([base, hi], 0), {"base": bshape, "hires": (h, w)}))
        return self._finish(out)


class TinyMergedVision(_Tower):
    """Qwen2-VL-style packing: the image resized (aspect kept, longer side ``max_patches``
    patches, both sides a multiple of ``merge`` patches) to a patch grid, merged ``merge`` x
    ``merge`` (channel concatenation, row-major) into (rows/merge) x (cols/merge) tokens."""

    def __init__(self, hidden: int, patch: int = 4, max_patches: int = 8, merge: int = 2,
                 vision_dim: int = 16):
        super().__init__(patch, vision_dim, vision_dim * merge * merge, hidden)
        self.max_patches, self.merge = max_patches, merge

    def patch_grid(self, height: int, width: int):
        m, n = self.merge, self.max_patches
        if width >= height:
            r, c = n * height / width, n
        else:
            r, c = n, n * width / height
        return max(m, int(round(r / m)) * m), max(m, int(round(c / m)) * m)

    def forward(self, images):
        p, m, dev, dt = self.patch, self.merge, self._param.device, self._param.dtype
        out = []
        for im in images:
            pr, pc = self.patch_grid(im.shape[0], im.shape[1])
            f = self.patch_embed(_to_tensor(im, (pr * p, pc * p), dev, dt))[0]   # (C, pr, pc)
            C = f.shape[0]
            f = f.reshape(C, pr // m, m, pc // m, m).permute(1, 3, 2, 4, 0)      # (R, Cc, m, m, C)
            f = f.reshape((pr // m) * (pc // m), m * m * C)
            out.append((self.projector(f), {"patch": (pr, pc), "merge": m}))
        return self._finish(out)


def _build_lm(kind: str, vocab: int, hidden: int, layers: int, heads: int, pad_id: int):
    if kind == "llama":
        from transformers import LlamaConfig as Config, LlamaForCausalLM as LM
    else:
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as LM
    cfg = Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                 pad_token_id=pad_id, bos_token_id=None, eos_token_id=None,
                 tie_word_embeddings=False)
    cfg.is_causal = False
    cfg._attn_implementation = "eager"
    model = LM(cfg)
    model.config.is_causal = False
    return model


def _finalize(model):
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def tiny_llava_anyres(seed: int = 0, hidden: int = 32, layers: int = 4, heads: int = 4,
                      dtype=torch.float32) -> GenericAdapter:
    """Bidirectional tiny ``LlamaForCausalLM`` + anyres vision tower (base 4x4, hires up to 8x8
    with a newline column), LLaVA placeholder -200 splice, logit shift 0.  The vision module is
    ``model.vision_tower`` (also ``adapter.vision``)."""
    tok = WordTokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_lm("llama", len(tok), hidden, layers, heads, tok.pad_token_id)
        model.vision_tower = TinyAnyresVision(hidden)
    model = _finalize(model.to(dtype))
    return GenericAdapter(model, tok, blocks="model.layers", mask_token_id=tok.mask_token_id,
                          placeholder_id=IMAGE_PLACEHOLDER, vision=model.vision_tower,
                          layout="anyres", logit_shift=0, name="tiny-llava-anyres")


def tiny_qwen2vl(seed: int = 0, hidden: int = 32, layers: int = 4, heads: int = 4,
                 dtype=torch.float32) -> GenericAdapter:
    """Bidirectional tiny ``Qwen2ForCausalLM`` + merged vision tower (patch grid up to 8x8 merged
    2x2), prompt ``<vision_start> <image_pad> * n <vision_end>``, logit shift 1 (Dream family).
    1D positions (no mRoPE)."""
    tok = WordTokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_lm("qwen2", len(tok), hidden, layers, heads, tok.pad_token_id)
        model.vision_tower = TinyMergedVision(hidden)
    model = _finalize(model.to(dtype))
    return GenericAdapter(model, tok, blocks="model.layers", mask_token_id=tok.mask_token_id,
                          image_token_id=tok.image_pad_id, vision=model.vision_tower,
                          layout="merged", logit_shift=1, vision_start_id=tok.vision_start_id,
                          vision_end_id=tok.vision_end_id, name="tiny-qwen2vl")
