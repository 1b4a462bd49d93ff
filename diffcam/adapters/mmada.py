"""MMaDA (Gen-Verse/MMaDA): a LLaDA-8B masked-diffusion model whose images are discrete
MAGVIT-v2 codes.

>>> adapter = diffcam.load("mmada", "Gen-Verse/MMaDA-8B-MixCoT")                # doctest: +SKIP
>>> adapter = diffcam.load("mmada", model, tokenizer=tok, vq_model=vq)          # doctest: +SKIP
>>> with diffcam.Explainer(adapter) as ex:                                        # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "Describe the image.",
...                      generation=diffcam.GenerationConfig(steps=64, gen_length=64,
...                                                          block_length=32))

What the adapter does (docs/models.md section 5; docs/families/mmada.md for users):

* **Image tokens.** The image is resized (shorter side) and centre-cropped to ``resolution``
  (512), scaled to [-1, 1] and quantised by the VQ model (``vq_model.get_code``): 32 x 32 = 1024
  codes, row-major.  Token id = code + ``len(tokenizer)`` (126349).  The multimodal-understanding
  sequence is ``[<|mmu|>, <|soi|>, 1024 image ids, <|eoi|>, chat-template text]``; the image is
  always first (one image per prompt; an ``<image>`` marker in the prompt is removed).
* **Image span.** Located from the ids, not an offset: the run of ids inside
  ``[text_vocab, text_vocab + codebook)`` that starts right after ``<|soi|>`` and ends at
  ``<|eoi|>``; it must hold a square number of codes (the ``"vq"`` grid, rows x cols).
* **Forward.** The inner ``LLaDAModel`` (``model.model``) with ``input_embeddings``; it computes
  the logits itself (``transformer.ff_out``).  Padding is passed as an explicit boolean
  ``attention_bias`` (B, 1, L, L) -- never as ``attention_mask``, which MMaDA's copy of
  ``modeling_llada.py`` turns into a **causal** mask (models.md 1.6).  ``use_cache=False``.
* **Blocks** ``model.model.transformer.blocks`` (32 for the 8B model; each returns
  ``(hidden, cache)``), default layer 10.
* **Generation** LLaDA's low-confidence remasking with semi-autoregressive blocks, full sequence
  at every step (= MMaDA's ``mmu_generate``), so every state is feasible.  Logits are not
  shifted (``logit_shift = 0``).

``PreparedSample.input_ids`` keeps the VQ token ids at image positions (they are the model's own
input), ``image_token_id`` is -1.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch

from ..attribution.layout import single_grid_layout
from .base import Adapter, PreparedSample

__all__ = ["MMaDAAdapter", "load", "DEFAULT_TEMPLATE", "CHECKPOINTS"]

#: the user turn of MMaDA's multimodal-understanding prompt (LLaDA / Llama-3 chat headers)
DEFAULT_TEMPLATE = ("<|start_header_id|>user<|end_header_id|>\n{prompt}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n")
#: checkpoint ids known to use this layout (docs/models.md 5a)
CHECKPOINTS = ("Gen-Verse/MMaDA-8B-Base", "Gen-Verse/MMaDA-8B-MixCoT")

_MMU_ID, _SOI_ID, _EOI_ID, _MASK_ID, _TEXT_VOCAB, _CODEBOOK = 126089, 126084, 126085, 126336, \
    126349, 8192


def _inner(model):
    """The OLMo-style ``LLaDAModel`` (the one with ``.transformer``) of an MMaDA/LLaDA LM."""
    if hasattr(getattr(model, "model", None), "transformer"):
        return model.model
    if hasattr(model, "transformer"):
        return model
    raise TypeError(f"{type(model).__name__} is not an MMaDA/LLaDA model: expected "
                    "model.model.transformer.blocks (MMadaModelLM / LLaDAModelLM) or "
                    "model.transformer.blocks (LLaDAModel)")


def mmada_pixels(image: np.ndarray, resolution: int = 512, mode: str = "crop") -> torch.Tensor:
    """MMaDA's ``image_transform``: RGB uint8 (H, W, 3) -> float (1, 3, R, R) in [-1, 1].

    ``mode="crop"``: resize the shorter side to R (bicubic) and centre-crop R x R;
    ``mode="squash"``: resize to R x R (the repo uses it for documents and diagrams).

    >>> mmada_pixels(np.zeros((20, 40, 3), np.uint8), 16).shape
    torch.Size([1, 3, 16, 16])
    """
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image))
    R = int(resolution)
    if mode == "squash":
        im = im.resize((R, R), Image.BICUBIC)
    elif mode == "crop":
        w, h = im.size
        s = R / min(w, h)
        nw, nh = max(R, round(w * s)), max(R, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - R) // 2, (nh - R) // 2
        im = im.crop((left, top, left + R, top + R))
    else:
        raise ValueError(f"mode={mode!r}: expected 'crop' or 'squash'")
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


class MMaDAAdapter(Adapter):
    """Adapter for MMaDA checkpoints (and derivatives with the same sequence layout).

    model           ``MMadaModelLM`` / ``LLaDAModelLM`` (``model.model.transformer.blocks``)
    tokenizer       MMaDA's text tokenizer (LLaDA's); ``len(tokenizer)`` is the image-id offset
    vq_model        the image tokenizer with ``get_code(pixel_values (B, 3, R, R)) -> (B, n)``
                    (MAGVIT-v2, ``showlab/magvitv2``)
    resolution      input side of the VQ model (512)
    image_mode      "crop" (default) or "squash" (see :func:`mmada_pixels`)
    text_vocab_size image-id offset (default ``len(tokenizer)``, 126349)
    codebook_size   number of VQ codes (default ``config.codebook_size``, 8192)
    mask_token_id   default ``config.mask_token_id`` or 126336
    mmu_id, soi_id, eoi_id   ``<|mmu|>`` 126089, ``<|soi|>`` 126084, ``<|eoi|>`` 126085
    template        the text part, ``{prompt}`` replaced by the prompt (:data:`DEFAULT_TEMPLATE`)
    default_layer   hooked block when the Explainer is given none (about a third of the depth)
    """

    name = "mmada"
    logit_shift = 0
    image_token_id = -1

    def __init__(self, model, tokenizer, vq_model, *, resolution: int = 512,
                 image_mode: str = "crop", text_vocab_size: Optional[int] = None,
                 codebook_size: Optional[int] = None, mask_token_id: Optional[int] = None,
                 mmu_id: int = _MMU_ID, soi_id: int = _SOI_ID, eoi_id: int = _EOI_ID,
                 template: str = DEFAULT_TEMPLATE, image_marker: str = "<image>",
                 default_layer: Optional[int] = None):
        if vq_model is None or not callable(getattr(vq_model, "get_code", None)):
            raise TypeError("MMaDA needs its image tokenizer: pass vq_model= with a "
                            "get_code(pixel_values) method (MAGVIT-v2 'showlab/magvitv2' from "
                            "the MMaDA repository)")
        if "{prompt}" not in template:
            raise ValueError("template must contain '{prompt}'")
        self.model = model
        self._inner = _inner(model)
        self.tokenizer = tokenizer
        self.vq_model = vq_model
        cfg = getattr(model, "config", None) or self._inner.config
        self.config = cfg
        self.resolution = int(resolution)
        self.image_mode = image_mode
        self.text_vocab_size = int(len(tokenizer) if text_vocab_size is None else text_vocab_size)
        self.codebook_size = int(codebook_size if codebook_size is not None else
                                 getattr(cfg, "codebook_size", _CODEBOOK))
        self.mask_token_id = int(mask_token_id if mask_token_id is not None else
                                 getattr(cfg, "mask_token_id", None) or _MASK_ID)
        self.mmu_id, self.soi_id, self.eoi_id = int(mmu_id), int(soi_id), int(eoi_id)
        self.template = template
        self.image_marker = image_marker
        self._default_layer = default_layer
        vocab = self._inner.transformer.wte.weight.shape[0]
        if self.text_vocab_size + self.codebook_size > vocab:
            raise ValueError(f"image ids run to {self.text_vocab_size + self.codebook_size} but the "
                             f"embedding has {vocab} rows: text_vocab_size / codebook_size do not "
                             "match this checkpoint")

    # ------------------------------------------------------------------ protocol
    def blocks(self):
        return self._inner.transformer.blocks

    @property
    def default_layer(self) -> int:
        if self._default_layer is not None:
            return int(self._default_layer)
        return super().default_layer

    @property
    def device(self):
        return self._inner.transformer.wte.weight.device

    def embed_tokens(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self._inner.transformer.wte(ids)

    def head_module(self):
        """The LM head applied row-wise (``transformer.ff_out``; None with tied weights)."""
        if getattr(self.config, "weight_tying", False):
            return None
        try:
            return self._inner.transformer["ff_out"]
        except KeyError:
            return None

    @staticmethod
    def attention_bias(attention_mask):
        """(B, L) padding mask -> boolean (B, 1, L, L) bias (True = may attend), or None when
        nothing is padded.  Rows and columns of padded positions are both masked."""
        if attention_mask is None:
            return None
        m = attention_mask.bool()
        if bool(m.all()):
            return None
        return m[:, None, :, None] & m[:, None, None, :]

    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        out = self._inner(input_ids=None, input_embeddings=inputs_embeds,
                          attention_bias=self.attention_bias(attention_mask), use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    # ------------------------------------------------------------------ prompts
    def _encode(self, text: str) -> list:
        tok = self.tokenizer
        if callable(tok) and not isinstance(tok, type):
            try:
                ids = tok(text)["input_ids"]
                if ids and isinstance(ids[0], list):
                    ids = ids[0]
                return [int(i) for i in ids]
            except (TypeError, KeyError):
                pass
        return [int(i) for i in tok.encode(text)]

    def image_codes(self, image: np.ndarray) -> torch.Tensor:
        """VQ codes (n,) of one RGB uint8 image, row-major over the latent grid."""
        vq = self.vq_model
        p = next(iter(vq.parameters()), None) if isinstance(vq, torch.nn.Module) else None
        x = mmada_pixels(image, self.resolution, self.image_mode)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            codes = vq.get_code(x)
        codes = torch.as_tensor(codes).reshape(-1).long()
        if codes.numel() == 0 or int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(f"the VQ model returned codes outside [0, {self.codebook_size}): "
                             "codebook_size does not match vq_model")
        return codes

    def locate_image(self, ids: list) -> tuple:
        """(span start, n codes) of the image: the run of image ids after ``<|soi|>``, closed by
        ``<|eoi|>``.  Raises when there is none or it is malformed."""
        lo, hi = self.text_vocab_size, self.text_vocab_size + self.codebook_size
        starts = [i for i, t in enumerate(ids) if t == self.soi_id]
        if len(starts) != 1:
            raise ValueError(f"expected one <|soi|> ({self.soi_id}) in the ids, found {len(starts)}")
        s = starts[0] + 1
        e = s
        while e < len(ids) and lo <= ids[e] < hi:
            e += 1
        if e == s or e >= len(ids) or ids[e] != self.eoi_id:
            raise ValueError(f"the image ids after <|soi|> must be a run of ids in [{lo}, {hi}) "
                             f"closed by <|eoi|> ({self.eoi_id})")
        return s, e - s

    def prepare(self, images, prompt: str) -> PreparedSample:
        """``[<|mmu|>, <|soi|>, image ids, <|eoi|>, template(prompt)]`` with one image."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        images = [np.asarray(im) for im in (images or [])]
        if len(images) != 1:
            raise ValueError(f"MMaDA's multimodal understanding takes exactly one image per prompt, "
                             f"got {len(images)}")
        im = images[0]
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got dtype {im.dtype} "
                             f"shape {im.shape}")
        if prompt.count(self.image_marker) > 1:
            raise ValueError(f"the prompt has {prompt.count(self.image_marker)} image markers; "
                             "MMaDA takes one image, always placed before the text")
        text = prompt.replace(self.image_marker, " ").strip()
        codes = self.image_codes(im)
        n = int(codes.numel())
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the VQ model returned {n} codes, not a square grid")
        want = getattr(self.config, "num_vq_tokens", None)
        if want and int(want) != n:
            raise ValueError(f"the VQ model returned {n} codes but the checkpoint expects "
                             f"num_vq_tokens={want}; check resolution={self.resolution}")
        ids = ([self.mmu_id, self.soi_id] + (codes + self.text_vocab_size).tolist()
               + [self.eoi_id] + self._encode(self.template.format(prompt=text)))
        start, length = self.locate_image(ids)
        lay = single_grid_layout(start, side, side, "vq", 0)
        if lay.span_length != length:
            raise ValueError(f"the image run has {length} ids but the grid needs {lay.span_length}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        with torch.no_grad():
            embeds = self.embed_tokens(ids_t).detach()
        return PreparedSample(input_ids=ids_t, inputs_embeds=embeds, layouts=[lay], extras={},
                              images=[im], prompt=prompt)

    def info(self) -> dict:
        d = super().info()
        d.update({"blocks": "model.transformer.blocks", "resolution": self.resolution,
                  "text_vocab_size": self.text_vocab_size, "codebook_size": self.codebook_size})
        return d

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Probe the attention on a short random sequence: position 0 must see the last token
        (bidirectional), and a padded position must not be seen.  Raises RuntimeError with what
        to do otherwise."""
        probe_attention(self)


def probe_attention(adapter, length: int = 6) -> None:
    """Bidirectionality and padding probe through ``adapter.forward`` (no gradients).

    Two sequences that differ only in their last token must give different logits at position 0
    (else attention is causal); with the last position padded, changing it must not change them
    (else the padding mask is ignored)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, length), generator=g).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 7) % 1000
    with torch.no_grad():
        x = adapter.embed_tokens(ids.reshape(-1)).reshape(2, length, -1)
        extras = adapter.extend_extras(_probe_sample(x[0]), length)
        lg = adapter.forward(x, None, extras)
        d_bi = float((lg[0, 0].float() - lg[1, 0].float()).abs().max())
        mask = torch.ones(2, length, dtype=torch.long, device=x.device)
        mask[:, -1] = 0
        lg = adapter.forward(x, mask, extras)
        d_pad = float((lg[0, 0].float() - lg[1, 0].float()).abs().max())
    scale = float(lg[0, 0].float().abs().max()) + 1e-6
    if d_bi <= 1e-6 * scale:
        raise RuntimeError(
            f"{adapter.name}: position 0 does not depend on later tokens -- the model runs with "
            "causal attention, so maps would ignore everything after each token. Load the "
            "family's own modeling code (trust_remote_code=True) with the transformers version "
            "the checkpoint was written for, or pass check=False if this is intended")
    if d_pad > 1e-3 * scale + 1e-5:
        raise RuntimeError(
            f"{adapter.name}: a padded position still changes the logits -- the padding mask is "
            "ignored by this copy of the modeling code; explain one sample at a time (no padding) "
            "or update the model code")


