import os

import numpy as np
import pytest

from diffcam import _backend

HOST_FAST = ("native", "numba")


def _required():
    """Backends that must be present (CI sets DIFFCAM_REQUIRE_BACKENDS=native,numba,cuda-emu), so a
    broken build fails the run instead of skipping its tests."""
    return {b.strip() for b in os.environ.get("DIFFCAM_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def backend_or_skip(name):
    mod, reason = _backend._probe(name)
    if mod is None:
        if name in _required():
            pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return mod


@pytest.fixture(scope="session")
def cuda_emu_ext():
    """diffcam's CUDA kernels compiled for the CPU (tests/refine/cuda_emu.py); skipped where
    no C++ compiler or pybind11 is installed, failed when required (``cuda-emu`` in
    DIFFCAM_REQUIRE_BACKENDS)."""
    from .refine import cuda_emu

    try:
        return cuda_emu.load()
    except cuda_emu.Unavailable as exc:
        if "cuda-emu" in _required():
            pytest.fail(f"the CUDA emulation is required here but unavailable: {exc}")
        pytest.skip(f"CUDA emulation unavailable: {exc}")


@pytest.fixture(params=HOST_FAST + ("cuda-emu",))
def fast_backend(request):
    """Each optimised backend with the kernel contract's functions, skipped (or failed, when
    required) where it is missing: native, numba, and the CUDA kernels run on the CPU
    emulation (NumPy arrays in and out)."""
    if request.param != "cuda-emu":
        yield backend_or_skip(request.param)
        return
    from .refine import cuda_emu

    with cuda_emu.emulated_backend(request.getfixturevalue("cuda_emu_ext")) as mod:
        yield mod


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models are far faster so on a shared 2-core box);
    the caller's count is restored after."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
