"""Contextual Background Attenuation (docs/method.md 2.3)."""

from __future__ import annotations

from . import _common
from ._arrays import as_batch

__all__ = ["background_attenuation"]


def background_attenuation(maps, config=None, backend=None, return_info=False, threads=None):
    """CBA alone: pixels below tau_bg are scaled by max(gamma, M / tau_bg).

    tau_bg = 0.15 median(M > 0) + 0.15 P60(M) + 0.20 mean(M > 0) + 0.015 max(M) (weights are
    config fields).  The pipeline then clips and min-max normalises; this function does not.
    With ``return_info`` the result is ``(maps, tau_bg)``.

    >>> import numpy as np
    >>> m = np.array([[0.0, 0.02], [0.5, 1.0]], np.float32)
    >>> out, tau_bg = background_attenuation(m, return_info=True)
    >>> round(tau_bg, 4), round(float(out[0, 1]), 6)        # 0.02 scaled by gamma = 0.5
    (0.2519, 0.01)
    """
    cfg = _common.config_or_default(config)
    batch = as_batch(maps, "maps", max_value=1.0)
    mod = _common.backend_for(batch, backend)
    out, tau_bg = _common.call(mod, "background_attenuation", batch.data, cfg.to_params(),
                               threads=_common.check_threads(threads))
    result = batch.wrap(out)
    if return_info:
        return result, batch.wrap_scalars(_common.host(tau_bg))
    return result
