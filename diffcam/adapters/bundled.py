"""The adapter of diffcam's bundled diffusion MLLM (:mod:`diffcam.models.bundled`).

>>> import diffcam
>>> adapter = diffcam.load("bundled")                  # the shipped masked-diffusion model
>>> adapter.name, len(adapter.blocks()), adapter.default_layer
('bundled', 4, 0)
>>> twin = diffcam.load("bundled", kind="autoregressive")   # the causal twin, same vision tower

It is an ordinary :class:`~diffcam.adapters.generic.GenericAdapter`: LLaDA-V packing (placeholder
-200 -> 4x4 base grid + 12x12 grid with a newline column), blocks at ``model.layers``, logit
shift 0, hooked at block 0 (:data:`DIFFUSION_DEFAULT_LAYER`).  The autoregressive twin has
causal attention and next-token logits (logit shift 1: row j - 1 scores token j); its
``generate`` decodes greedily left to right (one token per step, so its trajectory unmasks
position s at step s), and it explains given answers (``answer=...``) like any adapter.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .base import GenerationConfig, GenerationResult
from .generic import GenericAdapter

__all__ = ["BundledAdapter", "load"]


#: The diffusion model's hooked block: block 0 (the output of the first of its four blocks, a
#: quarter of the depth), chosen on the val split of the bundled benchmark over block 1 (the
#: generic "about a third of the depth" rule): raw Grad-CAM F3 26.1 % against 20.6 % on the 200
#: val scenes (1,249 maps; block 2: 11.7 % on 40 val scenes' descriptions; block 3's image
#: outputs reach no answer logit).  The autoregressive twin keeps the generic rule (block 1;
#: on val scenes 0-39 its raw Obj-IoU is 9.0 % there, 6.7 % at blocks 0 and 2).
DIFFUSION_DEFAULT_LAYER = 0


class BundledAdapter(GenericAdapter):
    """GenericAdapter configured for :class:`~diffcam.models.bundled.DiffcamTinyForMaskedDiffusion`.

    ``default_generation``: the whole response (18 tokens) as one block, one token per step,
    greedy low-confidence remasking -- the setting the model card's scores were measured with.
    """

    def __init__(self, model, tokenizer, name: Optional[str] = None):
        from ..models.bundled import IMAGE_PLACEHOLDER

        cfg = model.config
        causal = bool(cfg.causal)
        super().__init__(model, tokenizer, blocks="model.layers", mask_token_id=cfg.mask_token_id,
                         placeholder_id=IMAGE_PLACEHOLDER, vision=model.encode_images,
                         layout="anyres", logit_shift=1 if causal else 0, inner="model",
                         lm_head="lm_head",
                         prefix_ids=[tokenizer.bos_token_id],
                         default_layer=None if causal else DIFFUSION_DEFAULT_LAYER,
                         name=name or ("bundled-ar" if causal else "bundled"))
        self.causal = causal
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.default_generation = GenerationConfig(steps=cfg.gen_length, gen_length=cfg.gen_length)

    def generate(self, sample, config):
        """The diffusion model: LLaDA's low-confidence remasking (``config``).  The causal twin:
        greedy left-to-right decoding of ``config.gen_length`` tokens (``steps``, block length,
        temperature and seed do not apply), ``<eos>``-padded like a diffusion answer; its
        trajectory has one step per token (position j is masked before step j + 1)."""
        if self.causal:
            ids = self.greedy_decode([sample], config.gen_length)[0]
            g = int(ids.shape[0])
            masked = torch.arange(g)[None, :] >= torch.arange(g + 1)[:, None]
            return GenerationResult(ids, masked, g)
        return super().generate(sample, config)

    def greedy_decode(self, samples, max_new: int) -> torch.Tensor:
        """Greedy next-token decoding (the causal twin only) of prepared samples whose prompts
        have the same length: LongTensor (B, max_new), each row ``<eos>``-padded after its
        first ``<eos>``.  No KV cache: each step re-runs the sequence (the model is tiny)."""
        if not self.causal:
            raise ValueError("greedy_decode is for the autoregressive twin; the diffusion model "
                             "answers with generate() (masked-diffusion sampling)")
        if max_new < 1:
            raise ValueError(f"max_new={max_new}: at least one token")
        lengths = {int(s.inputs_embeds.shape[0]) for s in samples}
        if len(lengths) != 1:
            raise ValueError(f"greedy_decode needs prompts of one length, got {sorted(lengths)}")
        with torch.inference_mode():
            prompts = torch.stack([s.inputs_embeds for s in samples]).to(self.device)
            b = prompts.shape[0]
            ids = torch.full((b, max_new), self.eos_token_id, dtype=torch.long,
                             device=self.device)
            done = torch.zeros(b, dtype=torch.bool, device=self.device)
            for t in range(max_new):
                emb = self.embed_tokens(ids[:, :t]).to(prompts.dtype)
                logits = self.forward(torch.cat([prompts, emb], 1))
                nxt = logits[:, -1].argmax(-1)
                ids[:, t] = torch.where(done, torch.full_like(nxt, self.eos_token_id), nxt)
                done |= nxt == self.eos_token_id
                if bool(done.all()):
                    break
        return ids.cpu()

    def answer_text(self, ids) -> str:
        """The response text up to the first ``<eos>``."""
        ids = [int(i) for i in ids]
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        return self.tokenizer.decode(ids)

    def info(self) -> dict:
        d = super().info()
        d["weights"] = getattr(self.model, "name_or_path", "")
        return d


def load(path_or_model=None, kind: str = "diffusion", device="cpu", dtype=torch.float32,
         attn_implementation: str = "sdpa", tokenizer=None) -> BundledAdapter:
    """The bundled model behind its adapter.

    path_or_model  None (the weights shipped with diffcam), a folder written by
                   ``python -m diffcam.models.train --out DIR``, or a loaded
                   ``DiffcamTinyForMaskedDiffusion``
    kind           'diffusion' (default) or 'autoregressive' (the causal twin); only used when
                   ``path_or_model`` is None
    attn_implementation  'sdpa' (default; about 3x faster than 'eager' on CPU, same maps up to
                   float rounding) or 'eager'
    """
    from ..models.bundled import (DiffcamTinyForMaskedDiffusion, build_tokenizer,
                                  weights_dir)

    if isinstance(path_or_model, DiffcamTinyForMaskedDiffusion):
        model = path_or_model
        tok = tokenizer or build_tokenizer()
    else:
        path = weights_dir(kind) if path_or_model is None else os.fspath(path_or_model)
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            hint = ("the shipped weights are missing from this installation; reinstall diffcam or "
                    "train them with `python -m diffcam.models.train`" if path_or_model is None
                    else "train a model there with `python -m diffcam.models.train --out DIR`")
            raise FileNotFoundError(f"no bundled model weights at {path}: {hint}")
        model = DiffcamTinyForMaskedDiffusion.from_pretrained(
            path, attn_implementation=attn_implementation)
        if tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = tokenizer
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return BundledAdapter(model, tok)
