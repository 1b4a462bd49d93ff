"""Deletion and insertion curves through the model (method.md 3, beyond the paper).

A map is *faithful* when the pixels it ranks first are the ones the model needs: deleting them
first should make the target word unlikely fast (low deletion AUC), and revealing them first on
an uninformative image should bring the word back fast (high insertion AUC)
(Petsiuk et al., 2018).

For one image, prompt and answer, and per target (a set of answer token indices with its map):

1. the map is resized bilinearly to the image and its pixels ranked, highest first (ties in
   row-major order);
2. for fractions k / steps, k = 0..steps: the *deletion* image replaces the top fraction of
   pixels by the baseline image; the *insertion* image starts from the baseline and puts the top
   fraction of the original pixels back;
3. each image goes through the model (``adapter.prepare`` + ``adapter.forward``, no gradients)
   with the answer teacher-forced, and the target scores the geometric mean probability of its
   tokens (softmax over the vocabulary at the token's logit row, ``P + j - logit_shift``).
   For masked-diffusion models (``mask_targets=None`` and an adapter that is not causal) the
   target's own positions are set to the mask token, so the probability is the model's
   prediction of the word from the image and the rest of the answer, not a copy of its input;
4. AUC = the trapezoid mean of the curve over the fractions (0 to 1).

The baseline is ``"blur"`` (a box blur of a fifth of the image's size, repeated three times:
keeps colours' averages, removes shapes), ``"mean"`` (the image's mean colour), ``"zero"``
(black) or an array of the image's shape.

>>> import diffcam                                                      # doctest: +SKIP
>>> from diffcam.metrics.faithfulness import deletion_insertion         # doctest: +SKIP
>>> ad = diffcam.load("bundled")                                        # doctest: +SKIP
>>> with diffcam.Explainer(ad) as ex:                                   # doctest: +SKIP
...     exp = ex.explain(image, prompt, targets="nouns")
>>> maps = exp.maps[0]["hires"][:-1, 0]                                 # doctest: +SKIP
>>> s = deletion_insertion(ad, image, prompt, exp.token_ids, maps,      # doctest: +SKIP
...                        [t.tokens for t in exp.targets])
>>> s.deletion_auc, s.insertion_auc                                     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["FaithfulnessScores", "deletion_insertion", "baseline_image", "perturbation_order",
           "target_probability"]


@dataclass
class FaithfulnessScores:
    """Per target: the AUCs (T,) and the curves (T, steps + 1); ``fractions`` (steps + 1,)."""

    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    fractions: np.ndarray


def _box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1) window with edge clamping, per channel, float64."""
    out = img.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        idx = np.clip(np.arange(-r, n + r), 0, n - 1)
        pad = np.take(out, idx, axis=axis)
        c = np.cumsum(pad, axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        hi = np.take(c, np.arange(2 * r + 1, n + 2 * r + 1), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = (hi - lo) / (2 * r + 1)
    return out


def baseline_image(image: np.ndarray, baseline: Union[str, np.ndarray] = "blur") -> np.ndarray:
    """The uninformative image of the same shape (float64, values of ``image``'s range)."""
    img = np.asarray(image)
    if isinstance(baseline, str):
        if baseline == "blur":
            r = max(1, min(img.shape[:2]) // 10)
            out = img.astype(np.float64)
            for _ in range(3):
                out = _box_blur(out, r)
            return out
        if baseline == "mean":
            return np.broadcast_to(img.reshape(-1, img.shape[-1]).mean(0),
                                   img.shape).astype(np.float64)
        if baseline == "zero":
            return np.zeros(img.shape, np.float64)
        raise ValueError(f"baseline={baseline!r}: expected 'blur', 'mean', 'zero' or an array")
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != img.shape:
        raise ValueError(f"baseline has shape {b.shape}; the image has {img.shape}")
    return b


def perturbation_order(m: np.ndarray, size) -> np.ndarray:
    """Pixel indices (row-major, of an image of ``size`` = (H, W)) from the map's highest value
    to its lowest after a bilinear resize; ties keep row-major order."""
    from ..refine.resize import resize_stack

    r = resize_stack(np.asarray(m, np.float32), tuple(size)).astype(np.float64).ravel()
    return np.argsort(-r, kind="stable")


def _images(image, base, order, fractions, insertion: bool):
    H, W = image.shape[:2]
    n = H * W
    flat_img = image.reshape(n, -1).astype(np.float64)
    flat_base = base.reshape(n, -1)
    out = []
    for f in fractions:
        k = int(round(f * n))
        if insertion:
            x = flat_base.copy()
            x[order[:k]] = flat_img[order[:k]]
        else:
            x = flat_img.copy()
            x[order[:k]] = flat_base[order[:k]]
        out.append(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(image.shape))
    return out


def target_probability(adapter, images: Sequence[np.ndarray], prompt: str, answer_ids,
                       tokens: Sequence[int], mask_targets: Optional[bool] = None,
                       batch: int = 32) -> np.ndarray:
    """Geometric mean probability of the answer tokens ``tokens`` (answer indices) for each
    image, with the answer teacher-forced (see the module docstring); float64 (len(images),)."""
    import torch

    ids = [int(t) for t in answer_ids]
    tokens = [int(j) for j in tokens]
    if not tokens or min(tokens) < 0 or max(tokens) >= len(ids):
        raise ValueError(f"target tokens {tokens} are not answer positions 0..{len(ids) - 1}")
    if mask_targets is None:
        mask_targets = not bool(getattr(adapter, "causal", False))
    resp = torch.tensor(ids, dtype=torch.long)
    if mask_targets:
        resp[tokens] = int(adapter.mask_token_id)
    shift = int(getattr(adapter, "logit_shift", 0))
    y = torch.tensor([ids[j] for j in tokens], dtype=torch.long)
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            rows, extras = [], []
            for img in images[lo:lo + batch]:
                s = adapter.prepare([img], prompt)
                r = resp.to(s.inputs_embeds.device)
                x = torch.cat([s.inputs_embeds, adapter.embed_tokens(r).to(s.inputs_embeds.dtype)])
                rows.append((s.prompt_length, x))
                extras.append(adapter.extend_extras(s, x.shape[0]))
            L = {x.shape[0] for _, x in rows}
            if len(L) == 1 and all(not e for e in extras):
                logits = adapter.forward(torch.stack([x for _, x in rows]), None, {})
                per = [logits[b] for b in range(len(rows))]
            else:
                per = [adapter.forward(x[None], None, e)[0] for (_, x), e in zip(rows, extras)]
            for (P, _), z in zip(rows, per):
                pos = torch.tensor([P + j - shift for j in tokens], device=z.device)
                lp = torch.log_softmax(z[pos].float(), -1)
                lp = lp.gather(-1, y.to(z.device)[:, None])[:, 0]
                out.append(float(torch.exp(lp.mean())))
    return np.asarray(out, dtype=np.float64)


def deletion_insertion(adapter, image, prompt: str, answer_ids, maps, targets,
                       steps: int = 16, baseline: Union[str, np.ndarray] = "blur",
                       mask_targets: Optional[bool] = None, batch: int = 34
                       ) -> FaithfulnessScores:
    """Deletion and insertion AUCs of each map (``maps`` (T, h, w), any resolution) for its
    target (``targets``: T lists of answer token indices) on one RGB uint8 ``image``."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or not np.isfinite(maps).all():
        raise ValueError("maps must be finite (T, h, w) or (h, w)")
    targets = [list(t) for t in targets]
    if len(targets) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {len(targets)} targets")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    base = baseline_image(img, baseline)
    fr = np.arange(steps + 1) / steps
    dele = np.zeros((len(targets), steps + 1))
    ins = np.zeros((len(targets), steps + 1))
    for t, (m, toks) in enumerate(zip(maps, targets)):
        order = perturbation_order(m, img.shape[:2])
        ims = _images(img, base, order, fr, False) + _images(img, base, order, fr, True)
        p = target_probability(adapter, ims, prompt, answer_ids, toks, mask_targets, batch)
        dele[t], ins[t] = p[:steps + 1], p[steps + 1:]

    def auc(c):
        return ((c[:, 1:] + c[:, :-1]) / 2).mean(axis=1)

    return FaithfulnessScores(auc(dele), auc(ins), dele, ins, fr)
