"""The run folder without a model: commits, crash leftovers, errors, settings, dataset specs."""

import json
import os

import numpy as np
import pytest

from diffcam.data import shapes
from diffcam.data.sample import Sample
from diffcam.run import RunStore, SettingsMismatch, match_mask, open_dataset
from diffcam.run import store as store_mod


def _arr(v):
    return np.full((2, 1, 3, 3), v, np.float32)


def test_commit_read_back_and_sequence(tmp_path):
    st = RunStore.create(tmp_path / "r", {"model": "m", "n": 1})
    w = st.writer(0)
    assert w.flush() is None                      # nothing buffered: no empty shard
    w.add({"id": "a", "x": 1}, {"a/0/base": _arr(1)})
    w.add({"id": "b", "x": 2}, {"b/0/base": _arr(2)})
    assert w.flush() == "w000-000000"
    w.add({"id": "c"}, {"c/0/base": _arr(3)})
    assert w.flush() == "w000-000001"
    assert st.writer(0).seq == 2                  # a new writer continues the numbering
    assert st.done_ids() == {"a", "b", "c"}
    assert [r["id"] for r in st.records()] == ["a", "b", "c"]
    assert float(st.maps("b")["b/0/base"][0, 0, 0, 0]) == 2.0
    got = {r["id"]: a for r, a in st.iter_maps()}
    assert set(got) == {"a", "b", "c"} and float(got["c"]["c/0/base"].max()) == 3.0
    with pytest.raises(KeyError, match="'zz'"):
        st.maps("zz")
    with pytest.raises(ValueError, match="must start with"):
        w.add({"id": "d"}, {"e/0/base": _arr(0)})


def test_a_crash_between_maps_and_records_commits_nothing(tmp_path, monkeypatch):
    st = RunStore.create(tmp_path / "r", {"model": "m"})
    w = st.writer(3)
    w.add({"id": "a"}, {"a/0/base": _arr(1)})
    real = store_mod._atomic_write

    def atomic(path, write):
        if path.endswith(".jsonl"):
            raise OSError("disk full")            # maps written, records not
        return real(path, write)

    monkeypatch.setattr(store_mod, "_atomic_write", atomic)
    with pytest.raises(OSError):
        w.flush()
    assert st.done_ids() == set()
    shards = os.listdir(os.path.join(st.path, "shards"))
    assert shards == ["w003-000000.npz"]          # an orphan, not a committed sample
    # a crashed writer's temporary file, and another worker's files, which must stay
    open(os.path.join(st.path, "shards", ".w003-000001.npz.abc.tmp"), "w").close()
    open(os.path.join(st.path, "shards", ".w004-000000.npz.abc.tmp"), "w").close()
    monkeypatch.setattr(store_mod, "_atomic_write", real)
    w2 = st.writer(3)                              # the restarted worker cleans its leftovers
    assert sorted(os.listdir(os.path.join(st.path, "shards"))) == [".w004-000000.npz.abc.tmp"]
    assert w2.seq == 0


def test_failed_write_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "x.npz")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        store_mod._atomic_write(path, boom)
    assert os.listdir(tmp_path) == []


def test_errors_are_superseded_by_success(tmp_path):
    st = RunStore.create(tmp_path / "r", {"model": "m"})
    w = st.writer(0)
    try:
        raise FileNotFoundError("no such image: x.png")
    except FileNotFoundError as e:
        w.error("x", e)
        w.error("y", e)
    with open(w.error_path, "a") as f:
        f.write('{"id": "z", "typ')                # a line cut by a crash is ignored
    errs = st.errors()
    assert set(errs) == {"x", "y"} and errs["x"]["type"] == "FileNotFoundError"
    assert "no such image" in errs["x"]["message"] and "Traceback" in errs["x"]["traceback"]
    w.add({"id": "x"}, {"x/0/base": _arr(0)})
    w.flush()
    assert set(st.errors()) == {"y"}


