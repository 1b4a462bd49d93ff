"""Single-Instance Causal Debiasing (docs/method.md 2.4)."""

from __future__ import annotations

import numpy as np

from . import _common
from ._arrays import as_batch
from ._common import repeated_token_ratio

__all__ = ["causal_debiasing", "repeated_token_ratio"]


def causal_debiasing(maps, config=None, tokens=None, interference=None, backend=None,
                     return_info=False, threads=None):
    """SICD alone: subtract lambda* I, I = w_rep M_rep + w_out 1[M > mu + 2 sigma].

    lambda* = clip(<M, I> / <I, I>, lambda_min, lambda_max) is the constrained least-squares
    fit in closed form.  M_rep is the normalised mean of ``interference`` (per-token maps of the
    answer's repeated function words) or, without them, ``rep_scale`` times the share of
    repeated token ids in ``tokens``.  With ``return_info`` the result is
    ``(maps, lam, applied)``.

    >>> import numpy as np
    >>> m = np.zeros((8, 8), np.float32); m[2:4, 2:4] = 1; m[6, 6] = 0.9
    >>> cfg = RefineConfig.paper().replace(gate=False)
    >>> out, lam, applied = causal_debiasing(m, cfg, return_info=True)
    >>> applied, 0 <= lam <= 0.5
    (True, True)
    """
    cfg = _common.config_or_default(config)
    batch = as_batch(maps, "maps", max_value=1.0)
    mod = _common.backend_for(batch, backend)
    rep, rep_const = _common.sicd_inputs(batch, cfg, tokens, interference)
    out, lam, applied = _common.call(mod, "causal_debiasing", batch.data, rep, rep_const,
                                     cfg.to_params(), threads=_common.check_threads(threads))
    result = batch.wrap(out)
    if return_info:
        return (result, batch.wrap_scalars(_common.host(lam)),
                batch.wrap_scalars(np.asarray(_common.host(applied)).astype(bool)))
    return result


from .config import RefineConfig  # noqa: E402  (for the docstring example)
