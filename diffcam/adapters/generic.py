"""A generic adapter for any Hugging Face-style diffusion MLLM, configured in a few lines.

>>> adapter = GenericAdapter(model, tokenizer, blocks="model.layers", mask_token_id=126336,
...                          placeholder_id=-200, vision=my_vision, layout="anyres")  # doctest: +SKIP

The vision contract
-------------------
``vision(images)`` takes the list of RGB uint8 arrays (H, W, 3) of one prompt and returns, per
image, a pair ``(features, info)`` (or any object with ``.features`` and ``.info``):

* ``features``: a tensor (n_tokens, D) -- exactly the embeddings the model splices in for that
  image, in sequence order (for LLaVA anyres: the base grid, then the high-resolution rows each
  followed by the learned newline embedding);
* ``info``: a dict describing the grids inside those n_tokens, read by the layout rule:

  ===========  ==============================================================================
  layout       info keys
  ===========  ==============================================================================
  "anyres"     ``base=(rows, cols)``, ``hires=(h, w)`` or None (h x (w + 1) with newline column)
  "merged"     ``patch=(patch_rows, patch_cols)`` and ``merge`` (default 2), or
               ``merged=(rows, cols)``
  "single"     ``grid=(rows, cols)`` (optional ``name``)
  callable     anything: ``layout(span_start, info, image_index) -> ImageLayout``
  ===========  ==============================================================================

The layout's span length must equal n_tokens (checked).

Two splice styles
-----------------
* **placeholder** (LLaVA): ``placeholder_id=-200``; each image marker of the prompt becomes one
  placeholder id, which is replaced by the image's feature sequence.  Expanded ``input_ids`` hold
  ``image_token_id`` (-1 by default) at image positions.
* **image-pad run** (Qwen2-VL): ``image_token_id=<pad id>``; each marker becomes
  ``[vision_start_id] + [image_token_id] * n_tokens + [vision_end_id]`` (start/end optional) and
  the features are scattered into the run.  :meth:`GenericAdapter.prepare_ids` also accepts ids
  already expanded by a model's own processor (runs are matched to images in order).

In both styles the :class:`ImageLayout` is recorded from the actual splice positions.

Planting a marker (tests)
-------------------------
``adapter.vision`` is a plain attribute: wrap or replace it, e.g.::

    orig = adapter.vision
    def vision(images):
        out = orig(images)
        feats, info = out[0]
        feats = feats.clone(); feats[k] = marker       # k relative to the image span
        return [(feats, info)] + list(out[1:])
    adapter.vision = vision

The tiny models of :mod:`diffcam.testing` also have a ``feature_hook`` on their vision module.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..attribution.layout import (ImageLayout, anyres_layout, merged_layout, single_grid_layout)
from .base import Adapter, PreparedSample

__all__ = ["GenericAdapter", "resolve_attr", "layout_from_info"]


def resolve_attr(root: Any, path: Optional[str]) -> Any:
    """``resolve_attr(model, "model.layers")`` -> ``model.model.layers`` (``""``/None: root)."""
    obj = root
    if not path:
        return obj
    for part in path.split("."):
        if part.isdigit() and not hasattr(obj, part):
            obj = obj[int(part)]
            continue
        if not hasattr(obj, part):
            raise AttributeError(f"{type(root).__name__} has no attribute path {path!r} "
                                 f"(stopped at {part!r} on {type(obj).__name__})")
        obj = getattr(obj, part)
    return obj


def layout_from_info(layout, span_start: int, n_tokens: int, info: dict,
                     image_index: int) -> ImageLayout:
    """Build the ImageLayout of one spliced image from the vision module's grid info."""
    info = dict(info or {})
    if callable(layout):
        lay = layout(span_start, info, image_index)
    elif layout == "anyres":
        if "base" not in info:
            raise ValueError(f"layout 'anyres' needs info['base'] (and 'hires'), got {sorted(info)}")
        hires = info.get("hires")
        lay = anyres_layout(span_start, tuple(info["base"]),
                            None if hires is None else tuple(hires), image_index)
    elif layout == "merged":
        if "merged" in info:
            r, c = info["merged"]
            lay = single_grid_layout(span_start, int(r), int(c), "merged", image_index)
        elif "patch" in info:
            pr, pc = info["patch"]
            lay = merged_layout(span_start, int(pr), int(pc), int(info.get("merge", 2)), image_index)
        else:
            raise ValueError(f"layout 'merged' needs info['patch'] or info['merged'], got {sorted(info)}")
    elif layout == "single":
        if "grid" not in info:
            raise ValueError(f"layout 'single' needs info['grid'], got {sorted(info)}")
        r, c = info["grid"]
        lay = single_grid_layout(span_start, int(r), int(c), info.get("name", "base"), image_index)
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'anyres', 'merged', 'single' or a "
                         f"callable(span_start, info, image_index)")
    if not isinstance(lay, ImageLayout):
        raise TypeError(f"the layout rule returned {type(lay).__name__}, expected ImageLayout")
    lay.check()
    if lay.span_start != span_start or lay.span_length != n_tokens:
        raise ValueError(f"image {image_index}: the layout covers positions [{lay.span_start}, "
                         f"{lay.span_end}) but the vision module spliced {n_tokens} tokens at "
                         f"{span_start}; the vision info {info} does not match its features")
    return lay


