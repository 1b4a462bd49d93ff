"""A structural twin of DiffusionGemma (``google/diffusiongemma-26B-A4B-it``): transformers' own
``DiffusionGemmaForBlockDiffusion`` built from its own config classes (``DiffusionGemmaConfig``,
``DiffusionGemmaTextConfig``, ``Gemma4VisionConfig``) at toy size, with random weights.

Everything the adapter touches is the real transformers code (>= 5.13): the encoder
(``model.model.encoder``: ``vision_tower``, ``embed_vision``, ``language_model.layers``), the
decoder (``model.model.decoder``: canvas ``embed_tokens``, ``layers``, self-conditioning), the
tied ``lm_head`` with final-logit soft-capping, the KV-cache classes, ``generate`` with its
entropy-bound uniform-noise sampler, and transformers' ``Gemma4ImageProcessor`` (PIL backend).
Layers return bare tensors.  Real token ids: pad 0, eos 1, bos 2, ``<mask>`` 4, begin-of-image
255999, image soft token 258880, end-of-image 258882; vocabulary 262144.

Toy sizes: hidden 32, 3 text layers (sliding, full, full; sliding window ``sliding_window``),
4 experts (top 2), canvas of 8 tokens; the vision tower has patch 8, pooling 2 and at most 70
soft tokens (a 24 x 32 image gives a 7 x 9 soft-token grid).

Only the processor is a stand-in (:class:`DiffusionGemmaTwinProcessor`): it mimics the Gemma 4
processor's interface (``apply_chat_template`` + ``__call__`` returning ``input_ids``,
``pixel_values``, ``image_position_ids``, ``mm_token_type_ids``; each image token expanded to
``<boi> + n * <image> + <eoi>``), with a word-level tokenizer; the chat markup is a placeholder.

>>> model, processor = diffusion_gemma_twin(seed=0)                  # doctest: +SKIP
>>> type(model.model.encoder.language_model.layers[0]).__name__       # doctest: +SKIP
'DiffusionGemmaEncoderTextLayer'
"""

from __future__ import annotations

import torch

from .mmada import TwinTokenizer

__all__ = ["diffusion_gemma_twin", "DiffusionGemmaTwinProcessor", "GEMMA_IDS"]

#: DiffusionGemma / Gemma token ids (transformers' DiffusionGemmaConfig defaults)
GEMMA_IDS = dict(pad=0, eos=1, bos=2, unk=3, mask=4, start_turn=105, end_turn=106, boi=255999,
                 image=258880, eoi=258882, vocab=262144)


def diffusion_gemma_tokenizer() -> TwinTokenizer:
    i = GEMMA_IDS
    specials = {"<pad>": i["pad"], "<eos>": i["eos"], "<bos>": i["bos"], "<unk>": i["unk"],
                "<mask>": i["mask"], "<start_of_turn>": i["start_turn"],
                "<end_of_turn>": i["end_turn"], "<start_of_image>": i["boi"],
                "<image_soft_token>": i["image"], "<end_of_image>": i["eoi"]}
    tok = TwinTokenizer(specials, word_base=3000, length=i["vocab"], unk_id=i["unk"],
                        bos_token_id=i["bos"], eos_token_id=i["eos"], pad_token_id=i["pad"],
                        mask_token_id=i["mask"])
    tok.boi_token, tok.image_token, tok.eoi_token = ("<start_of_image>", "<image_soft_token>",
                                                     "<end_of_image>")
    tok.image_token_id = i["image"]
    return tok


class DiffusionGemmaTwinProcessor:
    """Gemma-4-processor interface over transformers' ``Gemma4ImageProcessor`` and a word-level
    tokenizer."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages, tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        parts = ["<bos>"]
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            body = " ".join(self.tokenizer.image_token if c["type"] == "image" else c["text"]
                            for c in content)
            parts.append(f"<start_of_turn>{msg['role']} {body}<end_of_turn>")
        if add_generation_prompt:
            parts.append("<start_of_turn>model")
        return " ".join(parts)

    def __call__(self, text, images=None, return_tensors="pt", **kwargs):
        if isinstance(text, str):
            text = [text]
        if len(text) != 1:
            raise ValueError("the twin processor takes one text")
        out, counts = {}, []
        if images:
            ip = self.image_processor(list(images), return_tensors="pt")
            out["pixel_values"] = ip["pixel_values"]
            out["image_position_ids"] = ip["image_position_ids"]
            counts = [int(n) for n in ip["num_soft_tokens_per_image"]]
        tk = self.tokenizer
        pieces = text[0].split(tk.image_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"{len(pieces) - 1} image tokens in the text for {len(counts)} images")
        s = pieces[0]
        for n, p in zip(counts, pieces[1:]):
            s += tk.boi_token + tk.image_token * n + tk.eoi_token + p
        ids = torch.tensor([tk.encode(s)], dtype=torch.long)
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        out["mm_token_type_ids"] = (ids == tk.image_token_id).long()
        return out


def diffusion_gemma_twin(seed: int = 0, hidden: int = 32, sliding_window: int = 16,
                         canvas_length: int = 8, bidirectional: str = "vision",
                         dtype=torch.float32):
    """(model, processor): a frozen, eval-mode ``DiffusionGemmaForBlockDiffusion`` at toy size
    (see the module docstring) and its processor stand-in.

    ``bidirectional`` is ``use_bidirectional_attention`` of the text config ("vision": image
    tokens see each other, text is causal; None: causal)."""
    import transformers
    from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                              DiffusionGemmaTextConfig, Gemma4VisionConfig)

    tc = DiffusionGemmaTextConfig(
        vocab_size=GEMMA_IDS["vocab"], hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        global_head_dim=16, num_global_key_value_heads=1, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "full_attention"], num_experts=4,
        top_k_experts=2, moe_intermediate_size=hidden // 2,
        use_bidirectional_attention=bidirectional, max_position_embeddings=1024)
    vc = Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                            patch_size=8, pooling_kernel_size=2, position_embedding_size=64)
    cfg = DiffusionGemmaConfig(text_config=tc, vision_config=vc, canvas_length=canvas_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(cfg)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        import torchvision  # noqa: F401
        ip_cls = transformers.Gemma4ImageProcessor
    except ImportError:   # the PIL backend, chosen explicitly (no fallback warning)
        ip_cls = transformers.Gemma4ImageProcessorPil
    ip = ip_cls(patch_size=8, pooling_kernel_size=2, max_soft_tokens=70)
    return model, DiffusionGemmaTwinProcessor(ip, diffusion_gemma_tokenizer())
