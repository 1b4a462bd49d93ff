import os

import numpy as np
import pytest

from diffcam import _backend

HOST_FAST = ("native", "numba")


def _required():
    """Backends that must be present (CI sets DIFFCAM_REQUIRE_BACKENDS=native,numba), so a
    broken build fails the run instead of skipping its tests."""
    return {b.strip() for b in os.environ.get("DIFFCAM_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def backend_or_skip(name):
    mod, reason = _backend._probe(name)
    if mod is None:
        if name in _required():
            pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return mod


@pytest.fixture(params=HOST_FAST)
def fast_backend(request):
    """Each optimised host backend, skipped (or failed, when required) where it is missing."""
    return backend_or_skip(request.param)


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
