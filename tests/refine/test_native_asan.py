"""The native kernels (diffcam._core) under AddressSanitizer.

The backend tests of native (every Hypothesis and adversarial map test of test_backends.py, the
rank filter's lane and row-pair tests, the selection paths, the public API and the metrics) run
again in a Python process whose ``diffcam._core`` is compiled from the same csrc/ with
``-fsanitize=address`` (tests/refine/cuda_emu.build_native_asan).  The AVX2 rank filter reads
8-float vectors from padded rows and the statistics select from scratch buffers: any read or
write outside an allocation (NumPy's arrays included, which ASan surrounds with redzones)
aborts that process with a report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import cuda_emu

TESTS = ["tests/refine/test_backends.py", "tests/refine/test_rank_filter_lanes.py",
         "tests/refine/test_selection_paths.py", "tests/test_api.py", "tests/test_metrics.py"]


def test_native_kernels_under_address_sanitizer(tmp_path):
    lib = cuda_emu.libasan()
    if lib is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    try:
        core = cuda_emu.build_native_asan()
    except cuda_emu.Unavailable as exc:
        pytest.skip(f"cannot build the native kernels here: {exc}")
    import diffcam

    # the installed package with its _core replaced by the ASan build (weights and the other
    # compiled modules left out: the refinement tests do not need them)
    pkg = tmp_path / "diffcam"
    shutil.copytree(Path(diffcam.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("weights", "*.so", "*.pyd", "__pycache__"))
    shutil.copy2(core, pkg / core.name)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LD_PRELOAD=lib,
               ASAN_OPTIONS="detect_leaks=0", DIFFCAM_REQUIRE_BACKENDS="native")
    env.pop("DIFFCAM_DISABLE_EXTENSIONS", None)
    res = subprocess.run(
        [sys.executable, "-P", "-c",
         "import diffcam._core as c, sys; assert c.__file__.startswith(sys.argv[1]), c.__file__",
         str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    res = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-k", "not numba and not cuda-emu and not emu", *TESTS],
        capture_output=True, text=True, timeout=1500, env=env, cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert "AddressSanitizer" not in res.stderr
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]
