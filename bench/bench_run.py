"""Dataset-run throughput on the bundled model: ``diffcam.run.run_dataset`` against the loop a
user would write (one ``Explainer.explain`` per sample, ``Explanation.save`` per sample).

Run: ``python -m pytest bench/bench_run.py --benchmark-only``

Every case explains the same 16 gold descriptions of the shapes test split (teacher forced, so
the time is the attribution pass, not sampling) with every answer token as a target, and writes
everything to a fresh folder:

    run_dataset-bN   run_dataset, batches of N samples, shards of 64, scores with the paper
                     preset at run time (both raw and refined maps scored against the masks)
    loop-save        for each sample: explain, then Explanation.save (maps.npz, overlays,
                     manifest), no scores
    loop-nosave      for each sample: explain only (the attribution floor)

extra_info: samples/s.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile

import pytest

torch = pytest.importorskip("torch")

import diffcam                                             # noqa: E402
from diffcam.data import shapes                            # noqa: E402
from diffcam.run import run_dataset                        # noqa: E402

N = 16


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    return diffcam.load("bundled")


def _samples():
    return list(shapes.dataset("test", 0, N, gold=True))


_count = itertools.count()


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_run_dataset(benchmark, adapter, batch, tmp_path):
    samples = _samples()
    benchmark.group = "dataset run, 16 samples"
    benchmark.name = f"run_dataset-b{batch}"

    def once():
        out = tmp_path / f"r{next(_count)}"
        s = run_dataset(adapter, samples, out, targets="all", batch_size=batch, progress=False)
        assert s["done"] == N
        shutil.rmtree(out)

    benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = N / benchmark.stats.stats.median


@pytest.mark.parametrize("save", [True, False], ids=["loop-save", "loop-nosave"])
def test_loop(benchmark, adapter, save, tmp_path):
    samples = _samples()
    benchmark.group = "dataset run, 16 samples"
    benchmark.name = "loop-save" if save else "loop-nosave"

    def once():
        root = tempfile.mkdtemp(dir=tmp_path)
        with diffcam.Explainer(adapter) as ex:
            for s in samples:
                e = ex.explain(s.image, s.prompt, answer=s.answer, targets="all")
                if save:
                    e.save(f"{root}/{s.id}")
        shutil.rmtree(root)

    benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = N / benchmark.stats.stats.median
