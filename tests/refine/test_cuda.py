"""The CUDA backend (diffcam.refine._cuda) against the float64 reference.

Every kernel test runs twice: on a GPU (``gpu``, marked ``cuda``: needs a GPU and a CUDA build
of torch, skips cleanly without one) and on the CPU emulation of the same CUDA sources
(``emu``: csrc/cuda compiled by the host compiler against csrc/cuda/emu/cuda_runtime.h, driven
through the same Python glue with NumPy arrays standing in for device arrays; see
tests/refine/cuda_emu.py).  The emulation runs everywhere a C++ compiler and pybind11 are
installed, so the kernels' logic is checked even where no GPU was ever lent; timing, the
device's libm and true thread concurrency are only checked by ``gpu``.
``test_available_reports_reason_without_gpu`` runs everywhere: on a machine without a GPU it
checks that ``available()`` says so (with a reason) instead of raising.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffcam.refine import reference as ref
from diffcam.refine.config import RefineConfig

from . import cuda_emu
from .test_backends import assert_refined_maps

_cuda = pytest.importorskip("diffcam.refine._cuda")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _gpu_or_skip():
    ok, reason = _cuda.available()
    if not ok:
        pytest.skip(f"CUDA backend unavailable: {reason}")
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("torch with CUDA support is not installed")
    return torch


@pytest.fixture
def torch_gpu():
    return _gpu_or_skip()


class _GPU:
    name = "gpu"

    def __init__(self, torch):
        self.torch = torch
        self.f32 = torch.float32

    def t(self, a, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(a), device="cuda", dtype=dtype)

    @staticmethod
    def h(x):
        return x.detach().cpu().numpy()

    @staticmethod
    def on_device(x):
        return x.is_cuda


class _Emu:
    name = "emu"
    f32 = np.dtype(np.float32)

    @staticmethod
    def t(a, dtype=None):
        return np.array(a, dtype=dtype, copy=True, order="C")

    @staticmethod
    def h(x):
        return np.asarray(x)

    @staticmethod
    def on_device(x):
        return isinstance(x, np.ndarray)


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.cuda), "emu"])
def dev(request):
    """The device the kernels run on: a GPU through torch, or the CPU emulation."""
    if request.param == "gpu":
        yield _GPU(_gpu_or_skip())
        return
    ext = request.getfixturevalue("cuda_emu_ext")
    with cuda_emu.emulated_backend(ext):
        yield _Emu()


def test_available_reports_reason_without_gpu():
    ok, reason = _cuda.available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    torch = _torch_cuda()
    if torch is None and not ok:
        assert "CUDA" in reason or "cuda" in reason
    if ok:
        assert "device" in reason


# ---------------------------------------------------------------- inputs
def _maps(rng, n=6, h=27, w=27):
    """Random, sparse, constant, negative-noise and peaked maps, one batch."""
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            m = rng.random((h, w))
        elif kind == 1:
            m = np.where(rng.random((h, w)) < 0.1, rng.random((h, w)), 0.0)
        elif kind == 2:
            m = np.full((h, w), 0.37)
        elif kind == 3:
            m = rng.random((h, w)) ** 4 + rng.normal(0, 1e-3, (h, w))
        elif kind == 4:
            m = np.zeros((h, w))
            m[h // 2, w // 2] = 1.0
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            m = np.exp(-((yy - h / 3) ** 2 + (xx - w / 2) ** 2) / (0.1 * h * w))
        out.append(m)
    return np.stack(out).astype(np.float32)


def _tol(a):
    return 1e-6 * max(float(np.abs(a).max()), 1e-30)


def _host(x):
    return x.detach().cpu().numpy()


def _assert_on_device(dev, *xs):
    for x in xs:
        assert dev.on_device(x), "output must stay on the device"


CONFIGS = {
    "paper": RefineConfig.paper(),
    "reference": RefineConfig.reference(),
    "k7": RefineConfig.paper().replace(kernel_size=7),
    "k11_final": RefineConfig.paper().replace(kernel_size=11, final_normalize=True,
                                              range_guard=0.1, gate=False),
    "no_akd": RefineConfig.paper().replace(akd=False, cba=False),
}


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("shape", [(6, 27, 27), (4, 5, 9), (2, 1, 1), (3, 70, 41)])
def test_kernel_sizes(dev, shape):
    rng = np.random.default_rng(0)
    maps = _maps(rng, *shape) * 3
    for cfg in CONFIGS.values():
        p = cfg.to_params()
        k = _cuda.kernel_sizes(dev.t(maps), p)
        _assert_on_device(dev, k)
        np.testing.assert_array_equal(dev.h(k), ref.kernel_sizes(maps, p))


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 11, 15, 31])
@pytest.mark.parametrize("shape", [(6, 27, 27), (2, 4, 3), (1, 1, 1), (1, 40, 70)])
def test_rank_gaussian_filter(dev, k, shape):
    rng = np.random.default_rng(k)
    maps = _maps(rng, *shape)
    out = _cuda.rank_gaussian_filter(dev.t(maps), np.full(shape[0], k, np.int32))
    _assert_on_device(dev, out)
    want = ref.rank_gaussian_filter(maps, np.full(shape[0], k))
    np.testing.assert_allclose(dev.h(out), want, rtol=0, atol=_tol(want))


def test_rank_gaussian_filter_mixed_k(dev):
    rng = np.random.default_rng(1)
    maps = _maps(rng, 12, 20, 23)
    ks = np.array([3, 5, 7, 9, 11, 3, 13, 7, 1, 5, 31, 3], np.int32)
    out = _cuda.rank_gaussian_filter(dev.t(maps), dev.t(ks))
    want = ref.rank_gaussian_filter(maps, ks)
    np.testing.assert_allclose(dev.h(out), want, rtol=0, atol=_tol(want))


def test_rank_gaussian_filter_every_size_launched(cuda_emu_ext):
    """Kernel sizes held on the device are unknown to the host, which then launches one filter
    kernel per odd size 1..31 whose blocks exit unless their map has that size (the GPU path of
    device-array ksizes); emulation only (the GPU half reaches it through mixed_k)."""
    rng = np.random.default_rng(12)
    maps = _maps(rng, 8, 19, 26)
    ks = np.array([31, 1, 7, 3, 29, 5, 11, 9], np.int32)
    out = np.full(maps.shape, np.nan, np.float32)
    cuda_emu_ext.rank_gaussian_filter(maps.ctypes.data, ks.ctypes.data, *maps.shape,
                                      out.ctypes.data, 0, 0, 1, 31)
    want = ref.rank_gaussian_filter(maps, ks)
    np.testing.assert_allclose(out, want, rtol=0, atol=_tol(want))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("shape", [(12, 27, 27), (3, 7, 5), (2, 150, 130)])
def test_confidence_gating(dev, cfg, shape):
    p = CONFIGS[cfg].to_params()
    maps = _maps(np.random.default_rng(2), *shape)
    out, branch, tau = _cuda.confidence_gating(dev.t(maps), p)
    _assert_on_device(dev, out, branch, tau)
    w_out, w_branch, w_tau = ref.confidence_gating(maps, p)
    np.testing.assert_array_equal(dev.h(branch), w_branch)
    np.testing.assert_allclose(dev.h(tau), w_tau, rtol=1e-12, atol=0)
    np.testing.assert_allclose(dev.h(out), w_out, rtol=0, atol=_tol(w_out))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("shape", [(12, 27, 27), (3, 7, 5), (2, 150, 130)])
def test_background_attenuation(dev, cfg, shape):
    p = CONFIGS[cfg].to_params()
    maps = _maps(np.random.default_rng(3), *shape)
    out, tau_bg = _cuda.background_attenuation(dev.t(maps), p)
    _assert_on_device(dev, out, tau_bg)
    w_out, w_tau = ref.background_attenuation(maps, p)
    np.testing.assert_allclose(dev.h(tau_bg), w_tau, rtol=1e-12, atol=0)
    np.testing.assert_allclose(dev.h(out), w_out, rtol=0, atol=_tol(w_out))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("with_rep", [False, True])
@pytest.mark.parametrize("shape", [(12, 27, 27), (2, 150, 130)])
def test_causal_debiasing(dev, cfg, with_rep, shape):
    p = CONFIGS[cfg].to_params()
    rng = np.random.default_rng(4)
    maps = _maps(rng, *shape)
    maps = (maps - maps.min(axis=(1, 2), keepdims=True))
    maps /= maps.max(axis=(1, 2), keepdims=True) + 1e-8
    rep = rng.random(shape).astype(np.float32) * 0.1 if with_rep else None
    rc = np.linspace(0.0, 0.1, shape[0])
    out, lam, applied = _cuda.causal_debiasing(
        dev.t(maps), None if rep is None else dev.t(rep), rc, p)
    _assert_on_device(dev, out, lam, applied)
    w_out, w_lam, w_app = ref.causal_debiasing(maps, rep, rc, p)
    np.testing.assert_array_equal(dev.h(applied), w_app)
    np.testing.assert_allclose(dev.h(lam), w_lam, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dev.h(out), w_out, rtol=0, atol=_tol(w_out))


# ---------------------------------------------------------------- pipeline
def _check_refine(dev, maps, rep, rc, p):
    got = _cuda.refine(dev.t(maps), None if rep is None else dev.t(rep), rc, p)
    _assert_on_device(dev, *got)
    want = ref.refine(maps, rep, rc, p)
    out, k, branch, tau, tau_bg, lam, applied = (dev.h(x) for x in got)
    np.testing.assert_array_equal(k, want[1])
    np.testing.assert_array_equal(branch, want[2])
    np.testing.assert_allclose(tau, want[3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tau_bg, want[4], rtol=1e-5, atol=1e-7, equal_nan=True)
    np.testing.assert_allclose(lam, want[5], rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(applied, want[6])
    # maps with a pixel at DACG's threshold may differ (on the symmetric blob maps of _maps with
    # k = 7 the float32 intermediate ties four pixels to tau; the kernels blur them)
    assert_refined_maps(out, want[0], maps, p, 1e-5 * max(1.0, np.abs(want[0]).max()))


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("shape", [(12, 27, 27), (6, 14, 14), (2, 64, 64), (2, 140, 150)])
def test_refine(dev, cfg, shape):
    rng = np.random.default_rng(5)
    maps = _maps(rng, *shape)
    rc = np.full(shape[0], 0.05)
    _check_refine(dev, maps, None, rc, CONFIGS[cfg].to_params())


def test_refine_with_rep_and_mixed_batch(dev):
    rng = np.random.default_rng(6)
    maps = _maps(rng, 18, 24, 24)
    rep = rng.random(maps.shape).astype(np.float32)
    _check_refine(dev, maps, rep, np.zeros(18), RefineConfig.paper().to_params())


@pytest.mark.cuda
def test_refine_on_side_stream(torch_gpu):
    torch = torch_gpu
    rng = np.random.default_rng(7)
    maps = _maps(rng, 32, 27, 27)
    p = RefineConfig.paper().to_params()
    want = ref.refine(maps, None, np.zeros(32), p)
    s = torch.cuda.Stream()
    x = torch.as_tensor(maps, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _cuda.refine(x, None, np.zeros(32), p)
    s.synchronize()
    np.testing.assert_allclose(_host(got[0]), want[0], rtol=0, atol=1e-5)


def test_inputs_are_converted_on_device(dev):
    rng = np.random.default_rng(8)
    maps = _maps(rng, 4, 16, 16).astype(np.float64)
    x = dev.t(maps).swapaxes(1, 2)  # float64, non-contiguous
    out = _cuda.rank_gaussian_filter(x, np.full(4, 3, np.int32))
    assert out.dtype == dev.f32 and dev.on_device(out)
    want = ref.rank_gaussian_filter(np.ascontiguousarray(maps.transpose(0, 2, 1)), [3] * 4)
    np.testing.assert_allclose(dev.h(out), want, rtol=0, atol=_tol(want))


@pytest.mark.cuda
def test_rejects_host_arrays(torch_gpu):
    with pytest.raises(TypeError):
        _cuda.rank_gaussian_filter(np.zeros((1, 4, 4), np.float32), [3])


# ---------------------------------------------------------------- metrics
def test_otsu_threshold_u8(dev):
    rng = np.random.default_rng(9)
    imgs = [rng.integers(0, 256, (5, 33, 31)), np.zeros((2, 33, 31), int),
            np.full((1, 33, 31), 200), ref.to_uint8(_maps(rng, 6, 33, 31))]
    imgs = np.concatenate(imgs).astype(np.uint8)
    got = _cuda.otsu_threshold_u8(dev.t(imgs))
    _assert_on_device(dev, got)
    np.testing.assert_array_equal(dev.h(got), ref.otsu_threshold_u8(imgs))


@pytest.mark.parametrize("size", [(27, 27), (64, 48), (13, 100), (5, 5)])
def test_resize_bilinear(dev, size):
    maps = _maps(np.random.default_rng(10), 4, 27, 27)
    got = _cuda.resize_bilinear(dev.t(maps), *size)
    want = ref.resize_bilinear(maps, *size)
    np.testing.assert_allclose(dev.h(got), want, rtol=0, atol=_tol(want))


def test_localization(dev):
    rng = np.random.default_rng(11)
    maps = _maps(rng, 6, 24, 24)
    maps = maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-8)
    masks = (rng.random((6, 2, 64, 64)) < 0.3).astype(np.uint8)
    masks[2] = 0
    got = _cuda.localization(dev.t(maps), dev.t(masks))
    _assert_on_device(dev, got)
    want = ref.localization(maps.astype(np.float32), masks)
    np.testing.assert_allclose(dev.h(got), want, rtol=1e-9, atol=1e-12)


def _sanitize_script():
    """bench/gpu_sanitize.py of this checkout (skips when bench/ is absent)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_sanitize.py"
    if not script.is_file():
        pytest.skip("bench/ is not in this checkout")
    return script


