"""Proxy-trained LM + shipped frozen tower + label-bottleneck projector: per-kind one-shot exact
accuracy on 256 val questions with real images, before and after real stage-1 steps.
A record of how the model card's numbers were made (not part of the package):

    python docs/experiments/proxy_transfer.py 300 400   # after proxy_kinds.py; ~7 min
"""
import sys, time, math, torch, numpy as np, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from diffcam.models import train
from diffcam.models.bundled import build_tokenizer, DiffcamTinyForMaskedDiffusion, weights_dir
from diffcam.data import shapes
torch.manual_seed(0)
clf_steps, real_steps = int(sys.argv[1]), int(sys.argv[2])
tok = build_tokenizer()
model = train.build_model(tok, "mdm", 128, 4, 4, 0, 2, 32, projector="label_bottleneck")
sd = torch.load(__import__("os").environ.get("PROXY_MODEL", "/tmp/proxy_model.pt"))
sd = {k: v for k, v in sd.items() if not k.startswith(("mm_projector", "base_pos", "hires_pos"))}
print(model.load_state_dict(sd, strict=False))
src = DiffcamTinyForMaskedDiffusion.from_pretrained(weights_dir("diffusion"))
model.vision_tower.load_state_dict(src.vision_tower.state_dict())
for p in model.vision_tower.parameters(): p.requires_grad_(False)
train.pretrain_projector_classifier(model, clf_steps, log=print)
train.set_projector_table(model, tok)
vp = list(shapes.samples("val", 0, 256, kinds=tuple(train.KIND_WEIGHTS), weights=tuple(train.KIND_WEIGHTS.values())))
kinds = [qa.kind for _, qa in vp]
vb = train.make_batch(tok, vp, "mdm")
def evaluate():
    model.eval()
    with torch.no_grad():
        pix, ids, att, starts, lens = vb
        resp = train._response_mask(ids, starts, lens)
        noisy = torch.where(resp, torch.full_like(ids, model.config.mask_token_id), ids)
        att_e, _ = train._expanded(model, ids, att, starts)
        lg = model(input_ids=noisy, pixel_values=pix, attention_mask=att_e)
        n = model.config.image_tokens
        lg = lg[:, n + 1:]
        tgt = ids[:, 2:]; w = resp[:, 2:] & (tgt != model.config.eos_token_id)
        ok = ((lg.argmax(-1) == tgt) | ~w).all(1)
    model.train()
    return {k: round(float(ok[torch.tensor([kk == k for kk in kinds])].float().mean()), 3) for k in train.KIND_WEIGHTS}
print("zero-shot real", evaluate(), flush=True)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
t0 = time.time()
data = train.Batches(tok, 32, 100000, start_step=20000)
for step, batch in enumerate(data):
    if step >= real_steps: break
    for g in opt.param_groups: g["lr"] = 1e-3 * min(1, (step + 1) / 30)
    loss, _ = train.loss_stage1(model, batch)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if (step + 1) % 100 == 0:
        print(f"real step {step+1} {(time.time()-t0)/60:.1f} min", evaluate(), flush=True)
