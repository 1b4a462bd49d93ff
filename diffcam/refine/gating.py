"""Distribution-Aware Confidence Gating (docs/method.md 2.2)."""

from __future__ import annotations

from . import _common
from ._arrays import as_batch
from .pipeline import branch_names

__all__ = ["confidence_gating"]


def confidence_gating(maps, config=None, backend=None, return_info=False, threads=None):
    """DACG alone: keep the pixels above the branch's percentile tau, blur the others (3x3).

    The branch (percentile 90 / 75 / 80 / 85) follows the map's mean and std.  With
    ``return_info`` the result is ``(maps, branch, tau)``.

    >>> import numpy as np
    >>> m = np.random.default_rng(0).random((14, 14)).astype(np.float32) ** 4
    >>> out, branch, tau = confidence_gating(m, return_info=True)
    >>> branch                                   # std 0.27 > 0.22
    'high_var'
    >>> bool((out[m > tau] == m[m > tau]).all())
    True
    """
    cfg = _common.config_or_default(config)
    batch = as_batch(maps, "maps", max_value=1.0)
    mod = _common.backend_for(batch, backend)
    out, branch, tau = _common.call(mod, "confidence_gating", batch.data, cfg.to_params(),
                                    threads=_common.check_threads(threads))
    result = batch.wrap(out)
    if return_info:
        return (result, branch_names(_common.host(branch), batch.single),
                batch.wrap_scalars(_common.host(tau)))
    return result
