"""Model adapters: the protocol (:mod:`.base`), the generic adapter (:mod:`.generic`) and
:func:`load`, which picks the adapter for a model.  Nothing heavy is imported at import time."""

from __future__ import annotations

from .base import Adapter, GenerationConfig, GenerationResult, PreparedSample

__all__ = ["Adapter", "PreparedSample", "GenerationConfig", "GenerationResult", "GenericAdapter",
           "load", "FAMILIES"]

#: named model families; their adapters are built in issue 4
FAMILIES = ("llada-v", "lavida", "mmada", "dream-vl", "diffusion-gemma")


def __getattr__(name):
    if name == "GenericAdapter":
        from .generic import GenericAdapter
        return GenericAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(name_or_model, **kwargs) -> Adapter:
    """Pick the adapter for a model.

    * an :class:`Adapter`: returned as is (no keyword arguments allowed);
    * a torch module: wrapped in a :class:`~diffcam.adapters.generic.GenericAdapter` built from
      ``kwargs`` (``tokenizer``, ``blocks``, ``mask_token_id``, ``placeholder_id`` or
      ``image_token_id``, ``vision``, ``layout``, ...);
    * a family name (``"llada-v"``, ``"lavida"``, ``"mmada"``, ``"dream-vl"``,
      ``"diffusion-gemma"``) or ``"bundled"``: not available yet (NotImplementedError).
    """
    if isinstance(name_or_model, Adapter):
        if kwargs:
            raise TypeError(f"load() got an Adapter and keyword arguments {sorted(kwargs)}; "
                            f"configure the adapter itself instead")
        return name_or_model
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower().replace("_", "-")
        if key in FAMILIES:
            raise NotImplementedError(
                f"the {key!r} adapter is issue 4 (adapters for the named model families) and is not "
                f"available yet; meanwhile wrap the model with diffcam.load(model, tokenizer=..., "
                f"blocks=..., mask_token_id=..., placeholder_id=... or image_token_id=..., "
                f"vision=..., layout=...)")
        if key == "bundled":
            raise NotImplementedError(
                "the bundled model is the bundled-model issue and is not available yet; for tests "
                "use diffcam.testing.tiny_llava_anyres() or diffcam.testing.tiny_qwen2vl()")
        raise ValueError(f"unknown model name {name_or_model!r}: expected an Adapter, a torch module "
                         f"with GenericAdapter keyword arguments, or one of {FAMILIES + ('bundled',)}")
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