def test_settings(tmp_path):
    path = tmp_path / "r"
    RunStore.create(path, {"model": {"name": "m", "layers": 4}, "explain": {"targets": "all"}})
    st = RunStore.create(path, {"model": {"name": "m", "layers": 4},
                                "explain": {"targets": "all"}})   # same settings: resumes
    assert st.settings["explain"] == {"targets": "all"}
    with pytest.raises(SettingsMismatch) as info:
        RunStore.create(path, {"model": {"name": "m", "layers": 5}, "explain": {}})
    msg = str(info.value)
    assert "model.layers: run.json has 4, now 5" in msg and "explain.targets" in msg
    with pytest.raises(FileExistsError):
        RunStore.create(path, {"model": {"name": "m", "layers": 4},
                               "explain": {"targets": "all"}}, resume=False)
    with pytest.raises(FileNotFoundError, match="not a diffcam run"):
        RunStore.open(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        RunStore.create(tmp_path / "f", {})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(ValueError, match="schema"):
        RunStore.open(bad)


def test_match_mask():
    masks = {"Circle": 1, "crosses": 2, "bus": 3}
    assert match_mask("circle", masks) == "Circle"
    assert match_mask("circles", masks) == "Circle"
    assert match_mask("cross", masks) == "crosses"
    assert match_mask("bus", masks) == "bus"
    assert match_mask("square", masks) is None and match_mask("circle", None) is None


def test_shapes_dataset_and_word_masks():
    samples = list(shapes.dataset("val", 2, 4, kinds=("describe", "count")))
    assert [s.id for s in samples] == ["shapes-val-2-describe", "shapes-val-2-count",
                                       "shapes-val-3-describe", "shapes-val-3-count"]
    sc = shapes.scene("val", 2)
    s = samples[0]
    assert s.answer is None and s.meta["expected"] == shapes.describe(sc)
    np.testing.assert_array_equal(s.image, sc.image)
    for k in range(sc.n_named):
        assert s.masks[sc.shapes[k]][sc.masks[k]].all()
        assert s.masks[sc.colours[k]][sc.masks[k]].all()
    union = np.any(sc.masks[:sc.n_named], axis=0)
    for m in s.masks.values():
        assert not (m & ~union).any()             # distractors are never in a word's mask
    gold = next(iter(shapes.dataset("val", 2, 3, gold=True)))
    assert gold.answer == shapes.describe(sc)
    with pytest.raises(ValueError, match="split"):
        next(shapes.dataset("nope"))
    with pytest.raises(ValueError, match="kind"):
        next(shapes.dataset("val", 0, 1, kinds=("colours",)))


def test_dataset_specs():
    ds = open_dataset("shapes:test")
    assert ds.count == 100 and ds.spec == "shapes:test:0:100:describe"
    ds = open_dataset("shapes:val:5:8:colour,presence", answer="gold")
    ids = [s.id for s in ds]
    assert len(ids) == ds.count == 6 and ids[0] == "shapes-val-5-colour"
    assert all(s.answer is not None for s in ds)
    for spec, msg in (("shapes:test:1", "expected shapes:SPLIT"), ("shapes:tst", "split"),
                      ("shapes:test:a:3", "START"), ("shapes:test:4:3", "STOP"),
                      ("shapes:test:0:3:dogs", "kinds"), ("", "non-empty"),
                      ("nowhere/at/all", "expected")):
        with pytest.raises(ValueError, match=msg):
            open_dataset(spec)
    with pytest.raises(ValueError, match="prompt"):
        open_dataset("shapes:test", prompt="hi")
    with pytest.raises(ValueError, match="gold"):
        open_dataset("shapes:test", answer="caption")


def test_sample_validation():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="id"):
        Sample("", img, "p")
    with pytest.raises(ValueError, match="prompt"):
        Sample("a", img, "  ")
    with pytest.raises(TypeError, match="answer"):
        Sample("a", img, "p", answer=3)
    with pytest.raises(ValueError, match="shape"):
        Sample("a", img, "p", masks={"x": np.zeros((2, 2, 2))})
    s = Sample("a", img, "p", masks={"x": np.ones((4, 4), np.uint8)})
    assert s.masks["x"].dtype == bool


def test_importing_runs_and_loaders_stays_light():
    import subprocess
    import sys

    code = ("import sys, diffcam; diffcam.run; import diffcam.data.coco; "
            "print(sorted(m for m in ('torch', 'ray', 'numba', 'transformers', 'pyarrow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_maps_index_follows_new_shards(tmp_path):
    st = RunStore.create(tmp_path / "r", {"model": "m"})
    w = st.writer(0)
    w.add({"id": "a"}, {"a/0/base": _arr(1)})
    w.flush()
    assert float(st.maps("a")["a/0/base"].max()) == 1.0
    with pytest.raises(KeyError):
        st.maps("b")
    w.add({"id": "b"}, {"b/0/base": _arr(2)})
    w.flush()
    assert float(st.maps("b")["b/0/base"].max()) == 2.0
