"""Dataset runs on the bundled model: results equal direct explanations, resume after a crash,
errors recorded and isolated, workers, settings checks, the CLI."""

import json
import os

import numpy as np
import pytest

import diffcam
from diffcam.data import shapes
from diffcam.data.sample import Sample
from diffcam.run import (RunStore, SettingsMismatch, format_summary, gallery, open_dataset,
                         run_dataset, summarize)

torch = pytest.importorskip("torch")

SPEC = "shapes:test:0:4"


@pytest.fixture(scope="module")
def adapter():
    return diffcam.load("bundled")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _gold(n=4, start=0):
    return list(shapes.dataset("test", start, start + n, gold=True))


def _same_scores(got, want):
    """Every metric of every scored word of ``got`` equals ``want``'s (float32 rounding of
    batched vs single forwards allowed)."""
    for word, sc in got.items():
        for which in ("raw", "refined"):
            for f, v in sc[which].items():
                assert v == pytest.approx(want[word][which][f], rel=1e-3, abs=1e-5), (word, f)


def _files(path):
    d = os.path.join(path, "shards")
    return {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}


@pytest.fixture(scope="module")
def gold_run(adapter, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "gold")
    stats = run_dataset(adapter, _gold(), out, targets="all", batch_size=3, shard_size=2,
                        progress=False)
    return out, stats


def test_run_stores_the_direct_explanations(adapter, gold_run):
    out, stats = gold_run
    assert (stats["done"], stats["skipped"], stats["errors"]) == (4, 0, 0)
    store = RunStore.open(out)
    assert len(store.shard_files()) == 2                        # shard_size=2
    recs = {r["id"]: r for r in store.records()}
    assert sorted(recs) == sorted(s.id for s in _gold())
    s = _gold()[2]
    with diffcam.Explainer(adapter) as ex:
        exp = ex.explain(s.image, s.prompt, answer=s.answer, targets="all")
    rec = recs[s.id]
    assert rec["answer"] == exp.answer and rec["targets"] == exp.target_names
    assert rec["answer_given"] is True and "correct" not in rec
    maps = store.maps(s.id)
    for g, arr in exp.maps[0].items():
        # batched (3 samples per forward) vs one by one: same maps up to float32 rounding
        np.testing.assert_allclose(maps[f"{s.id}/0/{g}"], arr, rtol=1e-4,
                                   atol=1e-6 * float(np.abs(arr).max()))


def test_scores_are_the_metrics_of_the_stored_maps(gold_run):
    out, _ = gold_run
    store = RunStore.open(out)
    rec, arrays = next(iter(store.iter_maps()))
    sample = {s.id: s for s in _gold()}[rec["id"]]
    scored = rec["scores"]
    # every colour and shape word of the description names a mask
    sc = shapes.scene("test", sample.meta["scene"])
    assert set(scored) == {w for k in range(sc.n_named) for w in (sc.shapes[k], sc.colours[k])}
    name, entry = next(iter(scored.items()))
    raw = arrays[f"{rec['id']}/0/{entry['grid']}"][entry["target"], 0].astype(np.float64)
    raw = np.maximum(raw, 0) / max(raw.max(), 1e-30)
    mask = sample.masks[entry["mask"]]
    s = diffcam.metrics.localization(raw.astype(np.float32), mask[None])
    assert entry["raw"]["obj_iou"] == pytest.approx(float(s.obj_iou), abs=1e-9)
    assert entry["raw"]["f3"] == pytest.approx(float(s.f3), abs=1e-9)
    with diffcam.Explainer(diffcam.load("bundled")) as ex:
        exp = ex.explain(sample.image, sample.prompt, answer=sample.answer, targets="all")
    ref = exp.map(entry["target"], grid=entry["grid"], refined=True)
    s = diffcam.metrics.localization(ref, mask[None])
    assert entry["refined"]["obj_iou"] == pytest.approx(float(s.obj_iou), abs=1e-6)
    assert entry["refined"]["concentration"] == pytest.approx(float(s.concentration), rel=1e-4)
    summ = summarize(out)
    n = sum(len(r["scores"]) for r in store.records())
    assert summ["done"] == 4 and summ["raw"]["n_maps"] == summ["refined"]["n_maps"] == n
    assert 0 < summ["refined"]["obj_iou"] <= 1


