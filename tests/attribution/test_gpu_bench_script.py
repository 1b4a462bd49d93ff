"""Smoke test of bench/gpu_llada_v.py (the GPU benchmark of the attribution pass, issue 3 item 9)
in its ``--tiny --device cpu`` mode: every case runs through the real Explainer / adapters /
samplers, the table and the JSON list every case with finite positive times, and the 16
per-token maps have the expected shape and are not degenerate."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_llada_v.py"
CHUNKS = (None, 8, 4)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_llada_v_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return _load()


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_bench") / "tiny.json"
    n = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = script.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--threads", "1",
                              "--repeats", "1", "--warmup", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(n)
    res = json.loads(path.read_text()) if path.exists() else None
    return rc, out.getvalue(), err.getvalue(), res


def _cases(res, family):
    return [c for c in res["cases"] if c["family"] == family]


def test_tiny_run_succeeds_and_writes_json(tiny_run):
    rc, out, err, res = tiny_run
    assert rc == 0, out[-3000:] + err[-3000:]
    assert res is not None
    assert not [b for b in res["builds"] if b.get("error")]
    meta = res["meta"]
    assert meta["device_kind"] == "cpu" and meta["tiny"] and meta["dtype"] == "float32"
    assert meta["torch"] == torch.__version__


@pytest.mark.parametrize("family", ["llada-v", "lavida"])
def test_every_case_present_with_finite_positive_times(tiny_run, family):
    rc, out, err, res = tiny_run
    cases = _cases(res, family)
    kinds = [c["kind"] for c in cases]
    assert kinds.count("forward") == 1 and kinds.count("prepare") == 1
    assert kinds.count("generation") == 1
    attr = [c for c in cases if c["kind"] == "attribution" and c["method"] == "diffusion-cam"]
    base = [c for c in cases if c["kind"] == "attribution" and c["method"] != "diffusion-cam"]
    assert sorted(c["method"] for c in base) == ["llava-cam", "tam"]
    assert all(c["target_ms"] is None and not c["aggregate_only"] for c in base)
    # the defaults (aggregate, one 16-map pass per chunk size), then the same aggregate and
    # one-pass 16 maps with Explainer(fast_backward=True) (--fast-backward both, the default)
    auto = [c for c in attr if c["fast_backward"] == "auto"]
    fast = [c for c in attr if c["fast_backward"] is True]
    assert len(auto) + len(fast) == len(attr)
    assert sorted(c["aggregate_only"] for c in auto) == [False] * len(CHUNKS) + [True]
    assert [c["backward_chunk"] for c in auto if not c["aggregate_only"]] == list(CHUNKS)
    assert sorted(c["aggregate_only"] for c in fast) == [False, True]
    assert all(c["backward_chunk"] is None and c["backward"] == "fast" for c in fast)
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for c in cases:
        assert c["error"] is None, c["error"]
        assert len(c["times_ms"]) == 1
        assert all(math.isfinite(t) and t > 0 for t in c["times_ms"])
        assert math.isfinite(c["median_ms"]) and c["median_ms"] > 0
        assert c["peak_gb"] is None                      # no CUDA: memory is n/a
        row = [line for line in table if line.startswith(f"| {c['case']} |")]
        assert len(row) == 1, c["case"]
        cells = [x.strip() for x in row[0].strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(c["median_ms"], abs=0.006)
        assert cells[3] == "n/a"
    gen = [c for c in cases if c["kind"] == "generation"][0]
    assert gen["response_tokens"] == res["meta"]["sizes"]["answer_tokens"]
    if family == "lavida":
        assert "prefix" in gen["case"] and gen["target_ms"] == 350.0
    else:
        assert gen["target_ms"] is None


@pytest.mark.parametrize("family", ["llada-v", "lavida"])
def test_per_token_maps_have_the_expected_shape(tiny_run, family):
    rc, out, err, res = tiny_run
    meta = res["meta"]
    lay = meta["image_layout"]
    T = meta["sizes"]["targets"]
    assert T == 16
    b, (h, w) = lay["base"][0], lay["hires"]
    assert lay["image_tokens"] == b * b + h * (w + 1)
    build = [x for x in res["builds"] if x["family"] == family][0]
    assert build["image_span"][1] - build["image_span"][0] == lay["image_tokens"]
    assert build["sequence_length"] == meta["sequence_length"] == (
        meta["sizes"]["prompt_tokens"] + lay["image_tokens"] + meta["sizes"]["answer_tokens"])
    assert len(build["targets"]) == T
    attr = [c for c in _cases(res, family) if c["kind"] == "attribution"]
    for c in attr:
        n = 1 if c["aggregate_only"] else T + 1
        assert c["expected_maps"] == n
        assert c["maps"] == {"base": [n, 1, b, b], "hires": [n, 1, h, w]}, c["case"]
        assert c["n_targets"] == T
        assert c["maps_finite"] and c["maps_nonconstant"], c["case"]
        assert c["backward"] or c["method"] == "tam"          # TAM runs no backward
    # one backward for all vectors: autograd's vmapped one, or on the CPU (this smoke test) the
    # hand-written one of diffcam.attribution.fastvjp
    assert any(c["backward"] in ("batched", "fast") for c in attr
               if c["backward_chunk"] is None and not c["aggregate_only"])


def test_cuda_requested_without_cuda_is_a_clear_error(script):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, err = io.StringIO(), io.StringIO()
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = script.main(["--tiny", "--device", "cuda", "--threads", "1"])
    finally:
        torch.set_num_threads(n)
    assert rc == 2
    assert "CUDA is not available" in err.getvalue()
    assert "Traceback" not in err.getvalue() + out.getvalue()


def test_full_size_estimate(script):
    """The docstring's numbers: the 16-map pass at layer 10 is ~174 TFLOP, beyond 150 ms even
    at the H100's dense bf16 peak; the aggregate map is not."""
    a = script.parse_args([])
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab) == (
        4096, 32, 32, 32, 12288, 126464)
    assert (a.device, a.dtype, a.targets, a.answer_tokens) == ("cuda", "bfloat16", 16, 64)
    lay = script.image_layout(a.image_tokens, a.base_side)
    assert lay == {"base": [14, 14], "hires": [21, 28], "newline_tokens": 21,
                   "image_tokens": 805}
    L = a.prompt_tokens + lay["image_tokens"] + a.answer_tokens
    assert L == 1000
    est = script.flop_estimate(a, L, lay["image_tokens"], 10, [24])
    D, I, V = 4096, 12288, 126464
    mm, att = 2 * (4 * D * D + 3 * D * I), 4 * L * D
    fwd = L * 32 * (mm + att) + 2 * D * V * L
    assert est["forward_tflop"] == pytest.approx(fwd / 1e12)
    l10 = est["layers"]["10"]
    assert l10["blocks_above"] == 21
    assert l10["pass16_tflop"] == pytest.approx((fwd + 16 * L * 21 * (mm + 2 * att)) / 1e12)
    assert 171 < l10["pass16_tflop"] < 177 and l10["pass16_ms_at_peak"] > 150
    assert l10["aggregate_ms_at_peak"] < 30
    assert est["layers"]["24"]["pass16_ms_at_peak"] < 150
    assert est["target_150ms_reachable_from"]["100%"]["min_layer"] == 14
    assert est["weights_gb_bf16"] == pytest.approx(16.03, abs=0.01)


def test_not_a_test_module_and_imports_cheaply():
    # bench/conftest.py collects bench_*.py; pytest's default pattern is test_*.py / *_test.py
    name = SCRIPT.name
    assert not name.startswith(("bench_", "test_")) and not name.endswith("_test.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(sorted(k for k in ('torch', 'diffcam', 'transformers') if k in sys.modules),"
            " [n for n in dir(m) if n.startswith('test')])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []"
