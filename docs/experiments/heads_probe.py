"""Probe of the shipped (frozen) vision tower: how well a per-cell classifier on its features
names the colour and shape of the named object under each 12x12 cell (sessions 7-8,
docs/bundled_model.md, "label-bottleneck projector").  A record, not part of the package.

    python docs/experiments/heads_probe.py HIDDEN STEPS [patch|proxy]

HIDDEN 0: a 1x1 linear head; > 0: a per-cell MLP of that width; < 0: two 3x3 convolutions of
width -HIDDEN.  Prints accuracy on 300 validation scenes."""
import sys, time, math, torch, numpy as np, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from diffcam.models.bundled import DiffcamTinyForMaskedDiffusion, weights_dir, encode_images
from diffcam.models import train
from diffcam.data import shapes
torch.manual_seed(0)
m = DiffcamTinyForMaskedDiffusion.from_pretrained(weights_dir("diffusion")).eval()
tower = m.vision_tower
for p in tower.parameters(): p.requires_grad_(False)
hidden = int(sys.argv[1]); steps = int(sys.argv[2]); lab = sys.argv[3] if len(sys.argv) > 3 else "patch"
class Conv(nn.Module):
    def __init__(s, h):
        super().__init__(); s.a = nn.Conv2d(96, h, 3, padding=1); s.b = nn.Conv2d(h, h, 3, padding=1); s.c = nn.Conv2d(h, 14, 1)
    def forward(s, x):
        x = x.permute(0, 3, 1, 2); x = F.gelu(s.a(x)); x = x + F.gelu(s.b(x)); return s.c(x).permute(0, 2, 3, 1)
clf = Conv(-hidden) if hidden < 0 else (nn.Sequential(nn.Linear(96, hidden), nn.GELU(), nn.Linear(hidden, 14)) if hidden else nn.Linear(96, 14))
opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=0.01)
def batch(off, n):
    scs = [shapes.scene("train", off + j) for j in range(n)]
    L = [(train.proxy_labels if lab == "proxy" else train.patch_labels)(sc, 12) for sc in scs]
    with torch.no_grad():
        f = tower(encode_images([sc.image for sc in scs])).permute(0, 2, 3, 1)
    return scs, f, torch.from_numpy(np.stack([c for c, _ in L])), torch.from_numpy(np.stack([s for _, s in L]))
t0 = time.time()
for step in range(steps):
    for g in opt.param_groups: g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
    _, f, col, shp = batch(7_000_000 + step * 64, 64)
    lg = clf(f)
    loss = F.cross_entropy(lg[..., :7].reshape(-1, 7), col.reshape(-1)) + F.cross_entropy(lg[..., 7:].reshape(-1, 7), shp.reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
print("train min", (time.time() - t0) / 60)
# eval on val scenes
scs, f, col, shp = batch(0, 300) if False else (None, None, None, None)
vs = [shapes.scene("val", i) for i in range(300)]
L = [train.patch_labels(sc, 12) for sc in vs]
with torch.no_grad():
    f = tower(encode_images([sc.image for sc in vs])).permute(0, 2, 3, 1)
    lg = clf(f)
col = torch.from_numpy(np.stack([c for c, _ in L])); shp = torch.from_numpy(np.stack([s for _, s in L]))
pc, ps = lg[..., :7].argmax(-1), lg[..., 7:].argmax(-1)
fg = col > 0
print("object-cell colour", float((pc == col)[fg].float().mean()), "shape", float((ps == shp)[fg].float().mean()))
print("bg cells predicted bg: colour", float((pc == 0)[~fg].float().mean()), "shape", float((ps == 0)[~fg].float().mean()))
# per-scene: set of predicted shapes (any cell) vs true named shapes; set of (shape->colour) majority
exact_shapes = 0; exact_pairs = 0
for i, sc in enumerate(vs):
    true = set(sc.shapes[k] for k in sc.named)
    pred = set(shapes.SHAPES[s - 1] for s in ps[i].unique().tolist() if s > 0)
    exact_shapes += true == pred
print("scenes whose predicted shape set == true:", exact_shapes / len(vs))

ok=n=0
for i, sc in enumerate(vs):
    for k in range(sc.n_named):
        sel = torch.from_numpy(col_k := (train.patch_labels(sc,12)[1] > 0)) 
        cov = sc.masks[k].reshape(12,8,12,8).mean(axis=(1,3)) >= 0.3
        cells = ps[i][torch.from_numpy(cov)]
        if len(cells)==0: continue
        n += 1; ok += int(torch.mode(cells).values) == 1 + shapes.SHAPES.index(sc.shapes[k])
print("per-object majority shape", ok / n, n)
