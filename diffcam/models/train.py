"""Train the bundled model on the shapes world (seeded, CPU).

    python -m diffcam.models.train                       # the masked-diffusion model
    python -m diffcam.models.train --objective ar --projector label_bottleneck \
        --init-vision diffcam/models/weights/diffusion --proxy 4:400,8:300,12:900 ...
                                                         # the autoregressive twin

Masked diffusion: after ``--stage1-steps`` warm-up steps (the whole response masked, the loss
on the answer words only: :func:`loss_stage1`), LLaDA's SFT recipe: each training answer is
padded with ``<eos>`` to ``gen_length`` tokens; a masking ratio ``t ~ U(eps, 1)`` is drawn per
sample, every response token is masked with probability ``t``, and the loss is the
cross-entropy on the masked positions weighted by ``1 / t`` and averaged over the response
length.  The prompt (with the image) is never masked.  The autoregressive twin shares the
diffusion model's (frozen) vision tower (and, with ``--projector label_bottleneck``, its
projector's classifier) and uses causal attention and next-token cross-entropy on the answer
and one ``<eos>``, also in the proxy warm-up.  The exact commands of the shipped weights are in
docs/bundled_model.md.

Fine-tuning a trained model (``--init-model``): every weight is loaded from that folder and the
pre-training stages are skipped; ``--kind-weights`` changes the question mix,
``--count-balance`` draws the count questions of training with balanced answers
(:func:`balanced_count_question`), ``--tie-plurals`` copies each shape word's embedding into its
plural's row (:func:`tie_plurals`) and ``--start-step`` moves the scene stream past the scenes
the first run saw.  The shipped diffusion weights are run L (50.0 min) plus such a fine-tune
(9.9 min; see docs/bundled_model.md for both commands).

Scene ``i`` of the train split is used once, by step ``i // batch``; the run is reproducible from
its seed (up to floating-point summation order across thread counts).  The weights, the tokenizer
and ``training_log.json`` are written to ``--out`` (default: the packaged weights folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data import shapes
from .bundled import (GEN_LENGTH, IMAGE_PLACEHOLDER, PROJECTOR_TYPES, DiffcamTinyConfig,
                      DiffcamTinyForMaskedDiffusion, build_tokenizer, encode_images, weights_dir)

KIND_WEIGHTS = {"describe": 0.4, "colour": 0.2, "presence": 0.2, "count": 0.2}


class Batches(torch.utils.data.IterableDataset):
    """Training batches of (pixels, ids, response start, response length) built from scenes
    ``[step * batch, (step + 1) * batch)`` of a split (steps ``start_step .. start_step +
    steps``), question kinds drawn with ``kind_weights`` (default :data:`KIND_WEIGHTS`); with
    ``count_balance`` every count question is redrawn by :func:`balanced_count_question`."""

    def __init__(self, tok, batch: int, steps: int, start_step: int = 0, split: str = "train",
                 objective: str = "mdm", gen_length: int = GEN_LENGTH, curriculum: int = 0,
                 label_grid: int = 0, kind_weights=None, count_balance: bool = False):
        self.tok, self.batch, self.steps, self.start = tok, batch, steps, start_step
        self.split, self.objective, self.gen_length = split, objective, gen_length
        self.curriculum, self.label_grid = curriculum, label_grid
        self.kind_weights = dict(kind_weights or KIND_WEIGHTS)
        self.count_balance = count_balance

    def __iter__(self):
        for step in range(self.start, self.start + self.steps):
            lo, hi = step * self.batch, (step + 1) * self.batch
            if step < self.curriculum:
                pairs = list(easy_samples(self.split, lo, hi))
            else:
                pairs = list(shapes.samples(self.split, lo, hi, kinds=tuple(self.kind_weights),
                                            weights=tuple(self.kind_weights.values())))
            if self.count_balance:
                pairs = [(sc, balanced_count_question(sc, shapes._rng(self.split, sc.index,
                                                                      salt=11)))
                         if qa.kind == "count" else (sc, qa) for sc, qa in pairs]
            yield make_batch(self.tok, pairs, self.objective, self.gen_length,
                             label_grid=self.label_grid)


def balanced_count_question(sc, rng: np.random.Generator, p_total: float = 0.4):
    """A count question about ``sc`` with the wording of :func:`diffcam.data.shapes.question`
    but balanced answers (training only; the splits keep ``shapes.question``): with probability
    ``p_total`` "how many shapes", else "how many <shape>s" where the answer is drawn uniformly
    from the counts this scene allows (zero for a shape that is absent, and the count of every
    shape present), then a shape with that count.  ``shapes.question`` asks about a present
    shape 85 % of the time, and most present shapes occur once, so "one" dominates its
    per-shape answers.

    >>> from diffcam.data import shapes
    >>> sc = shapes.scene("train", 0)
    >>> qa = balanced_count_question(sc, np.random.default_rng(0))
    >>> qa.kind, qa.answer in shapes.NUMBERS
    ('count', True)
    """
    if rng.random() < p_total:
        return shapes.count_question(sc)
    counts = {s: sum(1 for k in sc.named if sc.shapes[k] == s) for s in shapes.SHAPES}
    values = sorted(set(counts.values()))
    want = values[int(rng.integers(0, len(values)))]
    options = [s for s in shapes.SHAPES if counts[s] == want]
    return shapes.count_question(sc, options[int(rng.integers(0, len(options)))])


def tie_plurals(model, tok) -> None:
    """Copy each shape word's input embedding into its plural's row (``circle`` ->
    ``circles``, ...).  The plural words occur only in "how many Xs" questions, so they are
    the words a model learns least about; after the copy a count question names its shape with
    the vector the presence and colour questions and the descriptions trained."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for shp, plural in shapes.PLURALS.items():
            emb[tok.convert_tokens_to_ids(plural)] = emb[tok.convert_tokens_to_ids(shp)]


