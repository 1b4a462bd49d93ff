"""The adapter protocol: what the attribution engine needs from a diffusion MLLM.

An adapter wraps one model family (or, through :class:`diffcam.adapters.generic.GenericAdapter`,
any Hugging Face-style model) and answers five questions for the engine:

1. ``prepare(images, prompts)`` -- the expanded prompt of each sample: token ids, the prompt
   embeddings with the images spliced in, and the :class:`ImageLayout` of every image, read from
   the model's own packing metadata (never fixed offsets).
2. ``generate(sample, config)`` -- the answer, by the model's masked-denoising sampler, without
   gradients, with the trajectory (which response positions were still masked after each step).
3. ``forward(inputs_embeds, attention_mask, extras)`` -- logits of the full sequence through the
   model's *inner* forward (never a training forward that masks at random or duplicates the batch);
   the engine hooks ``blocks()[layer]`` around this call.
4. ``blocks()`` and ``default_layer`` -- where the hook goes.
5. ``logit_shift`` -- 0 when logit row j scores token j (LLaDA family), 1 when row j - 1 does
   (Dream family).

Optional: ``lens_logits(inputs_embeds, attention_mask, extras)`` -- the logits of every
position's own final hidden state, which the Token Activation Map baseline reads
(``explain(method="tam")``); only adapters whose ``forward`` leaves some rows empty need it
(DiffusionGemma: the prompt rows come from an encoder that predicts nothing).

Tensors are torch tensors on the model's device.  The engine owns hooks, gradients, targets and
Grad-CAM; an adapter never keeps an autograd graph alive.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:  # no runtime import: diffcam.attribution imports this module (import cycle)
    from ..attribution.layout import ImageLayout

__all__ = ["Adapter", "PreparedSample", "GenerationConfig", "GenerationResult",
           "cache_kwarg"]


def cache_kwarg(fn) -> str:
    """The keyword under which a transformers callable takes its KV cache: ``"cache"`` where
    the installed transformers has renamed it (``past_key_values`` is deprecated there and goes
    in 5.40), ``"past_key_values"`` in older releases.  Adapters pass a cache as
    ``fn(**{cache_kwarg(fn): cache})`` so they work on both sides of the rename.

    >>> def old(x, past_key_values=None): ...
    >>> def new(x, cache=None): ...
    >>> cache_kwarg(old), cache_kwarg(new)
    ('past_key_values', 'cache')
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):          # a builtin or C callable: the old name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class PreparedSample:
    """One (images, prompt) pair, expanded and embedded.

    input_ids      LongTensor (P,): the expanded prompt; image positions hold ``image_token_id``
                   of the adapter (or -1 when the model has none)
    inputs_embeds  Tensor (P, D): prompt embeddings with the image features spliced in (no grad)
    layouts        one ImageLayout per image of the sample, positions in the expanded sequence
    extras         model-specific inputs the forward needs for the *whole* sequence (e.g. mRoPE
                   position ids are built by ``extend_extras``)
    images         the decoded RGB uint8 arrays (H, W, 3), for overlays
    prompt         the prompt text as given
    """

    input_ids: Any
    inputs_embeds: Any
    layouts: list
    extras: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    prompt: str = ""

    @property
    def prompt_length(self) -> int:
        return int(self.inputs_embeds.shape[0])


@dataclass
class GenerationConfig:
    """LLaDA-style masked-diffusion sampling settings.

    steps          denoising steps in total (divided evenly among the blocks)
    gen_length     response length in tokens
    block_length   semi-autoregressive block length (gen_length: one block)
    temperature    0: greedy; > 0: Gumbel-max sampling
    remasking      'low_confidence' or 'random'
    seed           for temperature > 0 and 'random' remasking
    """

    steps: int = 32
    gen_length: int = 32
    block_length: Optional[int] = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    seed: int = 0

    def __post_init__(self):
        bl = self.gen_length if self.block_length is None else self.block_length
        if self.gen_length < 1 or self.steps < 1:
            raise ValueError(f"gen_length={self.gen_length} and steps={self.steps} must be >= 1")
        if bl < 1 or self.gen_length % bl:
            raise ValueError(f"block_length={bl} must divide gen_length={self.gen_length}")
        n_blocks = self.gen_length // bl
        if self.steps % n_blocks:
            raise ValueError(f"steps={self.steps} must be a multiple of the number of blocks "
                             f"({n_blocks} = gen_length / block_length)")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r}: expected 'low_confidence' or 'random'")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")


