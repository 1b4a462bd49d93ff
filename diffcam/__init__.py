"""diffcam: Diffusion-CAM activation maps for diffusion multimodal LLMs.

The refinement core (native kernels, batched, NumPy / torch / CUDA arrays in and out):

>>> import numpy as np, diffcam
>>> maps = np.random.default_rng(0).random((4, 27, 27)).astype(np.float32)
>>> refined = diffcam.refine(maps)                       # RefineConfig.paper() by default
>>> refined.shape
(4, 27, 27)
>>> ref = diffcam.refine(maps, config=diffcam.RefineConfig.reference())

The attribution engine (``diffcam.Explainer``, ``diffcam.load``) explains a diffusion MLLM through
an adapter; see diffcam.attribution.  Nothing heavy (torch, transformers, numba) is imported at
import time.
"""

from ._backend import BackendUnavailableError, backends
from .refine import (RefineConfig, RefineInfo, adaptive_kernel_denoising, adaptive_kernel_size,
                     background_attenuation, causal_debiasing, confidence_gating,
                     rank_gaussian_filter, resize)
from . import refine  # the callable refine package: diffcam.refine(maps, ...)
from . import metrics

__version__ = "0.1.0"

_LAZY = {
    "Explainer": ("diffcam.attribution", "Explainer"),
    "Explanation": ("diffcam.attribution", "Explanation"),
    "GenerationConfig": ("diffcam.adapters", "GenerationConfig"),
    "load": ("diffcam.adapters", "load"),
}


def __getattr__(name):
    """The attribution engine and the dataset runner are imported on first use."""
    if name == "run":
        import importlib

        return importlib.import_module("diffcam.run")
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'diffcam' has no attribute {name!r}")

__all__ = [
    "refine", "RefineConfig", "RefineInfo", "backends", "BackendUnavailableError",
    "adaptive_kernel_size", "rank_gaussian_filter", "adaptive_kernel_denoising",
    "confidence_gating", "background_attenuation", "causal_debiasing", "resize", "metrics",
    "Explainer", "Explanation", "GenerationConfig", "load", "run", "__version__",
]