def _probe_sample(embeds):
    ids = torch.zeros(embeds.shape[0], dtype=torch.long)
    return PreparedSample(input_ids=ids, inputs_embeds=embeds, layouts=[], extras={})


# ---------------------------------------------------------------------- loading
def _version_warnings(path_given: bool) -> None:
    try:
        import transformers
        from packaging.version import Version
        v = Version(transformers.__version__)
    except Exception:  # pragma: no cover - transformers is an optional dependency
        return
    if path_given and Version("5.0") <= v < Version("5.13"):
        warnings.warn(f"transformers {v}: versions 5.0-5.12 can silently leave weights of "
                      "remote-code models randomly initialised (models.md 1.10); MMaDA was written "
                      "for 4.4x -- pin transformers<5 (4.57.x) or check the answers look sane",
                      UserWarning, stacklevel=3)


def prepare_model(model, freeze: bool = True):
    """Settings that silently break attribution, fixed in place: eval mode, frozen parameters
    (``freeze``), ``config.use_cache = False`` where the config lost the attribute (LLaDA code on
    transformers 5.x fails in forward otherwise)."""
    inner = _inner(model)
    for cfg in {id(c): c for c in (getattr(model, "config", None), getattr(inner, "config", None))
                if c is not None}.values():
        if getattr(cfg, "use_cache", None) is None:
            try:
                cfg.use_cache = False
            except Exception:
                pass
    if model.training:
        model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _load_path(path, tokenizer, vq_model, vq_path, torch_dtype, device):
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("loading MMaDA from a path needs transformers (pip install "
                          "'transformers>=4.46,<5') and the MMaDA repository code") from e
    mm_cls = magvit = None
    try:  # the MMaDA repository's package (git clone https://github.com/Gen-Verse/MMaDA)
        import models as _mmada_models  # type: ignore
        mm_cls = getattr(_mmada_models, "MMadaModelLM", None)
        magvit = getattr(_mmada_models, "MAGVITv2", None)
    except ImportError:
        pass
    if mm_cls is not None:
        model = mm_cls.from_pretrained(path, trust_remote_code=True, torch_dtype=torch_dtype)
    else:
        from transformers import AutoModel
        model = AutoModel.from_pretrained(path, trust_remote_code=True, torch_dtype=torch_dtype)
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    if vq_model is None:
        if magvit is None:
            raise ImportError(
                "MMaDA's image tokenizer (MAGVIT-v2) is code from the MMaDA repository: "
                "git clone https://github.com/Gen-Verse/MMaDA, pip install its requirements, put "
                "the clone on PYTHONPATH (it provides the package 'models'), then "
                "diffcam.load('mmada', path); or pass vq_model= yourself")
        vq_model = magvit.from_pretrained(vq_path)
    if device is not None:
        model = model.to(device)
        if isinstance(vq_model, torch.nn.Module):
            vq_model = vq_model.to(device)
    if isinstance(vq_model, torch.nn.Module):
        vq_model.eval()
        for p in vq_model.parameters():
            p.requires_grad_(False)
    return model, tokenizer, vq_model


