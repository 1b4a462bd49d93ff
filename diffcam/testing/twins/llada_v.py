"""A structural twin of LLaDA-V (ML-GSAI/LLaDA-V), built in process with random weights.

What is reproduced (docs/models.md section 3), so that :mod:`diffcam.adapters.llada_v` runs the
same code on the twin as on the real checkpoint:

* classes and attribute paths: ``LlavaLLaDAModelLM.model`` is a ``LlavaLLaDAModel`` holding
  ``embed_tokens``, ``layers`` (Llama-style decoder layers that return a *tuple*), ``norm``,
  ``vision_tower`` (a SigLIP tower with its last encoder layer deleted), ``mm_projector``
  (``mlp2x_gelu``) and ``image_newline``; ``LlavaLLaDAModelLM.lm_head``; ``get_model()``,
  ``get_vision_tower()``, ``encode_images()``;
* the LLaVA-NeXT splice ``prepare_inputs_labels_for_multimodal(input_ids, position_ids,
  attention_mask, past_key_values, labels, images, modalities, image_sizes)`` with the ``-200``
  placeholder, returning ``(None, position_ids, attention_mask, past_key_values, inputs_embeds,
  labels)``;
* anyres packing: the base crop grid (the image squashed to one crop), then the high-resolution
  grid (best pinpoint, crops stitched, padding removed to the image's aspect, bilinearly shrunk
  when it exceeds ``anyres_max_N`` crops by more than 1.1x) with the learned ``image_newline``
  appended to every row;
* LLaDA's token ids (mask 126336, BOS 126080, EOS 126081, header ids 126346/126347, EOT 126348)
  in a vocabulary of 126464;
* the LM head scores only the twin's word list and the special tokens (other rows are zero), so
  answers generated with random weights are words;
* the trap: ``LlavaLLaDAModelLM.forward`` is the *training* forward (random forward-process
  masking of the embeddings; it fails without ``labels``), never to be used for attribution.

Sizes are scaled down: a crop is 28 px with 4 px patches, i.e. a 7 x 7 patch grid (27 x 27 in the
real model), hidden size 32, 4 layers.

>>> twin = build_llada_v_twin(seed=0)                                  # doctest: +SKIP
>>> import diffcam
>>> adapter = diffcam.load("llada-v", twin.model, **twin.load_kwargs())  # doctest: +SKIP

Planting markers (tests): ``twin.model.get_model().crop_hook`` is called as
``crop_hook(image_index, feats)`` with the projected crop features ``(n_crops, side, side, D)``
(crop 0 is the base crop) and ``grid_hook`` as ``grid_hook(image_index, name, grid)`` with the
final ``"base"`` and ``"hires"`` grids ``(rows, cols, D)`` right before packing (newline column
not yet appended).  Both must return a tensor of the same shape.  ``packing_log`` records the
grid shapes of every image packed, ``[(image_index, {"base": (r, c), "hires": (h, w) | None})]``.

For tests, :func:`hand_gradcam` (Grad-CAM with plain torch autograd) and
:func:`expected_commits` (the sampler's commits re-derived step by step) compute by hand what the
adapters and the engine must produce; they use nothing of ``diffcam.adapters`` or
``diffcam.attribution``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["IMAGE_TOKEN_INDEX", "LLADA_SPECIAL_IDS", "LLADA_VOCAB", "TwinTokenizer",
           "TwinImageProcessor", "SigLipVisionTower", "process_images", "select_best_resolution",
           "anyres_grid_shape", "unpad_image", "LLaDADecoderLayer", "LlavaLLaDAModel",
           "LlavaLLaDAModelLM", "Twin", "build_llada_v_twin", "llada_chat", "attention_bias",
           "WORDS", "hand_gradcam", "expected_commits"]

IMAGE_TOKEN_INDEX = -200
LLADA_VOCAB = 126464
LLADA_SPECIAL_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
                     "<|start_header_id|>": 126346, "<|end_header_id|>": 126347,
                     "<|eot_id|>": 126348}

WORDS = ("a the of on in and is there are with to it this what image picture photo describe "
         "left right top bottom near next small big large user assistant system you helpful "
         "cat dog box ball tree car bird house person table chair cup flower sky grass "
         "red green blue yellow black white orange brown "
         "one two three sitting standing , . ? \n").split(" ")


# ----------------------------------------------------------------------------- tokenizer
class TwinTokenizer:
    """A word-level tokenizer whose special tokens carry a real family's ids.

    Words get ids ``word_base + i``; special tokens (``<|...|>``) the ids of ``specials``;
    unknown words ``unk_id``.  HF-like ``encode`` / ``decode`` / ``convert_ids_to_tokens`` /
    ``__call__`` (``.input_ids``).  No special token is added automatically.

    >>> tok = TwinTokenizer(LLADA_SPECIAL_IDS, mask="<|mdm_mask|>", bos="<|startoftext|>",
    ...                     eos="<|endoftext|>")
    >>> tok.decode(tok.encode("a red cat<|eot_id|>"))
    'a red cat <|eot_id|>'
    >>> tok.mask_token_id
    126336
    """

    _pattern = re.compile(r"<\|[a-z_]+\|>|[a-z]+|\n|[^\sa-z]")

    def __init__(self, specials: dict, mask: str, bos: Optional[str], eos: str,
                 pad: Optional[str] = None, word_base: int = 1000, unk_id: int = 999):
        self.words = [w for w in WORDS if w]
        self.word_to_id = {w: word_base + i for i, w in enumerate(self.words)}
        self.specials = dict(specials)
        self.id_to_tok = {i: w for w, i in self.word_to_id.items()}
        self.id_to_tok.update({i: t for t, i in self.specials.items()})
        self.unk_token_id = int(unk_id)
        self.id_to_tok[self.unk_token_id] = "<unk>"
        self.mask_token_id = self.specials[mask]
        self.mask_token = mask
        self.bos_token_id = self.specials[bos] if bos else None
        self.eos_token_id = self.specials[eos]
        self.pad_token_id = self.specials[pad] if pad else self.eos_token_id
        self.all_special_ids = sorted(set(self.specials.values()) | {self.unk_token_id})
        self.chat_template = None

    def tokenize(self, text: str) -> list:
        return self._pattern.findall(text.lower())

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        out = []
        for t in self.tokenize(text):
            if t in self.specials:
                out.append(self.specials[t])
            else:
                out.append(self.word_to_id.get(t, self.unk_token_id))
        return out

    def __call__(self, text: str, **kw):
        return _Encoded(self.encode(text))

    def __len__(self) -> int:
        return max(self.id_to_tok) + 1

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self.id_to_tok.get(int(ids), "<unk>")
        return [self.id_to_tok.get(int(i), "<unk>") for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if torch.is_tensor(ids):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return " ".join(self.id_to_tok.get(i, "<unk>") for i in ids)


@dataclass
class _Encoded:
    input_ids: list


def llada_chat(prompt: str) -> str:
    """LLaDA's chat layout (a system turn, the user turn, the assistant header), as a template
    callable for the adapter's ``template=`` argument.

    >>> llada_chat("<image> describe").count("<|start_header_id|>")
    3
    """
    return ("<|startoftext|><|start_header_id|>system<|end_header_id|> you are a helpful "
            "assistant .<|eot_id|><|start_header_id|>user<|end_header_id|> " + prompt +
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")


# ----------------------------------------------------------------------------- images
class TwinImageProcessor:
    """SigLIP-style preprocessing: resize (squash) to ``size`` x ``size``, scale to [0, 1],
    normalise with mean 0.5 / std 0.5.  ``preprocess(images)["pixel_values"]`` is (N, 3, S, S)."""

    def __init__(self, size: int = 28):
        self.size = {"height": size, "width": size}
        self.crop_size = {"height": size, "width": size}
        self.image_mean = (0.5, 0.5, 0.5)
        self.image_std = (0.5, 0.5, 0.5)

    def preprocess(self, images, return_tensors: str = "pt") -> dict:
        from PIL import Image
        s = self.size["height"]
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32)
            a = (a / 255.0 - 0.5) / 0.5
            out.append(torch.from_numpy(a).permute(2, 0, 1))
        return {"pixel_values": torch.stack(out)}


def select_best_resolution(size_wh, candidates) -> tuple:
    """The pinpoint (w, h) that keeps most of the image's pixels after an aspect-preserving
    downscale, ties broken by the least wasted area.

    >>> select_best_resolution((40, 24), [(28, 56), (56, 28), (56, 56)])
    (56, 28)
    """
    W, H = size_wh
    best, best_eff, best_waste = None, -1, float("inf")
    for w, h in candidates:
        s = min(w / W, h / H)
        eff = min(int(W * s) * int(H * s), W * H)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(w), int(h)), eff, waste
    return best


def anyres_grid_shape(size_wh, pinpoints, crop: int) -> tuple:
    """(crops across, crops down) of the best pinpoint for an image of size (W, H)."""
    w, h = select_best_resolution(size_wh, pinpoints)
    return w // crop, h // crop


def _resize_and_pad(image, target_wh):
    from PIL import Image
    W, H = image.size
    tw, th = target_wh
    s = min(tw / W, th / H)
    nw, nh = min(tw, max(1, math.ceil(W * s))), min(th, max(1, math.ceil(H * s)))
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def process_images(images, image_processor, model_cfg):
    """The family's image preprocessing (the role of ``llava.mm_utils.process_images``): with
    ``image_aspect_ratio`` containing "anyres", each image becomes (1 + n_crops, 3, S, S) -- the
    base image squashed to one crop, then the crops of the image resized into its best pinpoint
    (row-major).  Returns a stacked tensor when all images give the same number of crops, else a
    list."""
    s = image_processor.crop_size["height"]
    out = []
    for im in images:
        im = im.convert("RGB")
        if "anyres" in str(getattr(model_cfg, "image_aspect_ratio", "")):
            tw, th = select_best_resolution(im.size, model_cfg.image_grid_pinpoints)
            padded = _resize_and_pad(im, (tw, th))
            crops = [padded.crop((x, y, x + s, y + s)) for y in range(0, th, s)
                     for x in range(0, tw, s)]
            out.append(image_processor.preprocess([im] + crops)["pixel_values"])
        else:
            out.append(image_processor.preprocess([im])["pixel_values"])
    if all(t.shape == out[0].shape for t in out):
        return torch.stack(out)
    return out


def unpad_image(t: torch.Tensor, size_wh) -> torch.Tensor:
    """Remove the letterbox padding of a stitched (C, h, w) feature map so that it keeps the
    original image's aspect ratio (size_wh = (W, H))."""
    W, H = size_wh
    h, w = t.shape[1:]
    if W / H > w / h:                       # padded top and bottom
        nh = int(H * (w / W))
        pad = (h - nh) // 2
        return t[:, pad:h - pad, :]
    nw = int(W * (h / H))                   # padded left and right
    pad = (w - nw) // 2
    return t[:, :, pad:w - pad]


