"""diffcam's bundled diffusion MLLM: a small vision tower and projector feeding a bidirectional
Llama language model trained with the masked-diffusion objective on the shapes world
(:mod:`diffcam.data.shapes`).

Images are packed the way LLaDA-V packs them: the prompt's ``<image>`` placeholder (id -200 in
the expanded ids) is replaced by a base grid (the whole image pooled to 4x4 tokens) followed by a
12x12 grid with the learned ``image_newline`` embedding after every row (16 + 12 * 13 = 172
tokens).  The language model is ``transformers.LlamaModel`` with ``is_causal=False`` at
``model.model.layers``; the whole model is a ``PreTrainedModel``, so it saves and loads with
``save_pretrained`` / ``from_pretrained`` (safetensors).

The autoregressive twin is the same class with ``causal=True`` (causal attention, trained on
next-token prediction), for the autoregressive baselines.

>>> import diffcam
>>> adapter = diffcam.load("bundled")                        # doctest: +SKIP
>>> model = DiffcamTinyForMaskedDiffusion.from_pretrained(weights_dir("diffusion"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

from ..data import shapes

__all__ = ["DiffcamTinyConfig", "DiffcamTinyForMaskedDiffusion", "build_tokenizer", "weights_dir",
           "SPECIAL_TOKENS", "IMAGE_PLACEHOLDER", "GEN_LENGTH", "encode_images"]

IMAGE_PLACEHOLDER = -200
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<mask>", "<unk>", "<image>"]
#: response length the model is trained with (answers are padded with <eos>)
GEN_LENGTH = 18


def weights_dir(kind: str = "diffusion") -> str:
    """Folder of the shipped weights: ``kind`` is 'diffusion' or 'autoregressive'."""
    if kind not in ("diffusion", "autoregressive"):
        raise ValueError(f"kind={kind!r}: expected 'diffusion' or 'autoregressive'")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", kind)


def build_tokenizer():
    """The word-level tokenizer of the shapes world (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + shapes.vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", mask_token="<mask>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


def sincos_2d(g: int, dim: int) -> torch.Tensor:
    """(g * g, dim) fixed 2-D position codes of a g x g grid in row-major order: the first half
    of the channels encode the column, the second half the row, each as sines and cosines of
    evenly spaced frequencies from half a turn across the grid to a quarter turn per cell."""
    half = dim // 2
    nf = half // 2
    freqs = np.linspace(np.pi / g, np.pi / 2, nf) if nf else np.zeros(0)
    pos = np.arange(g, dtype=np.float64)

    def code(p):
        a = p[:, None] * freqs[None]
        out = np.zeros((g, half))
        out[:, :2 * nf] = np.concatenate([np.sin(a), np.cos(a)], 1)
        return out

    cx, cy = code(pos), code(pos)
    yy, xx = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    full = np.zeros((g * g, dim))
    full[:, :half] = cx[xx.ravel()]
    full[:, half:2 * half] = cy[yy.ravel()]
    return torch.from_numpy(full).to(torch.float32)


class EndAnchoredLlamaModel(LlamaModel):
    """``LlamaModel`` plus a learned embedding of every token's distance from the end of its
    row (the last ``end_positions`` distances get their own vector, the rest share one).  A
    masked-diffusion model fills a fixed-length response at the end of the sequence, so this
    tells each masked slot which answer word it is, which RoPE alone (relative positions, all
    ``<mask>`` inputs alike) makes slow to learn.  Padding is read from a 2-D attention mask
    (left or right padding)."""

    def __init__(self, config, end_positions: int):
        super().__init__(config)
        self.end_positions = int(end_positions)
        self.end_pos = nn.Embedding(self.end_positions, config.hidden_size)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, L = inputs_embeds.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.to(torch.long)
            rank = valid.flip(1).cumsum(1).flip(1) - 1          # valid tokens after this one
        else:
            rank = torch.arange(L - 1, -1, -1, device=inputs_embeds.device).expand(B, L)
        rank = rank.clamp(0, self.end_positions - 1)
        inputs_embeds = inputs_embeds + self.end_pos(rank).to(inputs_embeds.dtype)
        return super().forward(attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               **kwargs)


class DiffcamTinyConfig(PretrainedConfig):
    """Configuration of the bundled model.

    The language model's configuration is ``text_config`` (a ``LlamaConfig``); the vision tower
    is a four-layer CNN with ``vision_channels`` channels that maps ``image_size`` pixels to a
    ``grid`` x ``grid`` feature map; the base grid pools it by ``base_pool``.
    """

    model_type = "diffcam_tiny"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, text_config=None, vision_channels=(32, 64, 96, 96), image_size=96, grid=12,
                 base_pool=3, causal=False, mask_token_id=3, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, image_placeholder_id=IMAGE_PLACEHOLDER, gen_length=GEN_LENGTH,
                 vision_extra_layers=0, end_positions=0, projector_type="mlp2x_gelu",
                 projector_hidden=128, projector_groups=(7, 7), **kwargs):
        if text_config is None:
            text_config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=384,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=256,
                                      tie_word_embeddings=False, pad_token_id=pad_token_id,
                                      bos_token_id=bos_token_id, eos_token_id=eos_token_id)
        elif isinstance(text_config, dict):
            text_config = LlamaConfig(**text_config)
        text_config.is_causal = bool(causal)
        self.text_config = text_config
        self.vision_channels = list(vision_channels)
        self.vision_extra_layers = int(vision_extra_layers)
        self.end_positions = int(end_positions)
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={projector_type!r}: expected one of "
                             f"{', '.join(PROJECTOR_TYPES)}")
        self.projector_type = str(projector_type)
        self.projector_hidden = int(projector_hidden)
        self.projector_groups = [int(x) for x in projector_groups]
        self.image_size = int(image_size)
        self.grid = int(grid)
        self.base_pool = int(base_pool)
        self.causal = bool(causal)
        self.mask_token_id = int(mask_token_id)
        self.image_placeholder_id = int(image_placeholder_id)
        self.gen_length = int(gen_length)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, **kwargs)

    @property
    def base_grid(self) -> int:
        return self.grid // self.base_pool

    @property
    def image_tokens(self) -> int:
        return self.base_grid ** 2 + self.grid * (self.grid + 1)


