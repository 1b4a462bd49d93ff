"""The shipped autoregressive twin of the bundled model (``diffcam.load("bundled",
kind="autoregressive")``): its files, causal attention, the vision tower it shares with the
diffusion model, its greedy answers on held-out scenes and its maps.

Sizes are kept small for CI (30 scenes for the answers, 5 for the map check); the measured
numbers the floors are set from are in the comments (200 scenes)."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

import diffcam
from diffcam.data import shapes
from diffcam.models import evaluate
from diffcam.models.bundled import weights_dir

AR_DIR = weights_dir("autoregressive")
DIFF_DIR = weights_dir("diffusion")
N_ACC = 30        # test scenes 0..29 for the answer floors (one question of every kind each)
N_MAPS = 10       # test scenes 500..509 for the map-localization checks

#: Exact-match accuracy floors on test scenes 0..N_ACC-1 (greedy decoding,
#: ``evaluate.answer_accuracy``).  Measured on the shipped weights (2026-12-07: label-bottleneck
#: projector, proxy warm-up, 4415 steps, 55 min):
#:
#:   kind       test 0-99   test 100-199   test 0-29 (this test)   best constant answer (0-199)
#:   describe   0.87        0.87           0.87  (26/30)           0.02  ('a orange star .')
#:   colour     0.714       0.660          0.54  (15/28)           0.21  ('yellow'; 0.26 per prompt)
#:   count      0.945       0.981          0.91  (29/32)           0.35  ('one';    0.41 per prompt)
#:   presence   0.99        0.97           1.00  (30/30)           0.51  ('no')
#:
#: (colour questions whose shape repeats fall back to count questions, hence 28 / 32.)  Each
#: floor is about the 200-scene accuracy minus 15-20 points, and stays well above the best
#: constant answer (even one chosen per prompt text).  The colour floor is low: the twin often
#: names the colour of another object (purple -> green, yellow -> orange), see
#: docs/bundled_model.md.
FLOORS = {"describe": 0.70, "colour": 0.45, "count": 0.75, "presence": 0.80}
CONSTANT_BASELINE = {"describe": 0.02, "colour": 0.26, "count": 0.41, "presence": 0.51}


@pytest.fixture(scope="module")
def adapter():
    return diffcam.load("bundled", kind="autoregressive")


@pytest.fixture(scope="module")
def diffusion():
    return diffcam.load("bundled")


# ------------------------------------------------------------------------------ files
def test_shipped_files_size_and_training_log():
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "training_log.json"):
        assert os.path.isfile(os.path.join(AR_DIR, f)), f
    assert os.path.getsize(os.path.join(AR_DIR, "model.safetensors")) <= 20 * 2 ** 20
    with open(os.path.join(AR_DIR, "training_log.json")) as fh:
        log = json.load(fh)
    assert log["args"]["objective"] == "ar"
    assert isinstance(log["steps_done"], int) and log["steps_done"] > 0
    assert 0 < log["train_minutes"] <= 60
    # the vision tower came from the diffusion model and stayed frozen
    assert log["init_vision"] and log["args"]["vision_lr_scale"] == 0


# ------------------------------------------------------------------------------ causality
def test_config_and_adapter_are_autoregressive(adapter, diffusion):
    with open(os.path.join(AR_DIR, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["causal"] is True and cfg["text_config"]["is_causal"] is True
    m = adapter.model
    assert m.config.causal is True and m.config.text_config.is_causal is True
    assert m.model.config.is_causal is True
    # next-token logits: response token j is scored on row j - 1
    assert adapter.causal is True and adapter.logit_shift == 1 and adapter.name == "bundled-ar"
    assert diffusion.causal is False and diffusion.logit_shift == 0
    s = diffusion.prepare([shapes.scene("test", 1).image], "<image> describe the image .")
    with pytest.raises(ValueError, match="twin"):
        diffusion.greedy_decode([s], 3)
    with pytest.raises(ValueError, match="max_new"):
        adapter.greedy_decode([s], 0)


def _first_rows_change(ad, sc):
    """Max change of the logits of all rows but the last when the last input is perturbed,
    and the change of the last row."""
    s = ad.prepare([sc.image], "<image> describe the image .")
    x = s.inputs_embeds[None]
    y = x.clone()
    y[0, -1] += torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ad.forward(x), ad.forward(y)
    d = (a - b).abs()
    return float(d[0, :-1].max()), float(d[0, -1].max())


def test_attention_is_causal_in_practice(adapter, diffusion):
    sc = shapes.scene("test", 7)
    before, last = _first_rows_change(adapter, sc)
    assert before <= 1e-5 and last > 1e-2, (before, last)
    # the same probe on the bidirectional diffusion model does see the change everywhere
    before_d, _ = _first_rows_change(diffusion, sc)
    assert before_d > 1e-3, before_d


# ------------------------------------------------------------------------------ vision tower
def test_vision_tower_is_the_diffusion_models():
    """Only the vision tower is shared exactly: ``train.py --init-vision`` copies the tower,
    projector and grid positions but freezes the tower alone, so ``mm_projector``, ``base_pos``,
    ``hires_pos`` and ``image_newline`` were fine-tuned with the causal language model."""
    from safetensors.numpy import load_file

    ar = load_file(os.path.join(AR_DIR, "model.safetensors"))
    dm = load_file(os.path.join(DIFF_DIR, "model.safetensors"))
    names = sorted(k for k in dm if k.startswith("vision_tower."))
    assert len(names) >= 1
    assert names == sorted(k for k in ar if k.startswith("vision_tower."))
    for k in names:
        assert ar[k].dtype == dm[k].dtype and ar[k].shape == dm[k].shape, k
        assert np.array_equal(ar[k], dm[k]), k


# ------------------------------------------------------------------------------ answers
@pytest.fixture(scope="module")
def answers(adapter):
    return evaluate.answer_accuracy(adapter, "test", n=N_ACC, return_records=True)


@pytest.mark.parametrize("kind", sorted(FLOORS))
def test_answer_accuracy_floor(answers, kind):
    acc, recs = answers
    assert sum(r[1] == kind for r in recs) >= N_ACC * 0.8       # the kind was actually asked
    assert FLOORS[kind] > CONSTANT_BASELINE[kind]
    assert acc[kind] >= FLOORS[kind], (kind, acc)


def test_answers_are_well_formed(answers):
    """Greedy decoding stops at <eos> with an answer of the right form for every kind."""
    _, recs = answers
    allowed = {"colour": set(shapes.COLOURS), "presence": {"yes", "no"},
               "count": set(shapes.NUMBERS)}
    for idx, kind, prompt, gold, ans in recs:
        if kind in allowed:
            assert ans in allowed[kind], (idx, prompt, ans)
        else:
            assert ans.startswith("a ") and ans.endswith(" ."), (idx, prompt, ans)
            assert "<" not in ans, (idx, prompt, ans)                 # no special tokens


def test_presence_beats_chance(answers):
    """The twin before 2026-12-07 (no proxy warm-up) answered "no" to 198 of 200 presence
    questions; the shipped one answers both ways and far above the constant answer."""
    acc, recs = answers
    gold = Counter(r[3] for r in recs if r[1] == "presence")
    said = Counter(r[4] for r in recs if r[1] == "presence")
    constant = max(gold.values()) / sum(gold.values())
    assert said["yes"] > 0 and said["no"] > 0, said
    assert acc["presence"] >= constant + 0.10, (acc["presence"], gold)


# ------------------------------------------------------------------------------ maps
def _check_maps(exp, answer):
    assert exp.answer == answer and exp.settings["logit_shift"] == 1
    assert exp.settings["answer_given"] is True
    n_words = len(answer.split())
    assert [t.name for t in exp.targets] == answer.split()
    hires, base = exp.maps[0]["hires"], exp.maps[0]["base"]
    assert hires.shape == (n_words + 1, 1, 12, 12) and base.shape == (n_words + 1, 1, 4, 4)
    for m in (hires, base):
        assert np.isfinite(m).all() and m.min() >= 0
        flat = m.reshape(len(m), -1)
        assert (flat.max(1) - flat.min(1) > 1e-6).all()               # no constant map


def test_explain_given_and_generated_answer(adapter, answers):
    _, recs = answers
    i = 0
    sc = shapes.scene("test", i)
    qa = shapes.question(sc, "describe")
    generated = next(r[4] for r in recs if r[0] == i and r[1] == "describe")
    with diffcam.Explainer(adapter) as ex:
        given = ex.explain(sc.image, qa.prompt, targets="all", answer=qa.answer)
        own = ex.explain(sc.image, qa.prompt, targets="all", answer=generated)
        # no answer given: the twin decodes greedily itself, one token per step
        gen = ex.explain(sc.image, qa.prompt, targets="all", states=("final", 2))
    _check_maps(given, qa.answer)
    _check_maps(own, generated)
    if generated == qa.answer:
        np.testing.assert_allclose(given.maps[0]["hires"], own.maps[0]["hires"], atol=1e-5)
    assert gen.answer == generated and gen.settings["answer_given"] is False
    g = len(gen.token_ids)
    assert g == adapter.default_generation.gen_length
    np.testing.assert_array_equal(gen.masked, np.arange(g)[None, :] >= np.arange(g + 1)[:, None])
    # causal attention: at step 2 the first two tokens are in place and the masked rest cannot
    # reach their logits, so the first word's map is the final state's
    np.testing.assert_allclose(gen.maps[0]["hires"][0, 1], gen.maps[0]["hires"][0, 0], atol=1e-5)


def _describe_maps(adapter, lo, n, gradcam="paper"):
    """MapRecords of the teacher-forced raw maps of the colour and shape words of the gold
    descriptions of test scenes lo..lo+n-1."""
    recs = []
    with diffcam.Explainer(adapter) as ex:
        for i in range(lo, lo + n):
            sc = shapes.scene("test", i)
            qa = shapes.question(sc, "describe")
            ground = evaluate.grounding_for(sc, qa)
            idx = [w for w, _ in ground]          # word index == token index (word tokenizer)
            exp = ex.explain(sc.image, qa.prompt, targets=idx, answer=qa.answer,
                             gradcam=gradcam)
            assert [t.name for t in exp.targets] == [qa.answer.split()[w] for w in idx]
            rec = evaluate.MapRecord("test", i, "describe", qa.prompt, qa.answer, True)
            rec.raw = np.ascontiguousarray(exp.maps[0]["hires"][:len(idx), 0], dtype=np.float32)
            rec.masks = np.stack([np.any(sc.masks[ks], axis=0) for _, ks in ground])
            rec.words = [qa.answer.split()[w] for w in idx]
            recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def twin_maps(adapter):
    """Raw maps (paper aggregation) of the gold descriptions of test 500..509, of the twin and
    of a copy with every weight re-initialised (``evaluate.randomised_copy``, seed 0)."""
    return (_describe_maps(adapter, 500, N_MAPS),
            _describe_maps(evaluate.randomised_copy(adapter, 0), 500, N_MAPS))


def test_maps_beat_noise_and_a_randomised_copy(twin_maps):
    """Teacher-forced maps of the colour and shape words of 10 gold descriptions overlap the
    named objects far more than uniform noise maps and than the maps of the same model with
    re-initialised weights (a bare "beats noise" check would not tell a trained model from an
    untrained one).  Measured Obj-IoU on test 500..509: 0.101 (500..529: 0.096, its 5-scene
    windows 0.060-0.131); noise 0.029 on 500..529; randomised copies, seeds 0 / 1: 0.032 / 0.033.
    The twin shipped until 2026-12-05 gave 0.053 on 500..529, no better than its randomised
    copies (0.067-0.074): its maps localized only under the reference aggregation."""
    recs, rand = twin_maps
    raw = evaluate.score_maps(recs, "raw")
    rnd = evaluate.score_maps(recs, "random")
    untrained = evaluate.score_maps(rand, "raw")
    assert raw["n_maps"] == rnd["n_maps"] == untrained["n_maps"] == \
        2 * sum(shapes.scene("test", r.index).n_named for r in recs)
    assert raw["obj_iou"] > 2.5 * rnd["obj_iou"], (raw, rnd)
    assert raw["obj_iou"] > 2 * untrained["obj_iou"], (raw, untrained)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="a target of our own beyond issue 5: the twin's maps localize "
                   "(3x noise) but at Obj-IoU 0.10 on test 500..509, far below the diffusion "
                   "model's 0.22 under the same protocol; remove the marker when a retrained "
                   "twin reaches 0.15")
def test_maps_localize_like_the_diffusion_models(twin_maps):
    """The same maps as the diffusion model's: with the paper's aggregation the shipped
    diffusion model reaches Obj-IoU 0.220 on the gold descriptions of test 500..529 (block 0,
    teacher forced, no ``<eos>`` padding), the twin 0.096 (block 1, chosen on val scenes 0-39:
    0.090 against 0.067 at block 0 and 0.067 at block 2)."""
    recs, _ = twin_maps
    raw = evaluate.score_maps(recs, "raw")
    assert raw["obj_iou"] > 0.15, raw
