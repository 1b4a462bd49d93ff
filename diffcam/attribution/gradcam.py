"""Grad-CAM aggregation (method.md 1.7) on the image part of a hooked hidden state.

``A`` holds the activations of one grid (..., h, w, D), ``G`` their gradients with the same shape
(or with extra leading dimensions, e.g. one per target, broadcast against ``A``).

paper     w_c = mean_{i,j} G_c;  M = ReLU(sum_c w_c A_c)
reference G clamped at 0 first; M = mean_c ReLU(w_c A_c)       (the released code, [ref])

then min-max normalised to [0, 1] per map with epsilon 1e-8 (a constant map becomes 0).

>>> import torch
>>> A = torch.ones(2, 2, 3); G = torch.ones(2, 2, 3)
>>> grad_cam(A, G).shape
torch.Size([2, 2])
"""

from __future__ import annotations

import torch

__all__ = ["grad_cam", "minmax", "EPS"]

EPS = 1e-8


def minmax(m: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Min-max normalise over the last two dimensions: (m - min) / (max - min + eps)."""
    flat = m.flatten(-2)
    lo = flat.min(-1).values[..., None, None]
    hi = flat.max(-1).values[..., None, None]
    return (m - lo) / (hi - lo + eps)


def grad_cam(A: torch.Tensor, G: torch.Tensor, variant: str = "paper", normalize: bool = True,
             eps: float = EPS) -> torch.Tensor:
    """Grad-CAM maps (..., h, w) from activations and gradients (..., h, w, D), in float32."""
    A = A.float()
    G = G.float()
    if variant == "paper":
        w = G.mean(dim=(-3, -2), keepdim=True)            # (..., 1, 1, D)
        m = torch.relu((w * A).sum(-1))
    elif variant == "reference":
        w = G.clamp_min(0).mean(dim=(-3, -2), keepdim=True)
        m = torch.relu(w * A).mean(-1)
    else:
        raise ValueError(f"variant={variant!r}: expected 'paper' or 'reference'")
    return minmax(m, eps) if normalize else m
