"""The shipped bundled model: it loads offline, packs images like LLaDA-V, answers held-out
questions, and its Diffusion-CAM maps point at the objects it names (issue 5, item 4).

Sizes are kept small for CI (a few hundred held-out questions); docs/bundled_model.md reports
the same scores on larger samples."""

import os

import numpy as np
import pytest
import torch

import diffcam
from diffcam.data import shapes
from diffcam.models import evaluate
from diffcam.models.bundled import weights_dir

N_QA = 60           # scenes for the colour / presence / count questions (180 questions)
N_DESCRIBE = 40     # scenes for the descriptions
N_MAPS = 15         # scenes whose description maps are scored

#: The shipped weights (52 min of training on 2 CPU cores, docs/bundled_model.md) meet the
#: description target (84.0 % exact on test scenes 0-299) but not the question target: colour
#: questions are answered at 84.0 %, presence at 99.0 %, counts at 73.7 % (test 0-299; on the
#: scenes of this test 84.6 / 98.3 / 73.5 %).  That target test is a strict xfail: it is
#: reported as an expected failure and turns into a failure (XPASS strict) as soon as retrained
#: weights meet the target, so the marker has to be removed then.
QUALITY_GAP = pytest.mark.xfail(strict=True, reason="issue 5: the shipped weights miss the "
                                "question-accuracy target (docs/bundled_model.md)")


@pytest.fixture(scope="module")
def adapter():
    return diffcam.load("bundled")


def test_shipped_files_and_size():
    d = weights_dir("diffusion")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "training_log.json"):
        assert os.path.isfile(os.path.join(d, f)), f
    assert os.path.getsize(os.path.join(d, "model.safetensors")) <= 20 * 2 ** 20


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


@QUALITY_GAP
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
    return {c: evaluate.score_maps(records, c) for c in ("random", "raw", "paper")}


def test_diffusion_cam_beats_random(scores):
    """The paper preset (SICD constants chosen on the val split, refined at the image's 96x96)
    beats random maps on Obj-IoU and F3 by far.  On these 15 scenes (66 maps): Obj-IoU 11.68 %
    against random 2.81 %, F3 19.36 % against 3.32 %; on the 300-scene test split of
    docs/benchmark.md (1,818 maps) F3 22.42 % against 3.76 %."""
    for metric in ("obj_iou", "f3_of_means"):
        assert scores["paper"][metric] > 3 * scores["random"][metric], (metric, scores)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 5: on the shipped weights' sharp raw maps Diffusion-CAM does not "
                   "beat raw Grad-CAM (docs/benchmark.md: F3 +0.07 points, 95 % CI [-0.18, "
                   "+0.32], Obj-IoU below raw); remove the marker when it does")
def test_diffusion_cam_beats_raw(scores):
    """Issue 5 asks for Diffusion-CAM maps that beat the raw Grad-CAM map on Obj-IoU and F3.
    On these 15 scenes the paper preset gives Obj-IoU 11.68 % against raw 12.80 % and F3
    19.36 % against 20.59 % (the preset without SICD: 12.85 % / 20.69 %)."""
    for metric in ("obj_iou", "f3_of_means"):
        assert scores["paper"][metric] > scores["raw"][metric], (metric, scores)


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