@dataclass
class GenerationResult:
    """The answer and its denoising trajectory.

    response_ids   LongTensor (G,): the final response tokens (mask tokens never remain)
    masked         BoolTensor (S + 1, G): masked[s, j] is True when response position j was still
                   masked after s steps (masked[0] all True, masked[S] all False)
    steps          S
    hidden_has_image  BoolTensor (S + 1,) or None: for prefix-cache samplers, whether the hooked
                   sequence of step s contained the image span (feasibility rule, method.md 1.8);
                   None for full-sequence samplers (always True)
    """

    response_ids: Any
    masked: Any
    steps: int
    hidden_has_image: Any = None


class Adapter(abc.ABC):
    """Base class of every model adapter.  Subclasses set the attributes and implement the
    abstract methods; the engine (``diffcam.Explainer``) does the rest."""

    #: the wrapped torch module
    model: Any = None
    #: a Hugging Face-style tokenizer (``encode``/``decode``/``convert_ids_to_tokens``) or an
    #: object with the same three methods
    tokenizer: Any = None
    #: id of the mask token of the masked-diffusion objective
    mask_token_id: int = -1
    #: id written into ``input_ids`` at image positions (-1 when there is none)
    image_token_id: int = -1
    #: 0: logit row j scores token j; 1: row j - 1 does (Dream family)
    logit_shift: int = 0
    #: family name, recorded in every Explanation
    name: str = "adapter"
    #: the GenerationConfig the Explainer uses when none is given (None: ``GenerationConfig()``)
    default_generation: Optional["GenerationConfig"] = None
    #: True when :meth:`forward` accepts the extras of one sample (batch dim 1) for a batch of
    #: rows: the Explainer then runs rows with equal extras (several states of one sample) in one
    #: batched forward instead of one forward per row
    broadcast_extras: bool = False

    # ----------------------------------------------------------------- abstract
    @abc.abstractmethod
    def blocks(self) -> Sequence[Any]:
        """The transformer blocks whose outputs can be hooked, in order."""

    @abc.abstractmethod
    def prepare(self, images: Sequence[Any], prompt: str) -> PreparedSample:
        """Expand one prompt with its images (one or several) into a PreparedSample."""

    @abc.abstractmethod
    def embed_tokens(self, ids) -> Any:
        """Embeddings (G, D) of token ids (G,) -- the response part of the sequence."""

    @abc.abstractmethod
    def forward(self, inputs_embeds, attention_mask=None, extras: Optional[dict] = None):
        """Logits (B, L, V) of the full sequences (B, L, D) through the inner forward."""

    # ----------------------------------------------------------------- defaults
    @property
    def default_layer(self) -> int:
        """About one third of the depth (block 10 of 32)."""
        return max(0, round(len(self.blocks()) * 10 / 32))

    def generate(self, sample: PreparedSample, config: GenerationConfig) -> GenerationResult:
        """Masked-diffusion sampling through :meth:`forward` (LLaDA low-confidence remasking).

        Adapters whose model needs its own sampler override this and still return the
        trajectory."""
        from ..generation import masked_diffusion_generate

        return masked_diffusion_generate(self, sample, config)

    def extend_extras(self, sample: PreparedSample, total_length: int) -> dict:
        """Model-specific forward inputs for the full sequence of ``total_length`` positions
        (prompt + response).  Default: the sample's extras unchanged."""
        return dict(sample.extras)

    def token_strings(self, ids) -> list:
        """Readable text of each token (for words and targets)."""
        tok = self.tokenizer
        return [tok.decode([int(i)]) for i in ids]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def info(self) -> dict:
        """Provenance recorded in every Explanation."""
        return {"adapter": self.name, "model_class": type(self.model).__name__,
                "num_blocks": len(self.blocks()), "logit_shift": self.logit_shift,
                "mask_token_id": self.mask_token_id}
