"""Adaptive Kernel Denoising (docs/method.md 2.1): the kernel-size rule and the rank-weighted
Gaussian filter."""

from __future__ import annotations

import numpy as np

from . import _common
from ._arrays import as_batch
from .config import MAX_KERNEL_SIZE

__all__ = ["adaptive_kernel_size", "rank_gaussian_filter", "adaptive_kernel_denoising"]


def adaptive_kernel_size(maps, config=None, backend=None):
    """AKD's kernel size for each map: odd(k_base F_step F_std F_size) clamped to [3, k_max].

    >>> import numpy as np
    >>> adaptive_kernel_size(np.zeros((27, 27), np.float32))        # flat token grid
    3
    >>> rng = np.random.default_rng(0)
    >>> adaptive_kernel_size(rng.random((384, 384)).astype(np.float32))  # odd(3*2*1.44*0.75)
    7
    """
    cfg = _common.config_or_default(config)
    batch = as_batch(maps, "maps", allow_negative=True)
    mod = _common.backend_for(batch, backend)
    ks = _common.call(mod, "kernel_sizes", batch.data, cfg.to_params())
    return batch.wrap_scalars(np.asarray(_common.host(ks), dtype=np.int64))


def _check_k(k, n: int):
    ks = np.asarray(k)
    if ks.dtype.kind not in "iu" and not (ks.dtype.kind == "f" and np.all(ks == np.round(ks))):
        raise TypeError(f"k must be an odd int (or one per map), got {k!r}")
    ks = ks.astype(np.int64)
    if ks.ndim > 1 or (ks.ndim == 1 and ks.shape[0] != n):
        raise ValueError(f"k must be one int or one per map ({n}), got shape {ks.shape}")
    bad = ks[(ks % 2 == 0) | (ks < 3) | (ks > MAX_KERNEL_SIZE)]
    if bad.size:
        raise ValueError(f"k={int(bad.ravel()[0])} is not supported: kernel sizes must be odd and "
                         f"in [3, {MAX_KERNEL_SIZE}]")
    return np.ascontiguousarray(np.broadcast_to(ks, (n,)), dtype=np.int32)


def rank_gaussian_filter(maps, k=3, backend=None, threads=None):
    """The rank-weighted Gaussian filter of AKD with a k x k window (reflect-101 border).

    Each output is the average of the sorted window values weighted by a Gaussian over rank
    whose width is the window's coefficient of variation: flat windows act like a median, noisy
    windows like a mean.  ``k`` is one odd size in [3, 31] or one per map.

    >>> import numpy as np
    >>> m = np.zeros((5, 5), np.float32); m[2, 2] = 1
    >>> out = rank_gaussian_filter(m, 3)
    >>> bool(out[2, 2] < 1) and bool(out[0, 0] == 0)
    True
    """
    batch = as_batch(maps, "maps", allow_negative=True)
    ks = _check_k(k, batch.n)
    mod = _common.backend_for(batch, backend)
    out = _common.call(mod, "rank_gaussian_filter", batch.data, ks,
                       threads=_common.check_threads(threads))
    return batch.wrap(out)


def adaptive_kernel_denoising(maps, config=None, backend=None, return_info=False, threads=None):
    """AKD alone: choose k per map (or ``config.kernel_size``) and filter.

    With the ``reference`` preset the released code's seeded noise is added first.

    >>> import numpy as np
    >>> m = np.random.default_rng(1).random((27, 27)).astype(np.float32)
    >>> out, k = adaptive_kernel_denoising(m, return_info=True)
    >>> out.shape, k
    ((27, 27), 3)
    """
    cfg = _common.config_or_default(config)
    batch = as_batch(maps, "maps", max_value=1.0)
    mod = _common.backend_for(batch, backend)
    batch = _common.add_reference_noise(batch, cfg)
    ks = _common.call(mod, "kernel_sizes", batch.data, cfg.to_params())
    out = _common.call(mod, "rank_gaussian_filter", batch.data, ks,
                       threads=_common.check_threads(threads))
    result = batch.wrap(out)
    if return_info:
        return result, batch.wrap_scalars(np.asarray(_common.host(ks), dtype=np.int64))
    return result
