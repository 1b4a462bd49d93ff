"""``diffcam bench``: time the refinement kernels on this machine.

With a source checkout (a ``bench/`` folder holding ``bench_refine.py`` next to the package, or
in the current directory) and pytest-benchmark installed, this runs the full pytest-benchmark
suite (bench/README.md).  Otherwise (an installed wheel: bench/ is not shipped) it runs a small
built-in loop with :func:`time.perf_counter`: the pipeline per backend on one 27x27 map and on
1024 of them, and the rank filter on a 1024x1024 map with k=7, printing the median us/map,
maps/s and the ratio to the paper's CPU budget.

>>> from diffcam.bench import main
>>> main(["--builtin", "--quick", "--backend", "numpy"])       # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main", "find_bench_dir", "builtin_bench"]

PAPER_BUDGET_MS = {"pipeline": 35.4, "filter": 12.7}


def find_bench_dir() -> Path | None:
    """The suite's folder: ./bench, or bench/ next to the diffcam package (source checkout)."""
    for cand in (Path.cwd() / "bench", Path(__file__).resolve().parents[1] / "bench"):
        if (cand / "bench_refine.py").is_file() and (cand / "conftest.py").is_file():
            return cand
    return None


def _have_pytest_benchmark() -> bool:
    try:
        import pytest  # noqa: F401
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return False
    return True


def _cam_maps(shape, n, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = shape
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    cy = rng.random((n, 1, 1), dtype=np.float32) * h
    cx = rng.random((n, 1, 1), dtype=np.float32) * w
    s = (0.1 + 0.15 * rng.random((n, 1, 1), dtype=np.float32)) * min(h, w)
    m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    m = np.maximum(m + rng.random((n, h, w), dtype=np.float32) * 0.25 - 0.05, 0)
    return np.ascontiguousarray(m / m.reshape(n, -1).max(axis=1)[:, None, None], np.float32)


def _median_time(fn, repeats: int, min_total: float = 0.0) -> float:
    fn()                                                  # warm-up (JIT, first touch)
    times = []
    t_end = time.perf_counter() + min_total
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def builtin_bench(backends=None, quick=False):
    """Time the headline cases with perf_counter; returns a list of dict rows."""
    import diffcam
    from diffcam.refine import rank_gaussian_filter

    avail = diffcam.backends()
    names = [b for b in (backends or ["native", "numba", "numpy"]) if b != "cuda"]
    rows = []
    cases = [("pipeline", (27, 27), 1, None, 1), ("pipeline", (27, 27), 1024, None, 0),
             ("filter", (1024, 1024), 1, 7, 0)]
    for name in names:
        if name not in avail or not avail[name].available:
            why = avail[name].reason if name in avail else "unknown backend"
            rows.append({"backend": name, "skipped": why})
            continue
        for module, shape, n, k, threads in cases:
            if name == "numpy" and (n > 1 or shape[0] > 64):
                rows.append({"backend": name, "module": module, "shape": shape, "batch": n,
                             "skipped": "the float64 reference is too slow for this case"})
                continue
            maps = _cam_maps(shape, n)
            x = maps[0] if n == 1 else maps
            if module == "pipeline":
                def fn(x=x, name=name, threads=threads):
                    return diffcam.refine(x, backend=name, threads=threads)
            else:
                def fn(x=x, name=name, k=k, threads=threads):
                    return rank_gaussian_filter(x, k, backend=name, threads=threads)
            try:
                med = _median_time(fn, 3 if quick else 7, 0.2 if quick else 1.0)
            except Exception as exc:
                rows.append({"backend": name, "module": module, "shape": shape, "batch": n,
                             "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            per_map_us = med / n * 1e6
            rows.append({"backend": name, "module": module, "shape": f"{shape[0]}x{shape[1]}",
                         "batch": n, "k": k, "threads": threads or os.cpu_count(),
                         "median_s": med, "per_map_us": per_map_us, "maps_per_s": n / med,
                         "x_paper_budget": PAPER_BUDGET_MS[module] * 1e3 / per_map_us})
    return rows


def _print_rows(rows, out=sys.stdout):
    print(f"{'backend':8} {'module':9} {'shape':10} {'batch':>5} {'k':>3} {'thr':>3} "
          f"{'us/map':>11} {'maps/s':>12} {'x paper':>8}", file=out)
    for r in rows:
        if "skipped" in r:
            what = f"{r.get('module', '')} {r.get('shape', '')} x{r.get('batch', '')}".strip()
            print(f"{r['backend']:8} skipped {what}: {r['skipped']}", file=out)
            continue
        print(f"{r['backend']:8} {r['module']:9} {r['shape']:10} {r['batch']:>5} "
              f"{r['k'] or '':>3} {r['threads']:>3} {r['per_map_us']:>11.2f} "
              f"{r['maps_per_s']:>12,.0f} {r['x_paper_budget']:>8.1f}", file=out)


def main(argv=None) -> int:
    """Entry point of ``diffcam bench``; returns the exit status."""
    ap = argparse.ArgumentParser(prog="diffcam bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="headline cases only, fewer rounds (about a minute)")
    ap.add_argument("--backend", default=None,
                    help="comma-separated backends (native, numba, numpy; the suite also knows "
                         "naive, scipy); default: all")
    ap.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    ap.add_argument("--builtin", action="store_true",
                    help="use the built-in perf_counter loop even when the suite is available")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backend.split(",")] if args.backend else None

    bench_dir = None if args.builtin else find_bench_dir()
    if bench_dir is not None and _have_pytest_benchmark():
        import pytest

        pargs = [str(bench_dir), "--benchmark-only", "-p", "no:cacheprovider", "-q",
                 "--rootdir", str(bench_dir.parent),
                 "--benchmark-min-rounds", "3" if args.quick else "5",
                 "--benchmark-max-time", "0.2" if args.quick else "1.0",
                 "--benchmark-columns", "median,iqr,rounds"]
        if args.quick:
            pargs.append("--bench-quick")
        if backends:
            pargs += ["--bench-backends", ",".join(backends)]
        if args.json:
            pargs += ["--benchmark-json", args.json]
        print(f"diffcam bench: running the suite in {bench_dir}", flush=True)
        return int(pytest.main(pargs))

    why = "--builtin" if args.builtin else (
        "no bench/ suite found" if bench_dir is None else "pytest-benchmark is not installed")
    print(f"diffcam bench: built-in timing loop ({why}); medians of repeated runs", flush=True)
    rows = builtin_bench(backends, quick=args.quick)
    _print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