def parse_kind_weights(text: str) -> dict:
    """``"describe:0.3,colour:0.3,presence:0.1,count:0.3"`` -> a dict over every question kind
    (kinds not named get weight 0; at least one weight must be positive).

    >>> parse_kind_weights("colour:1,count:1")
    {'describe': 0.0, 'colour': 1.0, 'presence': 0.0, 'count': 1.0}
    """
    out = {k: 0.0 for k in shapes.KINDS}
    for part in text.split(","):
        name, sep, val = part.partition(":")
        name = name.strip()
        if not sep or name not in out:
            raise ValueError(f"--kind-weights: expected kind:weight with kind in {shapes.KINDS}, "
                             f"got {part!r}")
        try:
            out[name] = float(val)
        except ValueError:
            raise ValueError(f"--kind-weights: {val!r} is not a number") from None
        if not out[name] >= 0:
            raise ValueError(f"--kind-weights: weight of {name} must be >= 0")
    if sum(out.values()) <= 0:
        raise ValueError("--kind-weights: at least one weight must be positive")
    return out


def easy_samples(split: str, start: int, stop: int, max_objects: int = 2,
                 object_scale: float = 1.0):
    """Curriculum pairs: scenes of ``split`` with one to ``max_objects`` named objects whose
    radii are multiplied by ``object_scale`` (their own seed stream, salt 7, so they never repeat
    a scene of the ordinary stream or of another split), questions drawn with
    :data:`KIND_WEIGHTS`."""
    kinds = tuple(KIND_WEIGHTS)
    p = np.asarray(list(KIND_WEIGHTS.values()), float)
    p = p / p.sum()
    for i in range(start, stop):
        r = shapes._rng(split, i, salt=7)
        sc = shapes.render_scene(r, n_objects=int(r.integers(1, max_objects + 1)),
                                 object_scale=object_scale)
        sc.split, sc.index = split, i
        kind = kinds[int(r.choice(len(kinds), p=p))]
        yield sc, shapes.question(sc, kind, r)


def patch_labels(sc, grid: int = 12, min_cover: float = 0.3):
    """(colour, shape) class of every grid cell: the named object covering the largest part of
    the cell when it covers at least ``min_cover`` of it, else 0 (background or distractor)."""
    S = sc.image.shape[0]
    cell = S // grid
    cover = sc.masks[:sc.n_named].reshape(sc.n_named, grid, cell, grid, cell).mean(axis=(2, 4))
    best = cover.argmax(0)
    ok = cover.max(0) >= min_cover
    colours = list(shapes.COLOURS)
    col = np.zeros((grid, grid), np.int64)
    shp = np.zeros((grid, grid), np.int64)
    for k in range(sc.n_named):
        sel = ok & (best == k)
        col[sel] = 1 + colours.index(sc.colours[k])
        shp[sel] = 1 + shapes.SHAPES.index(sc.shapes[k])
    return col, shp


def label_grids(scenes, grid: int, labeller=None):
    """Stacked per-cell labels of ``scenes``: two int64 tensors (colour, shape) of shape
    (len(scenes), grid, grid), each scene labelled by ``labeller(scene, grid)``
    (default :func:`patch_labels`)."""
    labeller = labeller or patch_labels
    labels = [labeller(sc, grid) for sc in scenes]
    return (torch.from_numpy(np.stack([c for c, _ in labels])),
            torch.from_numpy(np.stack([s for _, s in labels])))


class PatchBatches(torch.utils.data.IterableDataset):
    """Vision pre-training batches: pixels and per-cell (colour, shape) labels of train scenes
    ``offset + [step * batch, (step + 1) * batch)``."""

    def __init__(self, batch: int, steps: int, offset: int = 5_000_000, grid: int = 12):
        self.batch, self.steps, self.offset, self.grid = batch, steps, offset, grid

    def __iter__(self):
        for step in range(self.steps):
            lo = self.offset + step * self.batch
            scs = [shapes.scene("train", i) for i in range(lo, lo + self.batch)]
            yield (encode_images([sc.image for sc in scs]),) + label_grids(scs, self.grid)


