"""Random and adversarial test maps (shared by the backend tests and the benchmarks)."""

import numpy as np

KINDS = ("uniform", "sparse", "power", "levels", "constant", "zeros", "peaks", "tiny")


def make_map(rng, h, w, kind="uniform"):
    if kind == "uniform":
        m = rng.random((h, w))
    elif kind == "sparse":            # many exact zeros (ReLU'd Grad-CAM)
        m = rng.random((h, w)) * (rng.random((h, w)) < 0.2)
    elif kind == "power":             # skewed, a few bright pixels
        m = rng.random((h, w)) ** 6
    elif kind == "levels":            # heavy ties
        m = rng.integers(0, 4, (h, w)) / 3.0
    elif kind == "constant":
        m = np.full((h, w), rng.random())
    elif kind == "zeros":
        m = np.zeros((h, w))
    elif kind == "peaks":             # blobs on a dark background, like a good CAM
        yy, xx = np.mgrid[0:h, 0:w]
        m = np.zeros((h, w))
        for _ in range(rng.integers(1, 4)):
            cy, cx, s = rng.random() * h, rng.random() * w, 0.5 + rng.random() * max(h, w) / 6
            m += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        m = np.maximum(m + 0.05 * rng.standard_normal((h, w)), 0)
    elif kind == "tiny":              # values near float32's resolution
        m = rng.random((h, w)) * 1e-6
    else:
        raise ValueError(kind)
    mx = m.max()
    if kind not in ("constant", "zeros", "tiny") and mx > 0:
        m = m / mx
    return m.astype(np.float32)


def make_batch(rng, n, h, w, kinds=KINDS):
    return np.stack([make_map(rng, h, w, kinds[i % len(kinds)]) for i in range(n)])
