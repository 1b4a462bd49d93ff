"""The masked-diffusion sampler (diffcam.generation) on fake adapters with controlled logits."""

import pytest
import torch

from diffcam.adapters.base import Adapter, GenerationConfig, PreparedSample
from diffcam.generation import masked_diffusion_generate, num_transfer_tokens

V = 12
MASK = 11


class FakeAdapter(Adapter):
    """Logits fixed per sequence position (independent of the input), one-hot embeddings.
    Records every forward call."""

    name = "fake"

    def __init__(self, table, prompt_len=3, logit_shift=0):
        self.table = torch.as_tensor(table, dtype=torch.float32)   # (L, V)
        self.mask_token_id = MASK
        self.logit_shift = logit_shift
        self.prompt_len = prompt_len
        self.calls = []
        self.extras_lengths = []

    def blocks(self):
        return []

    def prepare(self, images, prompt):
        emb = torch.zeros(self.prompt_len, V)
        emb[:, 0] = 1
        return PreparedSample(input_ids=torch.zeros(self.prompt_len, dtype=torch.long),
                              inputs_embeds=emb, layouts=[], extras={"tag": 7})

    def embed_tokens(self, ids):
        return torch.nn.functional.one_hot(torch.as_tensor(ids), V).float()

    def extend_extras(self, sample, total_length):
        self.extras_lengths.append(total_length)
        return dict(sample.extras, total=total_length)

    def forward(self, inputs_embeds, attention_mask=None, extras=None):
        assert not torch.is_grad_enabled()
        assert extras["tag"] == 7 and extras["total"] == inputs_embeds.shape[1]
        self.calls.append(inputs_embeds.clone())
        return self.table[None, :inputs_embeds.shape[1]].clone()


def _table(P, conf, tokens, shift=0):
    """Row P + j - shift: a peak of height conf[j] on tokens[j]."""
    G = len(conf)
    t = torch.zeros(P + G, V)
    for j, (c, tok) in enumerate(zip(conf, tokens)):
        t[P + j - shift, tok] = c
    return t


def test_schedule():
    assert num_transfer_tokens(10, 4) == [3, 3, 2, 2]
    assert num_transfer_tokens(4, 4) == [1, 1, 1, 1]
    assert num_transfer_tokens(3, 5) == [1, 1, 1, 0, 0]
    assert sum(num_transfer_tokens(37, 6)) == 37


@pytest.mark.parametrize("shift", [0, 1])
def test_hand_checked_low_confidence(shift):
    P = 3
    # confidence order: position 1 > 2 > 3 > 0
    ad = FakeAdapter(_table(P, [1.0, 6.0, 4.0, 2.0], [4, 5, 6, 7], shift), P, shift)
    res = masked_diffusion_generate(ad, ad.prepare([], "x"), GenerationConfig(steps=2, gen_length=4))
    assert res.response_ids.tolist() == [4, 5, 6, 7]
    assert res.steps == 2
    assert res.masked.tolist() == [[True, True, True, True],
                                   [True, False, False, True],
                                   [False, False, False, False]]
    assert res.hidden_has_image is None
    # one full forward per step over prompt + response, starting from all-mask
    assert len(ad.calls) == 2 and all(c.shape == (1, P + 4, V) for c in ad.calls)
    assert ad.extras_lengths == [P + 4]
    resp0 = ad.calls[0][0, P:].argmax(-1).tolist()
    resp1 = ad.calls[1][0, P:].argmax(-1).tolist()
    assert resp0 == [MASK] * 4
    assert resp1 == [MASK, 5, 6, MASK]


def test_trajectory_properties_and_schedule():
    P, G, S = 2, 10, 4
    g = torch.Generator().manual_seed(3)
    conf = (torch.rand(G, generator=g) * 5 + 1).tolist()
    ad = FakeAdapter(_table(P, conf, [1 + j % 9 for j in range(G)]), P)
    res = masked_diffusion_generate(ad, ad.prepare([], "x"), GenerationConfig(steps=S, gen_length=G))
    m = res.masked
    assert m.shape == (S + 1, G) and m.dtype == torch.bool
    assert m[0].all() and not m[S].any()
    assert (m[1:] <= m[:-1]).all()                      # monotone unmasking
    commits = (m[:-1].sum(1) - m[1:].sum(1)).tolist()
    assert commits == num_transfer_tokens(G, S) == [3, 3, 2, 2]
    assert MASK not in res.response_ids.tolist()


