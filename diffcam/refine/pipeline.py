"""``diffcam.refine``: the whole Diffusion-CAM refinement (AKD -> DACG -> CBA -> SICD) in one call."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _backend
from . import _common
from ._arrays import as_batch
from .config import BRANCH_NAMES, RefineConfig

__all__ = ["refine", "RefineInfo"]


@dataclass
class RefineInfo:
    """What the pipeline decided for each map (arrays of length N, scalars for a single map).

    kernel_size   AKD kernel size (0 when AKD is off)
    branch        DACG branch: 'high_var', 'high_mean', 'low_mean' or 'default'
    tau           DACG confidence threshold
    tau_bg        CBA background threshold (NaN when CBA is off)
    lam           SICD's lambda* (NaN when SICD is off, 0 when its gate skipped the map)
    sicd_applied  whether SICD changed the map
    backend       the backend that ran
    """

    kernel_size: Any
    branch: Any
    tau: Any
    tau_bg: Any
    lam: Any
    sicd_applied: Any
    backend: str = ""

    def to_dict(self) -> dict:
        """JSON-friendly dict of the per-map values."""
        def plain(v):
            return v.tolist() if isinstance(v, np.ndarray) else v
        return {k: plain(getattr(self, k)) for k in
                ("kernel_size", "branch", "tau", "tau_bg", "lam", "sicd_applied", "backend")}


def branch_names(codes, single: bool):
    names = np.array(BRANCH_NAMES, dtype=object)[np.asarray(codes, dtype=np.int64)]
    return str(names[0]) if single else names


def refine(maps, config=None, tokens=None, interference=None, backend=None, return_info=False,
           normalize=False, threads=None):
    """Refine Grad-CAM maps with Diffusion-CAM's four modules (docs/method.md section 2).

    Parameters
    ----------
    maps : array-like (H, W) or (N, H, W)
        Raw maps in [0, 1] (NumPy, torch CPU/CUDA, CuPy).  The result has the same type, shape
        and device (and the same float dtype).
    config : RefineConfig or 'paper' / 'reference', optional
        Defaults to ``RefineConfig.paper()``.
    tokens : sequence of int, optional
        The answer's token ids (one sequence shared by all maps, or one per map); SICD's
        uniform fallback counts the repeated ones.
    interference : array-like, optional
        Per-token maps of the answer's repeated function words: (R, H, W) for one map, a list of
        N such stacks (or an (N, R, H, W) array) for a batch.  SICD subtracts their normalised
        mean.
    backend : 'native' | 'cuda' | 'numba' | 'numpy', optional
        Default: automatic (see ``diffcam.backends()``).
    return_info : bool
        Also return a :class:`RefineInfo` (kernel size, DACG branch and tau, tau_bg, lambda*).
    normalize : bool
        Min-max each map first (for maps that are not in [0, 1] yet).
    threads : int, optional
        CPU threads (None or 0: all cores).  Results do not depend on it.

    Example
    -------
    >>> import numpy as np, diffcam
    >>> m = np.random.default_rng(0).random((27, 27)).astype(np.float32)
    >>> out, info = diffcam.refine(m, return_info=True)
    >>> out.shape, out.dtype, info.kernel_size
    ((27, 27), dtype('float32'), 3)
    >>> diffcam.refine(np.stack([m, m]), config="reference").shape
    (2, 27, 27)
    """
    if tokens is None and interference is None and not return_info and not normalize:
        out = _default_call(maps, config, backend, threads)
        if out is not None:
            return out
    cfg = _common.config_or_default(config)
    nthreads = _common.check_threads(threads)
    batch = as_batch(maps, "maps", max_value=1.0, normalize=normalize)
    mod = _common.backend_for(batch, backend)
    native = _backend_name(mod) == "native"
    if native and tokens is None and interference is None:
        rep, rep_const = None, None                       # the native kernel's "all zeros"
    else:
        rep, rep_const = _common.sicd_inputs(batch, cfg, tokens, interference)
    batch = _common.add_reference_noise(batch, cfg)
    if native and not return_info:
        # the native kernel can skip the per-map info arrays nobody reads
        # (positional: threads, info=False; see _default_call)
        return batch.wrap(mod.refine(batch.data, rep, rep_const, cfg.to_params(), nthreads, False))
    out, k, branch, tau, tau_bg, lam, applied = _common.call(
        mod, "refine", batch.data, rep, rep_const, cfg.to_params(), threads=nthreads)
    result = batch.wrap(out)
    if not return_info:
        return result
    info = RefineInfo(
        kernel_size=batch.wrap_scalars(np.asarray(_common.host(k), dtype=np.int64)),
        branch=branch_names(_common.host(branch), batch.single),
        tau=batch.wrap_scalars(_common.host(tau)),
        tau_bg=batch.wrap_scalars(_common.host(tau_bg)),
        lam=batch.wrap_scalars(_common.host(lam)),
        sicd_applied=batch.wrap_scalars(np.asarray(_common.host(applied)).astype(bool)),
        backend=_backend_name(mod),
    )
    return result, info



_PAPER_PARAMS = _common._PAPER.to_params()


def _default_call(maps, config=None, backend=None, threads=None):
    """``refine(maps, config, backend=..., threads=...)`` without SICD inputs, info or
    normalisation, for float32 maps on the host -- a C-contiguous NumPy array, or a contiguous
    CPU torch tensor (viewed as one, the result wrapped back without a copy) -- on the native
    backend: one native call (``_core.refine_default``) that checks the array and its values
    (finite, >= 0, <= 1 + 1e-6), refines, and returns the same shape -- the general path's
    kernel call, bit for bit, about 4 us sooner (10 us for a torch tensor).  ``config``: None,
    ``"paper"`` or a RefineConfig without the reference preset's noise (the noise is drawn in
    Python); ``backend``: None when the native backend is the automatic choice, or
    ``"native"``; ``threads``: None or an int >= 0.  None for anything else (other types,
    dtypes, ranks, layouts or devices, other configs or backends, a DIFFCAM_BACKEND choice,
    values the checks reject), which then takes the general path and its errors."""
    tensor = type(maps) is not np.ndarray
    if tensor:
        torch = sys.modules.get("torch")          # a torch tensor exists only once torch is imported
        if (torch is None or type(maps) is not torch.Tensor or not maps.is_cpu
                or maps.dtype is not torch.float32 or maps.layout is not torch.strided):
            return None
    if config is None or (type(config) is str and config == "paper"):
        params = _PAPER_PARAMS
    elif type(config) is RefineConfig and not config.noise > 0:
        params = config.to_params()
    else:
        return None
    if threads is None:
        threads = 0
    elif type(threads) is not int or not 0 <= threads < 1 << 31:
        return None
    if backend is None:
        core = _backend.auto_native()
    elif type(backend) is str and backend == "native":
        core = _backend._probe("native")[0]
    else:
        return None
    if core is None:
        return None
    if not tensor:
        return core.refine_default(maps, params, threads)
    try:
        view = (maps.detach() if maps.requires_grad else maps).numpy()
    except (RuntimeError, TypeError):     # a tensor NumPy cannot view (e.g. a lazy negation)
        return None
    out = core.refine_default(view, params, threads)
    return None if out is None else torch.from_numpy(out)


def _backend_name(mod) -> str:
    name = getattr(mod, "name", None) or getattr(mod, "__name__", "")
    return {"diffcam._core": "native", "diffcam.refine._numba": "numba",
            "diffcam.refine._cuda": "cuda"}.get(name, name)