class SigLipVisionTower(nn.Module):
    """A SigLIP tower as LLaVA-NeXT wraps it: ``vision_tower`` is a transformers
    ``SiglipVisionModel`` whose last encoder layer was deleted (select layer -2); the features
    are the last remaining layer's hidden states, (N, side * side, C)."""

    def __init__(self, image_size: int = 28, patch_size: int = 4, hidden: int = 16,
                 layers: int = 2):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel
        cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=2,
                                 image_size=image_size, patch_size=patch_size,
                                 vision_use_head=False)
        self.vision_tower = SiglipVisionModel(cfg)
        del self.vision_tower.encoder.layers[-1]
        self.config = cfg

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, images):
        p = next(self.vision_tower.parameters())
        out = self.vision_tower(images.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
        return out.hidden_states[-1]


def _projector(cin: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cin, hidden), nn.GELU(), nn.Linear(hidden, hidden))


# ----------------------------------------------------------------------------- LLaVA-NeXT splice
class LlavaMetaModelTwin:
    """Vision modules of the inner model (``vision_tower``, ``mm_projector``, ``image_newline``)
    and the marker hooks."""

    def _init_vision(self, config, hidden: int):
        self.vision_tower = SigLipVisionTower(image_size=config.twin_crop_px,
                                              patch_size=config.twin_patch_px,
                                              hidden=config.mm_hidden_size)
        self.mm_projector = _projector(config.mm_hidden_size, hidden)
        self.image_newline = nn.Parameter(torch.randn(hidden) * 0.5)
        self.crop_hook: Optional[Callable] = None
        self.grid_hook: Optional[Callable] = None
        self.packing_log: list = []

    def get_vision_tower(self):
        return self.vision_tower


