"""Dream-VL / Dream-VLA (Dream-org, ``trust_remote_code``): Dream-7B masked diffusion on a
Qwen2-VL vision tower; also fits Dimple (``rp-yu/Dimple-7B``, projector ``img_projector``).

>>> adapter = diffcam.load("dream-vl", "Dream-org/Dream-VL-7B")                   # doctest: +SKIP
>>> adapter = diffcam.load("dream-vl", model, processor=processor)                # doctest: +SKIP
>>> with diffcam.Explainer(adapter) as ex:                                          # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "<image> Describe the image.",
...                      generation=diffcam.GenerationConfig(steps=64, gen_length=64))

What the adapter does (docs/models.md 6.2; docs/families/dream_vl.md for users):

* **Prompt and image tokens** come from the checkpoint's own Qwen2-VL processor:
  ``apply_chat_template`` (one ``{"type": "image"}`` entry per ``<image>`` marker) then
  ``processor(text=..., images=...)``, which expands ``<|image_pad|>`` (151655) to t*h*w/4 pads
  from ``image_grid_thw``.  The features (``model.visual`` then ``model.projector``) are scattered
  into those pads in order.
* **Image span** = each run of id 151655; grid = (h/2) x (w/2), row-major (the ``"merged"``
  grid), covering the whole aspect-preserving resized image.
* **Positions** are 3D mRoPE from the model's own ``get_rope_index`` over the *full* sequence
  (prompt + response, response ids = the mask id); they travel as ``extras["position_ids"]``.
  The base model silently falls back to 1D positions without them, so :meth:`forward` refuses to
  run without them.
* **Forward** ``model.model(inputs_embeds, attention_mask=None | 4D pairwise bool, position_ids)``
  then ``model.lm_head``.  Padding is a 4D pairwise mask (Dream passes the mask to SDPA as is).
* **Logit shift 1**: Dream keeps the autoregressive convention, logit row j - 1 scores token j.
* **Generation**: Dream's ``diffusion_generate`` algorithm (``alg`` maskgit_plus / topk_margin /
  entropy / origin, timesteps linear from 1 to ``eps``, count = masked * (1 - s/t), the last step
  commits all) run through :meth:`forward` on the full sequence at every step (the README's
  ``use_cache=False``), so every state is feasible.  Dream-VL's ``eos_penalty`` is not applied.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..attribution.layout import merged_layout
from .generic import GenericAdapter
from .base import Adapter, GenerationConfig, GenerationResult, PreparedSample
from .mmada import probe_attention

__all__ = ["DreamVLAdapter", "dream_generate", "load", "CHECKPOINTS", "ALGS"]

CHECKPOINTS = ("Dream-org/Dream-VL-7B", "Dream-org/Dream-VLA-7B", "rp-yu/Dimple-7B")
ALGS = ("maskgit_plus", "topk_margin", "entropy", "origin")
_MASK_ID, _IMAGE_PAD, _VISION_START, _VISION_END = 151666, 151655, 151652, 151653


def _cfg_get(cfg, name, default=None):
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = getattr(c, name, None) if c is not None else None
        if v is not None:
            return v
    return default


class DreamVLAdapter(Adapter):
    """Adapter for Dream-VL-style checkpoints (``visual`` + projector + Dream LM, mRoPE).

    model           ``DreamVLModel`` (``model.visual``, ``model.projector`` or
                    ``model.img_projector``, ``model.model.layers``, ``model.lm_head``)
    processor       the checkpoint's Qwen2-VL processor (``AutoProcessor``); its ``tokenizer`` is
                    the adapter's tokenizer
    mask_token_id   default ``config.mask_token_id`` or 151666
    image_token_id  default ``config.image_token_id`` or 151655
    chat_template   True: wrap the prompt with ``processor.apply_chat_template``; False: use it as
                    is (each ``<image>`` becomes ``<|vision_start|><|image_pad|><|vision_end|>``)
    image_features  ``callable(pixel_values, image_grid_thw) -> (n, D)`` overriding the default
                    ``projector(visual(pixel_values, grid_thw=...))``
    alg, alg_temp, top_p, top_k, eps   Dream sampler settings (``alg`` None: from
                    ``GenerationConfig.remasking``, low_confidence -> maskgit_plus,
                    random -> origin)
    default_layer   hooked block when the Explainer is given none
    """

    name = "dream-vl"
    logit_shift = 1
    broadcast_extras = True

    def __init__(self, model, processor, *, mask_token_id: Optional[int] = None,
                 image_token_id: Optional[int] = None, chat_template: bool = True,
                 image_features: Optional[Callable] = None, image_marker: str = "<image>",
                 alg: Optional[str] = None, alg_temp: float = 0.0, top_p: Optional[float] = None,
                 top_k: Optional[int] = None, eps: float = 1e-3,
                 default_layer: Optional[int] = None):
        if processor is None:
            raise TypeError("Dream-VL needs its processor (AutoProcessor.from_pretrained(path, "
                            "trust_remote_code=True)): pass processor=")
        for attr in ("model", "lm_head"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} is not a Dream-VL model: no .{attr} "
                                "(expected model.model.layers and model.lm_head)")
        if alg is not None and alg not in ALGS:
            raise ValueError(f"alg={alg!r}: expected one of {ALGS}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise TypeError("the processor has no .tokenizer")
        cfg = model.config
        self.config = cfg
        self.mask_token_id = int(mask_token_id if mask_token_id is not None else
                                 _cfg_get(cfg, "mask_token_id", _MASK_ID))
        self.image_token_id = int(image_token_id if image_token_id is not None else
                                  _cfg_get(cfg, "image_token_id", _IMAGE_PAD))
        vc = getattr(cfg, "vision_config", None)
        self.merge = int(getattr(vc, "spatial_merge_size", 2) if vc is not None else 2)
        self.chat_template = bool(chat_template)
        self.image_marker = image_marker
        self._image_features = image_features
        self.alg, self.alg_temp, self.top_p, self.top_k = alg, float(alg_temp), top_p, top_k
        self.eps = float(eps)
        self._default_layer = default_layer
        self._projector = next((getattr(model, n) for n in ("projector", "img_projector")
                                if getattr(model, n, None) is not None), None)
        if self._image_features is None and getattr(model, "visual", None) is None:
            raise TypeError("the model has no .visual; pass image_features=callable(pixel_values, "
                            "image_grid_thw) returning the spliced features")
        if not callable(getattr(model, "get_rope_index", None)):
            raise TypeError("the model has no get_rope_index(): Dream-VL needs its 3D mRoPE "
                            "positions (without them it silently uses 1D positions)")

    # ------------------------------------------------------------------ protocol
    def blocks(self):
        return self.model.model.layers

    @property
    def default_layer(self) -> int:
        if self._default_layer is not None:
            return int(self._default_layer)
        return super().default_layer

    @property
    def device(self):
        return self.model.lm_head.weight.device

    def embed_tokens(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.model.embed_tokens(ids)

    def head_module(self):
        return self.model.lm_head

    @staticmethod
    def pairwise_mask(attention_mask):
        """(B, L) padding mask -> 4D boolean (B, 1, L, L) or None when nothing is padded."""
        if attention_mask is None:
            return None
        m = attention_mask.bool()
        if bool(m.all()):
            return None
        return m[:, None, :, None] & m[:, None, None, :]

    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        pos = (extras or {}).get("position_ids")
        if pos is None:
            raise ValueError("Dream-VL forward without mRoPE position_ids: the model would "
                             "silently use 1D positions; build them with extend_extras()")
        B, L = inputs_embeds.shape[:2]
        if pos.shape[-1] != L:
            raise ValueError(f"position_ids cover {pos.shape[-1]} positions, the sequence {L}")
        if pos.shape[1] != B:
            pos = pos.expand(pos.shape[0], B, L)
        out = self.model.model(inputs_embeds=inputs_embeds,
                               attention_mask=self.pairwise_mask(attention_mask),
                               position_ids=pos, **self._base_kwargs())
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.model.lm_head(hidden)

    def _base_kwargs(self) -> dict:
        if not hasattr(self, "_base_kw"):
            self._base_kw = {}
            try:
                if "use_cache" in inspect.signature(self.model.model.forward).parameters:
                    self._base_kw["use_cache"] = False
            except (TypeError, ValueError):
                pass
        return self._base_kw

    def rope_index(self, input_ids: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """(3, 1, L) positions of one id sequence from the model's ``get_rope_index`` (both the
        4.5x signature and transformers 5's ``mm_token_type_ids`` one)."""
        fn = self.model.get_rope_index
        ids = input_ids.reshape(1, -1).to(self.device)
        thw = None if image_grid_thw is None else torch.as_tensor(image_grid_thw).to(self.device)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "mm_token_type_ids" in params:
            tt = (ids == self.image_token_id).int()
            out = fn(input_ids=ids, mm_token_type_ids=tt, image_grid_thw=thw)
        else:
            out = fn(ids, thw, None, None)
        pos = out[0] if isinstance(out, (tuple, list)) else out
        if pos.dim() != 3 or pos.shape[0] != 3 or pos.shape[-1] != ids.shape[1]:
            raise ValueError(f"get_rope_index returned positions {tuple(pos.shape)}, expected "
                             f"(3, 1, {ids.shape[1]})")
        return pos

    def extend_extras(self, sample: PreparedSample, total_length: int) -> dict:
        """mRoPE positions of ``[prompt | total_length - P mask ids]`` (text positions after the
        image continue from the largest image position)."""
        P = int(sample.input_ids.shape[0])
        if total_length < P:
            raise ValueError("total_length is shorter than the prompt")
        key = int(total_length)
        cache = sample.extras.setdefault("_rope_cache", {})
        if key not in cache:
            ids = torch.cat([sample.input_ids.to(self.device),
                             torch.full((total_length - P,), self.mask_token_id, dtype=torch.long,
                                        device=self.device)])
            cache.clear()
            cache[key] = self.rope_index(ids, sample.extras.get("image_grid_thw"))
        return {"position_ids": cache[key]}

    # ------------------------------------------------------------------ prompts
    def _messages(self, prompt: str, n_images: int) -> list:
        pieces = prompt.split(self.image_marker)
        content = []
        for i, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if i < n_images:
                content.append({"type": "image"})
        return [{"role": "user", "content": content}]

    def _features(self, pixel_values, thw):
        if self._image_features is not None:
            return self._image_features(pixel_values, thw)
        vis = self.model.visual
        p = next(vis.parameters())
        out = vis(pixel_values.to(device=p.device, dtype=p.dtype), grid_thw=thw.to(p.device))
        f = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(f, (tuple, list)):
            f = f[0]
        if self._projector is not None:
            f = self._projector(f)
        return f

    def prepare(self, images, prompt: str) -> PreparedSample:
        """Chat template + the processor's expansion, features scattered into the pad runs."""
        from PIL import Image

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        images = GenericAdapter._check_images(images)
        n_markers = prompt.count(self.image_marker)
        if n_markers == 0 and len(images) == 1:
            prompt = self.image_marker + prompt
        elif n_markers != len(images):
            raise ValueError(f"the prompt has {n_markers} image marker(s) {self.image_marker!r} but "
                             f"{len(images)} image(s) were given; put one marker per image")
        if self.chat_template:
            text = self.processor.apply_chat_template(self._messages(prompt, len(images)),
                                                      tokenize=False, add_generation_prompt=True)
        else:
            text = prompt.replace(self.image_marker,
                                  "<|vision_start|><|image_pad|><|vision_end|>")
        pil = [Image.fromarray(np.ascontiguousarray(a)) for a in images]
        batch = self.processor(text=[text], images=pil or None, return_tensors="pt")
        ids = torch.as_tensor(batch["input_ids"])[0].to(self.device)
        thw = batch.get("image_grid_thw") if hasattr(batch, "get") else batch["image_grid_thw"]
        runs = _runs(ids.tolist(), self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(f"the processor's ids hold {len(runs)} image-pad run(s) of id "
                             f"{self.image_token_id} for {len(images)} image(s)")
        layouts = []
        with torch.no_grad():
            embeds = self.embed_tokens(ids).clone()
            if images:
                thw = torch.as_tensor(thw).long()
                feats = self._features(batch["pixel_values"], thw)
                if feats.shape[-1] != embeds.shape[-1]:
                    raise ValueError(f"image features have width {feats.shape[-1]}, the "
                                     f"embeddings {embeds.shape[-1]}")
                off = 0
                for k, ((start, n), (t, h, w)) in enumerate(zip(runs, thw.tolist())):
                    if t != 1:
                        raise ValueError(f"image {k}: temporal grid t={t}; videos are not "
                                         "supported")
                    lay = merged_layout(start, h, w, self.merge, k)
                    if lay.span_length != n:
                        raise ValueError(f"image {k}: {n} pads but image_grid_thw {(t, h, w)} "
                                         f"gives {lay.span_length} merged tokens")
                    embeds[start:start + n] = feats[off:off + n].to(embeds.dtype)
                    off += n
                    layouts.append(lay)
                if off != feats.shape[0]:
                    raise ValueError(f"the vision tower produced {feats.shape[0]} features for "
                                     f"{off} image-pad tokens")
        extras = {"image_grid_thw": None if not images else thw}
        sample = PreparedSample(input_ids=ids, inputs_embeds=embeds.detach(), layouts=layouts,
                                extras=extras, images=list(images), prompt=prompt)
        return sample

    # ------------------------------------------------------------------ generation
    def generate(self, sample: PreparedSample, config: GenerationConfig) -> GenerationResult:
        alg = self.alg or ("origin" if config.remasking == "random" else "maskgit_plus")
        return dream_generate(self, sample, config, alg=alg, alg_temp=self.alg_temp,
                              top_p=self.top_p, top_k=self.top_k, eps=self.eps)

    def info(self) -> dict:
        d = super().info()
        d.update({"blocks": "model.model.layers", "image_token_id": self.image_token_id,
                  "merge": self.merge, "alg": self.alg})
        return d

    def check(self) -> None:
        """Bidirectional attention and padding probe (RuntimeError with advice otherwise)."""
        probe_attention(self)


def _runs(ids: list, tok: int) -> list:
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == tok:
            j = i
            while j < len(ids) and ids[j] == tok:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _filter(logits: torch.Tensor, top_p, top_k) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p     # keep the smallest set reaching top_p
        srt = srt.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, srt)
    return logits


