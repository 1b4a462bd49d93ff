"""diffcam.models.tables on synthetic MapRecords (no model needed)."""

import numpy as np
import pytest

from diffcam.models import evaluate, tables
from diffcam.models.evaluate import MapRecord
from diffcam.refine.config import RefineConfig


def _record(split, index, rng, kind="describe", correct=True, n_targets=2, n_inter=1,
            quality=1.0):
    """A record whose maps peak on their mask (``quality`` 1) or ignore it (0)."""
    masks = np.zeros((n_targets, 96, 96), bool)
    raw = rng.random((n_targets, 12, 12)).astype(np.float32) * 0.3
    for t in range(n_targets):
        r, c = rng.integers(0, 9, 2)
        masks[t, r * 8:(r + 3) * 8, c * 8:(c + 3) * 8] = True
        raw[t, r:r + 3, c:c + 3] += quality
    words = ["red", "circle", "blue", "square"][:n_targets]
    inter = rng.random((n_inter, 12, 12)).astype(np.float32) if n_inter >= 0 else None
    return MapRecord(split, index, kind, "<image> describe the image .", "a red circle .",
                     correct, raw if correct else None, [5, 6, 7, 5, 6, 2],
                     masks if correct else None, words if correct else [],
                     inter if correct else None)


def _records(split="test", n=12, seed=0, quality=1.0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        recs.append(_record(split, i, rng, n_inter=i % 3 - 1 if i % 3 else 0, quality=quality))
        recs.append(_record(split, i, rng, kind="colour", correct=i % 4 != 0, n_targets=1))
    return recs


def test_cache_round_trip(tmp_path):
    recs = _records()
    recs[1].interference = None
    path = tmp_path / "r.npz"
    tables.save_records(str(path), recs, meta={"x": 1})
    back, meta = tables.load_records(str(path), with_meta=True)
    assert meta == {"x": 1}
    assert len(back) == len(recs)
    for a, b in zip(recs, back):
        for name in ("split", "index", "kind", "prompt", "answer", "correct", "token_ids",
                     "words"):
            assert getattr(a, name) == getattr(b, name)
        for name in ("raw", "masks", "interference"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None)
            if x is not None:
                assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def test_collect_split_uses_the_cache(tmp_path):
    calls = []

    def fake_collect(adapter, split, n, start, kinds, layer):
        calls.append((split, start, n))
        rng = np.random.default_rng(start)
        return [_record(split, i, rng) for i in range(start, start + n)]

    made = []

    class FakeAdapter:
        default_layer = 1

    def factory():
        made.append(1)
        return FakeAdapter()

    a = tables.collect_split(factory, "val", 7, ("describe",), str(tmp_path), "fp", chunk=3,
                             collect=fake_collect, layer=1)
    assert calls == [("val", 0, 3), ("val", 3, 3), ("val", 6, 1)] and len(made) == 1
    stats = {}
    b = tables.collect_split(factory, "val", 7, ("describe",), str(tmp_path), "fp", chunk=3,
                             collect=fake_collect, stats=stats, layer=1)
    assert len(calls) == 3 and len(made) == 1          # all from the cache, no model loaded
    assert stats["cached"] == 7 and stats["explained"] == 0 and stats["cached_seconds"] >= 0
    assert [r.index for r in a] == [r.index for r in b] == list(range(7))
    assert all(np.array_equal(x.raw, y.raw) for x, y in zip(a, b))
    # layer=None: the adapter's default block keys the cache (here block 1: the same files)
    tables.collect_split(factory, "val", 7, ("describe",), str(tmp_path), "fp", chunk=3,
                         collect=fake_collect)
    assert len(calls) == 3 and len(made) == 2          # loaded once to learn the default
    FakeAdapter.default_layer = 0                      # a changed default must not hit them
    tables.collect_split(factory, "val", 7, ("describe",), str(tmp_path), "fp", chunk=3,
                         collect=fake_collect)
    assert len(calls) == 6
    tables.collect_split(factory, "val", 7, ("describe",), str(tmp_path), "other", chunk=3,
                         collect=fake_collect, layer=1)   # other weights: a miss
    assert len(calls) == 9

    gold = []

    def fake_gold(adapter, split, n, start, kinds, layer, gold_if_wrong=False):
        gold.append(gold_if_wrong)
        return fake_collect(adapter, split, n, start, kinds, layer)

    tables.collect_split(factory, "val", 3, ("describe",), str(tmp_path), "fp", chunk=3,
                         collect=fake_gold, gold_if_wrong=True, layer=1)   # its own entry
    assert gold == [True]


@pytest.mark.parametrize("refine_at", ["image", "grid"])
@pytest.mark.parametrize("config", ["raw", "random", "paper", "reference"])
def test_scores_match_score_maps(config, refine_at):
    recs = _records()
    prep = tables.prepare(recs, refine_at=refine_at)
    row = tables.score(prep, config)
    ref = evaluate.score_maps(recs, config, refine_at=refine_at)
    assert row.n_maps == ref["n_maps"] == prep.n_maps
    # batched refinement equals record-by-record refinement up to float32 rounding (the native
    # kernels' vector lanes depend on a map's position in the batch)
    assert row.f3 == pytest.approx(ref["f3_of_means"], abs=1e-7)
    assert row.obj_iou == pytest.approx(ref["obj_iou"], abs=1e-7)
    assert row.contrast == pytest.approx(ref["contrast"], rel=1e-7)


def test_refine_at_image_upsamples_before_refining():
    """refine_at="image": the 12x12 maps (and SICD's interference maps) are resized to the
    96x96 masks with diffcam.resize and then refined; "grid" refines the 12x12 maps; raw and
    random maps stay on the grid either way (the metrics resize them)."""
    import diffcam

    rec = _record("test", 0, np.random.default_rng(1), n_inter=2)
    assert rec.interference is not None and len(rec.interference)
    norm = evaluate._normalise
    up = diffcam.resize(norm(rec.raw), (96, 96))
    inter = diffcam.resize(norm(rec.interference), (96, 96))
    want = diffcam.refine(up, tokens=rec.token_ids, interference=[inter] * len(up))
    got = evaluate.refine_record(rec, "paper")
    assert got.shape == (2, 96, 96)
    np.testing.assert_array_equal(got, want)
    grid = evaluate.refine_record(rec, "paper", refine_at="grid")
    assert grid.shape == (2, 12, 12)
    np.testing.assert_array_equal(grid, diffcam.refine(norm(rec.raw), tokens=rec.token_ids,
                                                       interference=[norm(rec.interference)] * 2))
    for cfg in ("raw", "random"):
        assert evaluate.refine_record(rec, cfg).shape == (2, 12, 12)
    with pytest.raises(ValueError, match="refine_at"):
        evaluate.refine_record(rec, "paper", refine_at="pixels")
    prep = tables.prepare(_records(n=3))
    assert prep.refine_at == "image" and prep.maps.shape[1:] == (96, 96)
    assert prep.grid.shape[1:] == (12, 12)


def test_ablation_rows_switch_modules():
    for base in (RefineConfig.paper(), RefineConfig.reference()):
        rows = dict(tables.ablation_configs(base))
        for m in tables.MODULES:
            alone = rows[f"{tables.MODULE_NAMES[m]} only"]
            wo = rows[f"all but {tables.MODULE_NAMES[m]}"]
            for o in tables.MODULES:
                assert getattr(alone, o) == (getattr(base, m) if o == m else False)
                assert getattr(wo, o) == (False if o == m else getattr(base, o))
            # nothing but the switches changes
            assert alone.replace(**{o: getattr(base, o) for o in tables.MODULES}) == base
        assert rows["all four"] == base
        assert not any(getattr(rows["no module (clip + min-max only)"], m)
                       for m in tables.MODULES)


def test_ablation_and_verdicts():
    prep = tables.prepare(_records(n=16))
    out = tables.ablation(prep, {"paper": RefineConfig.paper(),
                                 "reference": RefineConfig.reference()})
    assert [r.label for r in out[""]] == ["random maps (floor)", "raw Grad-CAM"]
    assert len(out["paper"]) == 10
    raw = out[""][1]
    ver = {v.module: v for v in tables.module_verdicts(prep, out["reference"], raw, n_boot=200)}
    assert ver["DACG"].no_op and ver["DACG"].verdict.startswith("does not help")
    for v in ver.values():
        assert v.verdict.split(" (")[0] in ("helps", "hurts", "does not help")
        d, lo, hi = v.leave_one_out
        assert lo <= d + 1e-12 and d <= hi + 1e-12 or v.no_op


def test_paired_delta_interval():
    good, bad = tables.prepare(_records(n=20)), tables.prepare(_records(n=20, quality=0.0))
    a = tables.score(good, "raw")
    # same maps: zero difference, zero-width interval
    assert tables.paired_delta(good, a, tables.score(good, "raw"), 300) == (0.0, 0.0, 0.0)
    # random maps are clearly worse than maps that peak on the object
    d, lo, hi = tables.paired_delta(good, a, tables.score(good, "random"), 300)
    assert d > 0 and lo > 0 and hi >= d
    assert tables.score(bad, "raw").f3 < a.f3


def test_f3_vec_matches_scalar():
    from diffcam.metrics import f3_score

    rng = np.random.default_rng(1)
    x = np.c_[rng.random(50), rng.random(50) * 40, rng.random(50)]
    x[3, 0] = 0.0
    got = tables.f3_vec(x[:, 0], x[:, 1], x[:, 2])
    assert np.allclose(got, [f3_score(*r) for r in x], atol=1e-15)


def test_selection_picks_best_val_f3():
    prep = tables.prepare(_records("val", n=10))
    grid = {"w_rep": (0.0, 1.0), "w_out": (0.0, 0.5), "gate": (None, (0.1, 0.5))}
    sel = tables.select_sicd(prep, grid=grid)
    assert len(sel.rows) == 8
    best = max(r.f3 for r in sel.rows)
    assert sel.rows[0].f3 == best
    assert tables.score(prep, sel.chosen).f3 == best
    assert sel.chosen.preset == "paper"
    # ties go to the earliest grid point: w_rep = w_out = 0 makes SICD a no-op, so all four gate
    # variants of it tie; only the first can be chosen
    tie = {"w_rep": (0.0,), "w_out": (0.0,), "gate": (None, (0.1, 0.5))}
    s2 = tables.select_sicd(prep, grid=tie)
    assert s2.chosen.gate is False and s2.rows[0].f3 == s2.rows[1].f3


def test_selection_on_a_constructed_case(monkeypatch):
    """score() is replaced by a table of known val F3 values: the argmax must win."""
    prep = tables.prepare(_records("val", n=4))
    grid = {"w_rep": (0.0, 0.5, 1.0), "w_out": (0.0, 0.1), "gate": (None,)}
    target = {(0.5, 0.1): 0.9, (1.0, 0.0): 0.8}

    def fake_score(p, cfg, label=None, keep_maps=False):
        f3 = target.get((cfg.w_rep, cfg.w_out), 0.1) if isinstance(cfg, RefineConfig) else 0
        return tables.Row(label or "", cfg, 0, 0, 0, f3, 0, 1)

    monkeypatch.setattr(tables, "score", fake_score)
    sel = tables.select_sicd(prep, grid=grid)
    assert (sel.chosen.w_rep, sel.chosen.w_out, sel.chosen.gate) == (0.5, 0.1, False)
    assert [r.f3 for r in sel.rows[:2]] == [0.9, 0.8]


def test_sweep_changes_only_its_field():
    prep = tables.prepare(_records(n=6))
    base = RefineConfig.paper()
    for name in tables.SWEEP_FIELDS:
        vals = tables.sweep_values(base, name)
        assert getattr(base, name) in vals and len(vals) >= 4
        rows = tables.sweep(prep, base, name, vals[:2])
        for r, v in zip(rows, vals[:2]):
            assert getattr(r.config, name) == v
            same = r.config.replace(**{name: getattr(base, name)},
                                    gate=base.gate, preset="paper")
            assert same == base
    rows = tables.sweep(prep, base, "var_threshold", [0.0, 10.0])
    assert rows[0].branches["high_var"] == 1.0 and rows[1].branches["high_var"] == 0.0


def test_markdown_contains_every_row():
    grid = {"w_rep": (0.0, 1.0), "w_out": (0.1,), "gate": (None, (0.25, 1.0))}
    rep = tables.run_benchmark(records={"val": _records("val", 8), "test": _records("test", 10)},
                               n_boot=100, command="diffcam eval --val 8 --test 10", grid=grid)
    md = tables.render_markdown(rep)
    assert "diffcam eval --val 8 --test 10" in md
    for rows in rep["ablation"].values():
        for r in rows:
            assert f"| {r.label} |" in md
    for label, _ in tables.ablation_configs(RefineConfig.paper()):
        assert md.count(f"| {label} |") == 2          # one per preset
    for v in rep["verdicts"]["paper"] + rep["verdicts"]["reference"]:
        assert f"| {v.module} |" in md
    for name, rows in rep["sweeps"].items():
        assert len(rows) >= 4
        for r in rows:
            assert f"| {r.label} |" in md
    for r, _ in rep["headline"]:
        assert f"| {r.label} |" in md
    labels = [r.label for r, _ in rep["headline"]]
    assert "paper preset (val-selected) on the 12x12 grid" in labels and rep["refine_at"] == "image"
    assert "upsampled bilinearly to 96x96" in md
    grid_rep = tables.run_benchmark(records={"val": _records("val", 8), "test": _records("test", 10)},
                                    n_boot=20, grid=grid, refine_at="grid")
    assert len(grid_rep["headline"]) == len(rep["headline"]) - 2
    assert "on the 12x12 token grid itself" in tables.render_markdown(grid_rep)
    assert "chosen:" in md
    assert "F3 of the means per question kind" in md and "| describe |" in md
    assert "does not help" in md or "helps" in md or "hurts" in md


def test_cli_eval_parses(monkeypatch, tmp_path):
    from diffcam import cli

    seen = {}
    real_run = tables.run_benchmark

    def fake_run(**kw):
        seen.update(kw)
        return real_run(records={"val": _records("val", 4),
                                             "test": _records("test", 4)},
                                    n_boot=20, command=kw["command"],
                                    grid={"w_rep": (1.0,), "w_out": (0.1,), "gate": (None,)})

    monkeypatch.setattr(tables, "run_benchmark", fake_run)
    out = tmp_path / "b.md"
    rc = cli.main(["eval", "--val", "4", "--test", "4", "--kinds", "describe,count", "--cache",
                   str(tmp_path / "c"), "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    assert seen["val"] == 4 and seen["kinds"] == ("describe", "count")
    assert seen["gold_if_wrong"] is False and seen["refine_at"] == "image"
    text = out.read_text()
    assert "diffcam eval --val 4 --test 4 --kinds describe,count" in text
    assert "--refine-at" not in text
    rc = cli.main(["eval", "--val", "4", "--test", "4", "--cache", str(tmp_path / "c"), "--out",
                   str(out), "--quiet", "--refine-at", "grid"])
    assert rc == 0 and seen["refine_at"] == "grid" and "--refine-at grid" in out.read_text()
    assert cli.main(["eval", "--kinds", "nonsense", "--out", str(out)]) == 2


def test_reference_preset_refines_without_interference_maps():
    """The reference preset reproduces the released code, which has no interference maps: the
    tables (whole preset and its ablation rows) and evaluate.refine_record refine it with SICD's
    uniform constant, as Explanation.refined does; the paper preset uses the maps."""
    recs = [r for r in _records() if r.raw is not None and r.interference is not None
            and len(r.interference)]
    prep = tables.prepare(recs)
    bare = tables.without_interference(prep)
    assert all(len(x) == 0 for x in bare.interference) and any(len(x) for x in prep.interference)
    cfg = RefineConfig.reference()
    np.testing.assert_array_equal(tables.refine_prepared(prep, cfg)[0],
                                  tables.refine_prepared(bare, cfg)[0])
    maps = np.concatenate([evaluate.refine_record(r, "reference") for r in recs])
    np.testing.assert_allclose(tables.refine_prepared(prep, cfg)[0], maps, atol=1e-6)
    # the ablation's reference rows (RefineConfig.replace makes them "custom") too
    abl = tables.ablation(prep, {"reference": cfg}, floors=False)["reference"]
    sicd_only = next(r for r in abl if r.label == "SICD only")
    want = tables.score(bare, cfg.replace(akd=False, dacg=False, cba=False), keep_maps=True)
    np.testing.assert_array_equal(sicd_only.maps, want.maps)
    # the paper preset's SICD does use them
    paper = RefineConfig.paper()
    assert not np.array_equal(tables.refine_prepared(prep, paper)[0],
                              tables.refine_prepared(bare, paper)[0])
