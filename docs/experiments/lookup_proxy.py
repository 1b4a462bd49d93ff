"""Text-only proxy of the bundled model's lookup questions (session 6, docs/bundled_model.md,
"Why the lookup does not emerge").  Not part of the package or the tests: a record of how the
numbers of the model card were made.

The bundled model's language model (same class and size, fresh weights) reads a G x G "image"
in which the cell under each named object's centre holds embedding(colour word) +
embedding(shape word) and every cell a fixed 2-D sine-cosine position code; no vision tower.
It is trained with the stage-1 loss on shapes-world questions and prints the one-shot answer
accuracy on validation questions every 100 steps.

    PYTHONPATH=. python docs/experiments/lookup_proxy.py --grid 4 --maxn 2            # std 0.02
    PYTHONPATH=. python docs/experiments/lookup_proxy.py --grid 4 --maxn 2 --init 0.08 --emb 1.0
    PYTHONPATH=. python docs/experiments/lookup_proxy.py --grid 12 --maxn 2 --init 0.08 --emb 1.0
    # grid curriculum: 4x4 for 500 steps, 8x8 for 500, then 12x12 (evaluated on 12x12 too)
    PYTHONPATH=. python docs/experiments/lookup_proxy.py --grid 12 --maxn 2 --init 0.08 \
        --emb 1.0 --grow 4:500,8:500,12:100000 --minutes 12
"""
import argparse, time, math
import numpy as np, torch, torch.nn.functional as F
from diffcam.data import shapes
from diffcam.models import train as T
from diffcam.models.bundled import build_tokenizer, sincos_2d
ap = argparse.ArgumentParser()
ap.add_argument("--grid", type=int, default=4)
ap.add_argument("--grow", default="", help="grid curriculum 'G1:steps,G2:steps,...' (the last grid "
                "is kept until --minutes; evaluation on the current grid and on --grid)")
ap.add_argument("--minutes", type=float, default=6)
ap.add_argument("--kinds", default="colour,presence")
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--maxn", type=int, default=0)
ap.add_argument("--init", type=float, default=0.02)
ap.add_argument("--emb", type=float, default=0.02)
ap.add_argument("--posscale", type=float, default=0.5)
args = ap.parse_args()
torch.set_num_threads(args.threads)
tok = build_tokenizer()
kinds = tuple(args.kinds.split(","))
model = T.build_model(tok, "mdm", 128, 4, 4, 0, 2, 32)
lm, emb = model.model, model.model.embed_tokens
with torch.no_grad():
    for n, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, args.init)
    torch.nn.init.normal_(emb.weight, 0, args.emb)
G = args.grid
POS = {}
def pos_for(g):
    if g not in POS:
        POS[g] = args.posscale * sincos_2d(g, 128)
    return POS[g]
SCHED = [(int(a), int(b)) for a, b in (x.split(":") for x in args.grow.split(",") if x)]
def grid_at(step):
    for g, n in SCHED:
        if step < n:
            return g
        step -= n
    return SCHED[-1][0] if SCHED else args.grid
opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("vision")], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
cid = {c: tok.convert_tokens_to_ids(c) for c in shapes.COLOURS}
sid = {s: tok.convert_tokens_to_ids(s) for s in shapes.SHAPES}

def batch(pairs, G):
    rows, starts, lens, cells = [], [], [], []
    for sc, qa in pairs:
        p = tok.encode(qa.prompt[len("<image>"):].strip(), add_special_tokens=False)
        a = tok.encode(qa.answer, add_special_tokens=False)
        r = a + [tok.eos_token_id] * (18 - len(a))
        rows.append(p + r); starts.append(len(p)); lens.append(18)
        cl = []
        for k in sc.named:
            ys, xs = np.nonzero(sc.masks[k])
            cy, cx = int(ys.mean() * G / 96), int(xs.mean() * G / 96)
            cl.append((cy * G + cx, cid[sc.colours[k]], sid[sc.shapes[k]]))
        cells.append(cl)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tok.pad_token_id); att = torch.zeros((len(rows), 1 + G * G + L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r); att[i, :1 + G * G + len(r)] = 1
    return ids, att, torch.tensor(starts), torch.tensor(lens), cells, G

def forward(ids, att, starts, lens, cells, G, masked):
    B = ids.shape[0]
    img = pos_for(G).expand(B, G * G, 128).clone()
    for i, cl in enumerate(cells):
        for c, a, b in cl:
            img[i, c] = img[i, c] + emb.weight[a] + emb.weight[b]
    noisy = torch.where(masked, torch.full_like(ids, tok.mask_token_id), ids)
    x = torch.cat([emb(torch.full((B, 1), tok.bos_token_id)), img, emb(noisy)], 1)
    h = lm(inputs_embeds=x, attention_mask=att, use_cache=False).last_hidden_state
    return model.lm_head(h[:, 1 + G * G:])

def pairs_at(split, lo, hi):
    out = []
    for i in range(lo, hi):
        r = shapes._rng(split, i, salt=11)
        if args.maxn:
            sc = shapes.render_scene(r, n_objects=int(r.integers(1, args.maxn + 1))); sc.split, sc.index = split, i
        else:
            sc = shapes.scene(split, i)
        out.append((sc, shapes.question(sc, kinds[int(r.integers(0, len(kinds)))], r)))
    return out
vp = [p for p in pairs_at("val", 10000, 10400) if p[0].n_named >= min(2, args.maxn or 2)][:256]
vk = [qa.kind for _, qa in vp]
def evaluate(G):
    ids, att, st, ln, cells, G = batch(vp, G)
    resp = T._response_mask(ids, st, ln)
    with torch.no_grad():
        lg = forward(ids, att, st, ln, cells, G, resp)
    m = resp & (ids != tok.eos_token_id)
    hit = (lg.argmax(-1) == ids) & m
    out = {}
    for k in dict.fromkeys(vk):
        rows = torch.tensor([kk == k for kk in vk])
        out[k] = float(hit[rows].sum() / m[rows].sum())
    return out
t0 = time.perf_counter(); step = 0
while (time.perf_counter() - t0) / 60 < args.minutes:
    for g in opt.param_groups: g["lr"] = args.lr * min(1, (step + 1) / 50)
    g_now = grid_at(step)
    ids, att, st, ln, cells, _ = batch(pairs_at("train", 4_000_000 + step * args.batch, 4_000_000 + (step + 1) * args.batch), g_now)
    resp = T._response_mask(ids, st, ln)
    lg = forward(ids, att, st, ln, cells, g_now, resp)
    w = (resp & (ids != tok.eos_token_id)).float()
    loss = (F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids.reshape(-1), reduction="none").reshape(ids.shape) * w).sum() / w.sum()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); step += 1
    if step % 100 == 0:
        ev = {f"grid{g_now}": evaluate(g_now)}
        if args.grow and g_now != args.grid:
            ev[f"grid{args.grid}"] = evaluate(args.grid)
        print(f"step {step} {(time.perf_counter()-t0)/60:.1f}min loss {loss.item():.3f}", ev, flush=True)
