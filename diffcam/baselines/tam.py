"""Token Activation Map (TAM, method.md section 4): a gradient-free baseline.

For a token t of class c (its token id) at sequence position p, with the final-layer logits Z
(L, V) of one forward over ``[prompt with image | response]``:

1. **Activation.**  Image position i scores ``A_t[i] = max(0, Z[i, c])``: the logit lens of the
   final layer read at every image token.
2. **Estimated causal inference (ECI).**  The context of t is every text position q < p (prompt
   text and earlier response tokens; image spans and special tokens excluded).  A context token q
   whose string differs from t's contributes its own activation map ``A_q = max(0, Z[img, y_q])``
   weighted by ``w_q = max(0, Z[q, c])`` normalised to sum 1 (its clipped logit for class c):
   ``I = sum_q w_q A_q``.  ``lambda = <A_t, I> / <I, I>`` (unconstrained least squares, 0 when
   I = 0) and ``A_t <- max(A_t - lambda I, 0)``.  (Only lambda * I enters the result, so the
   weights' normalisation does not change the map.)
3. **Joint min-max.**  The image scores and the context's text scores ``max(0, Z[q, c])`` are
   min-max normalised together, so an image whose best position is weaker than the best text
   token does not reach 1.
4. The image part is reshaped per grid and smoothed by the rank-weighted Gaussian filter with
   k = 3 (:func:`diffcam.refine.rank_gaussian_filter`; done by the Explainer, per grid).

A target of several tokens, and the aggregate, add their tokens' corrected image scores and
their text scores (a token's text score counts at its own context positions only) before step 3.
The aggregate adds the tokens of every target, so a token named by two targets counts twice, as
in the aggregate score (the sum of the target scores) of the gradient methods.

Logit rows are read where the hidden state sits (row i for position i), for image and text
positions alike, whatever the model's ``logit_shift``: the logit lens of a position's own
hidden state.

>>> import torch
>>> A = torch.tensor([1.0, 2.0, 0.0]); ctx = torch.tensor([[0.0, 1.0, 0.0]]); w = torch.ones(1)
>>> out, lam = eci(A, ctx, w)
>>> out.tolist(), round(float(lam), 6)
([1.0, 0.0, 0.0], 2.0)
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = ["eci", "tam_token_scores", "tam_group_scores", "EPS"]

EPS = 1e-8


def eci(A: torch.Tensor, ctx_maps: torch.Tensor, weights: torch.Tensor):
    """Estimated causal inference: ``(max(A - lambda I, 0), lambda)``.

    ``A`` (n,) the token's image activation, ``ctx_maps`` (m, n) the context tokens' activation
    maps, ``weights`` (m,) their logits for the token's class (clipped at 0 and normalised here).
    With no context (m = 0) or an interference that is zero everywhere, lambda is 0 and ``A`` is
    returned unchanged (clipped at 0).  Computed in ``A``'s dtype.
    """
    ctx_maps = ctx_maps.to(A.dtype)
    w = torch.relu(weights.to(A.dtype))
    s = w.sum()
    if ctx_maps.shape[0] == 0 or float(s) <= 0:
        return torch.relu(A), A.new_zeros(())
    w = w / s
    interference = w @ ctx_maps                                     # (n,)
    ii = (interference * interference).sum()
    if float(ii) <= 0:
        return torch.relu(A), A.new_zeros(())
    lam = (A * interference).sum() / ii
    return torch.relu(A - lam * interference), lam


def tam_token_scores(Z: torch.Tensor, img_pos: torch.Tensor, ctx_pos: Sequence[int],
                     ctx_ids: Sequence[int], ctx_strings: Sequence[str], p: int, c: int,
                     string: str):
    """One token's ECI-corrected image scores (n,) and its text scores over ``ctx_pos`` (m,)
    (0 at positions >= p), from the logits ``Z`` (L, V) of its row.  Also returns lambda."""
    dt = torch.float64
    A = torch.relu(Z[img_pos, c].to(dt))
    earlier = [k for k, q in enumerate(ctx_pos) if q < p]
    keep = [k for k in earlier if ctx_strings[k] != string]
    dev = Z.device
    if keep:
        q_keep = torch.as_tensor([ctx_pos[k] for k in keep], dtype=torch.long, device=dev)
        y_keep = torch.as_tensor([ctx_ids[k] for k in keep], dtype=torch.long, device=dev)
        maps = torch.relu(Z[img_pos][:, y_keep].to(dt)).T                  # (m', n)
        A, lam = eci(A, maps, Z[q_keep, c].to(dt))
    else:
        lam = A.new_zeros(())
    text = torch.zeros(len(ctx_pos), dtype=dt, device=dev)
    if earlier:
        idx = torch.as_tensor(earlier, dtype=torch.long, device=dev)
        q = torch.as_tensor([ctx_pos[k] for k in earlier], dtype=torch.long, device=dev)
        text[idx] = torch.relu(Z[q, c].to(dt))
    return A, text, lam


def tam_group_scores(Z: torch.Tensor, img_pos: torch.Tensor, ctx_pos: Sequence[int],
                     ctx_ids: Sequence[int], ctx_strings: Sequence[str],
                     tokens: Sequence[Tuple[int, int, str]],
                     groups: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, List[float]]:
    """Jointly min-max normalised image scores (G, n) of each group of tokens, float64.

    ``tokens``: (position p, class c, string) of every scored token; ``groups``: indices into
    ``tokens`` (one group per target, then the aggregate).  Also returns each token's lambda.
    """
    per_tok = [tam_token_scores(Z, img_pos, ctx_pos, ctx_ids, ctx_strings, p, c, s)
               for p, c, s in tokens]
    out = []
    for g in groups:
        A = sum(per_tok[k][0] for k in g)
        T = sum(per_tok[k][1] for k in g)
        lo = A.min()
        hi = A.max()
        if T.numel():
            # only positions that belong to the context of at least one token of the group
            earlier = torch.zeros_like(T, dtype=torch.bool)
            for k in g:
                p = tokens[k][0]
                earlier |= torch.as_tensor([q < p for q in ctx_pos], device=T.device)
            if bool(earlier.any()):
                lo = torch.minimum(lo, T[earlier].min())
                hi = torch.maximum(hi, T[earlier].max())
        out.append((A - lo) / (hi - lo + EPS))
    return torch.stack(out), [float(t[2]) for t in per_tok]
