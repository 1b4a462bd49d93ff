"""The training script runs end to end and its output loads through diffcam.load; the loss
weights and logit rows of both objectives are the right ones."""

import json

import numpy as np
import pytest
import torch

import diffcam
from diffcam.data import shapes
from diffcam.models import train
from diffcam.models.bundled import build_tokenizer


def test_tiny_training_run_saves_a_loadable_model(tmp_path):
    out = tmp_path / "w"
    log = train.main(["--steps", "3", "--batch", "4", "--hidden", "32", "--layers", "2",
                      "--heads", "2", "--eval-every", "3", "--vision-steps", "2", "--out", str(out)])
    assert log["steps_done"] == 3 and len(log["history"]) == 1
    saved = json.load(open(out / "training_log.json"))
    assert saved["scenes_seen"] == 12 and saved["args"]["hidden"] == 32
    assert [h["step"] for h in saved["vision_history"]] == [2]
    ad = diffcam.load("bundled", str(out))
    assert len(ad.blocks()) == 2 and ad.model.config.text_config.hidden_size == 32
    sc = shapes.scene("test", 0)
    s = ad.prepare([sc.image], "<image> describe the image .")
    lay = s.layouts[0]
    assert lay.span_start == 1 and lay.span_length == 16 + 12 * 13
    assert lay.grid("base").shape == (4, 4) and lay.grid("hires").shape == (12, 12)


def _batch(objective):
    tok = build_tokenizer()
    pairs = list(shapes.samples("val", 0, 3))
    return tok, pairs, train.make_batch(tok, pairs, objective)


def test_make_batch_layout():
    tok, pairs, (pix, ids, att, starts, lens) = _batch("mdm")
    assert pix.shape == (3, 3, 96, 96)
    for i, (sc, qa) in enumerate(pairs):
        row = ids[i, :int(att[i].sum())].tolist()
        assert row[:2] == [tok.bos_token_id, -200]
        ans = tok.encode(qa.answer, add_special_tokens=False)
        assert row[starts[i]:starts[i] + len(ans)] == ans
        assert lens[i] == 18 and row[starts[i] + len(ans):] == [tok.eos_token_id] * (18 - len(ans))


def test_mdm_loss_reads_own_rows_and_ar_loss_next_rows():
    """With a model whose logits equal a one-hot of the *input* ids at each position, the masked
    diffusion view must line up row j with token j, the causal view row j-1 with token j."""
    tok, pairs, batch = _batch("mdm")
    model = train.build_model(tok, "mdm", 32, 1, 2, seed=0)
    pix, ids, att, starts, lens = batch
    n_img = model.config.image_tokens
    # fake logits: the expanded sequence's own ids as one-hot
    exp_ids = torch.cat([ids[:, :1], torch.full((ids.shape[0], n_img), 0), ids[:, 2:]], 1)
    logits = torch.nn.functional.one_hot(exp_ids, len(tok)).float()
    lg, tgt = train._response_view(model, logits, ids, "mdm")
    assert torch.equal(lg.argmax(-1), tgt)
    lg, tgt = train._response_view(model, logits, ids, "ar")
    # the causal view at row j holds the id of position j-1 of ids[:, 2:] -> shifted by one
    assert torch.equal(lg.argmax(-1)[:, 1:], tgt[:, :-1])


def test_mdm_loss_only_on_masked_response_tokens():
    tok, pairs, batch = _batch("mdm")
    model = train.build_model(tok, "mdm", 32, 1, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    loss, n_masked = train.loss_mdm(model, batch, g)
    assert torch.isfinite(loss) and 0 < n_masked <= 3 * 18
    loss.backward()
    assert model.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="start with <image>"):
        train.prompt_ids(tok, "describe <image>")


def test_patch_labels_follow_the_masks():
    sc = shapes.scene("val", 11)
    col, shp = train.patch_labels(sc)
    assert col.shape == shp.shape == (12, 12)
    assert ((col > 0) == (shp > 0)).all()
    for k in sc.named:
        cover = sc.masks[k].reshape(12, 8, 12, 8).mean(axis=(1, 3))
        # every cell this object covers most (and at least 30 %) carries its labels
        others = np.stack([sc.masks[j].reshape(12, 8, 12, 8).mean(axis=(1, 3))
                           for j in sc.named if j != k] or [np.zeros((12, 12))])
        own = (cover >= 0.3) & (cover > others.max(0))
        assert own.any()
        assert (col[own] == 1 + list(shapes.COLOURS).index(sc.colours[k])).all()
        assert (shp[own] == 1 + shapes.SHAPES.index(sc.shapes[k])).all()
    assert (col[sc.masks[:sc.n_named].reshape(-1, 12, 8, 12, 8).mean(axis=(2, 4)).max(0) < 0.3]
            == 0).all()


