"""Proxy warm-up of the language model, then real images (session 6, docs/bundled_model.md,
"Why the lookup does not emerge").  Not part of the package or the tests: a record of how the
numbers of the model card were made.

1. proxy: the bundled model's language model (linear std --init, embeddings std --emb) on the
   text-only proxy of lookup_proxy.py with the grid growing (--grow, default 4x4 for 500 steps,
   8x8 for 300, 12x12 for 300), questions --pkinds;
2. alignment (--align-steps, language model frozen): the projector and grid positions are
   trained so that each 12x12 token approaches position code + embedding(colour) +
   embedding(shape) of the named object covering the cell (nothing for background), the 4x4
   base tokens the 3x3 average of those;
3. real: everything but the frozen shipped tower trained with the stage-1 loss on --kinds for
   --minutes; one-shot accuracy on 256 validation questions of scenes with >= 2 objects.

    PYTHONPATH=. python docs/experiments/lookup_transfer.py --pkinds colour,presence --minutes 8
"""
import argparse, time, math
import numpy as np, torch, torch.nn.functional as F
from diffcam.data import shapes
from diffcam.models import train as T
from diffcam.models.bundled import build_tokenizer, sincos_2d, DiffcamTinyForMaskedDiffusion, weights_dir
ap = argparse.ArgumentParser()
ap.add_argument("--minutes", type=float, default=12)
ap.add_argument("--kinds", default="colour,presence")
ap.add_argument("--pkinds", default="describe,colour,presence,count")
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--init", type=float, default=0.08)
ap.add_argument("--emb", type=float, default=1.0)
ap.add_argument("--pinit", type=float, default=0.1)
ap.add_argument("--grow", default="4:500,8:300,12:300")
ap.add_argument("--align-steps", type=int, default=200)
args = ap.parse_args()
torch.set_num_threads(args.threads)
tok = build_tokenizer()
src = DiffcamTinyForMaskedDiffusion.from_pretrained(weights_dir("diffusion"))
model = T.build_model(tok, "mdm", 128, 4, 4, 0, 2, 32)
model.vision_tower.load_state_dict(src.vision_tower.state_dict())
for p in model.vision_tower.parameters(): p.requires_grad_(False)
lm, emb = model.model, model.model.embed_tokens
with torch.no_grad():
    for n, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear): torch.nn.init.normal_(m.weight, 0, args.init)
    torch.nn.init.normal_(emb.weight, 0, args.emb); torch.nn.init.normal_(lm.end_pos.weight, 0, args.emb)
    for m in model.mm_projector:
        if isinstance(m, torch.nn.Linear): torch.nn.init.normal_(m.weight, 0, args.pinit)
POS = {}
def pos_for(g):
    if g not in POS: POS[g] = 0.5 * sincos_2d(g, 128)
    return POS[g]
SCHED = [(int(a), int(b)) for a, b in (x.split(":") for x in args.grow.split(","))]
cid = {c: tok.convert_tokens_to_ids(c) for c in shapes.COLOURS}
sid = {s: tok.convert_tokens_to_ids(s) for s in shapes.SHAPES}
def pbatch(pairs, G):
    rows, starts, cells = [], [], []
    for sc, qa in pairs:
        p = tok.encode(qa.prompt[len("<image>"):].strip(), add_special_tokens=False)
        a = tok.encode(qa.answer, add_special_tokens=False)
        rows.append(p + a + [tok.eos_token_id] * (18 - len(a))); starts.append(len(p))
        cl = []
        for k in sc.named:
            ys, xs = np.nonzero(sc.masks[k])
            cl.append((int(ys.mean() * G / 96) * G + int(xs.mean() * G / 96), cid[sc.colours[k]], sid[sc.shapes[k]]))
        cells.append(cl)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id); att = torch.zeros((len(rows), 1 + G * G + L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r); att[i, :1 + G * G + len(r)] = 1
    return ids, att, torch.tensor(starts), torch.full((len(rows),), 18), cells
def pforward(ids, att, cells, masked, G):
    B = ids.shape[0]
    img = pos_for(G).expand(B, G * G, 128).clone()
    for i, cl in enumerate(cells):
        for c, a, b in cl: img[i, c] = img[i, c] + emb.weight[a] + emb.weight[b]
    noisy = torch.where(masked, torch.full_like(ids, tok.mask_token_id), ids)
    x = torch.cat([emb(torch.full((B, 1), tok.bos_token_id)), img, emb(noisy)], 1)
    return model.lm_head(lm(inputs_embeds=x, attention_mask=att, use_cache=False).last_hidden_state[:, 1 + G * G:])
pk = tuple(args.pkinds.split(","))
steps_total = sum(n for _, n in SCHED)
def grid_at(step):
    for g, n in SCHED:
        if step < n: return g
        step -= n
    return SCHED[-1][0]
W = np.array([0.4 if k == "describe" else 0.2 for k in pk]); W /= W.sum()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
t0 = time.perf_counter()
for step in range(steps_total):
    G = grid_at(step)
    for g in opt.param_groups: g["lr"] = args.lr * min(1, (step + 1) / 50)
    pairs = []
    for i in range(4_000_000 + step * 32, 4_000_000 + (step + 1) * 32):
        r = shapes._rng("train", i, salt=11); sc = shapes.scene("train", i)
        pairs.append((sc, shapes.question(sc, pk[int(r.choice(len(pk), p=W))], r)))
    ids, att, st, ln, cells = pbatch(pairs, G)
    resp = T._response_mask(ids, st, ln)
    lg = pforward(ids, att, cells, resp, G)
    w = (resp & (ids != tok.eos_token_id)).float()
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids.reshape(-1), reduction="none").reshape(ids.shape)
    loss = (ce * w).sum() / w.sum()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if (step + 1) % 100 == 0:
        hit = ((lg.argmax(-1) == ids) & (w > 0)).float().sum() / w.sum()
        print(f"[proxy G={G}] step {step+1} {(time.perf_counter()-t0)/60:.1f}min loss {loss.item():.3f} train-acc {hit:.3f}", flush=True)