def pretrain_vision(model, steps: int, batch: int = 64, lr: float = 2e-3, quiet: float = 0.05,
                    log=print) -> list:
    """Pre-train the vision tower to name the colour and the shape under every grid cell (two
    1x1-convolution heads, discarded afterwards) -- the stand-in for the pretrained vision
    encoder (SigLIP) that LLaDA-V starts from.  ``quiet`` weighs a penalty on the mean squared
    feature of cells without a named object, so that the background (and the distractors) give
    near-constant tokens and the objects stand out to a language model that starts by averaging
    the image.  Returns the history."""
    c = model.config.vision_channels[-1]
    heads = torch.nn.ModuleList([torch.nn.Conv2d(c, 1 + len(shapes.COLOURS), 1),
                                 torch.nn.Conv2d(c, 1 + len(shapes.SHAPES), 1)])
    params = list(model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    data = torch.utils.data.DataLoader(PatchBatches(batch, steps, grid=model.config.grid),
                                       batch_size=None, num_workers=1, prefetch_factor=4)
    hist, t0 = [], time.perf_counter()
    for step, (pix, col, shp) in enumerate(data):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        f = model.vision_tower(pix)
        loss = F.cross_entropy(heads[0](f), col) + F.cross_entropy(heads[1](f), shp)
        bg = (col == 0).unsqueeze(1).to(f.dtype)
        energy = (f.pow(2) * bg).sum() / (bg.sum() * f.shape[1]).clamp(min=1)
        loss = loss + quiet * energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            with torch.no_grad():
                fg = col > 0
                acc_c = float((heads[0](f).argmax(1) == col)[fg].float().mean()) if fg.any() else 0
                acc_s = float((heads[1](f).argmax(1) == shp)[fg].float().mean()) if fg.any() else 0
            hist.append({"step": step + 1, "loss": loss.item(), "object_cell_colour_acc": acc_c,
                         "object_cell_shape_acc": acc_s, "background_energy": energy.item(),
                         "minutes": (time.perf_counter() - t0) / 60})
            log(f"[vision] step {step + 1}/{steps} loss {loss.item():.3f} object-cell accuracy "
                f"colour {acc_c:.3f} shape {acc_s:.3f} background energy {energy.item():.3f}")
    return hist


def proxy_labels(sc, grid: int):
    """(colour, shape) class of every cell of a ``grid`` x ``grid`` split of the scene, as
    :func:`patch_labels`, plus, for any named object that holds no cell of its own (it covers no
    cell by at least 30 %, or others cover those cells more: small objects on a coarse grid),
    the free cell it covers most, so every named object is somewhere with its own colour and
    shape."""
    col, shp = patch_labels(sc, grid)
    S = sc.image.shape[0]
    cell = S // grid
    colours = list(shapes.COLOURS)
    yy, xx = np.mgrid[0:grid, 0:grid]
    for k in sc.named:
        c, s = 1 + colours.index(sc.colours[k]), 1 + shapes.SHAPES.index(sc.shapes[k])
        if ((col == c) & (shp == s)).any():
            continue
        ys, xs = np.nonzero(sc.masks[k])
        cy, cx = ys.mean() / cell - 0.5, xs.mean() / cell - 0.5
        cover = sc.masks[k].reshape(grid, cell, grid, cell).mean(axis=(1, 3))
        free = col == 0
        if not free.any():
            continue
        # the free cell the object covers most; ties (and no cover at all) by nearness to its
        # centre, so that an object whose centre cell another object holds still gets a cell
        key = np.where(free, cover - 1e-3 * np.hypot(yy - cy, xx - cx), -np.inf)
        y, x = np.unravel_index(int(np.argmax(key)), key.shape)
        col[y, x], shp[y, x] = c, s
    return col, shp


def _label_tables(model, tok):
    """(colour table, shape table): row 0 zeros, row i the embedding of the i-th colour / shape
    word (the language model's own input embeddings, so they train with it)."""
    emb = model.model.embed_tokens.weight
    zero = emb.new_zeros(1, emb.shape[1])
    cid = [tok.convert_tokens_to_ids(c) for c in shapes.COLOURS]
    sid = [tok.convert_tokens_to_ids(s) for s in shapes.SHAPES]
    return torch.cat([zero, emb[cid]]), torch.cat([zero, emb[sid]])


def proxy_image_tokens(model, tok, col, shp, real_layout: bool):
    """Text-only stand-in for the image tokens: every cell of a (B, g, g) label grid becomes a
    fixed 2-D position code (:func:`~diffcam.models.bundled.sincos_2d`, times 0.5) plus the
    embeddings of its colour and shape words.  With ``real_layout`` (g must be the model's grid)
    the tokens are packed like the real image -- base grid (3x3 averages), then rows each followed
    by the newline embedding; otherwise the g * g tokens alone."""
    from .bundled import sincos_2d

    B, g, _ = col.shape
    d = model.config.text_config.hidden_size
    ct, st = _label_tables(model, tok)
    cells = ct[col] + st[shp]                                         # (B, g, g, d)
    hires = 0.5 * sincos_2d(g, d).reshape(1, g, g, d) + cells
    if not real_layout:
        return hires.reshape(B, g * g, d)
    cfg = model.config
    if g != cfg.grid:
        raise ValueError(f"the real layout needs the model's grid ({cfg.grid}), got {g}")
    b = cfg.base_grid
    base = F.avg_pool2d(cells.permute(0, 3, 1, 2), cfg.base_pool).permute(0, 2, 3, 1)
    base = 0.5 * sincos_2d(b, d).reshape(1, b, b, d) + base
    nl = model.image_newline.expand(B, g, 1, d)
    return torch.cat([base.reshape(B, b * b, d),
                      torch.cat([hires, nl], dim=2).reshape(B, g * (g + 1), d)], dim=1)


def alignment_targets(model, tok, col, shp):
    """What the real image tokens are pulled towards (:func:`alignment_loss`): the proxy tokens
    of the model's grid in the real layout, without gradient."""
    with torch.no_grad():
        return proxy_image_tokens(model, tok, col, shp, real_layout=True)


def alignment_loss(model, tok, pixels, col, shp):
    """Mean squared distance between the projector's image tokens (base grid and grid cells; the
    newline tokens are the same on both sides and left out) and :func:`alignment_targets`."""
    feats = model.image_features(pixels)
    tgt = alignment_targets(model, tok, col, shp)
    g, b = model.config.grid, model.config.base_grid
    keep = torch.ones(feats.shape[1], dtype=torch.bool)
    keep[b * b + g::g + 1] = False                                    # newline column
    return F.mse_loss(feats[:, keep], tgt[:, keep])


def loss_stage1_embeds(model, embeds, n_img, batch, objective: str = "mdm"):
    """The proxy warm-up's loss: :func:`loss_stage1` (``objective="mdm"``: the whole response
    masked, cross-entropy on the answer words) or :func:`loss_ar` (``"ar"``: teacher-forced
    next-token cross-entropy on the answer and its ``<eos>``) with the image tokens given
    (``embeds``: (B, n_img, D)) instead of pixels.  Returns (loss, answer-word accuracy)."""
    if objective not in ("mdm", "ar"):
        raise ValueError(f"objective must be 'mdm' or 'ar', got {objective!r}")
    _, ids, att, starts, lens = batch[:5]
    resp = _response_mask(ids, starts, lens)
    inp = ids if objective == "ar" else \
        torch.where(resp, torch.full_like(ids, model.config.mask_token_id), ids)
    emb = model.model.embed_tokens
    x = torch.cat([emb(inp[:, :1]), embeds, emb(inp[:, 2:])], dim=1)
    att_e = torch.cat([att[:, :1], att.new_ones(att.shape[0], n_img), att[:, 2:]], dim=1)
    h = model.model(inputs_embeds=x, attention_mask=att_e, use_cache=False).last_hidden_state
    # ids[:, j >= 2] sits at position j + n_img - 1: scored there (mdm) or one before (ar)
    start = n_img + 1 if objective == "mdm" else n_img
    lg, tgt = model.lm_head(h[:, start:start + ids.shape[1] - 2]), ids[:, 2:]
    words = (resp[:, 2:] & (tgt != model.config.eos_token_id)).to(lg.dtype)
    w = resp[:, 2:].to(lg.dtype) if objective == "ar" else words
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    acc = ((lg.argmax(-1) == tgt).to(lg.dtype) * words).sum() / words.sum().clamp(min=1)
    return (ce.reshape(tgt.shape) * w).sum() / w.sum().clamp(min=1), float(acc)


def parse_schedule(text: str) -> list:
    """``"4:500,8:300,12:300"`` -> ``[(4, 500), (8, 300), (12, 300)]`` (grid: steps)."""
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            g, n = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"grid schedule parts are GRID:STEPS, got {part!r}") from None
        if g < 1 or n < 0:
            raise ValueError(f"grid schedule needs GRID >= 1 and STEPS >= 0, got {part!r}")
        out.append((g, n))
    return out