def test_curriculum_scenes_have_one_or_two_objects_and_are_reproducible():
    a = list(train.easy_samples("train", 0, 40))
    b = list(train.easy_samples("train", 0, 40))
    assert {sc.n_named for sc, _ in a} == {1, 2}
    for (sa, qa), (sb, qb) in zip(a, b):
        assert np.array_equal(sa.image, sb.image) and qa == qb
        assert qa.kind in train.KIND_WEIGHTS or qa.kind == "count"
    # a different seed stream from the ordinary training scenes
    assert not np.array_equal(a[0][0].image, shapes.scene("train", 0).image)


def test_sincos_positions_separate_columns_and_rows():
    from diffcam.models.bundled import sincos_2d
    P = sincos_2d(12, 96).numpy().reshape(12, 12, 96)
    # the first half depends on the column only, the second half on the row only
    assert np.allclose(P[:, :, :48], P[:1, :, :48]) and np.allclose(P[:, :, 48:], P[:, :1, 48:])
    cols = P[0, :, :48]
    assert len({tuple(np.round(c, 6)) for c in cols}) == 12     # every column distinct


def test_init_vision_copies_the_tower_and_a_zero_scale_freezes_it(tmp_path):
    common = ["--batch", "4", "--hidden", "32", "--layers", "1", "--heads", "2",
              "--eval-every", "2", "--vision-extra-layers", "1"]
    src = tmp_path / "src"
    train.main(["--steps", "1", "--vision-steps", "2", "--out", str(src)] + common)
    dst = tmp_path / "dst"
    log = train.main(["--steps", "2", "--init-vision", str(src), "--vision-lr-scale", "0",
                      "--objective", "ar", "--out", str(dst)] + common)
    assert log["init_vision"] == str(src) and "vision_history" not in log
    from diffcam.models.bundled import DiffcamTinyForMaskedDiffusion as M
    a, b = M.from_pretrained(str(src)), M.from_pretrained(str(dst))
    assert b.config.causal and b.config.vision_extra_layers == 1 and len(b.vision_tower.extra) == 1
    for (n, p), (_, q) in zip(a.vision_tower.named_parameters(), b.vision_tower.named_parameters()):
        assert torch.equal(p, q), n
    # the projector was copied but then trained
    assert not torch.equal(a.mm_projector[0].weight, b.mm_projector[0].weight)


def test_end_anchored_positions_count_valid_tokens_from_the_row_end():
    from transformers import LlamaConfig
    from diffcam.models.bundled import EndAnchoredLlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    m = EndAnchoredLlamaModel(cfg, end_positions=4).eval()
    seen = []
    m.layers[0].register_forward_pre_hook(lambda mod, a, k: seen.append(k["hidden_states"] if
                                          "hidden_states" in k else a[0]), with_kwargs=True)
    x = torch.randn(1, 6, 16)
    m(inputs_embeds=x)
    # distances from the end 5,4,3,2,1,0 -> clamped to 3,3,3,2,1,0
    want = x + m.end_pos.weight[torch.tensor([3, 3, 3, 2, 1, 0])]
    assert torch.allclose(seen[-1], want, atol=1e-6)
    # right padding: the last valid token gets distance 0; left padding likewise
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    m(inputs_embeds=x, attention_mask=right)
    assert torch.allclose(seen[-1][0, :4], x[0, :4] + m.end_pos.weight[torch.tensor([3, 2, 1, 0])],
                          atol=1e-6)
    left = torch.tensor([[0, 0, 1, 1, 1, 1]])
    m(inputs_embeds=x, attention_mask=left)
    assert torch.allclose(seen[-1][0, 2:], x[0, 2:] + m.end_pos.weight[torch.tensor([3, 2, 1, 0])],
                          atol=1e-6)


def test_end_positions_survive_save_and_load(tmp_path):
    tok = build_tokenizer()
    m = train.build_model(tok, "mdm", 32, 1, 2, seed=0, vision_extra_layers=1, end_positions=8)
    m.save_pretrained(tmp_path)
    from diffcam.models.bundled import DiffcamTinyForMaskedDiffusion, EndAnchoredLlamaModel
    r = DiffcamTinyForMaskedDiffusion.from_pretrained(str(tmp_path))
    assert isinstance(r.model, EndAnchoredLlamaModel) and r.config.end_positions == 8
    assert torch.equal(r.model.end_pos.weight, m.model.end_pos.weight)
    # the causal twin never gets them
    ar = train.build_model(tok, "ar", 32, 1, 2, seed=0, end_positions=8)
    assert not hasattr(ar.model, "end_pos")


