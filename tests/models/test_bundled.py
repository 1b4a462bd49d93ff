"""The shipped bundled model: it loads offline, packs images like LLaDA-V, answers held-out
questions, and its Diffusion-CAM maps point at the objects it names (issue 5, item 4).

Sizes are kept small for CI (a few hundred held-out questions); docs/bundled_model.md reports
the same scores on larger samples."""

import json
import os

import numpy as np
import pytest
import torch

import diffcam
from diffcam.data import shapes
from diffcam.models import evaluate, tables
from diffcam.models.bundled import weights_dir

N_QA = 60           # scenes for the colour / presence / count questions (180 questions)
N_DESCRIBE = 40     # scenes for the descriptions
N_MAPS = 40         # scenes whose description maps are scored

# The shipped weights (run L + fine-tune LA, 50.0 + 9.9 min of training on 2 CPU cores,
# docs/bundled_model.md) on test scenes 0-299: descriptions 80.3 % exact; colour 98.6 %,
# presence 96.7 %, count 90.3 % (mean of the three kinds 95.2 %).  On the scenes of these tests:
# colour 100 %, presence 96.7 %, count 89.7 % (mean 95.5 %; scenes 0-59) and descriptions 90.0 %
# (scenes 60-99).  Both targets are met with little margin: a retrained model that loses a point
# fails them.


@pytest.fixture(scope="module")
def adapter():
    return diffcam.load("bundled")


def test_shipped_files_and_size():
    d = weights_dir("diffusion")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "training_log.json",
              "training_log_run_l.json"):
        assert os.path.isfile(os.path.join(d, f)), f
    assert os.path.getsize(os.path.join(d, "model.safetensors")) <= 20 * 2 ** 20


def test_shipped_training_took_at_most_an_hour():
    """The shipped weights are run L plus a fine-tune of it (docs/bundled_model.md); issue 5
    allows 60 minutes of training per model on this CPU, counted over both runs."""
    d = weights_dir("diffusion")
    with open(os.path.join(d, "training_log_run_l.json")) as fh:
        base = json.load(fh)
    with open(os.path.join(d, "training_log.json")) as fh:
        tune = json.load(fh)
    assert "init_model" in tune and "init_model" not in base
    assert base["args"]["max_minutes"] + tune["args"]["max_minutes"] <= 60
    assert base["train_minutes"] + tune["train_minutes"] <= 60
    assert tune["args"]["vision_lr_scale"] == 0          # the tower stays run L's (and the twin's)


def test_structure_and_packing(adapter):
    m = adapter.model
    from transformers import LlamaModel

    # a LlamaModel (EndAnchoredLlamaModel adds the distance-from-end embeddings), bidirectional
    assert isinstance(m.model, LlamaModel) and m.config.text_config.is_causal is False
    assert adapter.blocks() is m.model.layers and adapter.logit_shift == 0
    sc = shapes.scene("test", 3)
    s = adapter.prepare([sc.image], "<image> describe the image .")
    lay = s.layouts[0]
    base, hires = lay.grid("base"), lay.grid("hires")
    assert lay.span_start == 1 and base.shape == (4, 4) and hires.shape == (12, 12)
    # the newline column: 12 rows of 13 tokens after the 16 base tokens, the 13th is the newline
    pos = hires.positions(0)
    assert pos[0, 0] == 16 and pos[1, 0] == 16 + 13 and pos[11, 11] == 16 + 11 * 13 + 11
    # a marker planted in the vision output of cell (5, 7) lands at that cell's position
    k = int(pos[5, 7])
    marker = torch.full((m.config.text_config.hidden_size,), 3.0)

    def hook(i, f):
        f = f.clone()
        f[k] = marker
        return f
    m.feature_hook = hook
    try:
        s2 = adapter.prepare([sc.image], "<image> describe the image .")
    finally:
        m.feature_hook = None
    diff = (s2.inputs_embeds - s.inputs_embeds).abs().sum(-1)
    assert diff.nonzero().flatten().tolist() == [lay.span_start + k]
    nl = lay.span_start + 16 + 12
    assert torch.allclose(s.inputs_embeds[nl], m.image_newline)


def test_save_load_round_trip(adapter, tmp_path):
    adapter.model.save_pretrained(tmp_path)
    again = diffcam.load("bundled", str(tmp_path), tokenizer=adapter.tokenizer)
    for (n, p), (_, q) in zip(adapter.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), n


def test_sdpa_and_eager_give_the_same_maps(adapter):
    eager = diffcam.load("bundled", attn_implementation="eager")
    sc = shapes.scene("test", 5)
    qa = shapes.question(sc, "describe")
    maps = []
    for ad in (adapter, eager):
        with diffcam.Explainer(ad) as ex:
            maps.append(ex.explain(sc.image, qa.prompt, targets="all",
                                   answer=qa.answer).maps[0]["hires"])
    np.testing.assert_allclose(maps[0], maps[1], rtol=2e-3, atol=1e-5 * np.abs(maps[1]).max())


@pytest.fixture(scope="module")
def qa_accuracy(adapter):
    return evaluate.answer_accuracy(adapter, "test", n=N_QA, kinds=("colour", "presence", "count"))


def test_questions_answered(qa_accuracy):
    pooled = np.mean(list(qa_accuracy.values()))
    assert pooled >= 0.95, qa_accuracy


