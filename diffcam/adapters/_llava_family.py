"""Shared machinery of the LLaVA-style diffusion MLLM adapters (LLaDA-V, LaViDa, LaViDa-O).

These families splice images the LLaVA-NeXT way: the prompt is tokenized with the placeholder
id ``-200`` where ``<image>`` was, and the model's own ``prepare_inputs_labels_for_multimodal``
replaces every placeholder by the image's packed features -- a base grid (the whole image
squashed to one crop, 2x2-pooled in LaViDa), then, for anyres images, the high-resolution grid of
h rows whose every row ends with the learned ``image_newline`` token.

The adapter never re-implements that packing.  It calls the model's splice and reads the layout
*from the spliced features themselves*: the newline tokens are exact copies of
``image_newline``, so their positions give the row stride (w + 1) and the number of rows h, and
the base grid is what comes before (a perfect square, cross-checked against the vision tower's
patch grid, pooled or not).  This is right for every pinpoint, unpadding and ``anyres_max``
shrink the model applies, and it fails loudly when the features are not laid out as expected.

Checks done when an adapter is built (each names what is wrong and what to do):

* the family's own model code under a transformers release it was not written for
  (:func:`check_transformers`);
* blocks whose ``forward`` was replaced at run time, e.g. by a feature cache such as dLLM-Cache
  (:func:`find_runtime_patches`);
* a probe of the attention (:func:`probe_attention`): the model must be bidirectional, and a
  padding mask must mask the padding without turning attention causal -- when no way of passing
  padding works, batches that need padding are refused (one sample per call always works).

The reference switch (``reference_quirks``) reproduces the two packing bugs of the released
Diffusion-CAM code for comparison (docs/reference_comparison.md): ``"sheared_slice"`` reads the
high-resolution grid as h*w contiguous tokens (rows sheared by the newline column) and
``"unexpanded_positions"`` reads each target's logit at its position in the *unexpanded* id
sequence (one token per image), which lands inside the image span.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..attribution.layout import Grid, ImageLayout
from .base import Adapter, PreparedSample

__all__ = ["IMAGE_TOKEN_INDEX", "REFERENCE_QUIRKS", "LlavaPreparedSample", "LlavaFamilyAdapter",
           "anyres_layout_from_features", "sheared_layout", "tokenize_image_prompt",
           "check_transformers", "find_runtime_patches", "probe_attention", "import_family"]

IMAGE_TOKEN_INDEX = -200
REFERENCE_QUIRKS = ("sheared_slice", "unexpanded_positions")
_REF_KEY = "_diffcam_reference_rows"


@dataclass
class LlavaPreparedSample(PreparedSample):
    """A :class:`PreparedSample` that also keeps the *unexpanded* ids (one ``-200`` per image),
    as the family's tokenizer produced them."""

    unexpanded_ids: list = field(default_factory=list)


