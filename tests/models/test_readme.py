"""The README's "Explain a model" example runs as written and its comment on the answer is
what the bundled model says."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- tested-example: tests/models/test_readme.py runs this block -->"


def _block():
    text = README.read_text()
    assert MARK in text, "the README lost its tested-example marker"
    after = text.split(MARK, 1)[1]
    m = re.match(r"\s*```python\n(.*?)```", after, re.S)
    assert m, "no python block right after the marker"
    return m.group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    code = _block()
    claimed = re.search(r"^exp\.answer\s+#\s*'(.*)'\s*$", code, re.M)
    assert claimed, "the example no longer shows the answer"
    monkeypatch.chdir(tmp_path)                     # exp.save("out/") writes here
    ns = {}
    exec(compile(code, str(README), "exec"), ns)
    assert ns["exp"].answer == claimed.group(1)
    tam = ns["tam"]
    assert tam.settings["method"] == "tam" and tam.answer == ns["exp"].answer
    assert tam.maps[0]["hires"].shape[0] == len(tam.targets) + 1
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"maps.npz", "manifest.json"} <= saved, saved