# alignment phase: projector outputs -> proxy tokens (LM frozen)
from diffcam.models.train import patch_labels
for p in list(lm.parameters()) + list(model.lm_head.parameters()): p.requires_grad_(False)
aopt = torch.optim.AdamW(list(model.mm_projector.parameters()) + [model.hires_pos, model.base_pos], lr=2e-3)
cols, shps = list(shapes.COLOURS), list(shapes.SHAPES)
E = emb.weight.detach()
col_e = torch.cat([torch.zeros(1, 128), E[[cid[c] for c in cols]]]); shp_e = torch.cat([torch.zeros(1, 128), E[[sid[x] for x in shps]]])
t2 = time.perf_counter()
for step in range(args.align_steps):
    scs = [shapes.scene("train", 6_000_000 + step * 32 + j) for j in range(32)]
    lab = [patch_labels(sc) for sc in scs]
    c = torch.from_numpy(np.stack([a for a, _ in lab])); sh = torch.from_numpy(np.stack([b for _, b in lab]))
    tgt_h = pos_for(12).reshape(1, 12, 12, 128) + col_e[c] + shp_e[sh]            # (B,12,12,D)
    tgt_b = pos_for(4).reshape(1, 4, 4, 128) + torch.nn.functional.avg_pool2d((col_e[c] + shp_e[sh]).permute(0, 3, 1, 2), 3).permute(0, 2, 3, 1)
    pix = T.encode_images([sc.image for sc in scs])
    f = model.image_features(pix)
    base = f[:, :16].reshape(-1, 4, 4, 128); hires = f[:, 16:].reshape(-1, 12, 13, 128)[:, :, :12]
    loss = F.mse_loss(hires, tgt_h) + F.mse_loss(base, tgt_b)
    aopt.zero_grad(); loss.backward(); aopt.step()
    if (step + 1) % 50 == 0:
        print(f"[align] step {step+1} {(time.perf_counter()-t2)/60:.1f}min mse {loss.item():.3f} (target norm2 {tgt_h.pow(2).mean().item():.3f})", flush=True)
for p in list(lm.parameters()) + list(model.lm_head.parameters()): p.requires_grad_(True)
# real phase
kinds = tuple(args.kinds.split(","))
def val_pairs():
    out, i = [], 0
    while len(out) < 256:
        sc = shapes.scene("val", 10_000 + i)
        if sc.n_named >= 2:
            r = shapes._rng("val", 10_000 + i, salt=5)
            qa = shapes.question(sc, kinds[i % len(kinds)], r)
            if qa.kind in kinds: out.append((sc, qa))
        i += 1
    return out
vp = val_pairs(); vk = [qa.kind for _, qa in vp]; val = T.make_batch(tok, vp, "mdm")
lm_params = [p for p in lm.parameters()] + list(model.lm_head.parameters())
step = 0; t1 = time.perf_counter()
while (time.perf_counter() - t1) / 60 < args.minutes:
    for g in opt.param_groups: g["lr"] = args.lr
    pairs = []
    for i in range(3_000_000 + step * 32, 3_000_000 + (step + 1) * 32):
        r = shapes._rng("train", i, salt=11); sc = shapes.scene("train", i)
        pairs.append((sc, shapes.question(sc, kinds[int(r.integers(0, len(kinds)))], r)))
    b = T.make_batch(tok, pairs, "mdm")
    loss, _ = T.loss_stage1(model, b)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0); opt.step()
    step += 1
    if step % 50 == 0:
        acc = T.quick_eval(model, tok, val, "mdm", vk)
        print(f"[real] step {step} {(time.perf_counter()-t1)/60:.1f}min loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
