import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def img():
    return np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def img2():
    return np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