def test_tam_protocol_of_the_stored_maps(gold_run):
    """Func-IoU of every function word ("a", "and") from the stored maps: the share of the map
    below the mean Otsu threshold of the record's scored maps; the summary's means and
    F1-IoU from the records."""
    from diffcam.metrics import tam

    out, _ = gold_run
    store = RunStore.open(out)
    rec, arrays = next(iter(store.iter_maps()))
    sample = {s.id: s for s in _gold()}[rec["id"]]
    t = rec["tam"]
    words = [w["word"] for w in t["function_words"]]
    assert words and set(words) <= {"a", "and"}
    assert [w["target"] for w in t["function_words"]] == [
        k for k, name in enumerate(rec["targets"][:-1]) if name in ("a", "and")]
    entries = list(rec["scores"].values())
    g = entries[0]["grid"]
    stack = arrays[f"{rec['id']}/0/{g}"][:, 0].astype(np.float64)

    def norm(m):
        return (np.maximum(m, 0) / max(m.max(), 1e-30)).astype(np.float32)

    # every occurrence of an object word counts (the scores keep one entry per word)
    from diffcam.run.runner import match_mask

    picks = [(k, match_mask(name, sample.masks)) for k, name in enumerate(rec["targets"][:-1])]
    picks = [(k, key) for k, key in picks if key is not None]
    assert len(picks) >= len(entries)
    masks = [sample.masks[key] for _, key in picks]
    noun = np.stack([norm(stack[k]) for k, _ in picks])
    ts = [int(diffcam.metrics.otsu_threshold(diffcam.resize(m, mk.shape))) for m, mk in
          zip(noun, masks)]
    assert t["threshold"]["raw"] == pytest.approx(np.mean(ts))
    for w in t["function_words"]:
        m = diffcam.resize(norm(stack[w["target"]]), masks[0].shape)
        want = np.mean(np.floor(np.clip(m * np.float32(255), 0, 255)) < np.mean(ts))
        assert w["raw"] == pytest.approx(want, abs=1e-12)
        assert 0 <= w["refined"] <= 1
    summ = summarize(out)
    all_raw = [w["raw"] for r in store.records() for w in r["tam"]["function_words"]]
    assert summ["tam"]["raw"]["n_function_maps"] == len(all_raw)
    assert summ["tam"]["raw"]["func_iou"] == pytest.approx(np.mean(all_raw))
    assert summ["tam"]["refined"]["obj_iou"] == pytest.approx(summ["refined"]["obj_iou"])
    o, f = summ["tam"]["refined"]["obj_iou"], summ["tam"]["refined"]["func_iou"]
    assert summ["tam"]["refined"]["f1_iou"] == pytest.approx(tam.f1_iou(o, f))
    text = format_summary(summ)
    assert "| TAM protocol |" in text and "| raw Grad-CAM |" in text and summ["method"] == \
        "diffusion-cam"
    other = format_summary(dict(summ, method="llava-cam"))
    assert "| LLaVA-CAM (raw) |" in other and "| LLaVA-CAM + paper refinement |" in other
    assert "Grad-CAM |" not in other
    rows = diffcam.run.function_word_rows(out)
    assert len(rows) == len(all_raw) and [r["raw_func_iou"] for r in rows] == all_raw
    assert rows[0]["word"] == t["function_words"][0]["word"] and \
        rows[0]["raw_threshold"] == t["threshold"]["raw"]


def test_explanation_score_is_the_run_scoring(adapter, gold_run):
    """Explanation.score(masks) gives what the run recorded for the same sample."""
    store = RunStore.open(gold_run[0])
    rec = next(iter(store.records()))
    sample = {s.id: s for s in _gold()}[rec["id"]]
    with diffcam.Explainer(adapter) as ex:
        exp = ex.explain(sample.image, sample.prompt, answer=sample.answer, targets="all")
    got = exp.score(sample.masks)
    assert got["scores"].keys() == rec["scores"].keys()
    for word, sc in got["scores"].items():
        assert (sc["mask"], sc["target"], sc["grid"]) == (
            rec["scores"][word]["mask"], rec["scores"][word]["target"],
            rec["scores"][word]["grid"])
    _same_scores(got["scores"], rec["scores"])
    assert [(w["word"], w["target"]) for w in got["tam"]["function_words"]] == [
        (w["word"], w["target"]) for w in rec["tam"]["function_words"]]
    for a, b in zip(got["tam"]["function_words"], rec["tam"]["function_words"]):
        assert a["raw"] == pytest.approx(b["raw"], abs=2e-3)
        assert a["refined"] == pytest.approx(b["refined"], abs=2e-3)
    none = exp.score({"elephant": np.ones((4, 4), bool)})
    assert none == {"scores": {}, "tam": {}}
    for bad, err in [({}, TypeError), ([np.ones((4, 4))], TypeError),
                     ({"dog": np.ones(4)}, ValueError), ({"": np.ones((4, 4))}, ValueError),
                     ({"dog": np.array([["a"]])}, TypeError)]:
        with pytest.raises(err):
            exp.score(bad)


