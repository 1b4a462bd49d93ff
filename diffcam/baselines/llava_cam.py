"""LLaVA-CAM (method.md section 4): the CAM used on autoregressive LLaVA-style models.

On the image part A (h, w, D) of the hooked hidden state -- the output of a block's
post-attention norm, i.e. the input of its MLP -- and its gradient G:

    w_c = mean_{i,j} ReLU(G_c)            (negative gradients dropped before pooling)
    M   = ReLU( mean_c w_c A_c )          (channel *mean*, one ReLU after it)
    M   = M / (max M + eps)
    M   = M where M >= threshold, else 0  (threshold 0.5)

The last step is our reading of "threshold 0.5": values below half the peak are zeroed and the rest
keep their graded value (``threshold=None`` keeps the whole map; the map stays in [0, 1] either
way, so it can be scored and refined like any other).  Unlike Grad-CAM's min-max, dividing by the
max keeps zero at zero; a map that is zero everywhere stays zero.

>>> import torch
>>> A = torch.ones(2, 2, 4); G = torch.ones(2, 2, 4)
>>> llava_cam(A, G)
tensor([[1., 1.],
        [1., 1.]])
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["llava_cam", "mlp_input_norm", "DEFAULT_THRESHOLD", "NORM_NAMES"]

DEFAULT_THRESHOLD = 0.5

#: Attribute names of the norm whose output feeds a block's MLP, in the order they are tried.
#: Gemma-style blocks have both ``pre_feedforward_layernorm`` (the MLP input) and a
#: ``post_attention_layernorm`` applied to the attention output before the residual add, so the
#: former is tried first; in Llama/Qwen blocks (and LLaDA-V's converted ones)
#: ``post_attention_layernorm`` is the MLP input, in LLaDA/MMaDA's own blocks ``ff_norm``.
NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ff_norm", "ffn_norm",
              "ln_2", "norm2")


def llava_cam(A: torch.Tensor, G: torch.Tensor, threshold: Optional[float] = DEFAULT_THRESHOLD,
              eps: float = 1e-8) -> torch.Tensor:
    """LLaVA-CAM maps (..., h, w) from activations ``A`` and gradients ``G`` (..., h, w, D).

    ``G`` may carry extra leading dimensions (one per target), broadcast against ``A``.
    Computed in float32; ``threshold`` in [0, 1] or None.
    """
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold!r}: expected a value in [0, 1] or None")
    A = A.float()
    G = G.float()
    w = torch.relu(G).mean(dim=(-3, -2), keepdim=True)          # (..., 1, 1, D)
    m = torch.relu((w * A).mean(-1))                              # (..., h, w)
    hi = m.flatten(-2).max(-1).values[..., None, None]
    m = m / (hi + eps)
    if threshold is not None:
        m = torch.where(m >= float(threshold), m, torch.zeros_like(m))
    return m


def mlp_input_norm(block, name: Optional[str] = None) -> Tuple[str, torch.nn.Module]:
    """The norm module of ``block`` whose output is LLaVA-CAM's hooked state: ``(name, module)``.

    ``name`` picks an attribute (a dotted path is allowed); otherwise the names of
    :data:`NORM_NAMES` are tried in order.  Raises ``ValueError`` naming what the block has when
    none is found.
    """
    if name is not None:
        m = block
        for part in name.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if not isinstance(m, torch.nn.Module):
            raise ValueError(f"the block ({type(block).__name__}) has no module {name!r}")
        return name, m
    for n in NORM_NAMES:
        m = getattr(block, n, None)
        if isinstance(m, torch.nn.Module):
            return n, m
    children = [n for n, _ in block.named_children()] if isinstance(block, torch.nn.Module) \
        else []
    raise ValueError(
        f"LLaVA-CAM hooks the norm that feeds a block's MLP, but the block "
        f"({type(block).__name__}) has none of {NORM_NAMES} (its children: {children}); pass "
        "llava_cam_norm='<attribute>' to Explainer")
