"""Lookup experiment on the bundled model (session 6, docs/bundled_model.md, "Why the lookup
does not emerge").  Not part of the package or the tests: a record of how the numbers of the
model card were made.

Trains a language model (fresh, or the shipped one with ``--variant continue``) on the shipped,
frozen vision tower with the stage-1 loss (whole response masked, loss on the answer words) on
lookup questions only (``--kinds colour,presence``) and prints the one-shot answer accuracy on
256 validation questions of scenes with at least two named objects every 50 steps.

    PYTHONPATH=. python docs/experiments/lookup_real.py --variant fresh --minutes 10
    # clean per-cell tags instead of relying on the tower (an upper bound on the features):
    PYTHONPATH=. python docs/experiments/lookup_real.py --oracle 1 --init 0.08 --emb 1.0 --pinit 0.1

--oracle 1     add learned embeddings of each cell's true (colour, shape) label to the grid tokens
--init/--emb   std of the language model's linear layers / of its token and end-position tables
--pinit        std of the projector's linear layers (with --init != 0.02)
--maxobj N     train on scenes with 2..N objects
--aux p        a fraction p of copy questions ("<image> X ?" -> X)
--copy 1       answer every question with its own shape word (a copy task)
"""
import argparse, math, time, sys, json
import numpy as np, torch
from diffcam.data import shapes
from diffcam.models import train as T
from diffcam.models.bundled import DiffcamTinyForMaskedDiffusion, build_tokenizer, weights_dir

ap = argparse.ArgumentParser()
ap.add_argument("--variant", default="fresh")
ap.add_argument("--kinds", default="colour,presence")
ap.add_argument("--maxobj", type=int, default=0)   # 0: ordinary scenes
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--minutes", type=float, default=12)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--loss", default="stage1")
ap.add_argument("--oracle", type=int, default=0)
ap.add_argument("--init", type=float, default=0.02)
ap.add_argument("--copy", type=int, default=0)
ap.add_argument("--aux", type=float, default=0)
ap.add_argument("--emb", type=float, default=0.02)
ap.add_argument("--pinit", type=float, default=0.02)
ap.add_argument("--heads", type=int, default=4)
args = ap.parse_args()
torch.set_num_threads(args.threads)
tok = build_tokenizer()
kinds = tuple(args.kinds.split(","))
src = DiffcamTinyForMaskedDiffusion.from_pretrained(weights_dir("diffusion"))
if args.variant == "continue":
    model = src
else:
    model = T.build_model(tok, "mdm", 128, args.layers, args.heads, args.seed, 2, 32)
    if args.init != 0.02:
        with torch.no_grad():
            for n, m in model.model.named_modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, 0, args.init)
            torch.nn.init.normal_(model.model.embed_tokens.weight, 0, args.emb)
            torch.nn.init.normal_(model.model.end_pos.weight, 0, args.emb)
            for m in model.mm_projector:
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, 0, args.pinit)
    model.vision_tower.load_state_dict(src.vision_tower.state_dict())
    if args.variant == "fresh_proj":
        model.mm_projector.load_state_dict(src.mm_projector.state_dict())
TAGS = {}
if args.oracle:
    tag_c = torch.nn.Embedding(8, 128); tag_s = torch.nn.Embedding(8, 128)
    torch.nn.init.normal_(tag_c.weight, 0, 0.5); torch.nn.init.normal_(tag_s.weight, 0, 0.5)
    model.tag_c, model.tag_s = tag_c, tag_s
    orig = model.image_features
    def feats(pixels):
        out = orig(pixels)
        c, s_ = TAGS["c"], TAGS["s"]
        B = out.shape[0]
        add = (model.tag_c(c) + (model.tag_s(s_) if args.oracle == 1 else 0)).reshape(B, 12, 12, -1)
        add = torch.cat([add, torch.zeros(B, 12, 1, 128)], 2).reshape(B, 156, 128)
        return torch.cat([out[:, :16], out[:, 16:] + add], 1)
    model.image_features = feats
def set_tags(pairs):
    if args.oracle:
        lab = [T.patch_labels(sc) for sc, _ in pairs]
        TAGS["c"] = torch.from_numpy(np.stack([a for a, _ in lab]))
        TAGS["s"] = torch.from_numpy(np.stack([b for _, b in lab]))
for p in model.vision_tower.parameters():
    p.requires_grad_(False)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                        betas=(0.9, 0.98), weight_decay=0.01)

def val_pairs():
    out, i = [], 0
    while len(out) < 256:
        sc = shapes.scene("val", 10_000 + i)
        if sc.n_named >= 2:
            r = shapes._rng("val", 10_000 + i, salt=5)
            k = kinds[i % len(kinds)]
            qa = shapes.question(sc, k, r)
            if args.copy:
                qa = shapes.QA(qa.prompt, qa.prompt.split()[-2], qa.kind, [])
            if qa.kind in kinds:
                out.append((sc, qa))
        i += 1
    return out
vp = val_pairs()
vk = [qa.kind for _, qa in vp]
val = T.make_batch(tok, vp, "mdm")
vp_tags = vp

def train_pairs(step, B=32):
    lo = 3_000_000 + step * B
    out = []
    for i in range(lo, lo + B):
        r = shapes._rng("train", i, salt=11)
        if args.maxobj:
            sc = shapes.render_scene(r, n_objects=int(r.integers(2, args.maxobj + 1)))
            sc.split, sc.index = "train", i
        else:
            sc = shapes.scene("train", i)
        k = kinds[int(r.integers(0, len(kinds)))]
        qa = shapes.question(sc, k, r)
        if args.copy:
            qa = shapes.QA(qa.prompt, qa.prompt.split()[-2], qa.kind, [])
        if args.aux and r.random() < args.aux:
            x = shapes.SHAPES[int(r.integers(0, 6))]
            qa = shapes.QA(f"<image> {x} ?", x, "aux", [])
        out.append((sc, qa))
    return out

gen = torch.Generator().manual_seed(1)
t0 = time.perf_counter(); step = 0
print(vars(args), flush=True)
while (time.perf_counter() - t0) / 60 < args.minutes:
    lr = args.lr * min(1, (step + 1) / 50)
    for g in opt.param_groups: g["lr"] = lr
    tp = train_pairs(step); set_tags(tp)
    b = T.make_batch(tok, tp, "mdm")
    loss, _ = T.loss_stage1(model, b) if args.loss == "stage1" else T.loss_mdm(model, b, gen)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    step += 1
    if step % 50 == 0:
        set_tags(vp)
        acc = T.quick_eval(model, tok, val, "mdm", vk)
        print(f"step {step} {(time.perf_counter()-t0)/60:.1f}min loss {loss.item():.3f} " +
              " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