def dream_generate(adapter, sample: PreparedSample, config: GenerationConfig, *,
                   alg: str = "maskgit_plus", alg_temp: float = 0.0, top_p=None, top_k=None,
                   eps: float = 1e-3) -> GenerationResult:
    """Dream's masked-diffusion sampler (``diffusion_generate`` without cache) through
    ``adapter.forward``, recording the trajectory.

    Step i of S uses t = 1 - i (1 - eps) / S and s = the next value: ``origin`` commits each
    masked position with probability 1 - s/t; the others commit the int(masked * (1 - s/t)) most
    confident (``maskgit_plus``: probability of the drawn token, ``topk_margin``: top-1 minus
    top-2 probability, ``entropy``: minus the entropy), sampled ∝ softmax(conf / alg_temp) when
    ``alg_temp > 0``; the last step commits everything.  Scores are read on row ``P + j - 1``
    (logit shift).  Temperature 0 is greedy; draws come from a CPU generator seeded with
    ``config.seed``.  The mask token is never committed.
    """
    if alg not in ALGS:
        raise ValueError(f"alg={alg!r}: expected one of {ALGS}")
    G, S = int(config.gen_length), int(config.steps)
    if config.block_length not in (None, G):
        raise ValueError("Dream's sampler has no semi-autoregressive blocks: leave "
                         "GenerationConfig.block_length unset (or equal to gen_length)")
    shift = int(adapter.logit_shift)
    mask_id = int(adapter.mask_token_id)
    P = sample.prompt_length
    L = P + G
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(config.seed))
    dev = sample.inputs_embeds.device
    steps_t = torch.linspace(1.0, eps, S + 1, dtype=torch.float64)
    with torch.inference_mode():
        extras = adapter.extend_extras(sample, L)
        prompt = sample.inputs_embeds[None]
        resp = torch.full((G,), mask_id, dtype=torch.long, device=dev)
        masked = torch.zeros(S + 1, G, dtype=torch.bool)
        masked[0] = True
        for i in range(S):
            m = resp == mask_id
            if bool(m.any()):
                x = torch.cat([prompt, adapter.embed_tokens(resp)[None].to(prompt.dtype)], 1)
                logits = adapter.forward(x, None, extras)[0]
                rows = logits[P - shift:P - shift + G].to(torch.float64)[m]
                if 0 <= mask_id < rows.shape[-1]:
                    rows[:, mask_id] = float("-inf")
                if config.temperature > 0:
                    rows = rows / config.temperature
                rows = _filter(rows, top_p, top_k)
                probs = torch.softmax(rows, -1)
                if config.temperature > 0:
                    x0 = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(dev)
                else:
                    x0 = probs.argmax(-1)
                idx = m.nonzero()[:, 0]
                t, s = float(steps_t[i]), float(steps_t[i + 1])
                last = i == S - 1
                if alg == "origin":
                    p = 1.0 if last else 1.0 - s / t
                    take = (torch.rand(idx.numel(), generator=gen, dtype=torch.float64) < p).to(dev)
                    chosen = idx[take]
                    resp[chosen] = x0[take]
                else:
                    if alg == "maskgit_plus":
                        conf = probs.gather(-1, x0[:, None])[:, 0]
                    elif alg == "topk_margin":
                        top2 = torch.topk(probs, 2, -1).values
                        conf = top2[:, 0] - top2[:, 1]
                    else:
                        conf = (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
                    k = idx.numel() if last else int(idx.numel() * (1.0 - s / t))
                    if k > 0:
                        if alg_temp and alg_temp > 0:
                            w = torch.softmax(conf / alg_temp, -1).cpu()
                            pick = torch.multinomial(w, k, replacement=False, generator=gen).to(dev)
                        else:
                            pick = torch.topk(conf, k).indices
                        resp[idx[pick]] = x0[pick]
            masked[i + 1] = (resp == mask_id).cpu()
    return GenerationResult(response_ids=resp.clone(), masked=masked, steps=S,
                            hidden_has_image=None)


# ---------------------------------------------------------------------- loading
def prepare_model(model, freeze: bool = True):
    """eval mode and frozen parameters (``freeze``); a model using flash attention is switched to
    SDPA when it can be (flash attention drops the 4D padding mask)."""
    if model.training:
        model.eval()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl and "flash" in str(impl):
        setter = getattr(model, "set_attn_implementation", None)
        if callable(setter):
            setter("sdpa")
        else:
            warnings.warn("the model uses flash attention, which ignores Dream's 4D padding "
                          "mask: explain one sample at a time, or load with "
                          "attn_implementation='sdpa'", UserWarning, stacklevel=3)
    return model


def _load_path(path, processor, torch_dtype, device):
    try:
        import transformers
        from transformers import AutoModel, AutoProcessor
    except ImportError as e:
        raise ImportError("loading Dream-VL needs transformers; the checkpoint's remote code was "
                          "written for transformers 4.51.3: pip install 'transformers==4.51.3'") from e
    from packaging.version import Version
    v = Version(transformers.__version__)
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=True, torch_dtype=torch_dtype)
    except Exception as e:
        if v >= Version("5.0"):
            raise RuntimeError(
                f"loading {path} failed on transformers {v}: Dream's remote code was written for "
                "4.46-4.51 and does not construct on 5.x (ROPE_INIT_FUNCTIONS['default'] is "
                "gone). Install transformers==4.51.3 in this environment") from e
        raise
    if Version("5.0") <= v < Version("5.13"):
        warnings.warn(f"transformers {v} can silently random-initialise remote-code weights "
                      "(models.md 1.10); check the answers are sane or use 4.51.3",
                      UserWarning, stacklevel=3)
    if processor is None:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    if device is not None:
        model = model.to(device)
    return model, processor