def _unpack_vision(out, n_images: int):
    items = list(out)
    if len(items) != n_images:
        raise ValueError(f"the vision callable returned {len(items)} outputs for {n_images} images")
    res = []
    for i, item in enumerate(items):
        if hasattr(item, "features"):
            feats, info = item.features, getattr(item, "info", {})
        else:
            feats, info = item
        if not torch.is_tensor(feats) or feats.dim() != 2:
            raise ValueError(f"image {i}: vision features must be a (n_tokens, D) tensor, got "
                             f"{getattr(feats, 'shape', type(feats).__name__)}")
        res.append((feats, info))
    return res


class GenericAdapter(Adapter):
    """Adapter for any HF-style model: inner model + LM head + a vision callable.

    Parameters
    ----------
    model           the full torch module (e.g. ``LlamaForCausalLM``)
    tokenizer       ``encode``/``decode``/``convert_ids_to_tokens``
    blocks          dotted path of the block list from ``model`` (``"model.layers"``)
    mask_token_id   mask id of the masked-diffusion objective
    image_token_id  Qwen2-VL style: the image-pad id (one per image token); with
                    ``placeholder_id`` it is only the id written at image positions (default -1)
    placeholder_id  LLaVA style: the id (e.g. -200) replaced by the image features
    vision          ``vision(images) -> [(features (n, D), info), ...]`` (module docstring)
    layout          "anyres" | "merged" | "single" | callable(span_start, info, image_index)
    logit_shift     0 (LLaDA family) or 1 (Dream family)
    inner           dotted path of the inner model called with ``inputs_embeds`` (``"model"``)
    lm_head         dotted path of the LM head (``"lm_head"``)
    embeddings      dotted path of the token embedding (default: ``model.get_input_embeddings()``)
    image_marker    the marker of an image in prompt text (``"<image>"``)
    vision_start_id, vision_end_id   optional ids wrapped around an image-pad run
    prefix_ids      ids prepended to every prompt (e.g. BOS)
    forward_kwargs  extra keyword arguments of the inner forward (default: ``use_cache=False``
                    when the inner forward accepts it)
    default_layer   override of the hooked block (default: about a third of the depth)
    extras_fn       ``extras_fn(sample, total_length) -> dict`` of extra inner-forward inputs for
                    the full sequence (e.g. mRoPE ``position_ids``); default: ``sample.extras``
    """

    def __init__(self, model, tokenizer, *, blocks: str = "model.layers", mask_token_id: int,
                 image_token_id: Optional[int] = None, placeholder_id: Optional[int] = None,
                 vision: Optional[Callable] = None, layout="anyres", logit_shift: int = 0,
                 inner: str = "model", lm_head: str = "lm_head", embeddings: Optional[str] = None,
                 image_marker: str = "<image>", vision_start_id: Optional[int] = None,
                 vision_end_id: Optional[int] = None, prefix_ids: Sequence[int] = (),
                 forward_kwargs: Optional[dict] = None, default_layer: Optional[int] = None,
                 extras_fn: Optional[Callable] = None, name: str = "generic"):
        if image_token_id is None and placeholder_id is None and vision is not None:
            raise ValueError("give placeholder_id (LLaVA style) or image_token_id (image-pad runs)")
        if logit_shift not in (0, 1):
            raise ValueError(f"logit_shift must be 0 or 1, got {logit_shift}")
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.placeholder_id = None if placeholder_id is None else int(placeholder_id)
        self.image_token_id = -1 if image_token_id is None else int(image_token_id)
        self.vision = vision
        self.layout = layout
        self.logit_shift = int(logit_shift)
        self.name = name
        self.image_marker = image_marker
        self.vision_start_id = vision_start_id
        self.vision_end_id = vision_end_id
        self.prefix_ids = [int(i) for i in prefix_ids]
        self._blocks_path = blocks
        self._inner = resolve_attr(model, inner)
        self._lm_head = resolve_attr(model, lm_head)
        self._embeddings = (resolve_attr(model, embeddings) if embeddings
                            else model.get_input_embeddings())
        resolve_attr(model, blocks)  # fail early on a wrong path
        if forward_kwargs is None:
            forward_kwargs = {}
            try:
                if "use_cache" in inspect.signature(self._inner.forward).parameters:
                    forward_kwargs["use_cache"] = False
            except (TypeError, ValueError):
                pass
        self.forward_kwargs = dict(forward_kwargs)
        self._default_layer = default_layer
        self.extras_fn = extras_fn

    # ------------------------------------------------------------------ protocol
    def blocks(self):
        return resolve_attr(self.model, self._blocks_path)

    @property
    def default_layer(self) -> int:
        if self._default_layer is not None:
            return int(self._default_layer)
        return super().default_layer

    @property
    def device(self):
        return self._embeddings.weight.device

    def embed_tokens(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self._embeddings(ids)

    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        kwargs = dict(self.forward_kwargs)
        kwargs.update(extras or {})
        out = self._inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        if hasattr(out, "last_hidden_state"):
            hidden = out.last_hidden_state
        elif torch.is_tensor(out):
            hidden = out
        else:
            hidden = out[0]
        return self._lm_head(hidden)

    def extend_extras(self, sample: PreparedSample, total_length: int) -> dict:
        if self.extras_fn is not None:
            return dict(self.extras_fn(sample, total_length))
        return dict(sample.extras)

    # ------------------------------------------------------------------ prompts
    def _encode(self, text: str) -> list:
        if not text:
            return []
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = self.tokenizer.encode(text)
        return [int(i) for i in ids]

    def _image_ids(self, n_tokens: int) -> list:
        if self.placeholder_id is not None:
            return [self.placeholder_id]
        ids = [self.image_token_id] * n_tokens
        if self.vision_start_id is not None:
            ids = [int(self.vision_start_id)] + ids
        if self.vision_end_id is not None:
            ids = ids + [int(self.vision_end_id)]
        return ids

    @staticmethod
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

    def _vision(self, images):
        if not images:
            return []
        if self.vision is None:
            raise ValueError("this adapter has no vision callable but images were given")
        with torch.no_grad():
            return _unpack_vision(self.vision(images), len(images))

    def prepare(self, images, prompt: str) -> PreparedSample:
        """Tokenize ``prompt`` (one ``image_marker`` per image), run the vision module, splice."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        images = self._check_images(images)
        n_markers = prompt.count(self.image_marker)
        if n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} image marker(s) {self.image_marker!r} but "
                             f"{len(images)} image(s) were given; put one marker per image")
        vis = self._vision(images)
        pieces = prompt.split(self.image_marker)
        ids = list(self.prefix_ids)
        for i, piece in enumerate(pieces):
            ids += self._encode(piece)
            if i < len(vis):
                ids += self._image_ids(int(vis[i][0].shape[0]))
        if not ids:
            raise ValueError("the prompt tokenizes to nothing")
        return self._splice(ids, images, vis, prompt)

    def prepare_ids(self, images, input_ids, prompt: str = "") -> PreparedSample:
        """Splice images into ids that already carry one placeholder per image (LLaVA style) or
        one image-pad run per image (Qwen2-VL style, e.g. from the model's own processor)."""
        images = self._check_images(images)
        ids = [int(i) for i in torch.as_tensor(input_ids).reshape(-1).tolist()]
        if not ids:
            raise ValueError("input_ids is empty")
        return self._splice(ids, images, self._vision(images), prompt)

    def _splice(self, ids: list, images: list, vis: list, prompt: str) -> PreparedSample:
        # locate the image slots in the unexpanded ids
        slots = []  # (start, length) in ids
        if self.placeholder_id is not None:
            slots = [(i, 1) for i, t in enumerate(ids) if t == self.placeholder_id]
            kind = f"placeholder id {self.placeholder_id}"
        elif self.image_token_id >= 0:
            i = 0
            while i < len(ids):
                if ids[i] == self.image_token_id:
                    j = i
                    while j < len(ids) and ids[j] == self.image_token_id:
                        j += 1
                    slots.append((i, j - i))
                    i = j
                else:
                    i += 1
            kind = f"image-pad run of id {self.image_token_id}"
        else:
            kind = "image slot"
        if len(slots) != len(vis):
            raise ValueError(f"found {len(slots)} {kind} in the prompt ids but {len(vis)} image(s)")
        device = self.device
        emb_dtype = self._embeddings.weight.dtype
        parts, out_ids, layouts = [], [], []
        prev = 0
        pos = 0
        with torch.no_grad():
            for k, ((start, length), (feats, info)) in enumerate(zip(slots, vis)):
                n = int(feats.shape[0])
                if self.placeholder_id is None and length != n:
                    raise ValueError(f"image {k}: the prompt has a run of {length} image-pad tokens "
                                     f"but the vision module produced {n} features")
                text = ids[prev:start]
                if text:
                    parts.append(self.embed_tokens(text))
                    out_ids += text
                    pos += len(text)
                layouts.append(layout_from_info(self.layout, pos, n, info, k))
                parts.append(feats.to(device=device, dtype=emb_dtype))
                out_ids += [self.image_token_id] * n
                pos += n
                prev = start + length
            text = ids[prev:]
            if text:
                parts.append(self.embed_tokens(text))
                out_ids += text
            embeds = torch.cat(parts, 0).detach()
        if embeds.shape[-1] != self._embeddings.weight.shape[-1]:
            raise ValueError(f"image features have width {embeds.shape[-1]} but the embeddings "
                             f"{self._embeddings.weight.shape[-1]}")
        return PreparedSample(input_ids=torch.tensor(out_ids, dtype=torch.long, device=device),
                              inputs_embeds=embeds, layouts=layouts, extras={},
                              images=list(images), prompt=prompt)

    def info(self) -> dict:
        d = super().info()
        d.update({"blocks": self._blocks_path, "layout": self.layout if isinstance(self.layout, str)
                  else getattr(self.layout, "__name__", "callable"),
                  "image_token_id": self.image_token_id, "placeholder_id": self.placeholder_id})
        return d