def test_gpu_sanitize_script_runs_on_the_emulation(cuda_emu_ext):
    """bench/gpu_sanitize.py (what compute-sanitizer watches in bench/gpu_check.sh on a lent
    GPU) runs every check and finds no mismatch when its kernels run on the CPU emulation, so
    scarce GPU time is not spent on a broken script."""
    import subprocess
    import sys

    script = _sanitize_script()
    res = subprocess.run([sys.executable, "-P", str(script), "--emulate"], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if "max|err|" in ln]
    assert len(lines) == 13 and all(ln.endswith("ok") for ln in lines), res.stdout
    assert "mismatches: 0" in res.stdout


def test_kernels_under_address_sanitizer(cuda_emu_ext):
    """Every emulated kernel test of this file again, in a Python process running the
    emulation built with AddressSanitizer and UBSan (cuda_emu.ASAN_FLAGS): an out-of-bounds read
    or write of any kernel on any of these shapes (1x1 maps, kernels wider than the map, odd
    sizes, the shared- and global-memory stage kernels) -- compute-sanitizer memcheck's job on
    a GPU -- or undefined behaviour aborts it with a report (a planted ``i <= n`` in a loop of
    akd_kernel is reported as a heap-buffer-overflow in the NumPy buffer of the maps)."""
    import os
    import subprocess
    import sys

    lib = cuda_emu.libasan()
    if lib is None:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    env = dict(os.environ, DIFFCAM_EMU_CXXFLAGS=" ".join(cuda_emu.ASAN_FLAGS),
               LD_PRELOAD=cuda_emu.preload(lib), ASAN_OPTIONS="detect_leaks=0")
    res = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
         "-k", "(emu or every_size) and not sanitize and not address_sanitizer"],
        capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert "AddressSanitizer" not in res.stderr
    assert " passed" in res.stdout and " failed" not in res.stdout, res.stdout[-2000:]


