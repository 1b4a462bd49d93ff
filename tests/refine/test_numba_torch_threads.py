"""The numba backend leaves torch's thread count as the caller set it.

numba's OpenMP threading layer and a CPU torch build share libgomp: starting numba's thread pool
used to reset the OpenMP thread count that torch reads, so after one ``diffcam.refine`` call a
process that had set ``torch.set_num_threads(1)`` ran torch on every core again.  The pool starts
once per process, so the check runs in a fresh interpreter.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("torch")

SCRIPT = r"""
import torch
torch.set_num_threads(1)
import numpy as np
import diffcam
# torch has run before the first refine (in real use: the model's forward)
assert torch.get_num_threads() == 1 and float(torch.ones(4).sum()) == 4
rng = np.random.default_rng(0)
diffcam.refine(rng.random((3, 8, 8), dtype=np.float32))
a = torch.get_num_threads()
diffcam.refine(rng.random((64, 64, 64), dtype=np.float32), threads=2)
b = torch.get_num_threads()
diffcam.metrics.localization(rng.random((4, 16, 16), dtype=np.float32),
                             [np.ones((1, 16, 16), bool)] * 4)
print(a, b, torch.get_num_threads())
"""


def test_refine_keeps_torch_threads():
    # no OMP_NUM_THREADS: with it set, libgomp's count is pinned and the bug does not show
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",
                                                           "NUMBA_NUM_THREADS")}
    env["DIFFCAM_BACKEND"] = "numba"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"], out.stdout