def test_rerun_skips_everything_and_writes_nothing(adapter, gold_run):
    out, _ = gold_run
    before = _files(out)
    stats = run_dataset(adapter, _gold(), out, targets="all", batch_size=3, shard_size=2,
                        progress=False)
    assert (stats["done"], stats["skipped"]) == (0, 4)
    assert _files(out) == before


def test_settings_mismatch_and_no_resume(adapter, gold_run):
    out, _ = gold_run
    with pytest.raises(SettingsMismatch, match="explain.targets"):
        run_dataset(adapter, _gold(), out, targets="nouns", progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        run_dataset(adapter, _gold(), out, targets="all", resume=False, progress=False)
    with pytest.raises(SettingsMismatch, match="explainer.llava_cam_threshold"):
        run_dataset(adapter, _gold(), out, targets="all", progress=False,
                    explainer_kwargs={"llava_cam_threshold": 0.3})


def test_crash_then_resume_equals_an_uninterrupted_run(adapter, gold_run, tmp_path,
                                                        monkeypatch):
    from diffcam.attribution import Explainer

    out = str(tmp_path / "crash")
    real, calls = Explainer.explain, []

    def explain(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt           # Ctrl-C in the middle of the third batch
        return real(self, *a, **k)

    monkeypatch.setattr(Explainer, "explain", explain)
    with pytest.raises(KeyboardInterrupt):
        run_dataset(adapter, _gold(), out, targets="all", batch_size=1, shard_size=10,
                    progress=False)
    store = RunStore.open(out)
    assert store.done_ids() == {s.id for s in _gold()[:2]}     # finished work was committed
    assert not [f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".tmp")]
    monkeypatch.setattr(Explainer, "explain", real)
    stats = run_dataset(adapter, _gold(), out, targets="all", batch_size=1, shard_size=10,
                        progress=False)
    assert (stats["done"], stats["skipped"]) == (2, 2)
    full = RunStore.open(gold_run[0])
    got = {r["id"]: (r, a) for r, a in RunStore.open(out).iter_maps()}
    for rec, arrays in full.iter_maps():
        r2, a2 = got[rec["id"]]
        assert r2["answer"] == rec["answer"] and r2["scores"].keys() == rec["scores"].keys()
        for k in arrays:
            np.testing.assert_allclose(a2[k], arrays[k], rtol=1e-4,
                                       atol=1e-6 * float(np.abs(arrays[k]).max()))


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_bad_sample_fails_alone_and_is_recorded(adapter, tmp_path, prefetch):
    bad_png = tmp_path / "broken.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples = _gold(3)
    samples.insert(1, Sample("broken", str(bad_png), "<image> describe the image .",
                             answer="a red circle ."))
    out = str(tmp_path / "errs")
    stats = run_dataset(adapter, samples, out, targets="all", batch_size=4, progress=False,
                        prefetch=prefetch)
    assert (stats["done"], stats["errors"]) == (3, 1)
    errs = RunStore.open(out).errors()
    assert list(errs) == ["broken"] and "broken.png" in errs["broken"]["message"] + \
        errs["broken"]["traceback"]
    assert "broken" in summarize(out)["errors"]
    again = run_dataset(adapter, samples, out, targets="all", batch_size=4, progress=False)
    assert (again["done"], again["skipped"], again["errors"]) == (0, 4, 0)
    retry = run_dataset(adapter, samples, out, targets="all", batch_size=4, progress=False,
                        retry_errors=True)
    assert (retry["done"], retry["errors"]) == (0, 1)


def test_workers_split_the_dataset(adapter, tmp_path):
    out = str(tmp_path / "w")
    a = run_dataset(adapter, _gold(5), out, targets="all", worker=(0, 2), progress=False)
    b = run_dataset(adapter, _gold(5), out, targets="all", worker=(1, 2), progress=False)
    assert (a["done"], b["done"]) == (3, 2)
    store = RunStore.open(out)
    assert store.done_ids() == {s.id for s in _gold(5)}
    assert {r["index"] % 2 for r in store.records() if r["_shard"].startswith("w001")} == {1}


def test_generated_answers_are_judged(adapter, tmp_path):
    out = str(tmp_path / "gen")
    stats = run_dataset(adapter, "shapes:test:0:2:describe,colour", out, targets="all",
                        progress=False, batch_size=4)
    assert stats["done"] == 4
    recs = list(RunStore.open(out).records())
    for r in recs:
        assert r["answer_given"] is False
        assert r["correct"] == (r["answer"].split() == r["meta"]["expected"].split())
    s = summarize(out)
    assert s["judged"] == 4 and set(s["by_kind"]) == {"describe", "colour"}


def test_bad_arguments(adapter, tmp_path):
    out = str(tmp_path / "bad")
    for kw, msg in (({"batch_size": 0}, "batch_size"), ({"shard_size": 1.5}, "shard_size"),
                    ({"worker": (2, 2)}, "worker"), ({"worker": 3}, "worker"),
                    ({"config": "fast"}, "config"), ({"limit": 0}, "limit"),
                    ({"method": "gradcam"}, "method"), ({"score": "prob"}, "score")):
        with pytest.raises(ValueError, match=msg):
            run_dataset(adapter, _gold(1), out, progress=False, **kw)
    with pytest.raises(TypeError, match="Sample"):
        run_dataset(adapter, [("img", "prompt")], out, progress=False)
    dup = _gold(1) + _gold(1)
    with pytest.raises(ValueError, match="occurs twice"):
        run_dataset(adapter, dup, str(tmp_path / "dup"), progress=False)
    with pytest.raises(ValueError, match="prompt"):
        run_dataset(adapter, _gold(1), str(tmp_path / "p"), prompt="x", progress=False)


def test_cli_run_and_report(tmp_path, capsys):
    from diffcam.cli import main

    out = str(tmp_path / "cli")
    assert main(["run", "shapes:val:0:2", "--out", out, "--answer", "gold", "--targets", "all",
                 "--threads", "1", "--quiet"]) == 0
    assert main(["report", out]) == 0
    text = capsys.readouterr().out
    assert "samples explained: 2" in text and "Diffusion-CAM" in text
    assert main(["report", out, "--json", "--scores", str(tmp_path / "scores.csv")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (tmp_path / "scores.csv").read_text().startswith("id,index,kind,answer")
    assert main(["report", out, "--function-scores", str(tmp_path / "func.csv")]) == 0
    capsys.readouterr()
    lines = (tmp_path / "func.csv").read_text().splitlines()
    assert lines[0] == ",".join(diffcam.run.report.FUNCTION_COLUMNS) and len(lines) > 1
    assert len(lines) - 1 == len(diffcam.run.function_word_rows(out))
    assert main(["report", out, "--gallery", str(tmp_path / "gal"), "--n", "2"]) == 0
    assert "ground truth" in (tmp_path / "gal" / "index.html").read_text()   # shapes spec
    assert doc["done"] == 2 and doc["dataset"] == "shapes:val:0:2:describe:gold"
    assert main(["run", "shapes:nope", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "split 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "shapes:val", "--out", out, "--worker", "2/2"])


def test_ray_engine_splits_the_run_over_workers(tmp_path):
    """Two Ray tasks (a local Ray instance) write one run folder; the result equals the
    dataset, each task took its half."""
    ray = pytest.importorskip("ray")
    from diffcam.run import run_dataset_ray

    out = str(tmp_path / "ray")
    try:
        stats = run_dataset_ray("bundled", "shapes:test:0:4", out, workers=2,
                                num_cpus_per_worker=1, progress=False, answer="gold",
                                targets="all", batch_size=2)
    finally:
        ray.shutdown()
    assert (stats["done"], stats["errors"]) == (4, 0)
    assert sorted(w["done"] for w in stats["workers"]) == [2, 2]
    store = RunStore.open(out)
    assert store.done_ids() == {s.id for s in _gold(4)}
    assert {r["_shard"][:4] for r in store.records()} == {"w000", "w001"}


def test_ray_engine_needs_names(tmp_path, monkeypatch):
    import sys

    from diffcam.run import run_dataset_ray

    monkeypatch.setitem(sys.modules, "ray", None)           # as if Ray were not installed
    with pytest.raises(ImportError, match="pip install ray"):
        run_dataset_ray("bundled", "shapes:test:0:4", str(tmp_path / "r"))
    with pytest.raises(TypeError, match="dataset spec"):
        run_dataset_ray("bundled", _gold(1), str(tmp_path / "r"))
    with pytest.raises(TypeError, match="diffcam.load"):
        run_dataset_ray(object(), "shapes:test:0:4", str(tmp_path / "r"))
    with pytest.raises(ValueError, match="workers"):
        run_dataset_ray("bundled", "shapes:test:0:4", str(tmp_path / "r"), workers=0)
    with pytest.raises(ValueError, match="worker="):
        run_dataset_ray("bundled", "shapes:test:0:4", str(tmp_path / "r"), worker=(0, 1))


def test_cli_explain_one_image(tmp_path, capsys, monkeypatch):
    from diffcam import cli
    from diffcam.attribution import Explanation
    from diffcam.cli import main
    from diffcam.viz.png import write_png

    sc = shapes.scene("test", 1)
    img = str(tmp_path / "scene.png")
    write_png(img, sc.image)
    out = str(tmp_path / "exp")
    assert main(["explain", img, "--out", out, "--targets", "all", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    exp = Explanation.load(out)
    assert f"answer: {exp.answer}" in text
    assert exp.settings["refine"]["preset"] == "paper"
    assert next(iter(exp.maps[0].values())).shape[-2:] == sc.image.shape[:2]  # refined at 96x96
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert len(pngs) == len(exp.target_names)
    load_model = cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    # an existing --out and an unreadable image are refused before the model is loaded
    assert main(["explain", img, "--out", out, "--raw"]) == 2      # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "missing.png"), "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["explain", str(tmp_path / "bad.png"), "--out", str(tmp_path / "m")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m")
    monkeypatch.setattr(cli, "_load_model", load_model)
    assert main(["explain", img, "--out", out, "--raw", "--overwrite",
                 "--answer", shapes.describe(sc)]) == 0
    raw = Explanation.load(out)
    assert raw.answer == shapes.describe(sc) and "refine" not in raw.settings


def _caption_run_vs_gold(adapter, gold_run, spec, out, scene_of, **kw):
    """Run the 4 gold scenes of an exported dataset with their captions as answers; each
    record paired with the gold run's record of the same scene (``scene_of(record)``)."""
    stats = run_dataset(adapter, spec, out, answer="caption", targets="all", progress=False,
                        **kw)
    assert (stats["done"], stats["errors"]) == (4, 0)
    ref = {r["meta"]["scene"]: r for r in RunStore.open(gold_run[0]).records()}
    return [(r, ref[scene_of(r)]) for r in RunStore.open(out).records()]


def test_the_shapes_export_runs_like_the_shapes_world(adapter, gold_run, tmp_path):
    """The same scenes through the COCO loader (PNG files, RLE masks, captions) give the same
    records and scores as through shapes.dataset (arrays in memory)."""
    root = str(tmp_path / "coco")
    shapes.export_coco(root, "test", n=4)
    pairs = _caption_run_vs_gold(adapter, gold_run, f"coco:{root}", str(tmp_path / "coco-run"),
                                 lambda r: r["meta"]["image_id"], batch_size=3, shard_size=2)
    for r, g in pairs:
        assert r["answer"] == g["answer"] and r["targets"] == g["targets"]
        assert r["scores"].keys() == g["scores"].keys() and r["scores"]
        _same_scores(r["scores"], g["scores"])


def test_a_grandf_run_scores_the_phrase_heads(adapter, gold_run, tmp_path):
    """The same scenes as GranD-f grounded captions: the caption explained teacher-forced, and
    the words heading a grounded phrase (the shape words) scored against the phrase masks,
    with the scores of the in-memory run; the gallery finds the masks through the spec."""
    path = shapes.export_grandf(str(tmp_path / "grandf"), "test", n=4, layout="gcg")
    out = str(tmp_path / "grandf-run")
    pairs = _caption_run_vs_gold(adapter, gold_run, f"grandf:{path}", out,
                                 lambda r: int(r["meta"]["file_name"][5:11]), batch_size=2,
                                 shard_size=3)
    for r, g in pairs:
        assert r["answer"] == g["answer"] == r["meta"]["caption"]
        assert r["targets"] == g["targets"]
        heads = {p["key"] for p in r["meta"]["phrases"]}
        assert r["scores"] and set(r["scores"]) == heads <= set(shapes.SHAPES)
        _same_scores(r["scores"], g["scores"])
    index = gallery(out, str(tmp_path / "g"), n=1)
    assert "ground truth" in open(index).read()


def test_a_grandf_run_of_phrase_targets(adapter, tmp_path):
    """targets="phrases": each sample's grounded phrases explained as targets and scored
    against the phrase masks (the spec switches to keys=phrase), the same numbers as
    Explanation.score of the same explanation; what cannot work fails clearly."""
    from diffcam.data.grandf import GrandfDataset

    path = shapes.export_grandf(str(tmp_path / "grandf"), "test", n=3, layout="gcg")
    out = str(tmp_path / "phrase-run")
    stats = run_dataset(adapter, f"grandf:{path}", out, answer="caption", targets="phrases",
                        batch_size=2, progress=False)
    assert (stats["done"], stats["errors"]) == (3, 0)
    store = RunStore.open(out)
    assert store.settings["dataset"].split("|")[2] == "keys=phrase"
    assert store.settings["explain"]["targets"] == "phrases"
    samples = {s.id: s for s in GrandfDataset(path).samples(answer="caption", keys="phrase")}
    for rec in store.records():
        s = samples[rec["id"]]
        phrases = [p["text"] for p in s.meta["phrases"]]
        assert rec["targets"][:-1] == phrases and set(rec["scores"]) == set(phrases)
        assert all(sc["mask"] == name for name, sc in rec["scores"].items())
    with diffcam.Explainer(adapter) as ex:
        exp = ex.explain(s.image, s.prompt, answer=s.answer, targets=phrases)
    got = exp.score(s.masks)["scores"]
    _same_scores(got, rec["scores"])
    with pytest.raises(ValueError, match="answer='caption'"):
        run_dataset(adapter, f"grandf:{path}", str(tmp_path / "x"), targets="phrases",
                    progress=False)
    img = shapes.scene("test", 0).image
    mask = np.zeros(img.shape[:2], bool)
    mask[:20, :20] = True
    odd = [Sample("no-phrases", img, "<image> describe the image .", answer="a red star ."),
           Sample("one-missing", img, "<image> describe the image .", answer="a red star .",
                  masks={"a red star": mask, "a blue moon": mask},
                  meta={"phrases": [{"text": "a blue moon", "span": [0, 11]},
                                    {"text": "a red star", "span": [0, 10]}]}),
           Sample("none-found", img, "<image> describe the image .", answer="a red star .",
                  meta={"phrases": [{"text": "a blue moon", "span": [0, 11]}]})]
    st = run_dataset(adapter, odd, str(tmp_path / "y"), targets="phrases", progress=False)
    assert (st["done"], st["errors"]) == (1, 2)
    store = RunStore.open(str(tmp_path / "y"))
    errs = store.errors(set())
    assert "no grounded phrases" in errs["no-phrases"]["message"]
    assert "none of the grounded phrases" in errs["none-found"]["message"]
    rec = next(iter(store.records()))        # the phrase the answer lacks is left out
    assert rec["id"] == "one-missing" and rec["targets"][:-1] == ["a red star"]
    assert list(rec["scores"]) == ["a red star"]


def test_cli_explain_refuses_phrases_targets(tmp_path, capsys):
    from diffcam.cli import main

    assert main(["explain", str(tmp_path / "img.png"), "--out", str(tmp_path / "o"),
                 "--targets", "phrases"]) == 2
    assert "--targets phrases applies to diffcam run" in capsys.readouterr().err


def _first_two_words(words, tokens):
    return [0, 1]


def test_a_callable_target_resumes(adapter, tmp_path):
    out = str(tmp_path / "callable")
    a = run_dataset(adapter, _gold(2), out, targets=_first_two_words, progress=False)
    b = run_dataset(adapter, _gold(2), out, targets=_first_two_words, progress=False)
    assert (a["done"], b["done"], b["skipped"]) == (2, 0, 2)
    st = RunStore.open(out)
    assert st.settings["explain"]["targets"].endswith("_first_two_words")
    assert all(len(r["targets"]) == 3 for r in st.records())     # two words + the aggregate


def test_score_rows_and_files(gold_run, tmp_path):
    import csv

    from diffcam.run import score_rows, write_scores

    out, _ = gold_run
    rows = score_rows(out)
    recs = list(RunStore.open(out).records())
    assert len(rows) == sum(len(r["scores"]) for r in recs)
    r0 = recs[0]
    word, sc = next(iter(r0["scores"].items()))
    row = next(r for r in rows if r["id"] == r0["id"] and r["word"] == word)
    assert row["refined_f3"] == sc["refined"]["f3"] and row["raw_obj_iou"] == sc["raw"]["obj_iou"]
    path = str(tmp_path / "s.csv")
    assert write_scores(out, path) == len(rows)
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows) and float(back[0]["raw_f3"]) == pytest.approx(rows[0]["raw_f3"])
    pq = pytest.importorskip("pyarrow.parquet")
    ppath = str(tmp_path / "s.parquet")
    write_scores(out, ppath)
    t = pq.read_table(ppath)
    assert t.num_rows == len(rows) and t.column("word").to_pylist() == [r["word"] for r in rows]
    with pytest.raises(ValueError, match="csv"):
        write_scores(out, str(tmp_path / "s.txt"))


def test_a_batch_out_of_memory_is_retried_one_by_one(adapter, gold_run, tmp_path, monkeypatch):
    from diffcam.attribution import Explainer
    from diffcam.run import runner

    real, sizes, freed = Explainer.explain, [], []

    def explain(self, images, prompts, **k):
        sizes.append(len(images))
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, prompts, **k)

    monkeypatch.setattr(Explainer, "explain", explain)
    monkeypatch.setattr(runner, "_free_device_memory", lambda: freed.append(1))
    out = str(tmp_path / "oom")
    stats = run_dataset(adapter, _gold(), out, targets="all", batch_size=3, shard_size=2,
                        progress=False)
    assert (stats["done"], stats["errors"]) == (4, 0)
    assert sizes == [3, 1, 1, 1, 1] and freed == [1]
    ref = {r["id"]: r for r in RunStore.open(gold_run[0]).records()}
    for r in RunStore.open(out).records():
        assert r["answer"] == ref[r["id"]]["answer"]


def test_trajectory_states_from_the_command_line(tmp_path, capsys):
    from diffcam.cli import main

    out = str(tmp_path / "traj")
    assert main(["run", "shapes:val:0:1", "--out", out, "--states", "final,2", "--targets",
                 "all", "--threads", "1", "--quiet"]) == 0
    rec, arrays = next(RunStore.open(out).iter_maps())
    assert rec["states"] == ["final", 2]
    maps = {k: a for k, a in arrays.items() if not k.endswith("/image")}
    assert maps and all(a.shape[1] == 2 for a in maps.values())  # (targets + 1, states, h, w)
    with pytest.raises(SystemExit):
        main(["run", "shapes:val:0:1", "--out", out, "--states", "last"])


def test_save_refined_keeps_every_refined_map_and_the_same_scores(adapter, gold_run, tmp_path):
    out = str(tmp_path / "refined")
    run_dataset(adapter, _gold(2), out, targets="all", save_refined=True, progress=False)
    ref = {r["id"]: r for r in RunStore.open(gold_run[0]).records()}
    for rec, arrays in RunStore.open(out).iter_maps():
        want = ref[rec["id"]]["scores"]
        assert rec["scores"].keys() == want.keys()
        _same_scores(rec["scores"], want)
        inter = [k for k in arrays if k.endswith("/interference")]
        assert inter                        # SICD's maps (repeated words, <eos> padding) kept
        n_inter = len(rec["interference"])
        assert all(arrays[k].shape[0] == n_inter for k in inter)
        for key in [k for k in arrays if not k.endswith(("/refined", "/image",
                                                         "/interference"))]:
            assert arrays[key + "/refined"].shape[-2:] == (96, 96)          # the image's size
            assert arrays[key + "/refined"].shape[:2] == arrays[key].shape[:2]


@pytest.mark.parametrize("prefetch", [True, False])
def test_several_images_per_sample(adapter, tmp_path, prefetch):
    from diffcam.viz.png import write_png

    a, b = shapes.scene("test", 0), shapes.scene("test", 1)
    path = str(tmp_path / "b.png")
    write_png(path, b.image)
    s = Sample("pair", [a.image, path], "<image> <image> describe the image .",
               answer=shapes.describe(a), masks=shapes.word_masks(a))
    out = str(tmp_path / f"pair{prefetch}")
    stats = run_dataset(adapter, [s], out, targets="all", progress=False, prefetch=prefetch)
    assert stats["done"] == 1
    rec, arrays = next(RunStore.open(out).iter_maps())
    assert rec["image_sizes"] == [[96, 96], [96, 96]]
    assert {k.split("/")[1] for k in arrays} == {"0", "1"}
    assert "pair/0/image" in arrays and "pair/1/image" not in arrays     # 1 was a file
    assert rec["image_files"] == [None, path]
    assert rec["scores"]                        # scored on the first image
    with diffcam.Explainer(adapter) as ex:
        e = ex.explain([[a.image, b.image]], s.prompt, answer=s.answer, targets="all")[0]
    for i in (0, 1):
        for g, m in e.maps[i].items():
            np.testing.assert_allclose(arrays[f"pair/{i}/{g}"], m, rtol=1e-4,
                                       atol=1e-6 * float(np.abs(m).max()))


def test_gallery_draws_the_maps_behind_the_scores(gold_run, tmp_path):
    from diffcam.run import gallery, score_rows, scored_maps

    out, _ = gold_run
    store = RunStore.open(out)
    for rec, arrays in store.iter_maps():            # in-memory images were stored
        assert rec["image_files"] == [None]
        np.testing.assert_array_equal(arrays[f"{rec['id']}/0/image"],
                                      shapes.scene("test", rec["meta"]["scene"]).image)
    samples = {s.id: s for s in _gold()}
    for row in score_rows(out)[:6]:
        raw, ref = scored_maps(out, row["id"], row["word"])
        mask = samples[row["id"]].masks[row["mask"]][None]
        s = diffcam.metrics.localization(ref, mask)
        assert float(s.obj_iou) == pytest.approx(row["refined_obj_iou"], abs=1e-6)
        assert float(s.f3) == pytest.approx(row["refined_f3"], abs=1e-6)
        assert float(diffcam.metrics.localization(raw, mask).f3) == \
            pytest.approx(row["raw_f3"], abs=1e-9)
    index = gallery(out, str(tmp_path / "g"), n=3, masks=lambda r: samples[r["id"]].masks)
    pngs = sorted(f for f in os.listdir(tmp_path / "g") if f.endswith(".png"))
    assert len(pngs) == 6 and sum(f.startswith("worst") for f in pngs) == 3
    text = open(index).read()
    assert all(p in text for p in pngs) and "Diffusion-CAM" in text and "ground truth" in text
    from PIL import Image

    w = Image.open(tmp_path / "g" / pngs[0]).size[0]
    assert w == 4 * 96 + 3 * 4                  # image, raw, refined, mask
    with pytest.raises(ValueError, match="metric"):
        gallery(out, str(tmp_path / "g2"), metric="nope")
    with pytest.raises(KeyError, match="scored word"):
        scored_maps(out, row["id"], "zebra")


def test_gallery_reads_image_files_back(adapter, tmp_path):
    root = str(tmp_path / "coco")
    shapes.export_coco(root, "val", n=2)
    out = str(tmp_path / "run")
    run_dataset(adapter, f"coco:{root}", out, answer="caption", targets="all", progress=False)
    recs = list(RunStore.open(out).iter_maps())
    assert all(r["image_files"][0].endswith(".png") and f"{r['id']}/0/image" not in a
               for r, a in recs)
    index = gallery(out, str(tmp_path / "g"), n=1)        # masks found through the spec
    assert "ground truth" in open(index).read()
    plain = gallery(out, str(tmp_path / "g0"), n=1, masks=None)
    assert "ground truth" not in open(plain).read()


def test_two_worker_processes_share_one_folder(tmp_path):
    """Two processes started at once on one folder (the run.json race included) split the
    dataset between them."""
    import subprocess
    import sys

    out = str(tmp_path / "shared")
    cmd = [sys.executable, "-m", "diffcam", "run", "shapes:val:0:6", "--out", out, "--answer",
           "gold", "--targets", "all", "--threads", "1", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd + ["--worker", f"{i}/2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    store = RunStore.open(out)
    assert store.done_ids() == {f"shapes-val-{i}-describe" for i in range(6)}
    by_worker = {}
    for r in store.records():
        by_worker.setdefault(r["_shard"][:4], set()).add(r["index"] % 2)
    assert by_worker == {"w000": {0}, "w001": {1}}


def test_model_loader_arguments_from_the_command_line(tmp_path, capsys):
    """--model-arg reaches the loader: the autoregressive twin of the bundled model."""
    from diffcam.cli import main

    out = str(tmp_path / "ar")
    assert main(["run", "shapes:val:0:2", "--out", out, "--answer", "gold", "--targets", "all",
                 "--model-arg", "kind=autoregressive", "--threads", "1", "--quiet"]) == 0
    st = RunStore.open(out)
    ar = diffcam.load("bundled", kind="autoregressive")
    assert st.settings["model"] == json.loads(json.dumps(ar.info()))
    assert st.settings["model"] != json.loads(json.dumps(diffcam.load("bundled").info()))
    assert len(st.done_ids()) == 2
    with pytest.raises(SystemExit):
        main(["run", "shapes:val:0:2", "--out", out, "--model-arg", "kind"])