def test_kernels_under_thread_sanitizer(cuda_emu_ext):
    """The emulation's thread mode (-DDCEMU_THREADS: every thread of a block is an OS thread,
    barriers and warp shuffles are mutex rendezvous, each warp its own) built with
    ThreadSanitizer runs bench/gpu_sanitize.py --quick: two threads of a block touching the
    same shared or global address, one writing, with no barrier between them is a data race
    report (compute-sanitizer racecheck's job on a GPU).  It finds a __syncthreads() removed
    from the bitonic sort and the one at the top of block_reduce (a write-after-read hazard on
    the per-warp partials that the fiber mode cannot see)."""
    import os
    import subprocess
    import sys

    lib = cuda_emu.libtsan()
    if lib is None:
        pytest.skip("the compiler has no ThreadSanitizer runtime")
    script = _sanitize_script()
    env = dict(os.environ, DIFFCAM_EMU_CXXFLAGS=" ".join(cuda_emu.TSAN_FLAGS),
               LD_PRELOAD=cuda_emu.preload(lib),
               TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0")
    res = subprocess.run([sys.executable, "-P", str(script), "--emulate", "--quick"],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "ThreadSanitizer" not in res.stderr, res.stderr[-4000:]
    lines = [ln for ln in res.stdout.splitlines() if "max|err|" in ln]
    assert len(lines) == 9 and all(ln.endswith("ok") for ln in lines), res.stdout
    assert "mismatches: 0" in res.stdout
