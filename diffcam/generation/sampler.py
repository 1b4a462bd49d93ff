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

__all__ = ["masked_diffusion_generate", "masked_diffusion_generate_batch", "num_transfer_tokens"]


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
    return masked_diffusion_generate_batch(adapter, [sample], config)[0]


def masked_diffusion_generate_batch(adapter, samples, config: GenerationConfig) -> list:
    """:func:`masked_diffusion_generate` for several samples of equal prompt length, one batched
    forward per step (no attention mask).  Every sample draws its noise from its own generator
    seeded with ``config.seed``, so a batch gives the same answers as the samples one by one (up to
    floating-point differences of the batched forward).  Returns one GenerationResult per sample.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    samples = list(samples)
    if not samples:
        return []
    B = len(samples)
    G = int(config.gen_length)
    block_len = G if config.block_length is None else int(config.block_length)
    n_blocks = G // block_len
    steps_per_block = config.steps // n_blocks
    S = config.steps
    shift = int(getattr(adapter, "logit_shift", 0))
    mask_id = int(adapter.mask_token_id)
    if mask_id < 0:
        raise ValueError(f"adapter {getattr(adapter, 'name', adapter)!r} has no mask_token_id")

    P = int(samples[0].inputs_embeds.shape[0])
    if any(int(s.inputs_embeds.shape[0]) != P for s in samples):
        raise ValueError("batched generation needs samples of equal prompt length, got "
                         f"{[int(s.inputs_embeds.shape[0]) for s in samples]}")
    if P - shift < 0:
        raise ValueError("the prompt is shorter than the logit shift")
    L = P + G
    prompt = samples[0].inputs_embeds
    device = prompt.device
    gens = []
    for _ in range(B):
        g = torch.Generator(device="cpu")
        g.manual_seed(int(config.seed))
        gens.append(g)

    with torch.inference_mode():
        if B == 1:
            extras = adapter.extend_extras(samples[0], L)
            prompts = prompt[None]
        else:
            extras = _batch_extras([adapter.extend_extras(s, L) for s in samples])
            prompts = torch.stack([s.inputs_embeds for s in samples])
        response = torch.full((B, G), mask_id, dtype=torch.long, device=device)
        is_masked = torch.ones(B, G, dtype=torch.bool, device=device)
        masked = torch.zeros(B, S + 1, G, dtype=torch.bool)
        masked[:, 0] = True
        positions = torch.arange(G, device=device)
        step = 0
        for b in range(n_blocks):
            lo, hi = b * block_len, (b + 1) * block_len
            schedules = [num_transfer_tokens(int(is_masked[i, lo:hi].sum()), steps_per_block)
                         for i in range(B)]
            for t in range(steps_per_block):
                resp = adapter.embed_tokens(response.reshape(-1)).reshape(B, G, -1)
                embeds = torch.cat([prompts, resp.to(prompts.dtype)], 1)
                logits = adapter.forward(embeds, None, extras)
                if logits.shape[0] != B or logits.shape[1] != L:
                    raise RuntimeError(f"the adapter's forward returned logits {tuple(logits.shape)} "
                                       f"for {B} sequence(s) of {L} positions")
                rows = logits[:, P - shift:P - shift + G].to(torch.float64)
                if 0 <= mask_id < rows.shape[-1]:
                    rows = rows.clone()
                    rows[..., mask_id] = float("-inf")
                for i in range(B):
                    x0 = _gumbel_max_scores(rows[i], config.temperature, gens[i]).argmax(-1)
                    if config.remasking == "low_confidence":
                        p = torch.softmax(rows[i], dim=-1)
                        conf = p.gather(-1, x0[:, None])[:, 0]
                    else:
                        conf = torch.rand(G, generator=gens[i], dtype=torch.float64).to(device)
                    conf = torch.where(is_masked[i] & (positions < hi), conf,
                                       torch.full_like(conf, float("-inf")))
                    k = schedules[i][t]
                    if k > 0:
                        chosen = torch.topk(conf, k).indices
                        response[i, chosen] = x0[chosen]
                        is_masked[i, chosen] = False
                step += 1
                masked[:, step] = is_masked.cpu()
    return [GenerationResult(response_ids=response[i].clone(), masked=masked[i].clone(), steps=S,
                             hidden_has_image=None) for i in range(B)]


def _batch_extras(all_extras: list) -> dict:
    """Stack per-sample extras: tensors with a leading batch dim of 1 are concatenated, equal
    non-tensor values are kept."""
    keys = set().union(*all_extras)
    out = {}
    for k in keys:
        vals = [e.get(k) for e in all_extras]
        if all(torch.is_tensor(v) for v in vals):
            if vals[0].dim() > 0 and vals[0].shape[0] == 1:
                out[k] = torch.cat(vals, 0)
            elif all(torch.equal(v, vals[0]) for v in vals):
                out[k] = vals[0]
            else:
                raise ValueError(f"cannot batch the extra {k!r} of these samples")
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
        else:
            raise ValueError(f"cannot batch the extra {k!r} of these samples")
    return out