#: ``mlp2x_gelu``: LLaVA's two-layer MLP on every feature-map cell (grid positions added to the
#: features first); ``label_bottleneck``: :class:`LabelBottleneckProjector`
PROJECTOR_TYPES = ("mlp2x_gelu", "label_bottleneck")


class LabelBottleneckProjector(nn.Module):
    """A projector with a narrow, interpretable middle: a small convolutional classifier turns
    the (B, C, g, g) feature map into ``sum(groups)`` logits per cell, each group goes through
    its own softmax (in the shipped configuration: 7 colour classes and 7 shape classes, class
    0 = nothing named there), and a bias-free linear map (``table``) sends the probabilities to
    the language model's width.  With the table's columns set to the embeddings of the colour
    and shape words, every cell becomes "embedding(colour) + embedding(shape)" -- the format of
    the proxy image tokens the language model is warmed up on (``diffcam.models.train``).
    Everything stays differentiable, so gradients reach the features as through any projector.

    >>> proj = LabelBottleneckProjector(96, 64, (7, 7), 128)
    >>> proj(torch.zeros(2, 96, 12, 12)).shape
    torch.Size([2, 12, 12, 128])
    """

    def __init__(self, in_channels: int, hidden: int, groups: Sequence[int], dim: int):
        super().__init__()
        self.groups = [int(g) for g in groups]
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, sum(self.groups), 1)
        self.table = nn.Linear(sum(self.groups), dim, bias=False)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) features -> (B, g, g, sum(groups)) class logits."""
        x = F.gelu(self.conv1(f))
        x = x + F.gelu(self.conv2(x))
        return self.head(x).permute(0, 2, 3, 1)

    def probabilities(self, f: torch.Tensor) -> torch.Tensor:
        """Per-group softmax of :meth:`logits`, concatenated."""
        return torch.cat([z.softmax(-1) for z in self.logits(f).split(self.groups, -1)], -1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) -> (B, g, g, dim)."""
        return self.table(self.probabilities(f))