def test_descriptions_exact(adapter):
    acc = evaluate.answer_accuracy(adapter, "test", n=N_DESCRIBE, start=N_QA,
                                   kinds=("describe",))
    assert acc["describe"] >= 0.80, acc


@pytest.fixture(scope="module")
def records(adapter):
    return evaluate.collect_maps(adapter, "test", n=N_MAPS, start=500, gold_if_wrong=True)


def test_maps_are_scored_for_every_named_object(records):
    n_obj = sum(shapes.scene("test", r.index).n_named for r in records)
    assert sum(len(r.raw) for r in records) == 2 * n_obj   # colour + shape word per object
    s = evaluate.score_maps(records, "paper")
    assert s["n_maps"] == 2 * n_obj and 0 <= s["obj_iou"] <= 1


@pytest.fixture(scope="module")
def scores(records):
    return {c: evaluate.score_maps(records, c) for c in ("random", "paper")}


def test_diffusion_cam_beats_random(scores):
    """The paper preset (config.py's constants, refined at the image's 96x96) beats random maps
    on Obj-IoU and F3 by far.  On these 40 scenes (180 maps, block 0 hooked): Obj-IoU 16.55 %
    against random 2.96 %, F3 25.50 % against 3.45 %; on the 300-scene test split of
    docs/benchmark.md (1,800 maps) F3 25.59 % against 3.78 %."""
    for metric in ("obj_iou", "f3_of_means"):
        assert scores["paper"][metric] > 3 * scores["random"][metric], (metric, scores)


def test_diffusion_cam_beats_raw(records):
    """Issue 5 asks for Diffusion-CAM maps that beat the raw Grad-CAM map on Obj-IoU and F3:
    here a higher Obj-IoU and an F3 gain whose 95 % paired bootstrap interval (scenes
    resampled, as in docs/benchmark.md) lies above zero -- a gain within the noise of 40
    scenes is not a win.  On these 40 scenes (180 maps, block 0 hooked) the paper preset gives
    Obj-IoU 16.55 % against raw 15.47 % and F3 25.50 % against 23.76 %: +1.74 points, interval
    [+0.89, +2.75]; on the benchmark's 1,800 test maps +1.08 [+0.88, +1.29]
    (docs/benchmark.md).  The gain comes from SICD with the ``<eos>`` padding's maps as
    interference (docs/attribution.md); before, with the repeated function words alone and the
    earlier SICD constants, it was +0.56 [-0.05, +1.02] on the first 15 of these scenes and
    -0.02 [-0.23, +0.18] on the benchmark."""
    prep = tables.prepare(records)
    raw, paper = tables.score(prep, "raw"), tables.score(prep, "paper")
    delta, lo, hi = tables.paired_delta(prep, paper, raw, n_boot=1000, seed=0)
    assert paper.obj_iou > raw.obj_iou, (paper.obj_iou, raw.obj_iou)
    assert lo > 0, (delta, lo, hi)


def test_parameter_randomisation(adapter, records):
    res = evaluate.randomisation_check(adapter, records[:8], config="paper")
    assert res["n_maps"] >= 16
    assert res["mean_rank_correlation"] < 0.2, res


def test_rank_correlation_reference():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.random((12, 12))
    assert evaluate.rank_correlation(a, a ** 3) == pytest.approx(1.0)
    assert evaluate.rank_correlation(a, -a) == pytest.approx(-1.0)
    assert evaluate.rank_correlation(a, np.ones_like(a)) == 0.0
    for _ in range(5):
        x, y = np.round(rng.random((12, 12)) * 4), rng.random((12, 12)) + a  # ties in x
        assert evaluate.rank_correlation(x, y) == pytest.approx(
            stats.spearmanr(x.ravel(), y.ravel()).statistic, abs=1e-12)


def test_empty_answer_is_an_error_of_its_own(adapter):
    from diffcam.attribution import EmptyAnswerError

    sc = shapes.scene("test", 3)
    eos = adapter.tokenizer.eos_token
    with diffcam.Explainer(adapter) as ex:
        with pytest.raises(EmptyAnswerError, match="only special tokens") as info:
            ex.explain(sc.image, "<image> describe the image .", answer=f"{eos} {eos}")
    assert isinstance(info.value, ValueError)


def test_collect_maps_counts_an_empty_generation_as_wrong(adapter, monkeypatch):
    """A model that generates only <eos> gives a wrong, empty answer (not a crash); with
    ``gold_if_wrong`` the gold answer is explained, padded to the generation length."""
    from diffcam.attribution import EmptyAnswerError, Explainer

    real = Explainer.explain
    calls = []

    def explain(self, *args, **kwargs):
        calls.append(kwargs.get("answer"))
        if kwargs.get("answer") is None:          # the generating call
            raise EmptyAnswerError("the answer has no tokens to explain (only special tokens)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "explain", explain)
    rec, = evaluate.collect_maps(adapter, "test", n=1, start=3, gold_if_wrong=True)
    gold = shapes.question(shapes.scene("test", 3), "describe").answer
    assert rec.answer == "" and rec.correct is False and rec.raw is not None
    assert len(rec.token_ids) == adapter.default_generation.gen_length
    assert calls[-1].split()[:len(gold.split())] == gold.split()
    rec, = evaluate.collect_maps(adapter, "test", n=1, start=3)
    assert rec.answer == "" and rec.correct is False and rec.raw is None