def test_stage1_loss_scores_answer_words_only_with_the_response_masked():
    tok, pairs, batch = _batch("mdm")
    model = train.build_model(tok, "mdm", 32, 1, 2, seed=0)
    seen = {}
    orig = model.forward

    def spy(input_ids=None, **kw):
        seen["ids"] = input_ids.clone()
        return orig(input_ids=input_ids, **kw)

    model.forward = spy
    loss, n = train.loss_stage1(model, batch)
    pix, ids, att, starts, lens = batch
    words = sum(len(tok.encode(qa.answer, add_special_tokens=False)) for _, qa in pairs)
    assert n == words and torch.isfinite(loss)
    for i in range(ids.shape[0]):         # every response slot masked, the prompt untouched
        s, l = int(starts[i]), int(lens[i])
        assert (seen["ids"][i, s:s + l] == tok.mask_token_id).all()
        assert torch.equal(seen["ids"][i, :s], ids[i, :s])
    # <eos> targets carry no loss: scrambling the logits of those rows leaves the loss as it is,
    # scrambling an answer word's row changes it
    n_img = model.config.image_tokens
    eos_rows = [(i, j + n_img - 1) for i in range(ids.shape[0]) for j in range(ids.shape[1])
                if starts[i] <= j < starts[i] + lens[i] and ids[i, j] == tok.eos_token_id]
    word_rows = [(i, int(starts[i]) + n_img - 1) for i in range(ids.shape[0])]

    def scrambled(rows):
        def f(input_ids=None, **kw):
            out = orig(input_ids=input_ids, **kw).clone()
            for i, r in rows:
                out[i, r] = torch.randn(out.shape[-1]) * 50
            return out
        return f

    model.forward = scrambled(eos_rows)
    assert torch.allclose(train.loss_stage1(model, batch)[0], loss, atol=1e-6)
    model.forward = scrambled(word_rows)
    assert not torch.allclose(train.loss_stage1(model, batch)[0], loss, atol=1e-3)


def test_stage1_steps_run_before_the_masked_diffusion_loss(tmp_path):
    log = train.main(["--steps", "2", "--stage1-steps", "1", "--batch", "4", "--hidden", "32",
                      "--layers", "1", "--heads", "2", "--eval-every", "2", "--vision-steps", "1",
                      "--out", str(tmp_path / "w")])
    assert log["steps_done"] == 2 and log["args"]["stage1_steps"] == 1