def load(path_or_model=None, *, tokenizer=None, vq_model=None, vq_path: str = "showlab/magvitv2",
         torch_dtype=torch.bfloat16, device=None, freeze: bool = True, check: bool = True,
         **adapter_kwargs: Any) -> MMaDAAdapter:
    """``diffcam.load("mmada", path_or_model, ...)``.

    path_or_model   a checkpoint path or hub id (``"Gen-Verse/MMaDA-8B-MixCoT"``), loaded with the
                    MMaDA repository's ``MMadaModelLM`` when importable, else ``AutoModel`` with
                    ``trust_remote_code=True``; or the model you already loaded
    tokenizer       required with a model object (``AutoTokenizer`` of the checkpoint otherwise)
    vq_model        required with a model object; loaded from ``vq_path`` with the repository's
                    ``MAGVITv2`` otherwise
    torch_dtype     bfloat16 (fp16 backward passes overflow, models.md 1.9)
    device          move the model (and VQ model) there after loading a path
    freeze          eval mode and ``requires_grad=False`` on every parameter (saves memory)
    check           run :func:`probe_attention` (bidirectional, padding honoured)
    adapter_kwargs  :class:`MMaDAAdapter` options (``resolution``, ``template``, ids, ...)

    >>> model, tok, vq = mmada_twin()                       # doctest: +SKIP
    >>> adapter = diffcam.load("mmada", model, tokenizer=tok, vq_model=vq,
    ...                        resolution=32)                # doctest: +SKIP
    """
    if path_or_model is None:
        raise TypeError("diffcam.load('mmada', path_or_model): give a checkpoint path / hub id "
                        f"(one of {CHECKPOINTS}) or the MMaDA model you loaded")
    if isinstance(path_or_model, (str, os.PathLike)):
        _version_warnings(True)
        model, tokenizer, vq_model = _load_path(str(path_or_model), tokenizer, vq_model, vq_path,
                                                torch_dtype, device)
    else:
        model = path_or_model
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a path or a torch module, got {type(model).__name__}")
        if tokenizer is None or vq_model is None:
            raise TypeError("diffcam.load('mmada', model, ...) needs tokenizer= (the checkpoint's "
                            "text tokenizer) and vq_model= (its MAGVIT-v2 image tokenizer)")
        _inner(model)
    prepare_model(model, freeze)
    adapter = MMaDAAdapter(model, tokenizer, vq_model, **adapter_kwargs)
    if check:
        adapter.check()
    return adapter
