"""A small fake adapter: embedding + bidirectional blocks returning tuples + LM head, with a
fixed image span (a 3 x 4 grid followed by... nothing: prompt = 2 text tokens, 12 image tokens,
1 text token).  Image features are a deterministic function of the image's pixels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffcam.adapters.base import Adapter, GenerationResult, PreparedSample
from diffcam.attribution.layout import single_grid_layout

V, D, ROWS, COLS = 24, 16, 3, 4
MASK, EOS = 1, 0


def word(i):
    """Token i's text: 'tok' + a letter (alphabetic, so a content word)."""
    return "tok" + chr(97 + int(i) % 26)


class FakeTok:
    all_special_ids = [EOS, MASK]

    def encode(self, text, add_special_tokens=False):
        out = []
        for w in text.split():
            out.append(2 + (sum(map(ord, w)) % (V - 2)))
        return out

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(word(i) for i in ids
                        if not (skip_special_tokens and int(i) in self.all_special_ids))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D))
        self.ln = nn.LayerNorm(D)

    def forward(self, x, key_padding_mask=None):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + a
        return (x + self.mlp(x), None)


class FakeModel(nn.Module):
    def __init__(self, n_blocks=4):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(D, V)
        self.vis = nn.Linear(3, D)

    def forward(self, x, attention_mask=None):
        kpm = None if attention_mask is None else attention_mask == 0
        for blk in self.blocks:
            x = blk(x, key_padding_mask=kpm)[0]
        return self.head(x)


class FakeAdapter(Adapter):
    name = "fake"
    mask_token_id = MASK

    def __init__(self, seed=0, n_blocks=4, answer=(5, 9, 7, EOS), steps=4, hidden_has_image=None):
        torch.manual_seed(seed)
        self.model = FakeModel(n_blocks).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = FakeTok()
        self.answer = list(answer)
        self.steps = steps
        self.hhi = hidden_has_image
        self.marker = None          # (row, col) of a planted marker, or None

    def blocks(self):
        return self.model.blocks

    def image_features(self, img):
        a = torch.as_tensor(np.asarray(img, dtype=np.float32) / 255.0)
        H, W = a.shape[:2]
        cells = a[: H - H % ROWS, : W - W % COLS].reshape(ROWS, H // ROWS, COLS, W // COLS, 3)
        f = self.model.vis(cells.mean((1, 3))).reshape(ROWS * COLS, D)
        if self.marker is not None:
            f = f.clone()
            f[self.marker[0] * COLS + self.marker[1]] += 8.0
        return f

    def prepare(self, images, prompt):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        with torch.no_grad():
            feats = [self.image_features(im) for im in images]
            t = self.model.emb(torch.tensor([2, 3]))
            parts, layouts, pos = [t], [], 2
            for k, f in enumerate(feats):
                layouts.append(single_grid_layout(pos, ROWS, COLS, "base", k))
                parts.append(f)
                pos += f.shape[0]
            parts.append(self.model.emb(torch.tensor([4])))
            emb = torch.cat(parts)
        return PreparedSample(input_ids=torch.zeros(emb.shape[0], dtype=torch.long),
                              inputs_embeds=emb, layouts=layouts, images=list(images),
                              prompt=prompt)

    def embed_tokens(self, ids):
        return self.model.emb(ids)

    def forward(self, inputs_embeds, attention_mask=None, extras=None):
        return self.model(inputs_embeds, attention_mask)

    def generate(self, sample, config):
        G, S = len(self.answer), self.steps
        masked = torch.ones(S + 1, G, dtype=torch.bool)
        for s in range(1, S + 1):
            masked[s] = masked[s - 1]
            masked[s, (s - 1) % G] = False
        masked[S] = False
        hhi = None if self.hhi is None else torch.tensor(self.hhi)
        return GenerationResult(torch.tensor(self.answer), masked, S, hhi)

    def token_strings(self, ids):
        return [("<eos>" if int(i) == EOS else " " + word(i)) for i in ids]
