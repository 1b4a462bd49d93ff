"""Proxy warm-up on all four kinds with per-kind one-shot accuracy on 256 val questions
(clean proxy labels, 12x12 real layout).
A record of how the model card's numbers were made (not part of the package):

    python docs/experiments/proxy_kinds.py 4:600,8:400,12:1000   # 26 min on 2 cores
"""
import sys, time, json, torch, numpy as np
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from diffcam.models import train
from diffcam.models.bundled import build_tokenizer
from diffcam.data import shapes
torch.manual_seed(0)
sched = train.parse_schedule(sys.argv[1]); label_fn = sys.argv[2] if len(sys.argv) > 2 else "proxy"
tok = build_tokenizer()
model = train.build_model(tok, "mdm", 128, 4, 4, 0, 2, 32)
train.reinit_language_model(model, 0.08, 1.0, 0)
vp = list(shapes.samples("val", 0, 256, kinds=tuple(train.KIND_WEIGHTS), weights=tuple(train.KIND_WEIGHTS.values())))
kinds = [qa.kind for _, qa in vp]
vb = train.make_batch(tok, vp, "mdm", with_pixels=False)
L = [train.proxy_labels(sc, 12) for sc, _ in vp]
vcol = torch.from_numpy(np.stack([c for c, _ in L])); vshp = torch.from_numpy(np.stack([s for _, s in L]))
def evaluate():
    model.eval()
    with torch.no_grad():
        img = train.proxy_image_tokens(model, tok, vcol, vshp, True)
        _, ids, att, starts, lens = vb
        resp = train._response_mask(ids, starts, lens)
        noisy = torch.where(resp, torch.full_like(ids, model.config.mask_token_id), ids)
        emb = model.model.embed_tokens
        n = img.shape[1]
        x = torch.cat([emb(noisy[:, :1]), img, emb(noisy[:, 2:])], 1)
        a = torch.cat([att[:, :1], att.new_ones(att.shape[0], n), att[:, 2:]], 1)
        lg = model.lm_head(model.model(inputs_embeds=x, attention_mask=a).last_hidden_state[:, n + 1:])
        tgt = ids[:, 2:]; w = resp[:, 2:] & (tgt != model.config.eos_token_id)
        ok = ((lg.argmax(-1) == tgt) | ~w).all(1)       # whole answer right
    model.train()
    out = {}
    for k in train.KIND_WEIGHTS:
        sel = torch.tensor([kk == k for kk in kinds])
        out[k] = round(float(ok[sel].float().mean()), 3)
    return out
t0 = time.time(); done = 0
for g, n in sched:
    while n > 0:
        m = min(n, 200)
        train.pretrain_proxy(model, tok, [(g, m)], batch=32, lr=2e-3, offset=4_000_000 + done * 32, log=lambda s: None)
        done += m; n -= m
        print(f"step {done} grid {g} {(time.time()-t0)/60:.1f} min exact-answer", evaluate(), flush=True)
torch.save(model.state_dict(), __import__("os").environ.get("PROXY_MODEL", "/tmp/proxy_model.pt"))