def pretrain_proxy(model, tok, schedule, batch: int = 32, lr: float = 2e-3,
                   offset: int = 4_000_000, log=print, objective: str = "mdm") -> list:
    """Proxy warm-up of the language model (docs/bundled_model.md, "Why the lookup does not
    emerge"): stage-1 training on shapes-world questions whose image is replaced by
    :func:`proxy_image_tokens`, the grid growing as ``schedule`` says ([(grid, steps), ...]; a
    stage on the model's own grid uses the real layout).  On the full-size grid from the start
    the lookup questions stay at chance; learned on 4x4 first they carry over to larger grids.
    Trains everything the proxy touches (language model, embeddings, newline), with the loss of
    ``objective`` (:func:`loss_stage1_embeds`).  Returns the history."""
    params = [p for n, p in model.named_parameters()
              if not n.startswith(("vision_tower", "mm_projector", "base_pos", "hires_pos"))]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    kinds, w = tuple(KIND_WEIGHTS), tuple(KIND_WEIGHTS.values())
    total = sum(n for _, n in schedule)
    hist, t0, step = [], time.perf_counter(), 0
    for g, n in schedule:
        real = g == model.config.grid
        for _ in range(n):
            for grp in opt.param_groups:
                grp["lr"] = lr * min(1.0, (step + 1) / 50)
            lo = offset + step * batch
            pairs = list(shapes.samples("train", lo, lo + batch, kinds=kinds, weights=w))
            col, shp = label_grids([sc for sc, _ in pairs], g, proxy_labels)
            b = make_batch(tok, pairs, objective, with_pixels=False)
            img = proxy_image_tokens(model, tok, col, shp, real)
            loss, acc = loss_stage1_embeds(model, img, img.shape[1], b, objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % 100 == 0 or step == total:
                hist.append({"step": step, "grid": g, "loss": loss.item(), "train_acc": acc,
                             "minutes": (time.perf_counter() - t0) / 60})
                log(f"[proxy] step {step}/{total} grid {g} loss {loss.item():.3f} "
                    f"train-acc {acc:.3f} {(time.perf_counter() - t0) / 60:.1f} min")
    return hist


def align_projector(model, tok, steps: int, batch: int = 32, lr: float = 3e-3,
                    offset: int = 6_000_000, log=print) -> list:
    """Train the projector and the grid position tables (everything else frozen) so that the
    real image tokens approach :func:`alignment_targets` -- the tokens the proxy-trained
    language model already reads (cosine learning-rate decay).  Returns the history."""
    params = list(model.mm_projector.parameters()) + [model.base_pos, model.hires_pos]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hist, t0 = [], time.perf_counter()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        scs = [shapes.scene("train", offset + step * batch + j) for j in range(batch)]
        col, shp = label_grids(scs, model.config.grid)
        loss = alignment_loss(model, tok, encode_images([sc.image for sc in scs]), col, shp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            with torch.no_grad():
                power = alignment_targets(model, tok, col, shp).pow(2).mean().item()
            hist.append({"step": step + 1, "mse": loss.item(), "target_power": power,
                         "minutes": (time.perf_counter() - t0) / 60})
            log(f"[align] step {step + 1}/{steps} mse {loss.item():.4f} (target power "
                f"{power:.4f}) {(time.perf_counter() - t0) / 60:.1f} min")
    return hist


def pretrain_projector_classifier(model, steps: int, batch: int = 64, lr: float = 3e-3,
                                  offset: int = 7_000_000, log=print) -> list:
    """Train the classifier of a ``label_bottleneck`` projector
    (:class:`~diffcam.models.bundled.LabelBottleneckProjector`) on the frozen vision tower's
    features: cross-entropy against the :func:`proxy_labels` of every cell (colour group and
    shape group), cosine learning rate.  Nothing else changes.  Returns the history (accuracy
    on the cells of named objects, and how often a background cell is called background)."""
    from .bundled import LabelBottleneckProjector

    proj = model.mm_projector
    if not isinstance(proj, LabelBottleneckProjector):
        raise ValueError("pretrain_projector_classifier needs projector_type='label_bottleneck'")
    params = [p for n, p in proj.named_parameters() if not n.startswith("table")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gc, gs = proj.groups
    g = model.config.grid
    hist, t0 = [], time.perf_counter()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        scs = [shapes.scene("train", offset + step * batch + j) for j in range(batch)]
        col, shp = label_grids(scs, g, proxy_labels)
        with torch.no_grad():
            f = model.vision_tower(encode_images([sc.image for sc in scs]))
        lg = proj.logits(f)
        lc, ls = lg[..., :gc], lg[..., gc:]
        loss = F.cross_entropy(lc.reshape(-1, gc), col.reshape(-1)) + \
            F.cross_entropy(ls.reshape(-1, gs), shp.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            with torch.no_grad():
                fg = col > 0
                pc, ps = lc.argmax(-1), ls.argmax(-1)
                rec = {"step": step + 1, "loss": loss.item(),
                       "object_cell_colour_acc": float((pc == col)[fg].float().mean()),
                       "object_cell_shape_acc": float((ps == shp)[fg].float().mean()),
                       "background_acc": float(((pc == 0) & (ps == 0))[~fg].float().mean()),
                       "minutes": (time.perf_counter() - t0) / 60}
            hist.append(rec)
            log(f"[projector] step {step + 1}/{steps} loss {rec['loss']:.3f} object-cell "
                f"colour {rec['object_cell_colour_acc']:.3f} shape "
                f"{rec['object_cell_shape_acc']:.3f} background {rec['background_acc']:.3f}")
    return hist


def set_projector_table(model, tok) -> None:
    """Point a ``label_bottleneck`` projector's table at the language model's current word
    embeddings: column 0 of each group zero (nothing named), column i the i-th colour / shape
    word -- so a confidently classified cell becomes exactly a proxy token
    (:func:`proxy_image_tokens`)."""
    ct, st = _label_tables(model, tok)
    with torch.no_grad():
        model.mm_projector.table.weight.copy_(torch.cat([ct, st]).T)


def prompt_ids(tok, prompt: str) -> list:
    """``<bos> <image-placeholder> question...`` (the prompt must start with ``<image>``)."""
    if not prompt.startswith("<image>"):
        raise ValueError(f"shapes prompts start with <image>: {prompt!r}")
    return [tok.bos_token_id, IMAGE_PLACEHOLDER] + tok.encode(prompt[len("<image>"):].strip(),
                                                               add_special_tokens=False)


def make_batch(tok, pairs, objective: str = "mdm", gen_length: int = GEN_LENGTH,
               with_pixels: bool = True, label_grid: int = 0):
    """(pixels, ids, attention mask, response starts, response lengths) of (scene, QA) pairs;
    ``pixels`` is None without ``with_pixels``; with ``label_grid`` two more items, the
    :func:`patch_labels` colour and shape grids (B, g, g) of the scenes."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    rows, starts, lens = [], [], []
    for sc, qa in pairs:
        p = prompt_ids(tok, qa.prompt)
        a = tok.encode(qa.answer, add_special_tokens=False)
        if objective == "mdm":
            if len(a) > gen_length:
                raise ValueError(f"answer longer than gen_length={gen_length}: {qa.answer!r}")
            r = a + [eos] * (gen_length - len(a))
        else:
            r = a + [eos]
        starts.append(len(p))
        lens.append(len(r))
        rows.append(p + r)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    att = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
    pixels = encode_images([sc.image for sc, _ in pairs]) if with_pixels else None
    out = (pixels, ids, att, torch.tensor(starts), torch.tensor(lens))
    if label_grid:
        out = out + label_grids([sc for sc, _ in pairs], label_grid)
    return out


def _expanded(model, ids, att, starts):
    """Attention mask and response starts in the expanded sequence (one image per row)."""
    n_img = model.config.image_tokens
    att_e = torch.cat([att[:, :1], att.new_ones(att.shape[0], n_img), att[:, 2:]], dim=1)
    return att_e, starts + n_img - 1


def _response_view(model, logits, ids, objective):
    """(logits that score ids[:, 2:], ids[:, 2:]): ids[:, j >= 2] sits at expanded position
    j + n_img - 1; a masked-diffusion row scores its own position, a causal row the next one."""
    n_img = model.config.image_tokens
    L = ids.shape[1] - 2
    start = n_img + 1 if objective == "mdm" else n_img
    return logits[:, start:start + L], ids[:, 2:]


def _response_mask(ids, starts, lens):
    """(B, L) bool: the response positions ``starts <= j < starts + lens`` of every row."""
    pos = torch.arange(ids.shape[1])[None]
    return (pos >= starts[:, None]) & (pos < (starts + lens)[:, None])


def loss_mdm(model, batch, gen: torch.Generator, eps: float = 1e-3, weighting: str = "llada"):
    pixels, ids, att, starts, lens = batch[:5]
    B = ids.shape[0]
    # stratified masking ratios (one per 1/B slice of (0, 1), shuffled): the same U(eps, 1)
    # marginal as LLaDA, with a lower-variance batch estimate of the loss
    u = (torch.rand(1, generator=gen) + torch.arange(B)) / B
    u = u[torch.randperm(B, generator=gen)]
    t = (1 - eps) * u + eps
    resp = _response_mask(ids, starts, lens)
    masked = resp & (torch.rand(ids.shape, generator=gen) < t[:, None])
    noisy = torch.where(masked, torch.full_like(ids, model.config.mask_token_id), ids)
    att_e, _ = _expanded(model, ids, att, starts)
    logits = model(input_ids=noisy, pixel_values=pixels, attention_mask=att_e)
    lg, tgt = _response_view(model, logits, ids, "mdm")
    m = masked[:, 2:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    if weighting in ("mean", "content"):  # mean over masked tokens ("content": <eos> x 0.1)
        w = m.to(ce.dtype)
        if weighting == "content":
            w = w * torch.where(tgt == model.config.eos_token_id, 0.1, 1.0)
        return (ce.reshape(tgt.shape) * w).sum() / w.sum().clamp(min=1), masked.sum().item()
    ce = ce.reshape(tgt.shape) * m / t[:, None]
    return (ce.sum(1) / lens).mean(), masked.sum().item()


def loss_stage1(model, batch):
    """Warm-up loss before LLaDA's: the whole response masked, cross-entropy averaged over the
    answer words only (the ``<eos>`` padding left out).  Returns (loss, number of scored
    tokens).  In the session-3 experiments (docs/bundled_model.md) this is the first loss under
    which the colour questions rose above chance on the full question mix."""
    pixels, ids, att, starts, lens = batch[:5]
    resp = _response_mask(ids, starts, lens)
    noisy = torch.where(resp, torch.full_like(ids, model.config.mask_token_id), ids)
    att_e, _ = _expanded(model, ids, att, starts)
    logits = model(input_ids=noisy, pixel_values=pixels, attention_mask=att_e)
    lg, tgt = _response_view(model, logits, ids, "mdm")
    w = (resp[:, 2:] & (tgt != model.config.eos_token_id)).to(lg.dtype)
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    return (ce.reshape(tgt.shape) * w).sum() / w.sum().clamp(min=1), int(w.sum())


def loss_ar(model, batch):
    pixels, ids, att, starts, lens = batch[:5]
    att_e, _ = _expanded(model, ids, att, starts)
    logits = model(input_ids=ids, pixel_values=pixels, attention_mask=att_e)
    resp = _response_mask(ids, starts, lens)
    lg, tgt = _response_view(model, logits, ids, "ar")
    m = resp[:, 2:]
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
    ce = ce.reshape(tgt.shape) * m
    return ce.sum() / m.sum(), int(m.sum())


@torch.no_grad()
def quick_eval(model, tok, batch, objective: str, kinds=None):
    """Answer-word accuracy of a one-shot prediction of the whole (fully masked) response (mdm)
    or of teacher-forced next-token prediction (ar) on a fixed validation batch; with ``kinds``
    (the question kind of every row) a dict ``{"all": acc, kind: acc, ...}``."""
    model.eval()
    pixels, ids, att, starts, lens = batch[:5]
    resp = _response_mask(ids, starts, lens)
    att_e, _ = _expanded(model, ids, att, starts)
    if objective == "mdm":
        noisy = torch.where(resp, torch.full_like(ids, model.config.mask_token_id), ids)
        logits = model(input_ids=noisy, pixel_values=pixels, attention_mask=att_e)
    else:
        logits = model(input_ids=ids, pixel_values=pixels, attention_mask=att_e)
    lg, tgt = _response_view(model, logits, ids, objective)
    m = resp[:, 2:] & (tgt != tok.eos_token_id)     # answer words only (not the <eos> padding)
    pred = lg.argmax(-1)
    model.train()
    hit = (pred == tgt) & m
    if kinds is None:
        return float(hit.sum() / m.sum())
    out = {"all": float(hit.sum() / m.sum())}
    for k in dict.fromkeys(kinds):
        rows = torch.tensor([kk == k for kk in kinds])
        out[k] = float(hit[rows].sum() / m[rows].sum().clamp(min=1))
    return out


def build_model(tok, objective: str, hidden: int, layers: int, heads: int, seed: int,
                vision_extra_layers: int = 0, end_positions: int = 0,
                projector: str = "mlp2x_gelu"):
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    tc = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                     num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=heads, max_position_embeddings=256,
                     tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tc._attn_implementation = "sdpa"
    cfg = DiffcamTinyConfig(text_config=tc, causal=(objective == "ar"),
                            mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            vision_extra_layers=vision_extra_layers,
                            end_positions=end_positions if objective == "mdm" else 0,
                            projector_type=projector)
    cfg._attn_implementation = "sdpa"
    return DiffcamTinyForMaskedDiffusion(cfg)


def reinit_language_model(model, linear_std: float, embed_std: float, seed: int = 0) -> None:
    """Re-draw the language model's weights (seeded): every linear layer of ``model.model`` and
    the LM head with std ``linear_std``, the token (and end-position) embeddings with
    ``embed_std``; norms, projector and vision tower unchanged."""
    if not (linear_std > 0 and embed_std > 0):
        raise ValueError(f"init stds must be > 0, got {linear_std} and {embed_std}")
    g = torch.Generator().manual_seed(seed + 17)
    with torch.no_grad():
        mods = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
        for m in mods + [model.lm_head]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * linear_std)
        tables = [model.model.embed_tokens] + ([model.model.end_pos]
                                               if hasattr(model.model, "end_pos") else [])
        for e in tables:
            e.weight.copy_(torch.randn(e.weight.shape, generator=g) * embed_std)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m diffcam.models.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", choices=("mdm", "ar"), default="mdm")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--max-minutes", type=float, default=57.0,
                    help="stop early (and still save) when the run would exceed this")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--vision-steps", type=int, default=600,
                    help="vision-tower pre-training steps (per-cell colour/shape labels); 0: none")
    ap.add_argument("--weighting", choices=("llada", "mean", "content"), default="llada",
                    help="masked-diffusion loss: LLaDA's 1/t-weighted sum over the response, "
                         "the plain mean over masked tokens, or that mean with <eos> padding "
                         "weighted 0.1")
    ap.add_argument("--end-positions", type=int, default=32,
                    help="learned embeddings of the distance from the sequence end (masked "
                         "diffusion only; 0: RoPE alone)")
    ap.add_argument("--vision-lr", type=float, default=2e-3,
                    help="peak learning rate of vision pre-training (cosine to 0)")
    ap.add_argument("--vision-quiet", type=float, default=0.05,
                    help="weight of the background-feature penalty in vision pre-training")
    ap.add_argument("--vision-extra-layers", type=int, default=2,
                    help="residual 3x3 convolutions after the vision tower's fourth (wider "
                         "receptive field)")
    ap.add_argument("--vision-lr-scale", type=float, default=0.0,
                    help="learning-rate factor of the vision tower during fine-tuning "
                         "(0: frozen after pre-training)")
    ap.add_argument("--stage1-steps", type=int, default=2000,
                    help="first fine-tuning steps with the whole response masked and the loss on "
                         "the answer words only (masked diffusion only; see loss_stage1)")
    ap.add_argument("--curriculum-steps", type=int, default=0,
                    help="first fine-tuning steps on scenes with one or two objects")
    ap.add_argument("--init-std", type=float, default=0.02,
                    help="std of the language model's linear layers at initialisation (0.02: the "
                         "class default; docs/bundled_model.md, session 6: 0.08 with "
                         "--embed-std 1.0 let a text proxy learn the lookup questions)")
    ap.add_argument("--embed-std", type=float, default=0.02,
                    help="std of the token and end-position embedding tables at initialisation")
    ap.add_argument("--init-vision", default=None,
                    help="copy the vision tower (and projector) from this saved model and skip "
                         "vision pre-training (the autoregressive twin shares the tower)")
    ap.add_argument("--proxy", default="",
                    help="proxy warm-up of the language model before real images, a grid "
                         "schedule 'GRID:STEPS,...' (e.g. 4:500,8:300,12:300; see "
                         "pretrain_proxy); empty: none")
    ap.add_argument("--proxy-lr", type=float, default=None,
                    help="learning rate of the proxy warm-up (default: --lr)")
    ap.add_argument("--align-steps", type=int, default=0,
                    help="after the proxy warm-up: steps that fit the projector to the proxy "
                         "tokens (align_projector)")
    ap.add_argument("--align-weight", type=float, default=0.0,
                    help="weight of alignment_loss kept as an auxiliary loss during fine-tuning")
    ap.add_argument("--projector", default="mlp2x_gelu", choices=PROJECTOR_TYPES,
                    help="projector type (diffcam.models.bundled.PROJECTOR_TYPES)")
    ap.add_argument("--projector-steps", type=int, default=0,
                    help="label_bottleneck: classifier pre-training steps on the frozen tower "
                         "(pretrain_projector_classifier), before the proxy warm-up")
    ap.add_argument("--init-model", default=None,
                    help="fine-tune: load every weight from this folder (a model of the same "
                         "--objective) and skip the vision, projector and proxy stages")
    ap.add_argument("--kind-weights", default=None, type=parse_kind_weights,
                    help="question mix of training, e.g. describe:0.3,colour:0.3,presence:0.1,"
                         "count:0.3 (default: KIND_WEIGHTS)")
    ap.add_argument("--count-balance", action="store_true",
                    help="draw the training count questions with balanced answers "
                         "(balanced_count_question)")
    ap.add_argument("--tie-plurals", action="store_true",
                    help="before training (after --init-model): copy each shape word's input "
                         "embedding into its plural's row (tie_plurals)")
    ap.add_argument("--start-step", type=int, default=0,
                    help="first step of the training scene stream (scenes start-step * batch "
                         "on): a fine-tune past the first run's scenes sees new ones")
    ap.add_argument("--out", default=None, help="output folder (default: the packaged weights)")
    args = ap.parse_args(argv)
    if args.start_step < 0:
        raise SystemExit("--start-step must be >= 0")
    if args.projector_steps and args.projector != "label_bottleneck":   # before any training
        raise SystemExit("--projector-steps is for --projector label_bottleneck")

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or weights_dir("diffusion" if args.objective == "mdm" else "autoregressive")
    tok = build_tokenizer()
    model = build_model(tok, args.objective, args.hidden, args.layers, args.heads, args.seed,
                        args.vision_extra_layers, args.end_positions, args.projector)
    if args.init_model:
        if args.init_vision or args.proxy or args.projector_steps or args.align_steps:
            raise SystemExit("--init-model loads every weight: it excludes --init-vision, "
                             "--proxy, --projector-steps and --align-steps")
        model = DiffcamTinyForMaskedDiffusion.from_pretrained(args.init_model)
        if bool(model.config.causal) != (args.objective == "ar"):
            raise SystemExit(f"--init-model {args.init_model}: a "
                             f"{'causal' if model.config.causal else 'masked-diffusion'} model, "
                             f"but --objective {args.objective}")
        args.vision_steps = 0
        args.projector = getattr(model.config, "projector_type", "mlp2x_gelu")
    elif args.init_std != 0.02 or args.embed_std != 0.02:
        reinit_language_model(model, args.init_std, args.embed_std, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] objective={args.objective} params={n_params / 1e6:.2f}M steps={args.steps} "
          f"batch={args.batch} threads={torch.get_num_threads()} -> {out}", flush=True)

    def lr_at(s, minutes=0.0):
        """Warm-up, then cosine decay to 5 %.  Progress is the larger of the step fraction and
        the time fraction of --max-minutes, so a slow (shared) machine still ends the schedule
        inside the time budget (the run then does fewer steps; training_log.json records them)."""
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        p = (s - args.warmup) / max(1, args.steps - args.warmup)
        p = min(1.0, max(p, minutes / budget))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    t_start = time.perf_counter()
    log = {"args": vars(args), "params": n_params, "history": []}
    if args.init_model:
        log["init_model"] = args.init_model
    elif args.init_vision:
        src = DiffcamTinyForMaskedDiffusion.from_pretrained(args.init_vision)
        model.vision_tower.load_state_dict(src.vision_tower.state_dict())
        if getattr(src.config, "projector_type", "mlp2x_gelu") == args.projector:
            model.mm_projector.load_state_dict(src.mm_projector.state_dict())
            with torch.no_grad():
                for name in ("base_pos", "hires_pos"):
                    getattr(model, name).copy_(getattr(src, name))
        log["init_vision"] = args.init_vision
    elif args.vision_steps:
        log["vision_history"] = pretrain_vision(model, args.vision_steps, lr=args.vision_lr,
                                                quiet=args.vision_quiet,
                                                log=lambda m: print(m, flush=True))
    if args.projector_steps:
        log["projector_history"] = pretrain_projector_classifier(
            model, args.projector_steps, log=lambda m: print(m, flush=True))
    if args.tie_plurals:     # before the language model trains (warm-up or fine-tune)
        tie_plurals(model, tok)
    if args.proxy:
        proxy_lr = args.lr if args.proxy_lr is None else args.proxy_lr
        log["proxy_history"] = pretrain_proxy(model, tok, parse_schedule(args.proxy),
                                              batch=args.batch, lr=proxy_lr,
                                              log=lambda m: print(m, flush=True),
                                              objective=args.objective)
    if args.projector == "label_bottleneck" and not args.init_model:   # (loaded with the rest)
        set_projector_table(model, tok)
    if args.align_steps:
        log["align_history"] = align_projector(model, tok, args.align_steps, batch=args.batch,
                                               log=lambda m: print(m, flush=True))
    vision = list(model.vision_tower.parameters())
    if args.vision_lr_scale == 0:
        for p in vision:
            p.requires_grad_(False)
    ids_v = {id(p) for p in vision}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids_v], "scale": 1.0}]
    if args.vision_lr_scale > 0:
        groups.append({"params": vision, "scale": args.vision_lr_scale})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    val_pairs = list(shapes.samples("val", 0, 256, kinds=tuple(KIND_WEIGHTS),
                                    weights=tuple(KIND_WEIGHTS.values())))
    val_kinds = [qa.kind for _, qa in val_pairs]
    val = make_batch(tok, val_pairs, args.objective)
    data = torch.utils.data.DataLoader(Batches(tok, args.batch, args.steps,
                                               start_step=args.start_step,
                                               kind_weights=args.kind_weights,
                                               count_balance=args.count_balance,
                                               objective=args.objective,
                                               curriculum=args.curriculum_steps,
                                               label_grid=model.config.grid
                                               if args.align_weight else 0),
                                       batch_size=None, num_workers=1, prefetch_factor=4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    budget = args.max_minutes - (t0 - t_start) / 60
    model.train()
    run_loss, run_n, done = 0.0, 0, 0
    for step, batch in enumerate(data):
        lr = lr_at(step, (time.perf_counter() - t0) / 60)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        if args.objective == "mdm" and step < args.stage1_steps:
            loss, _ = loss_stage1(model, batch)
        elif args.objective == "mdm":
            loss, _ = loss_mdm(model, batch, gen, weighting=args.weighting)
        else:
            loss, _ = loss_ar(model, batch)
        if args.align_weight:
            loss = loss + args.align_weight * alignment_loss(model, tok, batch[0], batch[5],
                                                             batch[6])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       1.0)
        opt.step()
        run_loss += loss.item()
        run_n += 1
        done = step + 1
        elapsed = time.perf_counter() - t0
        if done % args.eval_every == 0 or done == args.steps:
            acc = quick_eval(model, tok, val, args.objective, val_kinds)
            rec = {"step": done, "loss": run_loss / run_n, "val_token_acc": acc["all"],
                   "val_token_acc_by_kind": acc, "minutes": elapsed / 60, "lr": lr}
            log["history"].append(rec)
            eta = elapsed / done * (args.steps - done) / 60
            kinds = " ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "all")
            print(f"[train] step {done}/{args.steps} loss {rec['loss']:.4f} val-acc "
                  f"{acc['all']:.3f} ({kinds}) {elapsed / 60:.1f} min (eta {eta:.1f} min)",
                  flush=True)
            run_loss, run_n = 0.0, 0
        if elapsed / 60 * (done + 1) / done > budget:
            print(f"[train] stopping at step {done}: the next step would pass "
                  f"--max-minutes={args.max_minutes}", flush=True)
            break
    minutes = (time.perf_counter() - t_start) / 60
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log.update({"steps_done": done, "train_minutes": minutes, "scenes_seen": done * args.batch,
                "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                           f"torch {torch.__version__}, python {sys.version.split()[0]}"})
    with open(os.path.join(out, "training_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"[train] saved to {out} after {done} steps, {minutes:.1f} min", flush=True)
    return log


if __name__ == "__main__":
    main()
