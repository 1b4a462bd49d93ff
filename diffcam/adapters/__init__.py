"""Model adapters: the protocol (:mod:`.base`), the generic adapter (:mod:`.generic`) and
:func:`load`, which picks the adapter for a model.  Nothing heavy is imported at import time."""

from __future__ import annotations

from .base import Adapter, GenerationConfig, GenerationResult, PreparedSample

__all__ = ["Adapter", "PreparedSample", "GenerationConfig", "GenerationResult", "GenericAdapter",
           "load", "FAMILIES", "FAMILY_MODULES"]

#: named model families -> the module of diffcam.adapters that implements each; every module
#: exposes ``load(path_or_model=None, **kwargs) -> Adapter``
FAMILY_MODULES = {
    "llada-v": "llada_v",
    "lavida": "lavida",
    "mmada": "mmada",
    "dream-vl": "dream_vl",
    "diffusion-gemma": "diffusion_gemma",
    "bundled": "bundled",
}
FAMILIES = tuple(k for k in FAMILY_MODULES if k != "bundled")


def _family_loader(key: str):
    import importlib

    modname = FAMILY_MODULES[key]
    try:
        mod = importlib.import_module(f"{__name__}.{modname}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{modname}":
            raise NotImplementedError(f"the {key!r} adapter is not available in this build") from e
        raise
    return mod.load


def __getattr__(name):
    if name == "GenericAdapter":
        from .generic import GenericAdapter
        return GenericAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(name_or_model, path_or_model=None, **kwargs) -> Adapter:
    """Pick the adapter for a model.

    * an :class:`Adapter`: returned as is (no other arguments allowed);
    * a family name (``"llada-v"``, ``"lavida"``, ``"mmada"``, ``"dream-vl"``,
      ``"diffusion-gemma"``) with a checkpoint path or an already loaded model:
      ``load("llada-v", "GSAI-ML/LLaDA-V")``; keyword arguments go to the family's loader
      (see docs/models.md);
    * ``"bundled"``: diffcam's own small diffusion MLLM, shipped with the package;
    * a torch module: wrapped in a :class:`~diffcam.adapters.generic.GenericAdapter` built from
      ``kwargs`` (``tokenizer``, ``blocks``, ``mask_token_id``, ``placeholder_id`` or
      ``image_token_id``, ``vision``, ``layout``, ...).
    """
    if isinstance(name_or_model, Adapter):
        if kwargs or path_or_model is not None:
            raise TypeError(f"load() got an Adapter and other arguments; configure the adapter "
                            f"itself instead")
        return name_or_model
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower().replace("_", "-")
        if key in FAMILY_MODULES:
            return _family_loader(key)(path_or_model, **kwargs)
        raise ValueError(f"unknown model name {name_or_model!r}: expected an Adapter, a torch module "
                         f"with GenericAdapter keyword arguments, or one of {tuple(FAMILY_MODULES)}")
    if path_or_model is not None:
        raise TypeError("load(module, ...) takes keyword arguments only after the module")
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError("diffcam.load needs torch") from e
    if isinstance(name_or_model, torch.nn.Module):
        if "tokenizer" not in kwargs or "mask_token_id" not in kwargs:
            raise TypeError("load(module, ...) wraps the module in a GenericAdapter and needs at "
                            "least tokenizer=... and mask_token_id=... (plus blocks=, "
                            "placeholder_id= or image_token_id=, vision=, layout=)")
        from .generic import GenericAdapter
        tok = kwargs.pop("tokenizer")
        return GenericAdapter(name_or_model, tok, **kwargs)
    raise TypeError(f"load() expects an Adapter, a torch module or a model name, got "
                    f"{type(name_or_model).__name__}")
