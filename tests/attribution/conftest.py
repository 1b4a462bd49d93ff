import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def anyres():
    """The tiny LLaVA-anyres-layout model (base grid + grid with a newline column)."""
    from diffcam.testing import tiny_llava_anyres

    return tiny_llava_anyres(seed=0)


@pytest.fixture(scope="module")
def qwen():
    """The tiny Qwen2-VL-layout model (merged grid, one-position logit shift)."""
    from diffcam.testing import tiny_qwen2vl

    return tiny_qwen2vl(seed=0)


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def img2():
    return np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models are far faster on one thread; on a shared 2-core box, OpenMP threads
    spinning against other processes make them 30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
