"""The native kernels (diffcam._core) under AddressSanitizer + UBSan and ThreadSanitizer.

The native backend's tests run again in a Python process whose ``diffcam._core`` is compiled
from the same csrc/ with a sanitizer (tests/refine/cuda_emu.build_native):

* ``address``: every Hypothesis and adversarial map test of test_backends.py, the rank filter's
  lane and row-pair tests, the selection paths, the public API and the metrics.  The AVX2 rank
  filter reads 8-float vectors from padded rows and the statistics select from scratch
  buffers: any read or write outside an allocation (NumPy's arrays included, which ASan
  surrounds with redzones), or undefined behaviour, aborts that process with a report (a
  planted read one past the end of a map in ``sum4`` is reported as a heap-buffer-overflow).
* ``thread``: the tests that split maps and rows over threads (thread-count invariance, row
  bands of the big-map filter, mixed batches): two threads touching the same memory, one
  writing, without synchronisation is a data race report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import cuda_emu

ADDRESS_TESTS = ["tests/refine/test_backends.py", "tests/refine/test_rank_filter_lanes.py",
                 "tests/refine/test_selection_paths.py", "tests/test_api.py",
                 "tests/test_metrics.py"]
THREAD_TESTS = ["tests/refine/test_backends.py", "tests/refine/test_rank_filter_lanes.py",
                "tests/refine/test_selection_paths.py"]

CASES = {
    "address": (cuda_emu.libasan, cuda_emu.ASAN_FLAGS, "ASAN_OPTIONS", "detect_leaks=0",
                ADDRESS_TESTS, "not numba and not cuda-emu and not emu", "AddressSanitizer"),
    "thread": (cuda_emu.libtsan, ["-fsanitize=thread", "-g"], "TSAN_OPTIONS",
               "halt_on_error=1 report_signal_unsafe=0", THREAD_TESTS,
               "(thread or row_blocks or mixed_batch) and native", "ThreadSanitizer"),
}


@pytest.mark.parametrize("sanitizer", list(CASES))
def test_native_kernels_under_sanitizer(tmp_path, sanitizer):
    runtime, flags, opt_var, opts, tests, select, banner = CASES[sanitizer]
    lib = runtime()
    if lib is None:
        pytest.skip(f"the compiler has no {banner} runtime")
    try:
        core = cuda_emu.build_native(flags, tag=sanitizer)
    except cuda_emu.Unavailable as exc:
        pytest.skip(f"cannot build the native kernels here: {exc}")
    import diffcam

    # the installed package with its _core replaced by the sanitizer build (weights and the
    # other compiled modules left out: the refinement tests do not need them)
    pkg = tmp_path / "diffcam"
    shutil.copytree(Path(diffcam.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("weights", "*.so", "*.pyd", "__pycache__"))
    shutil.copy2(core, pkg / core.name)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LD_PRELOAD=cuda_emu.preload(lib),
               DIFFCAM_REQUIRE_BACKENDS="native", **{opt_var: opts})
    env.pop("DIFFCAM_DISABLE_EXTENSIONS", None)
    res = subprocess.run(
        [sys.executable, "-P", "-c",
         "import diffcam._core as c, sys; assert c.__file__.startswith(sys.argv[1]), c.__file__",
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    res = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-k", select, *tests],
        capture_output=True, text=True, timeout=1500, env=env, cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert banner not in res.stderr, res.stderr[-4000:]
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]