def load(path_or_model=None, *, processor=None, torch_dtype=torch.bfloat16, device=None,
         freeze: bool = True, check: bool = True, **adapter_kwargs: Any) -> DreamVLAdapter:
    """``diffcam.load("dream-vl", path_or_model, ...)``.

    path_or_model   a checkpoint path or hub id (``"Dream-org/Dream-VL-7B"``; also
                    ``"rp-yu/Dimple-7B"``) loaded with ``AutoModel(..., trust_remote_code=True)``,
                    or the model you already loaded
    processor       required with a model object (``AutoProcessor`` of the checkpoint otherwise)
    torch_dtype     bfloat16
    device          move the loaded model there
    freeze          eval mode and ``requires_grad=False`` on every parameter
    check           probe bidirectional attention and padding (:meth:`DreamVLAdapter.check`)
    adapter_kwargs  :class:`DreamVLAdapter` options (``alg``, ``chat_template``, ...)
    """
    if path_or_model is None:
        raise TypeError("diffcam.load('dream-vl', path_or_model): give a checkpoint path / hub id "
                        f"(one of {CHECKPOINTS}) or the Dream-VL model you loaded")
    if isinstance(path_or_model, (str, os.PathLike)):
        model, processor = _load_path(str(path_or_model), processor, torch_dtype, device)
    else:
        model = path_or_model
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"expected a path or a torch module, got {type(model).__name__}")
        if processor is None:
            raise TypeError("diffcam.load('dream-vl', model, ...) needs processor= (the "
                            "checkpoint's AutoProcessor)")
    prepare_model(model, freeze)
    adapter = DreamVLAdapter(model, processor, **adapter_kwargs)
    if check:
        adapter.check()
    return adapter