def test_reinit_language_model_sets_the_stds_and_leaves_the_rest():
    tok = build_tokenizer()
    m = train.build_model(tok, "mdm", 64, 2, 2, seed=0, end_positions=8)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train.reinit_language_model(m, 0.08, 1.0, seed=3)
    lin = [mod.weight for mod in m.model.modules() if isinstance(mod, torch.nn.Linear)]
    w = torch.cat([x.detach().flatten() for x in lin + [m.lm_head.weight]])
    assert abs(float(w.std()) - 0.08) < 0.004
    assert abs(float(m.model.embed_tokens.weight.detach().std()) - 1.0) < 0.1
    assert abs(float(m.model.end_pos.weight.detach().std()) - 1.0) < 0.2
    for n, p in m.named_parameters():      # tower, projector, grid positions, norms untouched
        if n.startswith(("vision_tower", "mm_projector", "base_pos", "hires_pos")) or "norm" in n:
            assert torch.equal(p, before[n]), n
    m2 = train.build_model(tok, "mdm", 64, 2, 2, seed=0, end_positions=8)
    train.reinit_language_model(m2, 0.08, 1.0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    with pytest.raises(ValueError, match="init stds"):
        train.reinit_language_model(m2, 0.0, 1.0)


# ---------------------------------------------------------------- proxy warm-up and alignment

def test_parse_schedule_reads_grid_steps_pairs_and_names_bad_parts():
    assert train.parse_schedule("4:500,8:300,12:300") == [(4, 500), (8, 300), (12, 300)]
    # whitespace around numbers and empty parts are tolerated; zero steps is a valid stage
    assert train.parse_schedule(" 4 : 5 ,, 12:0 ,") == [(4, 5), (12, 0)]
    assert train.parse_schedule("") == [] and train.parse_schedule(" , ") == []
    for bad in ("4-5", "a:1", "4:1:2", "4:", ":3", "4.5:2"):
        with pytest.raises(ValueError, match="GRID:STEPS") as e:
            train.parse_schedule(f"8:1,{bad},12:1")
        assert repr(bad) in str(e.value)
    for bad in ("0:5", "-4:5", "4:-1"):
        with pytest.raises(ValueError, match="GRID >= 1") as e:
            train.parse_schedule(f"{bad},12:1")
        assert repr(bad) in str(e.value)


def _classes(sc, k):
    return 1 + list(shapes.COLOURS).index(sc.colours[k]), 1 + shapes.SHAPES.index(sc.shapes[k])


@pytest.mark.parametrize("g", [4, 8, 12])
def test_proxy_labels_extend_patch_labels_with_a_cell_per_object(g):
    """Scenes 0-23 (on the 4x4 grid 19 of them lose an object in patch_labels, 8x8: 2): the
    labelled cells of patch_labels are never overwritten, every new cell is free in
    patch_labels, touched by (or nearest to) an object that had no cell of its own, and carries
    that object's classes; afterwards every named object owns a cell with its own
    (colour, shape) pair."""
    fixed = 0
    for i in range(24):
        sc = shapes.scene("train", i)
        col, shp = train.proxy_labels(sc, g)
        c0, s0 = train.patch_labels(sc, g)
        assert col.shape == shp.shape == (g, g) and col.dtype == shp.dtype == np.int64
        kept = (c0 > 0) | (s0 > 0)
        assert np.array_equal(col[kept], c0[kept]) and np.array_equal(shp[kept], s0[kept])
        lost = {_classes(sc, k) for k in sc.named
                if not ((c0 == _classes(sc, k)[0]) & (s0 == _classes(sc, k)[1])).any()}
        new = list(zip(*np.nonzero((col != c0) | (shp != s0))))
        fixed += len(new)
        assert len(new) == len(lost)
        for y, x in new:
            assert not kept[y, x]
            assert (int(col[y, x]), int(shp[y, x])) in lost
        assert ((col > 0) == (shp > 0)).all()
        for k in sc.named:
            c, s = _classes(sc, k)
            assert ((col == c) & (shp == s)).any(), (i, g, k)
    assert fixed > 0 if g < 12 else True


@pytest.mark.parametrize("index,g", [(24, 4), (229, 8)])
def test_proxy_labels_keep_every_named_object_even_when_centres_collide(index, g):
    """Train scene 24 on 4x4 (purple star and red diamond share their centre cell) and scene
    229 on 8x8 (the blue diamond's centre cell holds the orange square): both objects keep a
    cell."""
    sc = shapes.scene("train", index)
    col, shp = train.proxy_labels(sc, g)
    for k in sc.named:
        c, s = _classes(sc, k)
        assert ((col == c) & (shp == s)).any(), k
    # the object whose centre was taken sits in a cell it actually covers
    S, cell = sc.image.shape[0], sc.image.shape[0] // g
    for k in sc.named:
        c, s = _classes(sc, k)
        ys, xs = np.nonzero((col == c) & (shp == s))
        cover = sc.masks[k].reshape(g, cell, g, cell).mean(axis=(1, 3))
        assert max(cover[y, x] for y, x in zip(ys, xs)) > 0, k


def _tiny():
    tok = build_tokenizer()
    return tok, train.build_model(tok, "mdm", 32, 1, 2, seed=0)


def _word(model, tok, w):
    i = tok.convert_tokens_to_ids(w)
    assert i != tok.unk_token_id, w
    return model.model.embed_tokens.weight[i]


def test_proxy_image_tokens_are_positions_plus_word_embeddings():
    from diffcam.models.bundled import sincos_2d
    tok, model = _tiny()
    cfg, d = model.config, 32
    g, b = cfg.grid, cfg.base_grid
    colours = list(shapes.COLOURS)
    gen = torch.Generator().manual_seed(0)
    col = torch.randint(0, 7, (2, g, g), generator=gen)
    shp = torch.randint(0, 7, (2, g, g), generator=gen)
    col[0, 0, 0], shp[0, 0, 0] = 0, 0
    col[1, 5, 7], shp[1, 5, 7] = 3, 5
    with torch.no_grad():
        # without the real layout: g * g tokens, any grid
        for gg in (4, 8):
            t = train.proxy_image_tokens(model, tok, col[:, :gg, :gg], shp[:, :gg, :gg], False)
            assert t.shape == (2, gg * gg, d)
            P = 0.5 * sincos_2d(gg, d)
            assert torch.allclose(t[0, 0], P[0])
            y, x = 2, 3
            want = (P[y * gg + x] + _word(model, tok, colours[int(col[1, y, x]) - 1])
                    * (col[1, y, x] > 0) + _word(model, tok, shapes.SHAPES[int(shp[1, y, x]) - 1])
                    * (shp[1, y, x] > 0))
            assert torch.allclose(t[1, y * gg + x], want, atol=1e-6)
        t = train.proxy_image_tokens(model, tok, col, shp, True)
        assert t.shape == (2, cfg.image_tokens, d) and cfg.image_tokens == b * b + g * (g + 1)
        for k in range(g):
            assert torch.equal(t[:, b * b + g + k * (g + 1)], model.image_newline.expand(2, d))
        P = 0.5 * sincos_2d(g, d)
        cell = lambda i, y, x: t[i, b * b + y * (g + 1) + x]     # noqa: E731
        assert torch.allclose(cell(0, 0, 0), P[0], atol=1e-6)
        want = P[5 * g + 7] + _word(model, tok, colours[2]) + _word(model, tok, shapes.SHAPES[4])
        assert torch.allclose(cell(1, 5, 7), want, atol=1e-6)
        # the plain layout is the real layout's grid cells without the base grid and newlines
        plain = train.proxy_image_tokens(model, tok, col, shp, False).reshape(2, g, g, d)
        real = t[:, b * b:].reshape(2, g, g + 1, d)[:, :, :g]
        assert torch.allclose(plain, real)
        # base token (1, 2): its position code plus the mean word embeddings of its 3x3 block
        ct, st = train._label_tables(model, tok)
        p = cfg.base_pool
        blk = (ct[col[0, p:2 * p, 2 * p:3 * p]] + st[shp[0, p:2 * p, 2 * p:3 * p]]).mean((0, 1))
        assert torch.allclose(t[0, 1 * b + 2], 0.5 * sincos_2d(b, d)[1 * b + 2] + blk, atol=1e-6)
    with pytest.raises(ValueError, match="model's grid"):
        train.proxy_image_tokens(model, tok, col[:, :8, :8], shp[:, :8, :8], True)


def _label_batch(tok, n=4):
    pairs = list(shapes.samples("train", 0, n))
    return pairs, train.make_batch(tok, pairs, "mdm", label_grid=12)


def test_alignment_loss_compares_image_tokens_except_newlines():
    tok, model = _tiny()
    _, (pix, _, _, _, _, col, shp) = _label_batch(tok)
    loss = train.alignment_loss(model, tok, pix, col, shp)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.mm_projector[0].weight.grad is not None
    assert model.model.embed_tokens.weight.grad is None        # the targets carry no gradient
    tgt = train.alignment_targets(model, tok, col, shp)
    cfg = model.config
    g, b = cfg.grid, cfg.base_grid
    # projector output equal to the targets: zero, whatever the newline tokens hold
    feats = tgt.clone()
    feats[:, b * b + g::g + 1] = 100.0
    model.image_features = lambda px: feats
    assert float(train.alignment_loss(model, tok, pix, col, shp)) < 1e-12
    # one grid token off by 1 in every channel: mean over the kept tokens and channels
    feats = tgt.clone()
    feats[0, b * b + 3] += 1.0
    model.image_features = lambda px: feats
    n_keep = b * b + g * g
    want = 1.0 / (tgt.shape[0] * n_keep)
    assert abs(float(train.alignment_loss(model, tok, pix, col, shp)) - want) < 1e-6


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


FRONT = ("vision_tower", "mm_projector", "base_pos", "hires_pos")


def test_align_projector_trains_only_projector_and_grid_positions():
    tok, model = _tiny()
    _, (pix, _, _, _, _, col, shp) = _label_batch(tok)
    with torch.no_grad():
        before_loss = float(train.alignment_loss(model, tok, pix, col, shp))
    before = _snapshot(model)
    msgs = []
    hist = train.align_projector(model, tok, 5, batch=4, log=msgs.append)
    assert [h["step"] for h in hist] == [5] and len(msgs) == 1 and np.isfinite(hist[0]["mse"])
    with torch.no_grad():
        after_loss = float(train.alignment_loss(model, tok, pix, col, shp))
    assert after_loss < before_loss
    trained = ("mm_projector", "base_pos", "hires_pos")
    for n, p in model.named_parameters():
        if n.startswith(trained):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_pretrain_proxy_trains_the_language_side_on_a_growing_grid(monkeypatch):
    tok, model = _tiny()
    before = _snapshot(model)
    shapes_seen = []
    orig = train.loss_stage1_embeds

    def spy(m, embeds, n_img, batch, objective):
        shapes_seen.append((tuple(embeds.shape), n_img, batch[0]))
        assert objective == "mdm"
        return orig(m, embeds, n_img, batch, objective)

    monkeypatch.setattr(train, "loss_stage1_embeds", spy)
    hist = train.pretrain_proxy(model, tok, [(4, 2), (12, 2)], batch=4, log=lambda m: None)
    assert [(h["step"], h["grid"]) for h in hist] == [(4, 12)]
    assert np.isfinite(hist[0]["loss"]) and 0 <= hist[0]["train_acc"] <= 1
    n_real = model.config.image_tokens
    assert [s[:2] for s in shapes_seen] == [((4, 16, 32), 16)] * 2 + [((4, n_real, 32), n_real)] * 2
    assert all(s[2] is None for s in shapes_seen)                # no pixels are rendered
    for n, p in model.named_parameters():
        if n.startswith(FRONT):
            assert torch.equal(p, before[n]), n
    for n in ("model.embed_tokens.weight", "lm_head.weight", "image_newline"):
        assert not torch.equal(dict(model.named_parameters())[n], before[n]), n


def test_make_batch_without_pixels_and_with_label_grids():
    tok = build_tokenizer()
    pairs = list(shapes.samples("val", 0, 3))
    full = train.make_batch(tok, pairs, "mdm")
    bare = train.make_batch(tok, pairs, "mdm", with_pixels=False)
    assert len(bare) == 5 and bare[0] is None
    for a, b in zip(full[1:], bare[1:]):
        assert torch.equal(a, b)
    lab = train.make_batch(tok, pairs, "mdm", label_grid=12)
    assert len(lab) == 7 and torch.equal(lab[0], full[0])
    col, shp = lab[5], lab[6]
    assert col.shape == shp.shape == (3, 12, 12) and col.dtype == shp.dtype == torch.long
    for i, (sc, _) in enumerate(pairs):
        c, s = train.patch_labels(sc, 12)
        assert np.array_equal(col[i].numpy(), c) and np.array_equal(shp[i].numpy(), s)
    assert col.any()
    lab4 = train.make_batch(tok, pairs, "mdm", label_grid=4, with_pixels=False)
    assert lab4[0] is None and lab4[5].shape == (3, 4, 4)


def test_training_run_with_proxy_warm_up_and_alignment(tmp_path):
    out = tmp_path / "w"
    log = train.main(["--steps", "2", "--batch", "4", "--hidden", "32", "--layers", "2",
                      "--heads", "2", "--eval-every", "2", "--vision-steps", "2",
                      "--proxy", "4:2,12:2", "--align-steps", "2", "--align-weight", "1",
                      "--out", str(out)])
    assert log["steps_done"] == 2
    saved = json.load(open(out / "training_log.json"))
    assert [(h["step"], h["grid"]) for h in saved["proxy_history"]] == [(4, 12)]
    assert [h["step"] for h in saved["align_history"]] == [2]
    assert saved["args"]["proxy"] == "4:2,12:2" and saved["args"]["align_weight"] == 1.0
    assert all(np.isfinite(h["loss"]) for h in saved["history"])
    ad = diffcam.load("bundled", str(out))
    assert len(ad.blocks()) == 2 and ad.model.config.text_config.hidden_size == 32


def test_proxy_loss_of_the_ar_objective_is_the_teacher_forced_loss():
    """With the model's own image tokens in the real layout, the proxy warm-up's loss is exactly
    the training loss of its objective: loss_ar for the causal twin (answer and <eos> scored
    from the row before) and loss_stage1 for masked diffusion."""
    tok = build_tokenizer()
    pairs = list(shapes.samples("val", 0, 4))
    for objective, ref in (("ar", train.loss_ar), ("mdm", train.loss_stage1)):
        model = train.build_model(tok, objective, 32, 1, 2, seed=0, vision_extra_layers=2,
                                  end_positions=0)
        train.reinit_language_model(model, 0.08, 1.0)     # far from uniform logits
        b = train.make_batch(tok, pairs, objective)
        feats = model.image_features(b[0])
        got, acc = train.loss_stage1_embeds(model, feats, feats.shape[1], b, objective)
        want = ref(model, b)[0]
        assert got.item() == pytest.approx(want.item(), rel=1e-5), objective
        assert 0 <= acc <= 1
    # the causal loss really is next-token: shifting the targets by one changes it
    model = train.build_model(tok, "ar", 32, 1, 2, seed=0, vision_extra_layers=2)
    train.reinit_language_model(model, 0.08, 1.0)
    b = train.make_batch(tok, pairs, "ar")
    feats = model.image_features(b[0])
    ar = train.loss_stage1_embeds(model, feats, feats.shape[1], b, "ar")[0]
    mdm_rows = train.loss_stage1_embeds(model, feats, feats.shape[1], b, "mdm")[0]
    assert abs(ar.item() - mdm_rows.item()) > 1e-3
    with pytest.raises(ValueError, match="objective"):
        train.loss_stage1_embeds(model, feats, feats.shape[1], b, "causal")


def test_training_run_of_the_twin_with_proxy_warm_up(tmp_path, monkeypatch):
    """--proxy also warms up the causal twin (with the next-token loss), after which a
    label-bottleneck projector's table points at the twin's own word embeddings."""
    seen = []
    orig, orig_table = train.loss_stage1_embeds, train.set_projector_table

    def spy(m, embeds, n_img, batch, objective):
        seen.append(objective)
        return orig(m, embeds, n_img, batch, objective)

    def spy_table(m, tok):
        orig_table(m, tok)
        ct, st = train._label_tables(m, tok)
        seen.append(torch.equal(m.mm_projector.table.weight.T, torch.cat([ct, st])))

    monkeypatch.setattr(train, "loss_stage1_embeds", spy)
    monkeypatch.setattr(train, "set_projector_table", spy_table)
    out = tmp_path / "w"
    log = train.main(["--steps", "2", "--batch", "4", "--hidden", "32", "--layers", "2",
                      "--heads", "2", "--eval-every", "2", "--vision-steps", "0",
                      "--objective", "ar", "--projector", "label_bottleneck",
                      "--proxy", "4:2,12:1", "--out", str(out)])
    assert seen == ["ar"] * 3 + [True] and log["steps_done"] == 2   # table set after the proxy
    assert [(h["step"], h["grid"]) for h in log["proxy_history"]] == [(3, 12)]
    m = diffcam.load("bundled", str(out)).model
    assert m.config.causal and m.config.projector_type == "label_bottleneck"


# ---------------------------------------------------------------- label-bottleneck projector

def _bottleneck(tmp_path=None):
    tok = build_tokenizer()
    return tok, train.build_model(tok, "mdm", 32, 1, 2, seed=0, vision_extra_layers=2,
                                  projector="label_bottleneck")


def test_unknown_projector_type_is_refused():
    from diffcam.models.bundled import DiffcamTinyConfig
    with pytest.raises(ValueError, match="projector_type"):
        DiffcamTinyConfig(projector_type="mlp3x")


def test_confident_bottleneck_cells_are_exactly_the_proxy_tokens():
    """With the table pointed at the word embeddings and a classifier that is certain of each
    cell's classes, the packed image tokens equal proxy_image_tokens of those labels (real
    layout: base grid, grid rows, newline column)."""
    tok, model = _bottleneck()
    train.set_projector_table(model, tok)
    proj = model.mm_projector
    sc = shapes.scene("train", 3)
    col, shp = train.proxy_labels(sc, 12)
    assert col.max() > 0
    onehot = torch.cat([torch.nn.functional.one_hot(torch.from_numpy(col), 7),
                        torch.nn.functional.one_hot(torch.from_numpy(shp), 7)], -1).float()
    proj.logits = lambda f: (onehot * 200.0 - 100.0)[None].expand(f.shape[0], -1, -1, -1)
    with torch.no_grad():
        got = model.image_features(train.encode_images([sc.image]))
        want = train.proxy_image_tokens(model, tok, torch.from_numpy(col)[None],
                                        torch.from_numpy(shp)[None], real_layout=True)
    assert got.shape == want.shape == (1, model.config.image_tokens, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bottleneck_probabilities_sum_to_one_per_group_and_gradients_reach_the_features():
    tok, model = _bottleneck()
    f = torch.randn(2, 96, 12, 12, requires_grad=True)
    p = model.mm_projector.probabilities(f)
    assert p.shape == (2, 12, 12, 14)
    torch.testing.assert_close(p[..., :7].sum(-1), torch.ones(2, 12, 12))
    torch.testing.assert_close(p[..., 7:].sum(-1), torch.ones(2, 12, 12))
    model.mm_projector(f).square().sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_projector_classifier_pretraining_learns_and_touches_only_the_classifier():
    tok, model = _bottleneck()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = train.pretrain_projector_classifier(model, 6, batch=4, lr=1e-2, log=lambda m: None)
    assert [h["step"] for h in hist] == [6] and np.isfinite(hist[0]["loss"])
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        should = n.startswith("mm_projector.") and not n.startswith("mm_projector.table")
        assert changed == should, n
    tok2, mlp = _tiny()
    with pytest.raises(ValueError, match="label_bottleneck"):
        train.pretrain_projector_classifier(mlp, 1)


def test_bottleneck_training_run_saves_and_loads(tmp_path):
    out = tmp_path / "b"
    log = train.main(["--steps", "2", "--batch", "4", "--hidden", "32", "--layers", "2",
                      "--heads", "2", "--eval-every", "2", "--vision-steps", "2",
                      "--projector", "label_bottleneck", "--projector-steps", "2",
                      "--proxy", "4:1,12:1", "--out", str(out)])
    assert log["steps_done"] == 2
    saved = json.load(open(out / "training_log.json"))
    assert [h["step"] for h in saved["projector_history"]] == [2]
    ad = diffcam.load("bundled", str(out))
    m = ad.model
    assert m.config.projector_type == "label_bottleneck"
    # the table was set from the word embeddings after the proxy warm-up and saved with them
    # (the real stage trains both afterwards, so compare the saved model's own relation only
    # in shape, and the group layout)
    assert m.mm_projector.table.weight.shape == (32, 14)
    sc = shapes.scene("test", 0)
    s = ad.prepare([sc.image], "<image> describe the image .")
    assert s.layouts[0].span_length == 16 + 12 * 13
    # refused before any training (it used to pre-train the vision tower for minutes first)
    with pytest.raises(SystemExit, match="label_bottleneck"):
        train.main(["--steps", "1", "--projector-steps", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_label_grids_stack_each_scenes_labels():
    scs = [shapes.scene("val", i) for i in range(3)]
    for labeller, g in ((None, 12), (train.proxy_labels, 4)):
        col, shp = train.label_grids(scs, g, labeller)
        assert col.shape == shp.shape == (3, g, g) and col.dtype == shp.dtype == torch.long
        for i, sc in enumerate(scs):
            c, s = (labeller or train.patch_labels)(sc, g)
            assert np.array_equal(col[i].numpy(), c) and np.array_equal(shp[i].numpy(), s)
    # the proxy labeller differs from the plain one somewhere on a coarse grid (objects that
    # hold no cell of their own get one), so the labeller argument is really used
    more = [shapes.scene("val", i) for i in range(12)]
    plain = train.label_grids(more, 4)[0]
    proxy = train.label_grids(more, 4, train.proxy_labels)[0]
    assert (plain != 0).sum() < (proxy != 0).sum()


@pytest.mark.parametrize("extra, want", [([], 2e-3), (["--proxy-lr", "5e-4"], 5e-4)])
def test_proxy_lr_defaults_to_lr(monkeypatch, tmp_path, extra, want):
    seen = []

    def spy(model, tok, schedule, batch, lr, log, objective):
        seen.append(lr)
        return []

    monkeypatch.setattr(train, "pretrain_proxy", spy)
    train.main(["--steps", "1", "--batch", "2", "--hidden", "32", "--layers", "1",
                "--heads", "2", "--eval-every", "1", "--vision-steps", "0", "--lr", "2e-3",
                "--proxy", "4:1", "--out", str(tmp_path / "w")] + extra)
    assert seen == [want]


def test_init_model_fine_tunes_a_trained_model(tmp_path):
    common = ["--batch", "4", "--hidden", "32", "--layers", "1", "--heads", "2",
              "--eval-every", "2"]
    src = tmp_path / "src"
    train.main(["--steps", "1", "--vision-steps", "2", "--out", str(src)] + common)
    dst = tmp_path / "dst"
    log = train.main(["--steps", "2", "--init-model", str(src), "--stage1-steps", "0",
                      "--start-step", "50", "--kind-weights", "colour:1,count:1",
                      "--count-balance", "--out", str(dst)] + common)
    assert log["init_model"] == str(src) and log["steps_done"] == 2
    assert "vision_history" not in log
    assert log["args"]["kind_weights"] == {"describe": 0.0, "colour": 1.0, "presence": 0.0,
                                           "count": 1.0}
    from diffcam.models.bundled import DiffcamTinyForMaskedDiffusion as M
    a, b = M.from_pretrained(str(src)), M.from_pretrained(str(dst))
    # the tower is loaded and frozen (default --vision-lr-scale 0), the language model trains
    for (n, p), (_, q) in zip(a.vision_tower.named_parameters(), b.vision_tower.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not b.config.causal
    with pytest.raises(SystemExit, match="masked-diffusion model, but --objective ar"):
        train.main(["--steps", "1", "--init-model", str(src), "--objective", "ar",
                    "--out", str(tmp_path / "x")] + common)
    with pytest.raises(SystemExit, match="excludes"):
        train.main(["--steps", "1", "--init-model", str(src), "--proxy", "4:1",
                    "--out", str(tmp_path / "y")] + common)


def test_batches_follow_start_step_kind_weights_and_count_balance(monkeypatch):
    seen = []
    monkeypatch.setattr(train, "make_batch", lambda tok, pairs, *a, **k: seen.append(pairs))
    tok = build_tokenizer()
    list(train.Batches(tok, 3, 2, start_step=4, kind_weights={"colour": 0.0, "count": 1.0},
                       count_balance=True))
    assert [[sc.index for sc, _ in p] for p in seen] == [[12, 13, 14], [15, 16, 17]]
    for p in seen:
        for sc, qa in p:
            assert qa.kind == "count"
            want = train.balanced_count_question(sc, shapes._rng("train", sc.index, salt=11))
            assert (qa.prompt, qa.answer) == (want.prompt, want.answer)
    seen.clear()
    list(train.Batches(tok, 2, 1, kind_weights={"describe": 1.0}))
    assert [qa.kind for _, qa in seen[0]] == ["describe", "describe"]


def test_balanced_count_question_is_a_true_count_in_the_usual_wording():
    answers = set()
    for i in range(150):
        sc = shapes.scene("train", i)
        qa = train.balanced_count_question(sc, np.random.default_rng(i))
        again = train.balanced_count_question(sc, np.random.default_rng(i))
        assert (qa.prompt, qa.answer, qa.grounding) == (again.prompt, again.answer,
                                                        again.grounding)
        named = [sc.shapes[k] for k in sc.named]
        if qa.prompt == "<image> how many shapes are there ?":
            assert qa.answer == shapes.NUMBERS[sc.n_named]
        else:
            plural = qa.prompt.split()[3]
            shp = [s for s, p in shapes.PLURALS.items() if p == plural][0]
            assert qa.prompt == f"<image> how many {plural} are there ?"
            assert qa.answer == shapes.NUMBERS[named.count(shp)]
            assert [k for _, k in qa.grounding] == [k for k in sc.named if sc.shapes[k] == shp]
        answers.add(qa.answer)
    assert {"zero", "one", "two", "three", "four"} <= answers


@pytest.mark.parametrize("text,msg", [("colour", "expected kind:weight"),
                                      ("hue:1", "expected kind:weight"),
                                      ("colour:x", "not a number"),
                                      ("colour:-1", "must be >= 0"),
                                      ("colour:0,count:0", "at least one")])
def test_parse_kind_weights_names_bad_parts(text, msg):
    with pytest.raises(ValueError, match=msg):
        train.parse_kind_weights(text)


def test_tie_plurals_copies_each_shape_embedding_to_its_plural():
    tok = build_tokenizer()
    model = train.build_model(tok, "mdm", 32, 1, 2, 0)
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    train.tie_plurals(model, tok)
    words = list(shapes.SHAPES) + list(shapes.PLURALS.values())
    ids = {w: tok.convert_tokens_to_ids(w) for w in words}
    for shp, plural in shapes.PLURALS.items():
        assert torch.equal(emb[ids[plural]], before[ids[shp]])
        assert not torch.equal(before[ids[plural]], before[ids[shp]])
    plural_ids = {ids[p] for p in shapes.PLURALS.values()}
    others = [i for i in range(emb.shape[0]) if i not in plural_ids]
    assert torch.equal(emb[others], before[others])


def test_tie_plurals_in_a_fresh_run_keeps_the_pre_training_stages(tmp_path, monkeypatch):
    calls = []
    real = train.tie_plurals
    monkeypatch.setattr(train, "tie_plurals", lambda m, t: calls.append(1) or real(m, t))
    log = train.main(["--steps", "1", "--batch", "4", "--hidden", "32", "--layers", "1",
                      "--heads", "2", "--eval-every", "1", "--vision-steps", "2",
                      "--tie-plurals", "--out", str(tmp_path / "t")])
    assert calls == [1]
    assert [h["step"] for h in log["vision_history"]] == [2] and log["steps_done"] == 1
