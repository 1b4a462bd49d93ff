"""Diffusion-CAM's refinement modules (docs/method.md section 2).

``diffcam.refine`` is both this package and the pipeline function: ``diffcam.refine(maps)`` runs
AKD -> DACG -> CBA -> SICD, and the modules are here one function each.

>>> import numpy as np, diffcam
>>> m = np.random.default_rng(0).random((2, 24, 24)).astype(np.float32)
>>> diffcam.refine(m).shape
(2, 24, 24)
>>> from diffcam.refine import rank_gaussian_filter, RefineConfig
"""

import sys as _sys
import types as _types

from .akd import adaptive_kernel_denoising, adaptive_kernel_size, rank_gaussian_filter
from .attenuation import background_attenuation
from .config import BRANCH_NAMES, PARAM_FIELDS, RefineConfig
from .debias import causal_debiasing, repeated_token_ratio
from .gating import confidence_gating
from .pipeline import RefineInfo, refine
from .resize import resize

__all__ = [
    "refine", "RefineConfig", "RefineInfo", "adaptive_kernel_size", "rank_gaussian_filter",
    "adaptive_kernel_denoising", "confidence_gating", "background_attenuation",
    "causal_debiasing", "repeated_token_ratio", "resize", "BRANCH_NAMES", "PARAM_FIELDS",
]


class _CallableModule(_types.ModuleType):
    """Lets ``diffcam.refine(maps, ...)`` call the pipeline while staying a package."""

    # the pipeline function itself (no forwarding frame: a call costs what calling it costs)
    __call__ = staticmethod(refine)


_sys.modules[__name__].__class__ = _CallableModule
