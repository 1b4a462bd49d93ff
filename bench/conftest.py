"""pytest configuration of the benchmark suite (bench/README.md).

Collects ``bench_*.py`` files, adds the suite's options and prints a per-map summary (us/map,
maps/s, speedup over the naive NumPy/SciPy baseline of the same run, ratio to the paper's CPU
budget) at the end of the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
# bench/ needs `import naive` and, in a source checkout without an install, `import diffcam`.
for p in (str(_HERE), str(_ROOT)):
    if p not in sys.path:
        sys.path.insert(0 if p == str(_HERE) else len(sys.path), p)

ALL_BACKENDS = ("native", "numba", "numpy", "naive", "scipy")


def pytest_addoption(parser):
    g = parser.getgroup("diffcam-bench")
    g.addoption("--bench-backends", default=",".join(ALL_BACKENDS),
                help="comma-separated backends to time (native, numba, numpy, naive, scipy)")
    g.addoption("--bench-quick", action="store_true",
                help="only the headline cases: pipeline on 27x27 (x1, x1024) and the rank filter "
                     "on 1024x1024 k=7")
    g.addoption("--bench-summary", default=None, metavar="PATH",
                help="also write the summary table (markdown) and records (PATH.json) here")


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself: do not add it twice
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def bench_options(request):
    cfg = request.config
    backends = {b.strip() for b in cfg.getoption("--bench-backends").split(",") if b.strip()}
    return {"backends": backends, "quick": cfg.getoption("--bench-quick")}


@pytest.fixture
def bench_record(request):
    """Register one timed case for the end-of-run summary."""
    records = request.config.__dict__.setdefault("_diffcam_records", [])
    return records.append


def _key(r):
    module = "pipeline" if r["module"] in ("pipeline_kernel", "pipeline_default") else r["module"]
    return (module, r["shape"], r["batch"], r.get("k"))


def _table(records):
    naive = {_key(r): r["per_map_us"] for r in records if r["backend"] == "naive"}
    lines = ["| module | shape | batch | k | backend | threads | median/call | us/map | maps/s "
             "| x naive | x paper budget | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"filter": 0, "dacg": 1, "cba": 2, "sicd": 3, "pipeline": 4, "pipeline_default": 5,
             "pipeline_kernel": 6}
    border = {b: i for i, b in enumerate(ALL_BACKENDS)}
    for r in sorted(records, key=lambda r: (order.get(r["module"], 9), r["batch"],
                                            r["pixels"], r["shape"], r.get("k") or 0,
                                            border.get(r["backend"], 9))):
        ref, mark = naive.get(_key(r)), ""
        if ref is None:                     # naive loops over maps: its x1 per-map time
            ref, mark = naive.get(_key({**r, "batch": 1})), " (vs naive x1)"
        vs = f"{ref / r['per_map_us']:.1f}{mark}" if ref and r["backend"] != "naive" else ""
        med = r["median_s"]
        med_s = f"{med * 1e3:.3f} ms" if med >= 1e-3 else f"{med * 1e6:.1f} us"
        lines.append(
            f"| {r['module']} | {r['shape']} | {r['batch']} | {r.get('k') or ''} | {r['backend']} "
            f"| {r['threads']} | {med_s} | {r['per_map_us']:.2f} | {r['maps_per_s']:,.0f} | {vs} "
            f"| {r['speedup_vs_paper_budget']:.1f} | {r['rounds']} |")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.__dict__.get("_diffcam_records")
    if not records:
        return
    lines = _table(records)
    terminalreporter.write_sep("=", "diffcam per-map summary (medians)")
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--bench-summary")
    if path:
        Path(path).write_text("\n".join(lines) + "\n")
        Path(str(path) + ".json").write_text(json.dumps(records, indent=1))
        terminalreporter.write_line(f"summary written to {path} and {path}.json")


def pytest_report_header(config):
    try:
        import diffcam
        avail = {k: v.available for k, v in diffcam.backends().items()}
    except Exception as exc:  # pragma: no cover - reported, not fatal
        avail = f"diffcam import failed: {exc}"
    return [f"diffcam backends: {avail}",
            f"cpus: {os.cpu_count()}, DIFFCAM_NUM_THREADS={os.environ.get('DIFFCAM_NUM_THREADS')}"]