class LlavaMetaForCausalLMTwin:
    """The multimodal half of the LM classes: ``encode_images`` and the LLaVA-NeXT splice."""

    def get_vision_tower(self):
        return self.get_model().vision_tower

    def encode_images(self, images):
        feats = self.get_model().vision_tower(images)
        return self.get_model().mm_projector(feats)

    def _pool_crops(self, feats):
        """(n_crops, side, side, D) -> pooled crops (identity here; LaViDa pools 2x2)."""
        return feats

    def _merge_image(self, index: int, feats: torch.Tensor, size_wh) -> torch.Tensor:
        inner = self.get_model()
        cfg = self.config
        side = self.get_vision_tower().num_patches_per_side
        D = feats.shape[-1]
        f = feats.reshape(feats.shape[0], side, side, D)
        if inner.crop_hook is not None:
            f = _checked(inner.crop_hook(index, f), f, "crop_hook")
        f = self._pool_crops(f)
        ps = f.shape[1]
        base = f[0]
        info = {"base": (ps, ps), "hires": None}
        if f.shape[0] > 1:
            crop_px = self.get_vision_tower().image_size
            ncw, nch = anyres_grid_shape(size_wh, cfg.image_grid_pinpoints, crop_px)
            grid = f[1:].reshape(nch, ncw, ps, ps, D).permute(4, 0, 2, 1, 3)
            grid = grid.reshape(D, nch * ps, ncw * ps)
            grid = unpad_image(grid, size_wh)
            m = re.match(r"anyres_max_(\d+)", str(cfg.image_aspect_ratio))
            if m:
                h, w = grid.shape[1:]
                times = math.sqrt(h * w / (int(m.group(1)) * ps * ps))
                if times > 1.1:
                    grid = F.interpolate(grid[None], [int(h // times), int(w // times)],
                                         mode="bilinear")[0]
            hw = grid.permute(1, 2, 0)
            if inner.grid_hook is not None:
                base = _checked(inner.grid_hook(index, "base", base), base, "grid_hook")
                hw = _checked(inner.grid_hook(index, "hires", hw), hw, "grid_hook")
            h, w = hw.shape[:2]
            info["hires"] = (int(h), int(w))
            nl = inner.image_newline.to(hw.dtype).expand(h, 1, D)
            packed = torch.cat([base.reshape(-1, D), torch.cat([hw, nl], 1).reshape(-1, D)], 0)
        else:
            if inner.grid_hook is not None:
                base = _checked(inner.grid_hook(index, "base", base), base, "grid_hook")
            packed = torch.cat([base.reshape(-1, D), inner.image_newline[None].to(base.dtype)], 0)
        inner.packing_log.append((index, info))
        return packed

    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask,
                                             past_key_values, labels, images,
                                             modalities=("image",), image_sizes=None):
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        images = [x[None] if x.dim() == 3 else x for x in images]
        counts = [int(x.shape[0]) for x in images]
        feats = torch.split(self.encode_images(torch.cat(images, 0)), counts, 0)
        packed = [self._merge_image(i, f, image_sizes[i]) for i, f in enumerate(feats)]
        embed = self.get_input_embeddings()
        rows, k = [], 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            if attention_mask is not None:
                ids = ids[attention_mask[b].bool()]
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            parts, prev = [], 0
            for p in where:
                parts.append(embed(ids[prev:p]))
                parts.append(packed[k].to(parts[-1].dtype))
                k += 1
                prev = p + 1
            parts.append(embed(ids[prev:]))
            rows.append(torch.cat(parts, 0))
        L = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros(len(rows), L, rows[0].shape[-1])
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=out.device)
        for b, r in enumerate(rows):
            out[b, :r.shape[0]] = r
            mask[b, :r.shape[0]] = True
        pos = torch.arange(L, device=out.device)[None].expand(len(rows), L)
        return None, pos, mask, past_key_values, out, labels