# ----------------------------------------------------------------------------- imports
def import_family(module: str, family: str, advice: str):
    """Import ``module`` of a family's own code, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{family}: cannot import {module!r} ({e}). {advice}") from e


# ----------------------------------------------------------------------------- layouts
def _square_side(n: int) -> Optional[int]:
    if n <= 0:
        return None
    r = math.isqrt(n)
    return r if r * r == n else None


def anyres_layout_from_features(feats, newline, span_start: int, image_index: int = 0,
                                base_sides: Sequence[int] = ()) -> ImageLayout:
    """The ImageLayout of one spliced LLaVA-style image, read from its packed features.

    ``feats`` (n, D) are the image's features as spliced; ``newline`` (D,) the model's
    ``image_newline``.  Newline tokens are found by value; with h >= 2 of them their spacing is
    w + 1 and the base grid is the n - h(w + 1) tokens before, which must be a square (and one of
    ``base_sides`` when given).  With one trailing newline and no high-resolution grid (a single
    crop) the layout is the base grid alone (the newline belongs to the span, to no grid).

    >>> import torch
    >>> nl = torch.ones(2); cell = torch.zeros(2)
    >>> feats = torch.stack([cell] * 4 + ([cell] * 3 + [nl]) * 2)       # 2x2 base, 2x3 hires
    >>> lay = anyres_layout_from_features(feats, nl, span_start=5)
    >>> [(g.name, g.rows, g.cols, g.row_stride) for g in lay.grids]
    [('base', 2, 2, 2), ('hires', 2, 3, 4)]
    """
    n = int(feats.shape[0])
    nl = newline.reshape(-1).detach().to(device=feats.device, dtype=torch.float32)
    if nl.shape[0] != feats.shape[1]:
        raise ValueError(f"image_newline has width {nl.shape[0]} but the image features "
                         f"{feats.shape[1]}")
    tol = 1e-5 * (1.0 + float(nl.abs().max()))
    q = ((feats.detach().float() - nl).abs().amax(-1) <= tol).nonzero().flatten().tolist()
    sides = [int(s) for s in base_sides if s]
    where = f"image {image_index} ({n} spliced tokens)"
    grids = None
    if not q:
        s = _square_side(n)
        if s is None:
            raise ValueError(f"{where}: no image_newline token and {n} is not a square grid; "
                             "this packing (mm_patch_merge_type without 'unpad'?) is not "
                             "supported")
        grids = (Grid("base", 0, s, s, s),)
    elif len(q) >= 2:
        stride = q[1] - q[0]
        w, h = stride - 1, len(q)
        regular = all(q[r] == q[0] + r * stride for r in range(h)) and q[-1] == n - 1
        nb = q[0] - w
        s = _square_side(nb)
        if w < 1 or not regular or s is None:
            raise ValueError(f"{where}: the image_newline tokens sit at {q[:6]}{'...' if h > 6 else ''}"
                             f", which is not a base grid followed by rows of w cells + newline")
        grids = (Grid("base", 0, s, s, s), Grid("hires", nb, h, w, w + 1))
    else:
        if q[0] != n - 1:
            raise ValueError(f"{where}: a single image_newline token at {q[0]}, not at the end")
        s = _square_side(n - 1)
        if s is not None and (not sides or s in sides):
            grids = (Grid("base", 0, s, s, s),)
        else:
            for s in sides:
                w = n - 1 - s * s
                if w >= 1:
                    grids = (Grid("base", 0, s, s, s), Grid("hires", s * s, 1, w, w + 1))
                    break
        if grids is None:
            raise ValueError(f"{where}: one newline token and no base grid among {sides} fits")
    base = grids[0].rows
    if sides and base not in sides:
        raise ValueError(f"{where}: the packed features hold a {base}x{base} base grid but the "
                         f"vision tower gives {' or '.join(f'{s}x{s}' for s in sides)} "
                         "(pooled or not); the model's packing differs from what this adapter "
                         "expects")
    lay = ImageLayout(int(span_start), n, grids, int(image_index))
    lay.check()
    return lay


def sheared_layout(layout: ImageLayout) -> ImageLayout:
    """The released reference code's reading of the high-resolution grid: h*w *contiguous*
    tokens reshaped to (h, w), i.e. row stride w instead of w + 1 (rows drift by one column per
    row and newline tokens enter the map).  Other grids are unchanged.

    >>> lay = ImageLayout(0, 12, (Grid("base", 0, 2, 2, 2), Grid("hires", 4, 2, 3, 4)))
    >>> sheared_layout(lay).grid("hires").positions(0).tolist()
    [[4, 5, 6], [7, 8, 9]]
    """
    grids = tuple(Grid(g.name, g.offset, g.rows, g.cols, g.cols) if g.name == "hires" else g
                  for g in layout.grids)
    return ImageLayout(layout.span_start, layout.span_length, grids, layout.image_index)


# ----------------------------------------------------------------------------- tokenizing
def _encode(tokenizer, text: str, special: bool) -> list:
    if not text:
        return []
    try:
        ids = tokenizer.encode(text, add_special_tokens=special)
    except TypeError:
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


def tokenize_image_prompt(text: str, tokenizer, marker: str = "<image>",
                          placeholder: int = IMAGE_TOKEN_INDEX) -> list:
    """Tokenize ``text`` with one ``placeholder`` per ``marker``, the way LLaVA's
    ``tokenizer_image_token`` does: every chunk tokenized as the tokenizer does by default, a
    leading BOS kept once.

    >>> class T:
    ...     bos_token_id = 1
    ...     def encode(self, s, add_special_tokens=True):
    ...         return ([1] if add_special_tokens else []) + [len(w) for w in s.split()]
    >>> tokenize_image_prompt("hi <image> a cat", T())
    [1, 2, -200, 1, 3]
    """
    chunks = [_encode(tokenizer, c, True) for c in text.split(marker)]
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_bos = bos is not None and bool(chunks[0]) and chunks[0][0] == bos
    out = [bos] if keep_bos else []
    for i, c in enumerate(chunks):
        if i:
            out.append(placeholder)
        if keep_bos and c and c[0] == bos:
            c = c[1:]
        out.extend(c)
    return out


# ----------------------------------------------------------------------------- checks
def _version_tuple(v: str) -> tuple:
    parts = []
    for p in str(v).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def is_family_code(model) -> bool:
    """True when ``model`` comes from a family's own code (the ``llava`` package of LLaDA-V /
    LaViDa, or Hugging Face remote code) rather than from transformers or diffcam."""
    mod = type(model).__module__ or ""
    return mod.split(".")[0] in ("llava", "transformers_modules")


def check_transformers(family: str, model=None, version: Optional[str] = None,
                       pin: str = "a 4.x release", real: Optional[bool] = None) -> None:
    """Refuse transformers releases under which a family's own model code silently breaks.

    Only applies to the family's own code (``real``, default: :func:`is_family_code`).
    transformers 5.0 - 5.12 can random-initialise weights of such code without an error
    (meaningless logits and maps): RuntimeError.  5.13 and later: a warning (the code was
    written for 4.x; check the answers).

    >>> check_transformers("llada-v", version="4.57.6", real=True)          # fine
    >>> check_transformers("llada-v", version="5.3.0", real=True)           # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    RuntimeError: llada-v: transformers 5.3.0 ...
    """
    if real is None:
        real = model is not None and is_family_code(model)
    if not real:
        return
    if version is None:
        try:
            import transformers
            version = transformers.__version__
        except ImportError:
            return
    v = _version_tuple(version)
    if (5, 0, 0) <= v < (5, 13, 0):
        raise RuntimeError(
            f"{family}: transformers {version} is installed, but the family's own model code was "
            f"written for transformers 4.x (its repository pins {pin}); transformers 5.0-5.12 "
            "can leave the weights of such code randomly initialised without any error, which "
            f"gives meaningless answers and maps. Install it: pip install 'transformers=={pin}' "
            "(or pass check_versions=False after checking the model's answers yourself)."
            if pin[0].isdigit() else
            f"{family}: transformers {version} is installed, but the family's own model code was "
            f"written for transformers 4.x ({pin}); transformers 5.0-5.12 can leave the weights of "
            "such code randomly initialised without any error, which gives meaningless answers and "
            "maps. Install the version its repository pins (pip install 'transformers<5'), or pass "
            "check_versions=False after checking the model's answers yourself.")
    if v >= (5, 0, 0):
        warnings.warn(f"{family}: transformers {version} is newer than the 4.x releases the "
                      f"family's code was written for ({pin}); check that the model's answers "
                      "make sense before trusting its maps", UserWarning, stacklevel=3)


def find_runtime_patches(blocks) -> list:
    """Names of modules inside ``blocks`` whose ``forward`` was replaced on the instance (a
    feature cache such as dLLM-Cache does that).  accelerate's dispatch hooks are not counted.

    >>> import torch
    >>> blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    >>> find_runtime_patches(blocks)
    []
    >>> blocks[0].forward = lambda x: x
    >>> find_runtime_patches(blocks)
    ['blocks[0].forward']
    """
    found = []
    for i, b in enumerate(blocks):
        for name, m in b.named_modules():
            if "forward" in vars(m) and not hasattr(m, "_hf_hook"):
                found.append(f"blocks[{i}]{'.' + name if name else ''}.forward")
    return found


def probe_attention(logits_fn: Callable, embed: Callable, vocab: int, modes: Sequence[str],
                    device=None) -> dict:
    """Probe a model's attention on a 5-token sequence.

    ``logits_fn(embeds (1, 5, D), attention_mask or None, mode) -> logits``.  Returns
    ``{"bidirectional": bool, mode: "ok" | reason, ..., "padding_mode": first ok mode or None}``:
    a mode is ok when, with the last position marked as padding, the first position still sees
    position 3 (no causal turn) and the valid positions do not see the padded one.
    """
    ids = torch.tensor([(7919 * k + 101) % vocab for k in range(1, 8)], device=device)
    x = embed(ids[:5])[None]
    x_late = x.clone()
    x_late[0, 3] = embed(ids[5:6])[0]
    x_pad = x.clone()
    x_pad[0, 4] = embed(ids[6:7])[0]

    def diff(a, b):
        return float((a.float() - b.float()).abs().max())

    res: dict = {}
    with torch.no_grad():
        a = logits_fn(x, None, None)
        noise = diff(a, logits_fn(x, None, None))
        tol = 10 * noise + 1e-6 * float(a.float().abs().max()) + 1e-12
        res["bidirectional"] = diff(a[0, 0], logits_fn(x_late, None, None)[0, 0]) > tol
        m = torch.ones(1, 5, dtype=torch.long, device=x.device)
        m[0, 4] = 0
        res["padding_mode"] = None
        for mode in modes:
            try:
                c = logits_fn(x, m, mode)
                late = logits_fn(x_late, m, mode)
                pad = logits_fn(x_pad, m, mode)
            except Exception as e:              # a model that rejects this way of padding
                res[mode] = f"raised {type(e).__name__}: {e}"
                continue
            if not torch.isfinite(c[0, :4]).all():
                res[mode] = "non-finite logits with a padding mask"
            elif diff(c[0, 0], late[0, 0]) <= tol:
                res[mode] = "a padding mask turns attention causal"
            elif diff(c[0, :4], pad[0, :4]) > tol:
                res[mode] = "the padding mask is ignored (valid tokens see the padding)"
            else:
                res[mode] = "ok"
                if res["padding_mode"] is None:
                    res["padding_mode"] = mode
    return res


def _check_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    out = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"image {i}: expected an RGB uint8 array (H, W, 3), got dtype "
                             f"{a.dtype} shape {a.shape}")
        out.append(a)
    return out


def _pick_embeds(out):
    """The inputs_embeds of a ``prepare_inputs_labels_for_multimodal`` result: element 4 of the
    LLaVA-NeXT tuple (forks that append values keep it there)."""
    if isinstance(out, (tuple, list)) and len(out) >= 5 and torch.is_tensor(out[4]) \
            and out[4].dim() == 3:
        return out[4]
    cands = [x for x in (out if isinstance(out, (tuple, list)) else [out])
             if torch.is_tensor(x) and x.dim() == 3 and x.is_floating_point()]
    if len(cands) == 1:
        return cands[0]
    raise RuntimeError("the model's prepare_inputs_labels_for_multimodal returned no "
                       "(1, P, D) embeddings; was the prompt given without an image placeholder?")


class _SamplerView:
    """What :func:`diffcam.generation.masked_diffusion_generate` needs of an adapter, with the
    plain logits (no reference remap) and optional suppressed tokens (-inf logits)."""

    def __init__(self, adapter, suppress: Sequence[int] = ()):
        self._a = adapter
        self.mask_token_id = adapter.mask_token_id
        self.logit_shift = adapter.logit_shift
        self.name = adapter.name
        self._suppress = [int(i) for i in suppress]

    def embed_tokens(self, ids):
        return self._a.embed_tokens(ids)

    def extend_extras(self, sample, total_length):
        return {}

    def forward(self, inputs_embeds, attention_mask=None, extras=None):
        logits = self._a._logits(inputs_embeds, None, None, None)
        if self._suppress:
            logits[..., self._suppress] = float("-inf")
        return logits


# ----------------------------------------------------------------------------- the adapter
class LlavaFamilyAdapter(Adapter):
    """Base class of the LLaVA-style family adapters.  Subclasses name the family and give
    :meth:`blocks`, :meth:`_logits` (the inner forward) and :meth:`head_module`.

    Parameters (shared by the families)
    -----------------------------------
    model            the family's LM class, as its own loader returns it
    tokenizer        its tokenizer
    image_processor  its image processor
    process_images   ``process_images(pil_images, image_processor, model.config)`` -- default:
                     ``llava.mm_utils.process_images`` of the family's package
    template         how a prompt becomes the model's text: ``"auto"`` (the family's
                     conversation template from ``llava.conversation``, else the tokenizer's chat
                     template), a conversation-template name, a callable ``str -> str``, or
                     None (the prompt as given)
    mask_token_id    default: ``model.config.mask_token_id``, else the family's
    reference_quirks ``()``; ``"all"`` or a subset of ``("sheared_slice",
                     "unexpanded_positions")`` reproduces the released reference code's packing
                     bugs (for comparisons only, docs/reference_comparison.md)
    check_versions   refuse transformers releases that break the family's code (True)
    allow_patched_forward  accept blocks whose forward was replaced at run time (False)
    probe            probe the attention once (bidirectional, padding) (True)
    default_layer    the hooked block (default: about a third of the depth)
    """

    family = "llava"
    image_marker = "<image>"
    #: the forward takes one sample's extras for several rows of that sample (the reference
    #: remap is per sample), so several states of one sample share one forward
    broadcast_extras = True
    conv_template: Optional[str] = None
    family_mask_token_id = -1
    transformers_pin = "a 4.x release"
    install_advice = ""
    padding_modes: tuple = ("mask",)

    def __init__(self, model, tokenizer, image_processor, *, process_images=None,
                 template="auto", mask_token_id: Optional[int] = None, reference_quirks=(),
                 check_versions: bool = True, allow_patched_forward: bool = False,
                 probe: bool = True, default_layer: Optional[int] = None):
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(f"{self.family}: model must be the loaded torch module, got "
                            f"{type(model).__name__}")
        if tokenizer is None or image_processor is None:
            raise TypeError(f"{self.family}: an already loaded model needs its tokenizer= and "
                            "image_processor= too (both are returned by the family's "
                            "llava.model.builder.load_pretrained_model)")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = self.family
        self._check_structure()
        if check_versions:
            check_transformers(self.family, model, pin=self.transformers_pin)
        self._prepare_model()
        patches = find_runtime_patches(self.blocks())
        if patches and not allow_patched_forward:
            more = f" (and {len(patches) - 3} more)" if len(patches) > 3 else ""
            raise ValueError(
                f"{self.family}: the forward of {', '.join(patches[:3])}{more} was replaced at run "
                "time -- a feature cache such as dLLM-Cache (register_cache_LLaDA_V) reuses stale "
                "activations, so hooks see partial computation and the maps are wrong. Load the "
                "model again without registering the cache, or pass allow_patched_forward=True "
                "if the patch does not change the computation.")
        self.mask_token_id = int(self._resolve_mask_id(mask_token_id))
        self.image_token_id = -1
        self._process_images = process_images or self._default_process_images()
        self._template = self._resolve_template(template)
        if reference_quirks == "all" or reference_quirks is True:
            reference_quirks = REFERENCE_QUIRKS
        elif isinstance(reference_quirks, str):
            reference_quirks = (reference_quirks,)
        quirks = tuple(reference_quirks or ())
        bad = [q for q in quirks if q not in REFERENCE_QUIRKS]
        if bad:
            raise ValueError(f"unknown reference quirk(s) {bad}: expected {REFERENCE_QUIRKS}")
        self.reference_quirks = quirks
        self._default_layer = default_layer
        self.padding_mode: Optional[str] = self.padding_modes[0]
        self.probe_result: Optional[dict] = None
        if probe:
            self._probe()

    # ------------------------------------------------------------------ family hooks
    def _check_structure(self) -> None:
        """Raise a clear error when the model lacks the family's attribute paths."""

    def _prepare_model(self) -> None:
        """Switch off what breaks attribution (activation checkpointing, missing config keys)."""
        cfg = getattr(self.model, "config", None)
        if cfg is not None and not hasattr(cfg, "use_cache"):
            cfg.use_cache = False           # LLaDA-lineage configs lose it on transformers 5

    def _logits(self, inputs_embeds, attention_mask=None, padding_mode=None, rows=None):
        """Logits (B, L, V) through the inner forward.  ``rows`` (L,), when given, re-indexes the
        final hidden state before the LM head (logit row q is computed from position
        ``rows[q]``), so that the head stays row-wise for the engine."""
        raise NotImplementedError

    def head_module(self):
        """The LM head applied row-wise to the final hidden state (None: unknown)."""
        return None

    def _newline(self):
        return self._inner_model().image_newline

    def _inner_model(self):
        return self.model.get_model()

    def _base_sides(self) -> tuple:
        """Possible sides of the base grid: the vision tower's patch grid, and its 2x2-pooled
        sizes (ceil for bilinear pooling, floor for average pooling)."""
        vt = self.model.get_vision_tower()
        side = getattr(vt, "num_patches_per_side", None)
        if not side:
            return ()
        stride = int(getattr(self.model.config, "mm_spatial_pool_stride", 2) or 2)
        return tuple(dict.fromkeys([int(side), math.ceil(side / stride), side // stride]))

    # ------------------------------------------------------------------ defaults
    def _resolve_mask_id(self, mask_token_id):
        if mask_token_id is not None:
            mid = int(mask_token_id)
        else:
            mid = getattr(getattr(self.model, "config", None), "mask_token_id", None)
            mid = self.family_mask_token_id if mid is None else int(mid)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if not 0 <= mid < vocab:
            raise ValueError(f"{self.family}: mask_token_id={mid} is outside the vocabulary "
                             f"({vocab}); pass mask_token_id=")
        return mid

    def _default_process_images(self):
        mod = import_family("llava.mm_utils", self.family,
                            f"Pass process_images=, or install the family's package: "
                            f"{self.install_advice}")
        return mod.process_images

    def _resolve_template(self, template) -> Optional[Callable]:
        if template is None:
            return None
        if callable(template):
            return template
        if not isinstance(template, str):
            raise TypeError(f"template must be 'auto', a template name, a callable or None, got "
                            f"{type(template).__name__}")
        name = self.conv_template if template == "auto" else template
        if name:
            try:
                conv_mod = importlib.import_module("llava.conversation")
                conv = conv_mod.conv_templates[name]
                return _ConvTemplate(conv)
            except (ImportError, KeyError, AttributeError) as e:
                if template != "auto":
                    raise ValueError(f"{self.family}: conversation template {name!r} is not "
                                     f"available ({e}); {self.install_advice}") from e
        if getattr(self.tokenizer, "chat_template", None):
            return _ChatTemplate(self.tokenizer)
        warnings.warn(f"{self.family}: no conversation template found (llava.conversation is not "
                      "importable and the tokenizer has no chat template); prompts are used as "
                      "given -- pass template= to format them for the model", UserWarning,
                      stacklevel=3)
        return None

    @property
    def default_layer(self) -> int:
        if self._default_layer is not None:
            return int(self._default_layer)
        return super().default_layer

    @property
    def device(self):
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self):
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ probe
    def _probe(self) -> None:
        res = probe_attention(lambda x, m, mode: self._logits(x, m, mode, None),
                              lambda ids: self.embed_tokens(ids),
                              int(self.model.get_input_embeddings().weight.shape[0]),
                              self.padding_modes, device=self.device)
        self.probe_result = res
        if not res["bidirectional"]:
            raise ValueError(f"{self.family}: the model's attention is causal (changing a later "
                             "token does not change an earlier position), but a diffusion model "
                             "must be bidirectional; this is not the family's model class, or "
                             "its attention was configured causal (config.is_causal)")
        self.padding_mode = res["padding_mode"]
        if self.padding_mode is None:
            reasons = "; ".join(f"{m}: {res[m]}" for m in self.padding_modes)
            warnings.warn(f"{self.family}: padded batches are refused for this model ({reasons}); "
                          "explain one sample per call, or samples of equal prompt length",
                          UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ prompts
    def _tokenize(self, text: str) -> list:
        try:
            mm = importlib.import_module("llava.mm_utils")
            fn = getattr(mm, "tokenizer_image_token")
        except (ImportError, AttributeError):
            return tokenize_image_prompt(text, self.tokenizer, self.image_marker)
        return [int(i) for i in fn(text, self.tokenizer, IMAGE_TOKEN_INDEX)]

    def prompt_text(self, prompt: str) -> str:
        """The text given to the tokenizer: the prompt in the conversation template."""
        return self._template(prompt) if self._template is not None else prompt

    def prepare(self, images, prompt: str) -> LlavaPreparedSample:
        """Template, tokenize (``-200`` per ``<image>``) and splice with the model's own code."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        images = _check_images(images)
        n = prompt.count(self.image_marker)
        if n != len(images):
            raise ValueError(f"the prompt has {n} image marker(s) {self.image_marker!r} but "
                             f"{len(images)} image(s) were given; put one marker per image")
        text = self.prompt_text(prompt)
        if text.count(self.image_marker) != n:
            raise ValueError(f"the template changed the number of {self.image_marker!r} markers "
                             f"({n} -> {text.count(self.image_marker)})")
        return self.prepare_ids(images, self._tokenize(text), prompt)

    def prepare_ids(self, images, input_ids, prompt: str = "") -> LlavaPreparedSample:
        """Splice ``images`` into ids that carry one ``-200`` per image (e.g. from the family's
        ``tokenizer_image_token``)."""
        images = _check_images(images)
        ids = [int(i) for i in torch.as_tensor(input_ids).reshape(-1).tolist()]
        slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        if len(slots) != len(images):
            raise ValueError(f"found {len(slots)} image placeholder(s) ({IMAGE_TOKEN_INDEX}) in the "
                             f"ids but {len(images)} image(s)")
        if not ids:
            raise ValueError("input_ids is empty")
        if not images:
            with torch.no_grad():
                emb = self.embed_tokens(ids).detach()
            return LlavaPreparedSample(torch.tensor(ids, device=self.device), emb, [], {}, [],
                                       prompt, unexpanded_ids=ids)
        from PIL import Image
        pil = [Image.fromarray(a) for a in images]
        sizes = [im.size for im in pil]
        with torch.no_grad():
            tensors = self._image_tensors(pil)
            embeds = self._splice(ids, tensors, sizes)
            lengths = self._image_lengths(ids, tensors, sizes, embeds)
            layouts, out_ids = [], []
            pos, prev = 0, 0
            newline = self._newline()
            sides = self._base_sides()
            for k, (slot, n) in enumerate(zip(slots, lengths)):
                text = ids[prev:slot]
                self._check_text(embeds, pos, text)
                out_ids += text
                pos += len(text)
                layouts.append(anyres_layout_from_features(embeds[pos:pos + n], newline, pos, k,
                                                           sides))
                out_ids += [self.image_token_id] * n
                pos += n
                prev = slot + 1
            text = ids[prev:]
            self._check_text(embeds, pos, text)
            out_ids += text
        if "sheared_slice" in self.reference_quirks:
            layouts = [sheared_layout(lay) for lay in layouts]
        return LlavaPreparedSample(
            input_ids=torch.tensor(out_ids, dtype=torch.long, device=self.device),
            inputs_embeds=embeds.detach(), layouts=layouts, extras={}, images=list(images),
            prompt=prompt, unexpanded_ids=ids)

    def _image_tensors(self, pil) -> list:
        t = self._process_images(pil, self.image_processor, self.model.config)
        items = list(t)                 # a stacked tensor or a list: one entry per image
        if len(items) != len(pil):
            raise ValueError(f"process_images returned {len(items)} tensors for {len(pil)} images")
        return [x.to(device=self.device, dtype=self.dtype) for x in items]

    def _splice(self, ids, tensors, sizes) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model.prepare_inputs_labels_for_multimodal(
            x, None, None, None, None, tensors, modalities=["image"] * len(tensors),
            image_sizes=list(sizes))
        emb = _pick_embeds(out)
        if emb.shape[0] != 1:
            raise RuntimeError(f"the model's splice returned a batch of {emb.shape[0]} for one "
                               "prompt")
        return emb[0]

    def _image_lengths(self, ids, tensors, sizes, embeds) -> list:
        n_text = len(ids) - len(tensors)
        P = int(embeds.shape[0])
        if len(tensors) == 1:
            lengths = [P - n_text]
        else:       # one splice per image, anchored by one text token (a 1-token prompt is
            anchor = next((t for t in ids if t != IMAGE_TOKEN_INDEX), None)   # passed through)
            if anchor is None:
                anchor = int(getattr(self.tokenizer, "bos_token_id", None) or
                             getattr(self.tokenizer, "eos_token_id", 0) or 0)
            lengths = [int(self._splice([anchor, IMAGE_TOKEN_INDEX], [t], [s]).shape[0]) - 1
                       for t, s in zip(tensors, sizes)]
        if min(lengths) < 1 or n_text + sum(lengths) != P:
            raise ValueError(f"the model's splice returned {P} positions for {n_text} text tokens "
                             f"and images of {lengths} tokens; the prompt was probably truncated "
                             "(tokenizer_model_max_length) -- shorten it")
        return lengths

    def _check_text(self, embeds, pos: int, text: list) -> None:
        if not text:
            return
        want = self.embed_tokens(text)
        got = embeds[pos:pos + len(text)]
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=1e-6,
                                                         rtol=1e-3):
            raise ValueError(f"the model's splice does not hold the prompt's text tokens at "
                             f"positions {pos}..{pos + len(text) - 1} where the placeholder "
                             "arithmetic puts them (a fork that packs differently?)")

    # ------------------------------------------------------------------ protocol
    def embed_tokens(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids)

    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        extras = dict(extras or {})
        ref = extras.pop(_REF_KEY, None)
        if extras:
            raise TypeError(f"{self.family}: unexpected forward extras {sorted(extras)}")
        if attention_mask is not None and bool(attention_mask.bool().all()):
            attention_mask = None
        if attention_mask is not None and self.padding_mode is None:
            raise ValueError(
                f"{self.family}: this batch needs padding (samples of different prompt lengths), "
                "but the attention probe found no way to pass a padding mask that keeps attention "
                f"bidirectional ({self.probe_result}); explain one sample per call")
        rows = None
        if ref is not None:             # reference quirk: response rows read earlier rows
            P, delta, shift = ref
            rows = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            rows[P - shift:] -= delta
        return self._logits(inputs_embeds, attention_mask, self.padding_mode, rows)

    def extend_extras(self, sample, total_length: int) -> dict:
        if "unexpanded_positions" in self.reference_quirks:
            unexp = getattr(sample, "unexpanded_ids", None)
            if not unexp:
                raise ValueError("reference_quirks 'unexpanded_positions' needs a sample prepared "
                                 "by this adapter")
            P = sample.prompt_length
            return {_REF_KEY: (P, P - len(unexp), self.logit_shift)}
        return dict(sample.extras)

    def info(self) -> dict:
        d = super().info()
        d.update({"family": self.family, "model_module": type(self.model).__module__,
                  "padding_mode": self.padding_mode,
                  "reference_quirks": list(self.reference_quirks)})
        try:
            import transformers
            d["transformers"] = transformers.__version__
        except ImportError:
            pass
        return d


class _ConvTemplate:
    """A LLaVA conversation template as a ``str -> str`` callable (user turn + empty assistant
    turn)."""

    def __init__(self, conv):
        self.conv = conv

    def __call__(self, prompt: str) -> str:
        c = copy.deepcopy(self.conv)
        c.append_message(c.roles[0], prompt)
        c.append_message(c.roles[1], None)
        return c.get_prompt()


class _ChatTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  tokenize=False, add_generation_prompt=True)