class TinyVisionTower(nn.Module):
    """Convolutions, 96x96 RGB -> 12x12 feature map: three strided ones (strides 2, 2, 2), then
    ``1 + extra_layers`` residual 3x3 convolutions at the grid resolution, which widen the
    receptive field (32 px with none extra, 64 px with two) so that a cell sees a whole object."""

    def __init__(self, channels: Sequence[int], extra_layers: int = 0):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.conv1 = nn.Conv2d(3, c1, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, stride=1, padding=1)
        if extra_layers and c3 != c4:
            raise ValueError("extra vision layers need vision_channels[2] == vision_channels[3]")
        self.extra = nn.ModuleList([nn.Conv2d(c4, c4, 3, stride=1, padding=1)
                                    for _ in range(int(extra_layers))])

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        y = F.gelu(self.conv4(x))
        x = x + y if x.shape[1] == y.shape[1] else y
        for conv in self.extra:
            x = x + F.gelu(conv(x))
        return x


def _pixels(images, size: int, device, dtype) -> torch.Tensor:
    """List of RGB uint8 (H, W, 3) arrays (or one (B, H, W, 3) array) -> (B, 3, size, size)."""
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"images must be RGB arrays (H, W, 3), got shape {a.shape}")
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].to(torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        out.append(x)
    x = torch.cat(out) / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


class DiffcamTinyForMaskedDiffusion(PreTrainedModel):
    """The bundled model.  Attributes follow LLaVA/LLaDA-V naming: ``vision_tower``,
    ``mm_projector``, ``image_newline``, ``model`` (``LlamaModel``, blocks at ``model.layers``),
    ``lm_head``."""

    config_class = DiffcamTinyConfig
    base_model_prefix = "diffcam_tiny"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: DiffcamTinyConfig):
        super().__init__(config)
        tc = config.text_config
        d = tc.hidden_size
        self.vision_tower = TinyVisionTower(config.vision_channels,
                                            getattr(config, "vision_extra_layers", 0))
        cv = config.vision_channels[-1]
        if getattr(config, "projector_type", "mlp2x_gelu") == "label_bottleneck":
            self.mm_projector = LabelBottleneckProjector(cv, config.projector_hidden,
                                                         config.projector_groups, d)
            pos_dim = d                    # positions added to the projected tokens
        else:
            self.mm_projector = nn.Sequential(nn.Linear(cv, d), nn.GELU(), nn.Linear(d, d))
            pos_dim = cv                   # positions added to the features
        self.base_pos = nn.Parameter(torch.zeros(config.base_grid ** 2, pos_dim))
        self.hires_pos = nn.Parameter(torch.zeros(config.grid ** 2, pos_dim))
        self.image_newline = nn.Parameter(torch.zeros(d))
        n_end = int(getattr(config, "end_positions", 0))
        self.model = EndAnchoredLlamaModel(tc, n_end) if n_end else LlamaModel(tc)
        self.lm_head = nn.Linear(d, tc.vocab_size, bias=False)
        #: tests may set ``feature_hook(image_index, features) -> features``
        self.feature_hook = None
        self.post_init()

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, std if isinstance(module, nn.Linear) else 0.1)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, DiffcamTinyForMaskedDiffusion):
            # 2-D sine-cosine start for the learned grid positions: column (x) and row (y)
            # codes in separate channels, so "left of" is easy to read from the first step
            cfg = module.config
            with torch.no_grad():
                module.base_pos.copy_(0.5 * sincos_2d(cfg.base_grid, module.base_pos.shape[1]))
                module.hires_pos.copy_(0.5 * sincos_2d(cfg.grid, module.hires_pos.shape[1]))
            nn.init.normal_(module.image_newline, 0.0, std)
        elif hasattr(module, "weight") and module.__class__.__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    # ------------------------------------------------------------------ images
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> packed (B, image_tokens, D): base grid, then grid rows each
        followed by the newline embedding."""
        cfg = self.config
        f = self.vision_tower(pixels)                                 # (B, C, g, g)
        B, C, g, _ = f.shape
        if isinstance(self.mm_projector, LabelBottleneckProjector):
            # tokens first, positions after: the base grid averages the cells' tokens
            cells = self.mm_projector(f)                              # (B, g, g, D)
            base = F.avg_pool2d(cells.permute(0, 3, 1, 2), cfg.base_pool)
            base = base.flatten(2).transpose(1, 2) + self.base_pos
            hires = (cells.reshape(B, g * g, -1) + self.hires_pos).reshape(B, g, g, -1)
            nl = self.image_newline.to(hires.dtype).expand(B, g, 1, hires.shape[-1])
            hires = torch.cat([hires, nl], dim=2).reshape(B, g * (g + 1), -1)
            return torch.cat([base, hires], dim=1)
        base = F.avg_pool2d(f, cfg.base_pool).flatten(2).transpose(1, 2) + self.base_pos
        hires = f.flatten(2).transpose(1, 2) + self.hires_pos
        base = self.mm_projector(base)                                # (B, b*b, D)
        hires = self.mm_projector(hires).reshape(B, g, g, -1)
        nl = self.image_newline.to(hires.dtype).expand(B, g, 1, hires.shape[-1])
        hires = torch.cat([hires, nl], dim=2).reshape(B, g * (g + 1), -1)
        return torch.cat([base, hires], dim=1)

    def encode_images(self, images) -> List[tuple]:
        """The vision contract of :class:`diffcam.adapters.generic.GenericAdapter`:
        RGB uint8 arrays -> ``[(features (172, D), {"base": (4, 4), "hires": (12, 12)}), ...]``."""
        if len(images) == 0:
            return []
        p = next(self.parameters())
        feats = self.image_features(_pixels(images, self.config.image_size, p.device, p.dtype))
        g, b = self.config.grid, self.config.base_grid
        out = []
        for i in range(feats.shape[0]):
            f = feats[i]
            if self.feature_hook is not None:
                h = self.feature_hook(i, f)
                if h is None or tuple(h.shape) != tuple(f.shape):
                    raise ValueError("feature_hook must return a tensor of the features' shape")
                f = h
            out.append((f, {"base": (b, b), "hires": (g, g)}))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, pixel_values=None,
                **kwargs):
        """Logits (B, L, V).  Either ``inputs_embeds`` (images already spliced in) or
        ``input_ids`` with ``pixel_values`` (B, 3, S, S): every ``image_placeholder_id`` in a row is
        replaced by that row's packed image (one image per row)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_images(input_ids, pixel_values)
        h = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       use_cache=False).last_hidden_state
        return self.lm_head(h)

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]):
        """Embeddings of (B, P) ids where the single placeholder of each row expands into the
        image tokens; rows must have the placeholder at the same index."""
        ph = self.config.image_placeholder_id
        has = (input_ids == ph)
        if not bool(has.any()):
            return self.model.embed_tokens(input_ids)
        if pixel_values is None:
            raise ValueError("input_ids hold the image placeholder but pixel_values is None")
        cols = has.float().argmax(1)
        if not bool((has.sum(1) == 1).all()) or not bool((cols == cols[0]).all()):
            raise ValueError("every row needs exactly one image placeholder, at the same index")
        c = int(cols[0])
        img = self.image_features(pixel_values)
        left = self.model.embed_tokens(input_ids[:, :c])
        right = self.model.embed_tokens(input_ids[:, c + 1:])
        return torch.cat([left, img, right], dim=1)


def encode_images(images, size: int = shapes.IMAGE_SIZE, device="cpu", dtype=torch.float32):
    """RGB uint8 arrays -> the model's (B, 3, size, size) pixel tensor."""
    return _pixels(images, size, device, dtype)


def register_auto_classes():
    """Make ``AutoConfig`` / ``AutoModel`` know the ``diffcam_tiny`` model type."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register("diffcam_tiny", DiffcamTinyConfig)
        AutoModel.register(DiffcamTinyConfig, DiffcamTinyForMaskedDiffusion)
    except ValueError:  # already registered
        pass
