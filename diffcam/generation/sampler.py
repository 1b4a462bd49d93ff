"""LLaDA-style masked-diffusion sampling with semi-autoregressive blocks.

The sequence is ``[prompt embeddings | gen_length mask tokens]``.  Each step runs one full
forward through ``adapter.forward`` (the inner forward, no KV cache, so a block hook sees the
whole sequence, image span included), predicts every still-masked response position and commits
the most confident ones of the current block.  The number of commits per step follows LLaDA's
linear schedule (``num_transfer_tokens``).  The trajectory is recorded: ``masked[s, j]`` is True
when response position ``j`` was still masked after ``s`` steps.

Everything runs under ``torch.inference_mode``; for a given seed the result is deterministic
(Gumbel noise and random confidences come from a private, seeded ``torch.Generator`` on the CPU,
never from the global RNG).
"""

from __future__ import annotations

import torch

from ..adapters.base import GenerationConfig, GenerationResult

__all__ = ["masked_diffusion_generate", "num_transfer_tokens"]


def num_transfer_tokens(n_masked: int, steps: int) -> list:
    """LLaDA's linear schedule: ``n_masked`` commits spread over ``steps`` steps, the remainder
    to the earliest steps.

    >>> num_transfer_tokens(10, 4)
    [3, 3, 2, 2]
    """
    base, rem = divmod(int(n_masked), int(steps))
    return [base + (1 if i < rem else 0) for i in range(steps)]


def _gumbel_max_scores(logits: torch.Tensor, temperature: float, gen: torch.Generator):
    """LLaDA's ``add_gumbel_noise``: exp(logits) / (-log u) ** temperature in float64, whose
    argmax is a sample from softmax(logits / temperature)."""
    logits = logits.to(torch.float64)
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).to(logits.device)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return logits.exp() / (-torch.log(u)) ** temperature


def masked_diffusion_generate(adapter, sample, config: GenerationConfig) -> GenerationResult:
    """Generate ``config.gen_length`` tokens for one PreparedSample.

    Logit row for response position ``j`` is ``P + j - adapter.logit_shift`` (P = prompt length).
    The mask token itself is never committed (its logit is excluded), so no mask id remains in
    the answer.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    G = int(config.gen_length)
    block_len = G if config.block_length is None else int(config.block_length)
    n_blocks = G // block_len
    steps_per_block = config.steps // n_blocks
    S = config.steps
    shift = int(getattr(adapter, "logit_shift", 0))
    mask_id = int(adapter.mask_token_id)
    if mask_id < 0:
        raise ValueError(f"adapter {getattr(adapter, 'name', adapter)!r} has no mask_token_id")

    prompt = sample.inputs_embeds
    P = int(prompt.shape[0])
    if P - shift < 0:
        raise ValueError("the prompt is shorter than the logit shift")
    L = P + G
    device = prompt.device
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(config.seed))

    with torch.inference_mode():
        extras = adapter.extend_extras(sample, L)
        response = torch.full((G,), mask_id, dtype=torch.long, device=device)
        is_masked = torch.ones(G, dtype=torch.bool, device=device)
        masked = torch.zeros(S + 1, G, dtype=torch.bool)
        masked[0] = True
        positions = torch.arange(G, device=device)
        step = 0
        for b in range(n_blocks):
            lo, hi = b * block_len, (b + 1) * block_len
            schedule = num_transfer_tokens(int(is_masked[lo:hi].sum()), steps_per_block)
            for k in schedule:
                embeds = torch.cat([prompt, adapter.embed_tokens(response).to(prompt.dtype)], 0)
                logits = adapter.forward(embeds[None], None, extras)
                rows = logits[0, P - shift:P - shift + G]
                if rows.shape[0] != G:
                    raise RuntimeError(f"the adapter's forward returned {logits.shape[1]} logit rows "
                                       f"for a sequence of {L} positions")
                rows = rows.to(torch.float64)
                if 0 <= mask_id < rows.shape[-1]:
                    rows = rows.clone()
                    rows[:, mask_id] = float("-inf")
                x0 = _gumbel_max_scores(rows, config.temperature, gen).argmax(-1)
                if config.remasking == "low_confidence":
                    p = torch.softmax(rows, dim=-1)
                    conf = p.gather(-1, x0[:, None])[:, 0]
                else:
                    conf = torch.rand(G, generator=gen, dtype=torch.float64).to(device)
                conf = torch.where(is_masked & (positions < hi), conf,
                                   torch.full_like(conf, float("-inf")))
                if k > 0:
                    chosen = torch.topk(conf, k).indices
                    response[chosen] = x0[chosen]
                    is_masked[chosen] = False
                step += 1
                masked[step] = is_masked.cpu()
    return GenerationResult(response_ids=response.clone(), masked=masked, steps=S,
                            hidden_has_image=None)
