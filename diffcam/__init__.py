"""diffcam: Diffusion-CAM activation maps for diffusion multimodal LLMs.

The refinement core (native kernels, batched, NumPy / torch / CUDA arrays in and out):

>>> import numpy as np, diffcam
>>> maps = np.random.default_rng(0).random((4, 27, 27)).astype(np.float32)
>>> refined = diffcam.refine(maps)                       # RefineConfig.paper() by default
>>> refined.shape
(4, 27, 27)
>>> ref = diffcam.refine(maps, config=diffcam.RefineConfig.reference())

Nothing heavy (torch, transformers, numba) is imported at import time.
"""

from ._backend import BackendUnavailableError, backends
from .refine import (RefineConfig, RefineInfo, adaptive_kernel_denoising, adaptive_kernel_size,
                     background_attenuation, causal_debiasing, confidence_gating,
                     rank_gaussian_filter)
from . import refine  # the callable refine package: diffcam.refine(maps, ...)
from . import metrics

__version__ = "0.1.0"

__all__ = [
    "refine", "RefineConfig", "RefineInfo", "backends", "BackendUnavailableError",
    "adaptive_kernel_size", "rank_gaussian_filter", "adaptive_kernel_denoising",
    "confidence_gating", "background_attenuation", "causal_debiasing", "metrics",
    "__version__",
]
