"""Masked-diffusion sampling (LLaDA-style low-confidence remasking) through any adapter."""

from .sampler import masked_diffusion_generate, masked_diffusion_generate_batch, num_transfer_tokens

__all__ = ["masked_diffusion_generate", "masked_diffusion_generate_batch", "num_transfer_tokens"]