def _checked(new, old, name):
    if new is None or tuple(new.shape) != tuple(old.shape):
        raise ValueError(f"{name} must return a tensor of shape {tuple(old.shape)}")
    return new


# ----------------------------------------------------------------------------- attention masks
def attention_bias(mode: str, attention_mask, B: int, Lq: int, Lk: int, dtype, device,
                   past: int = 0) -> torch.Tensor:
    """Additive (B, 1, Lq, Lk) bias for the twins' attention.  ``mode``:

    * ``"bidirectional"``: every query sees every valid key (padding keys masked) -- LLaDA-V;
    * ``"causal_with_padding"``: bidirectional without a mask, but a padding ``attention_mask``
      turns it causal (the MMaDA/LLaDA-copy pitfall of docs/models.md 1.6);
    * ``"ignored"``: the mask is ignored (original LLaDA code);
    * ``"causal"``: always causal (a model that is not a diffusion model at all).
    """
    neg = torch.finfo(dtype).min
    bias = torch.zeros(B, 1, Lq, Lk, dtype=dtype, device=device)
    q = torch.arange(Lq, device=device)[:, None] + past
    k = torch.arange(Lk, device=device)[None, :]
    causal = (k > q)[None, None]
    if mode == "causal":
        bias = bias.masked_fill(causal, neg)
    if attention_mask is None or mode == "ignored":
        return bias
    if attention_mask.dim() == 4:
        am = attention_mask.to(device)
        return bias + (am if am.is_floating_point() else torch.where(am.bool(), 0.0, neg).to(dtype))
    keep = attention_mask.to(device).bool()[:, None, None, :Lk]
    bias = bias.masked_fill(~keep, neg)
    if mode == "causal_with_padding":
        bias = bias.masked_fill(causal, neg)
    elif mode not in ("bidirectional", "causal"):
        raise ValueError(f"unknown attention mode {mode!r}")
    return bias