def test_blocks_respected():
    P, G, BL, S = 2, 8, 4, 4
    # the second block is far more confident: without blocks it would be committed first
    conf = [1.0, 1.5, 2.0, 2.5, 9.0, 9.5, 10.0, 10.5]
    ad = FakeAdapter(_table(P, conf, [1, 2, 3, 4, 5, 6, 7, 8]), P)
    res = masked_diffusion_generate(ad, ad.prepare([], "x"),
                                    GenerationConfig(steps=S, gen_length=G, block_length=BL))
    m = res.masked
    per_block = S // (G // BL)
    for s in range(S):
        newly = (m[s] & ~m[s + 1]).nonzero().flatten()
        b = s // per_block
        assert ((newly >= b * BL) & (newly < (b + 1) * BL)).all(), (s, newly)
        assert len(newly) == 2
    assert not m[per_block, :BL].any() and m[per_block, BL:].all()
    # inside a block the most confident positions go first
    assert m[1].tolist() == [True, True, False, False] + [True] * 4
    assert res.response_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_mask_token_never_committed():
    P, G = 2, 4
    t = _table(P, [3.0, 3.0, 3.0, 3.0], [1, 2, 3, 4])
    t[P:, MASK] = 100.0                                  # the mask id is the argmax everywhere
    ad = FakeAdapter(t, P)
    res = masked_diffusion_generate(ad, ad.prepare([], "x"), GenerationConfig(steps=4, gen_length=G))
    assert res.response_ids.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampling_deterministic_for_seed(remasking):
    P, G = 2, 8
    g = torch.Generator().manual_seed(0)
    t = torch.randn(P + G, V, generator=g)              # flat-ish logits: sampling matters
    ad = FakeAdapter(t, P)
    sample = ad.prepare([], "x")

    def run(seed):
        cfg = GenerationConfig(steps=4, gen_length=G, block_length=4, temperature=1.0,
                               remasking=remasking, seed=seed)
        return masked_diffusion_generate(ad, sample, cfg)

    state = torch.random.get_rng_state()
    a, b = run(5), run(5)
    assert torch.equal(torch.random.get_rng_state(), state)   # global RNG untouched
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.masked, b.masked)
    outs = {tuple(run(s).response_ids.tolist()) + tuple(run(s).masked.flatten().tolist())
            for s in range(6)}
    assert len(outs) > 1                                 # the seed matters


def test_random_remasking_keeps_schedule():
    P, G = 2, 6
    ad = FakeAdapter(_table(P, [1.0] * G, [1] * G), P)
    res = masked_diffusion_generate(ad, ad.prepare([], "x"),
                                    GenerationConfig(steps=3, gen_length=G, remasking="random"))
    m = res.masked
    assert (m[:-1].sum(1) - m[1:].sum(1)).tolist() == [2, 2, 2]


def test_adapter_default_generate_uses_sampler():
    P = 3
    ad = FakeAdapter(_table(P, [1.0, 6.0, 4.0, 2.0], [4, 5, 6, 7]), P)
    res = ad.generate(ad.prepare([], "x"), GenerationConfig(steps=4, gen_length=4))
    assert res.response_ids.tolist() == [4, 5, 6, 7]
    assert res.masked.sum(1).tolist() == [4, 3, 2, 1, 0]


def test_batch_equals_one_by_one():
    from diffcam.generation import masked_diffusion_generate_batch

    class Biased(FakeAdapter):
        def forward(self, inputs_embeds, attention_mask=None, extras=None):
            self.calls.append(inputs_embeds.clone())
            t = self.table[None, :inputs_embeds.shape[1]]
            return t + 3.0 * inputs_embeds[:, :1, :]            # per-sample bias from the prompt

        def extend_extras(self, sample, total_length):
            return {}

    P, G = 3, 6
    g = torch.Generator().manual_seed(1)
    ad = Biased(torch.randn(P + G, V, generator=g), P)
    samples = []
    for tok in (1, 2, 3):
        s = ad.prepare([], "x")
        s.inputs_embeds = s.inputs_embeds.clone()
        s.inputs_embeds[0] = torch.nn.functional.one_hot(torch.tensor(tok), V).float()
        samples.append(s)
    for cfg in (GenerationConfig(steps=6, gen_length=G, block_length=3),
                GenerationConfig(steps=3, gen_length=G, temperature=1.0, seed=4),
                GenerationConfig(steps=2, gen_length=G, remasking="random", seed=2)):
        ad.calls.clear()
        batch = masked_diffusion_generate_batch(ad, samples, cfg)
        assert len(ad.calls) == cfg.steps and ad.calls[0].shape == (3, P + G, V)
        for s, rb in zip(samples, batch):
            r1 = masked_diffusion_generate(ad, s, cfg)
            assert torch.equal(r1.response_ids, rb.response_ids)
            assert torch.equal(r1.masked, rb.masked)
    short = ad.prepare([], "x")
    short.inputs_embeds = short.inputs_embeds[:2]
    with pytest.raises(ValueError, match="equal prompt length"):
        masked_diffusion_generate_batch(ad, [samples[0], short], GenerationConfig(steps=2, gen_length=2))