# ----------------------------------------------------------------------------- language model
def _llama_config(vocab: int, hidden: int, layers: int, heads: int, **extra):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                      rope_theta=500000.0, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None, tie_word_embeddings=False)
    cfg.is_causal = False
    cfg._attn_implementation = "eager"
    for k, v in extra.items():
        setattr(cfg, k, v)
    return cfg


@functools.lru_cache(maxsize=None)
def _decoder_layer_cls():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class LLaDADecoderLayer(LlamaDecoderLayer):
        """A Llama decoder layer that returns a tuple ``(hidden_states,)``, like LLaDA-V's."""

        def forward(self, *args, **kwargs):
            return (super().forward(*args, **kwargs),)

    return LLaDADecoderLayer


def __getattr__(name):
    if name == "LLaDADecoderLayer":
        return _decoder_layer_cls()
    raise AttributeError(name)


class LlavaLLaDAModel(LlavaMetaModelTwin, nn.Module):
    """The inner model: Llama-style, bidirectional, tuple-returning layers + vision modules."""

    def __init__(self, config, attention_mode: str = "bidirectional"):
        nn.Module.__init__(self)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
        self.config = config
        self.attention_mode = attention_mode
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        layer = _decoder_layer_cls()
        self.layers = nn.ModuleList([layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(D, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self._init_vision(config, D)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast
        if past_key_values is not None or use_cache:
            raise NotImplementedError("the LLaDA-V twin has no KV cache (LLaDA-V re-runs the full "
                                      "sequence every step)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)[None].expand(B, L)
        bias = attention_bias(self.attention_mode, attention_mask, B, L, L, x.dtype, x.device)
        pe = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=bias, position_ids=position_ids,
                      position_embeddings=pe)[0]
        x = self.norm(x)
        if return_dict is False:
            return (x,)
        return BaseModelOutputWithPast(last_hidden_state=x)


class LlavaLLaDAModelLM(LlavaMetaForCausalLMTwin, nn.Module):
    """The LM class (``model_type`` ``llava_llada``).  Its ``forward`` is the training forward."""

    def __init__(self, config, attention_mode: str = "bidirectional"):
        nn.Module.__init__(self)
        self.config = config
        self.model = LlavaLLaDAModel(config, attention_mode)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_model(self):
        return self.model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, images=None,
                image_sizes=None, **kwargs):
        """Training forward: masks a random fraction of the answer embeddings (forward process
        of the masked-diffusion objective).  Needs ``labels``; never deterministic."""
        if inputs_embeds is None:
            _, position_ids, attention_mask, _, inputs_embeds, labels = \
                self.prepare_inputs_labels_for_multimodal(input_ids, position_ids,
                                                          attention_mask, None, labels, images,
                                                          image_sizes=image_sizes)
        supervised = labels.ne(-100)          # fails without labels, like the real class
        t = torch.rand(inputs_embeds.shape[0], 1, device=inputs_embeds.device)
        noisy = (torch.rand(supervised.shape, device=supervised.device) < t) & supervised
        mask_emb = self.get_input_embeddings().weight[self.config.mask_token_id]
        x = torch.where(noisy[..., None], mask_emb.to(inputs_embeds.dtype), inputs_embeds)
        h = self.model(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state
        return self.lm_head(h)


# ----------------------------------------------------------------------------- factory
@dataclass
class Twin:
    """A built twin: the model, its tokenizer and image processor, the family's
    ``process_images`` and the chat template callable."""

    model: Any
    tokenizer: Any
    image_processor: Any
    process_images: Callable
    template: Callable
    extra: dict = field(default_factory=dict)

    def load_kwargs(self, **over) -> dict:
        """Keyword arguments for ``diffcam.load(family, twin.model, **twin.load_kwargs())``."""
        d = {"tokenizer": self.tokenizer, "image_processor": self.image_processor,
             "process_images": self.process_images, "template": self.template}
        d.update(over)
        return d


def _focus_head(weight: torch.Tensor, tokenizer) -> None:
    """Zero the LM-head rows of every id that is neither one of the twin's words nor a special
    token (the mask excepted), so that random-weight answers are readable words."""
    keep = torch.zeros(weight.shape[0], dtype=torch.bool)
    keep[list(tokenizer.word_to_id.values())] = True
    keep[[i for i in tokenizer.specials.values() if i < weight.shape[0]]] = True
    keep[tokenizer.mask_token_id] = False
    with torch.no_grad():
        weight[~keep] = 0.0


def _finalize(model, dtype):
    model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _size_overrides(intermediate_size, kv_heads, attn_implementation) -> dict:
    """Config keys the builders' optional size arguments set (none when left at None)."""
    out = {}
    if intermediate_size is not None:
        out["intermediate_size"] = int(intermediate_size)
    if kv_heads is not None:
        out["num_key_value_heads"] = int(kv_heads)
    if attn_implementation is not None:
        out["_attn_implementation"] = str(attn_implementation)
    return out


def build_llada_v_twin(seed: int = 0, hidden: int = 32, layers: int = 4, heads: int = 4,
                       attention_mode: str = "bidirectional", max_crops: int = 2,
                       dtype=torch.float32, *, intermediate_size: Optional[int] = None,
                       kv_heads: Optional[int] = None, vocab: Optional[int] = None,
                       attn_implementation: Optional[str] = None) -> Twin:
    """Build the LLaDA-V twin (random weights, seeded; global RNG untouched).

    ``attention_mode`` (see :func:`attention_bias`) lets tests reproduce attention pitfalls;
    ``max_crops`` is the N of ``anyres_max_N`` (4 in LLaDA-V; 2 here so small images already
    exercise the bilinear shrink of the high-resolution grid).

    Optional sizes (None keeps the twin's defaults: ``2 * hidden``, ``heads // 2``, LLaDA's
    126464, ``"eager"``): ``intermediate_size`` (12288 in LLaDA-8B), ``kv_heads`` (32),
    ``vocab`` and ``attn_implementation`` (e.g. ``"sdpa"``).  The modules are created on the
    current default device in the current default dtype, then cast to ``dtype``: under
    ``with torch.device("cuda")`` and a bfloat16 default dtype a full-size twin is built on the
    GPU without a float32 or CPU copy."""
    crop = 28
    cfg = _llama_config(LLADA_VOCAB if vocab is None else int(vocab), hidden, layers, heads,
                        **_size_overrides(intermediate_size, kv_heads, attn_implementation),
                        image_aspect_ratio=f"anyres_max_{max_crops}",
                        image_grid_pinpoints=[(crop * i, crop * j) for i in range(1, 4)
                                              for j in range(1, 4)],
                        mm_patch_merge_type="spatial_unpad", mm_vision_select_layer=-2,
                        mm_hidden_size=16, mm_projector_type="mlp2x_gelu",
                        twin_crop_px=crop, twin_patch_px=4, model_type="llava_llada",
                        mask_token_id=LLADA_SPECIAL_IDS["<|mdm_mask|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaLLaDAModelLM(cfg, attention_mode)
    tok = TwinTokenizer(LLADA_SPECIAL_IDS, mask="<|mdm_mask|>", bos="<|startoftext|>",
                        eos="<|endoftext|>")
    _focus_head(model.lm_head.weight, tok)
    return Twin(_finalize(model, dtype), tok, TwinImageProcessor(crop), process_images,
                llada_chat)


# ----------------------------------------------------------------------------- hand computations
def hand_gradcam(block, run, full_embeds, positions: dict, targets) -> dict:
    """Grad-CAM by hand with plain torch autograd, independent of ``diffcam.attribution``.

    block        the block whose output is the activation A (a tensor, or a tuple whose first
                 element is the hidden state)
    run          ``run(full_embeds) -> logits (1, L, V)``, the model's forward
    full_embeds  (1, L, D) prompt + response embeddings
    positions    ``{grid name: (rows, cols) array of sequence positions}``
    targets      one list of ``(logit row, token id)`` pairs per target; the aggregate (sum of
                 all) is appended last

    Returns ``{grid name: (len(targets) + 1, rows, cols) float32 array}`` of min-max-normalised
    maps ``ReLU(sum_c mean_ij(G_c) A_c)``.
    """
    store = {}

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        leaf = h.detach().requires_grad_(True)
        store["leaf"] = leaf
        return (leaf,) + tuple(out[1:]) if isinstance(out, tuple) else leaf

    handle = block.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = run(full_embeds)
    finally:
        handle.remove()
    leaf = store["leaf"]
    scores = [sum(logits[0, r, y] for r, y in t) for t in targets]
    scores.append(sum(scores))
    out = {name: [] for name in positions}
    for s in scores:
        (g,) = torch.autograd.grad(s, leaf, retain_graph=True)
        for name, pos in positions.items():
            p = torch.as_tensor(np.asarray(pos), dtype=torch.long)
            A, G = leaf[0, p].detach().float(), g[0, p].float()
            m = torch.relu((A * G.mean((0, 1))).sum(-1))
            out[name].append(((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy())
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def expected_commits(rows_fn, final_ids, masked, gen_length: int, steps: int, block_length,
                     mask_id: int, suppress=()) -> list:
    """Re-derive, step by step, what LLaDA's low-confidence remasking must commit, from the
    recorded states: for step s the state is the final answer with the positions still masked
    after s steps set to ``mask_id``; ``rows_fn(state) -> (G, V)`` are the logit rows that score
    the response.  Returns one ``(committed positions (sorted list), their tokens)`` per step,
    with the linear schedule of ``num_transfer_tokens`` computed here by hand."""
    G = gen_length
    bl = G if block_length is None else block_length
    per_block = steps // (G // bl)
    y = torch.as_tensor(final_ids).reshape(-1)
    masked = torch.as_tensor(masked)
    out = []
    for s in range(steps):
        b, t = divmod(s, per_block)
        hi = (b + 1) * bl
        if t == 0:
            n = int(masked[s, b * bl:hi].sum())
            sched = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        state = torch.where(masked[s], torch.full_like(y, mask_id), y)
        rows = rows_fn(state).to(torch.float64).clone()
        rows[:, list(suppress) + [mask_id]] = float("-inf")
        x0 = rows.argmax(-1)
        conf = torch.softmax(rows, -1).max(-1).values
        cand = masked[s] & (torch.arange(G) < hi)
        conf = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
        k = sched[t]
        chosen = sorted(torch.topk(conf, k).indices.tolist()) if k else []
        out.append((chosen, [int(x0[i]) for i in chosen]))
    return out
