"""``diffcam.Explainer``: Diffusion-CAM maps of a diffusion MLLM (method.md section 1).

>>> with diffcam.Explainer(adapter) as ex:                              # doctest: +SKIP
...     exp = ex.explain("cat.jpg", "<image>\\nDescribe the image.")
...     exp.overlay("cat").save("cat_map.png")

The pass, for a batch of (images, prompt) samples:

1. ``adapter.prepare`` expands each prompt with its images (layouts from the packing metadata);
2. the answer is generated without gradients (``adapter.generate``), or, with ``answer=``, the
   given text is tokenized as the response (teacher-forced attribution);
3. ONE grad-enabled forward over ``[prompt | response state]`` for every (sample, state) row,
   right-padded to equal length with an attention mask, with block ``layer`` hooked so that the
   autograd graph starts there (:class:`~diffcam.attribution.hooks.BlockHook`);
4. a score per target (logit / log-prob / vocabulary sum of the produced token at its position,
   minus a contrast token's) and the aggregate (their sum); the gradients of all targets of all
   rows come from one batched backward (``is_grads_batched=True``; a loop where the model cannot
   be vmapped, same result) -- rows never interact, so target k of every row shares one
   backward vector; the aggregate's gradient is the sum of the targets' (no vector of its own);
5. Grad-CAM on each grid of each image (newline columns dropped) -> :class:`Explanation`.

Response token j sits at expanded position ``P + j`` (P = prompt length) and is scored on logit
row ``P + j - adapter.logit_shift``.  A state ``s`` (int) re-masks the response positions that
were still masked after s denoising steps; the score is still the final token's.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Optional

import numpy as np
import torch

from .._allocator import allocator_state, tune_cpu_allocator, tuning_enabled
from ..adapters.base import Adapter, GenerationConfig
from .explanation import Explanation
from . import fastvjp
from .gradcam import grad_cam
from .hooks import BlockHook
from .images import is_image_like, load_image
from .targets import MAX_PADDING_MAPS, group_words, interference_tokens, resolve_targets

__all__ = ["Explainer", "EmptyAnswerError", "SCORES", "METHODS"]


class EmptyAnswerError(ValueError):
    """The answer to explain has no token that is not a special token (the model generated
    only ``<eos>``/padding, or ``answer=`` was empty after tokenization).  A ``ValueError``, so
    existing handlers keep working; catch this class to tell an empty generation from a bad
    argument (``diffcam.models.evaluate.collect_maps`` counts it as a wrong answer)."""


SCORES = ("logit", "logprob", "vocab_sum")
METHODS = ("diffusion-cam", "grad-cam", "llava-cam", "tam")
GRADCAM_VARIANTS = ("paper", "reference")


def _versions() -> dict:
    import diffcam
    v = {"diffcam": getattr(diffcam, "__version__", None), "torch": torch.__version__,
         "numpy": np.__version__}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except Exception:
        v["transformers"] = None
    return v


class Explainer:
    """Build once per model; call :meth:`explain` as often as needed.

    adapter   an :class:`~diffcam.adapters.base.Adapter` (e.g. a GenericAdapter)
    layer     block to hook (default ``adapter.default_layer``); negative counts from the end
    batched_backward  True: try ``is_grads_batched`` first (falls back to a loop on error);
                      False: always loop over targets
    head_rows_only    True: apply the LM head with gradients only to the scored rows (the head
                      module is found on the adapter and verified against the full logits on
                      every call, with a fallback); False: keep the full logits in the graph
    backward_chunk    at most this many backward vectors (targets, the aggregate included) per
                      backward pass; the maps of one chunk are made before the next chunk's
                      gradients exist, so the gradient memory is bounded by chunk x image tokens
                      x hidden size (and a batched backward's transients by chunk x sequence);
                      None (default): every target in one pass (fastest).  Same maps either way.
    tune_allocator    True: on the first explanation of a model on the CPU, raise glibc's
                      malloc thresholds for this process (:mod:`diffcam._allocator`: freed
                      multi-MB backward temporaries stay in the heap instead of page-faulting
                      back in on every call; 1.4-1.6x faster per-token maps on the tiny
                      LLaVA-layout test model); False: leave the C library's defaults; None
                      (default): True unless the environment sets ``DIFFCAM_TUNE_MALLOC=0``.
                      Process-wide; a no-op off Linux/glibc.  Maps are the same either way.
    fast_backward     "auto" (default): on the CPU, the maps (per-token and aggregate) of
                      models whose blocks above the hook are LLaMA-style decoder layers
                      (transformers' Llama / Qwen2 / Mistral layers and subclasses, see
                      :func:`fastvjp.unsupported_reason`) use a hand-written batched backward
                      (:mod:`diffcam.attribution.fastvjp`: the blocks re-run from their
                      captured inputs, checked against the real outputs, then the
                      vector-Jacobian products by hand; 16 per-token maps of the tiny
                      LLaVA-layout test model 1.8x faster than autograd's vmapped backward,
                      of the 33-position Qwen2-VL-layout one up to 1.2x; the aggregate map
                      alone 3-4 % faster with a third less graph memory, bench/RESULTS.md);
                      any other model, device or a failed check uses autograd.  True: also
                      on CUDA; False: always autograd.  Same maps (within float32
                      rounding); ``last_backward`` says which ran ("fast").
    fast_check        "once" (default): each block above the hook is checked against its real
                      forward the first time it is called with a new kind of input (dtypes,
                      devices and ranks of its arguments, which arguments are given, the values
                      of flags, the identity of its forward and submodules); later calls of a
                      checked kind run the checked re-implementation in place of the block, so
                      those blocks run once per call instead of twice.  "always": every call
                      runs the real blocks and checks the re-run against them.
    llava_cam_norm    ``method="llava-cam"`` hooks this attribute of block ``layer`` (a dotted
                      path allowed); None (default): the norm that feeds the block's MLP
                      (:func:`diffcam.baselines.mlp_input_norm`)
    llava_cam_threshold  LLaVA-CAM's threshold on the max-normalised map (default 0.5; None:
                      no threshold)
    tam_kernel        the rank Gaussian filter's window of ``method="tam"`` (default 3, odd,
                      3 to 31; None: no filter)
    max_padding_maps  at most this many padding positions (EOS after the answer) get an
                      interference map for SICD (default 8, evenly spaced; 0: none; see
                      ``explain(interference=...)``)

    >>> from diffcam.testing import tiny_llava_anyres
    >>> ex = Explainer(tiny_llava_anyres(seed=0), backward_chunk=4)
    >>> ex.backward_chunk
    4

    Hooks exist only inside an explain call (the context manager form guarantees cleanup of
    anything left by an interrupted call); no autograd graph survives a call.  The maps need
    gradients at the hooked activations only: parameters that require grad (a model fresh from
    ``from_pretrained``) are switched off for the attribution pass and back on after it, so
    autograd records nothing below the hook and keeps nothing for weight gradients.
    """

    def __init__(self, adapter: Adapter, layer: Optional[int] = None,
                 batched_backward: bool = True, head_rows_only: bool = True,
                 backward_chunk: Optional[int] = None,
                 tune_allocator: Optional[bool] = None, fast_backward="auto",
                 fast_check: str = "once", llava_cam_norm: Optional[str] = None,
                 llava_cam_threshold: Optional[float] = 0.5, tam_kernel: Optional[int] = 3,
                 max_padding_maps: int = MAX_PADDING_MAPS):
        if not isinstance(adapter, Adapter) and not all(
                hasattr(adapter, a) for a in ("blocks", "prepare", "forward", "embed_tokens")):
            raise TypeError(f"adapter must implement diffcam.adapters.Adapter, got "
                            f"{type(adapter).__name__}")
        self.adapter = adapter
        self.batched_backward = bool(batched_backward)
        self.head_rows_only = bool(head_rows_only)
        if backward_chunk is not None:
            if isinstance(backward_chunk, bool) or not isinstance(backward_chunk,
                                                                   (int, np.integer)):
                raise TypeError(f"backward_chunk must be an int or None, got "
                                f"{type(backward_chunk).__name__}")
            if backward_chunk < 1:
                raise ValueError(f"backward_chunk must be >= 1, got {backward_chunk}")
            backward_chunk = int(backward_chunk)
        self.backward_chunk = backward_chunk
        if tune_allocator is not None and not isinstance(tune_allocator, bool):
            raise TypeError(f"tune_allocator must be True, False or None, got "
                            f"{type(tune_allocator).__name__}")
        self.tune_allocator = tune_allocator
        if fast_backward not in ("auto", True, False):
            raise ValueError(f"fast_backward must be 'auto', True or False, got "
                             f"{fast_backward!r}")
        self.fast_backward = fast_backward
        if fast_check not in ("once", "always"):
            raise ValueError(f"fast_check must be 'once' or 'always', got {fast_check!r}")
        self.fast_check = fast_check
        if llava_cam_norm is not None and not isinstance(llava_cam_norm, str):
            raise TypeError(f"llava_cam_norm must be an attribute name or None, got "
                            f"{type(llava_cam_norm).__name__}")
        self.llava_cam_norm = llava_cam_norm
        if llava_cam_threshold is not None and not (
                isinstance(llava_cam_threshold, numbers.Real)
                and not isinstance(llava_cam_threshold, bool)
                and 0.0 <= float(llava_cam_threshold) <= 1.0):
            raise ValueError(f"llava_cam_threshold must be in [0, 1] or None, got "
                             f"{llava_cam_threshold!r}")
        self.llava_cam_threshold = llava_cam_threshold
        if tam_kernel is not None and (isinstance(tam_kernel, bool) or not isinstance(
                tam_kernel, (int, np.integer)) or tam_kernel % 2 == 0 or not 3 <= tam_kernel <= 31):
            raise ValueError(f"tam_kernel must be an odd int in [3, 31] or None, got "
                             f"{tam_kernel!r}")
        self.tam_kernel = None if tam_kernel is None else int(tam_kernel)
        if isinstance(max_padding_maps, bool) or not isinstance(max_padding_maps,
                                                                (int, np.integer)) \
                or max_padding_maps < 0:
            raise ValueError(f"max_padding_maps must be an int >= 0, got {max_padding_maps!r}")
        self.max_padding_maps = int(max_padding_maps)
        self._want_interference = False
        self._fast_trusted = {}  # layer -> per block above it: checked kinds of call -> form
        self._fast_off = {}     # layer -> why the hand-written backward is not used there
        self._rows_local = {}   # layer -> whether the final norm + head work row by row
        self._hooks: list = []
        self.last_backward = None      # "batched" or "loop": how the last call got its grads
        self.layer = self._check_layer(layer)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove any hook still registered (none is, after a completed call) and collect."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ checks
    def _check_layer(self, layer) -> int:
        n = len(self.adapter.blocks())
        if layer is None:
            layer = self.adapter.default_layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        layer = int(layer)
        if not -n <= layer < n:
            raise ValueError(f"layer={layer} but the model has {n} blocks")
        return layer % n

    @staticmethod
    def _samples(images, prompts):
        single = is_image_like(images)
        if images is None:
            raise ValueError("no image given: Diffusion-CAM explains an answer by image regions")
        items = [images] if single else list(images)
        if not items:
            raise ValueError("images is empty")
        samples = []
        for i, it in enumerate(items):
            if isinstance(it, (list, tuple)):
                if not it:
                    raise ValueError(f"sample {i} has no image")
                samples.append([load_image(x, f"image {i}.{k}") for k, x in enumerate(it)])
            else:
                samples.append([load_image(it, f"image {i}")])
        if isinstance(prompts, str):
            prompts = [prompts] * len(samples)
        else:
            prompts = list(prompts)
            single = single and len(prompts) == 1
            if len(prompts) == 1 and len(samples) > 1:
                prompts = prompts * len(samples)
            if len(prompts) != len(samples):
                raise ValueError(f"{len(prompts)} prompts for {len(samples)} image samples")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty" if len(prompts) > 1 else
                                 "the prompt is empty")
        return single, samples, prompts

    @staticmethod
    def _states(states) -> list:
        if isinstance(states, (str, int, np.integer)):
            states = [states]
        out = []
        for s in states:
            if isinstance(s, str):
                if s != "final":
                    raise ValueError(f"state {s!r}: expected 'final' or a step number")
                out.append("final")
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                out.append(int(s))
            else:
                raise ValueError(f"state {s!r}: expected 'final' or a step number")
        if not out:
            raise ValueError("states is empty")
        if len(set(out)) != len(out):
            raise ValueError(f"states {out} has duplicates")
        return out

    def _contrast_id(self, contrast) -> Optional[int]:
        if contrast is None:
            return None
        if isinstance(contrast, (int, np.integer)):
            return int(contrast)
        ids = list(self.adapter.tokenizer.encode(contrast, add_special_tokens=False)) if \
            _accepts_kw(self.adapter.tokenizer.encode) else list(self.adapter.tokenizer.encode(contrast))
        if len(ids) != 1:
            raise ValueError(f"contrast={contrast!r} is {len(ids)} tokens; give a single-token "
                             "word or a token id")
        return int(ids[0])

    # ------------------------------------------------------------------ main entry
    def explain(self, images, prompts, targets="nouns", layer: Optional[int] = None,
                states=("final",), score: str = "logit", contrast=None,
                method: str = "diffusion-cam", answer=None,
                generation: Optional[GenerationConfig] = None, gradcam: str = "paper",
                aggregate_only: bool = False, interference="auto"):
        """Explain one sample (returns an :class:`Explanation`) or a batch (a list of them).

        images      a path, PIL image or array; a list of them (a batch, one image each); an
                    element that is a list/tuple holds several images of one sample
        prompts     a str (shared by the batch) or one per sample; the adapter's image marker
                    marks where each image goes
        targets     "nouns" | "all" | list of words or phrases ("a red circle": every
                    occurrence's tokens, one target) | list of token indices | callable
                    (see :func:`diffcam.attribution.targets.resolve_targets`)
        states      "final" and/or step numbers s (trajectory maps, method.md 1.2)
        score       "logit" | "logprob" | "vocab_sum"
        contrast    a token id or single-token word d: score = score_t - score_d
        method      "diffusion-cam" (raw maps here; refine with ``Explanation.refined()``),
                    "grad-cam" (the same raw maps, recorded as the baseline), or the baselines
                    of method.md 4: "llava-cam" (gradients at the norm feeding block
                    ``layer``'s MLP, :func:`diffcam.baselines.llava_cam`) and "tam" (Token
                    Activation Map: no gradients, final-layer logit lens with estimated causal
                    inference, :mod:`diffcam.baselines.tam`; ``layer``, ``score``, ``contrast``
                    and ``gradcam`` do not apply to it)
        answer      explain this text instead of generating (a str, or one per sample)
        generation  GenerationConfig of the sampler (default: ``adapter.default_generation``,
                    else ``GenerationConfig()``)
        gradcam     "paper" | "reference" aggregation (method.md 1.7, [ref])
        aggregate_only  compute only the aggregate map (one backward vector instead of
                    targets + 1); the maps' target axis then has length 1
        interference  "auto" (default): also compute the per-token maps that SICD subtracts
                    (method.md 2.4; :func:`~diffcam.attribution.targets.interference_tokens`:
                    the repeated function words and up to ``max_padding_maps`` padding
                    positions), kept apart from the targets in
                    :attr:`Explanation.interference_maps` and used by
                    :meth:`Explanation.refined`; they never enter the aggregate.  Targets that
                    are such tokens are not computed twice.  Only for
                    ``method="diffusion-cam"`` without ``aggregate_only``.  None: none (SICD
                    then falls back to the target maps of repeated function words, else the
                    uniform constant).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("explain() was called inside torch.inference_mode(): gradients "
                               "cannot flow; call it outside inference mode")
        if score not in SCORES:
            raise ValueError(f"score={score!r}: expected one of {SCORES}")
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {METHODS}")
        if gradcam not in GRADCAM_VARIANTS:
            raise ValueError(f"gradcam={gradcam!r}: expected one of {GRADCAM_VARIANTS}")
        if not (interference is None or (isinstance(interference, str)
                                         and interference == "auto")):
            raise ValueError(f"interference={interference!r}: expected 'auto' or None")
        if contrast is not None and score == "vocab_sum":
            raise ValueError("contrast has no meaning with score='vocab_sum' (the vocabulary sum "
                             "does not depend on the token)")
        layer = self.layer if layer is None else self._check_layer(layer)
        if method == "llava-cam":       # fail before generating: the block must have the norm
            from ..baselines import mlp_input_norm

            mlp_input_norm(self.adapter.blocks()[layer], self.llava_cam_norm)
        state_list = self._states(states)
        if generation is None:
            generation = getattr(self.adapter, "default_generation", None) or GenerationConfig()
        single, samples, prompts = self._samples(images, prompts)
        answers = self._answers(answer, len(samples))
        if answers is not None and any(s != "final" for s in state_list):
            raise ValueError("trajectory states need the generated trajectory; they cannot be "
                             "used with answer= (teacher forcing has no denoising steps)")
        d_id = self._contrast_id(contrast)
        if getattr(getattr(self.adapter, "model", None), "training", False):
            warnings.warn("the model is in training mode (dropout is active, maps are not "
                          "deterministic); call model.eval() first", UserWarning, stacklevel=2)
        try:
            self._aggregate_only = bool(aggregate_only)
            self._want_interference = (interference == "auto" and method == "diffusion-cam"
                                       and not aggregate_only)
            out = self._explain(samples, prompts, targets, layer, state_list, score, d_id,
                                method, answers, generation, gradcam, contrast)
        finally:
            self.close()
        return out[0] if single else out

    @staticmethod
    def _answers(answer, n):
        if answer is None:
            return None
        if isinstance(answer, str):
            answer = [answer] * n
        answer = list(answer)
        if len(answer) != n:
            raise ValueError(f"{len(answer)} answers for {n} samples")
        for a in answer:
            if not isinstance(a, str) or not a.strip():
                raise ValueError("answer= is empty")
        return answer

    def _encode_answer(self, text: str):
        tok = self.adapter.tokenizer
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tok.encode(text)
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"answer {text!r} tokenizes to nothing")
        return ids

    def _special_ids(self) -> set:
        tok = self.adapter.tokenizer
        s = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
        s.add(int(self.adapter.mask_token_id))
        return s

    # ------------------------------------------------------------------ the pass
    def _explain(self, samples, prompts, targets, layer, state_list, score, d_id, method,
                 answers, generation, gradcam, contrast):
        ad = self.adapter
        shift = int(getattr(ad, "logit_shift", 0))
        special = self._special_ids()
        prepared, gens, infos, inter_info = [], [], [], []
        for i, (imgs, prompt) in enumerate(zip(samples, prompts)):
            sample = ad.prepare(imgs, prompt)
            for lay in sample.layouts:
                lay.check()
                if lay.span_end > sample.prompt_length:
                    raise ValueError(f"sample {i}: image span [{lay.span_start}, {lay.span_end}) "
                                     f"runs past the prompt ({sample.prompt_length} positions)")
            if sample.prompt_length - shift < 0:
                raise ValueError("the prompt is shorter than the logit shift")
            if answers is None:
                with torch.no_grad():
                    gen = ad.generate(sample, generation)
                ids = [int(t) for t in gen.response_ids.tolist()]
            else:
                ids = self._encode_answer(answers[i])
                gen = None
            # feasibility + states
            for s in state_list:
                if s == "final":
                    continue
                if not 0 <= s <= gen.steps:
                    raise ValueError(f"state step={s} is out of range: the answer was generated in "
                                     f"{gen.steps} steps (0..{gen.steps})")
                hhi = gen.hidden_has_image
                if hhi is not None and not bool(hhi[s]):
                    raise ValueError(
                        f"state step={s} is not feasible (method.md 1.8): the hooked hidden "
                        f"sequence of that step does not contain the image span (the sampler "
                        f"uses a prefix KV cache); choose a step where the image is in the "
                        f"hooked sequence (e.g. 0) or 'final'")
            strings = list(ad.token_strings(ids))
            is_special = [t in special for t in ids]
            words = group_words(self._raw_tokens(ids, strings), is_special)
            tg = self._targets(targets, words, strings, is_special)
            # SICD's interference maps: extra targets after the real ones (never in the
            # aggregate); a token set that already is a target is not computed twice
            extra, inter_tg, inter_idx = [], [], []
            if self._want_interference:
                inter_tg = interference_tokens(words, ids, is_special, strings,
                                               int(ad.mask_token_id), self.max_padding_maps)
                where = {t.tokens: k for k, t in enumerate(tg)}
                for t in inter_tg:
                    if t.tokens not in where:
                        where[t.tokens] = len(tg) + len(extra)
                        extra.append(t)
                    inter_idx.append(where[t.tokens])
            prepared.append(sample)
            gens.append(gen)
            infos.append((ids, strings, words, tg + extra, len(tg)))
            inter_info.append((inter_tg, inter_idx))

        rows = []     # (sample index, state, response id tensor)
        for i, sample in enumerate(prepared):
            ids = torch.tensor(infos[i][0], dtype=torch.long, device=sample.inputs_embeds.device)
            for s in state_list:
                r = ids
                if s != "final":
                    m = torch.as_tensor(gens[i].masked[s], dtype=torch.bool).to(ids.device)
                    r = torch.where(m, torch.full_like(ids, int(ad.mask_token_id)), ids)
                rows.append((i, s, r))

        if method == "tam":
            maps_rows = self._tam(prepared, infos, rows, special)
        else:
            maps_rows = self._attribute(prepared, infos, rows, layer, score, d_id, shift,
                                        gradcam, method)

        versions = _versions()
        settings = {"layer": layer, "score": score, "contrast": contrast, "contrast_id": d_id,
                    "method": method, "gradcam": gradcam, "states": list(state_list),
                    "targets": targets if isinstance(targets, (str, type(None))) else
                    (repr(targets) if callable(targets) else list(map(_jsonable, targets))),
                    "answer_given": answers is not None,
                    "generation": None if answers is not None else dict(vars(generation)),
                    "logit_shift": shift, "backward": self.last_backward,
                    "fast_check": self.fast_check,
                    "aggregate_only": self._aggregate_only,
                    "interference": "auto" if self._want_interference else None,
                    "backward_chunk": self.backward_chunk,
                    "allocator_tuned": allocator_state()["tuned"],
                    "head_rows_only": self.head_rows_only and getattr(self, "_head_ok", True)}
        try:
            adapter_info = ad.info()
        except Exception:
            adapter_info = {"adapter": getattr(ad, "name", type(ad).__name__)}
        out = []
        n_states = len(state_list)
        for i, sample in enumerate(prepared):
            ids, strings, words, tg_all, n_main = infos[i]
            tg = tg_all[:n_main]
            inter_tg, inter_idx = inter_info[i]
            per_image, inter_maps = [], []
            for lay_idx, lay in enumerate(sample.layouts):
                d, dx = {}, {}
                for g in lay.grids:
                    stack = [maps_rows[(i, k)][lay_idx][g.name] for k in range(n_states)]
                    arr = np.stack(stack, axis=1).astype(np.float32)   # (T_all+1, S, h, w)
                    # the real targets and the aggregate (last); the extra targets' maps
                    # only serve as interference maps
                    d[g.name] = (np.concatenate([arr[:n_main], arr[-1:]])
                                 if len(tg_all) > n_main else arr)
                    if inter_idx:
                        dx[g.name] = np.ascontiguousarray(arr[inter_idx])   # (X, S, h, w)
                per_image.append(d)
                inter_maps.append(dx)
            masked = None if gens[i] is None else np.asarray(
                torch.as_tensor(gens[i].masked).cpu().numpy(), dtype=bool)
            answer_text = answers[i] if answers is not None else self._decode(ids)
            out.append(Explanation(
                answer=answer_text, token_ids=ids, tokens=strings, words=words, targets=tg,
                states=list(state_list), maps=per_image, layouts=list(sample.layouts),
                images=list(samples[i]), prompt=prompts[i], masked=masked,
                settings=dict(settings), versions=versions, adapter=adapter_info,
                interference=list(inter_tg) if inter_idx else [],
                interference_maps=inter_maps if inter_idx else []))
        return out

    def _raw_tokens(self, ids, strings) -> list:
        """Token strings with their word-start markers (convert_ids_to_tokens) for grouping."""
        conv = getattr(self.adapter.tokenizer, "convert_ids_to_tokens", None)
        if conv is None:
            return strings
        try:
            raw = [str(t) for t in conv([int(i) for i in ids])]
        except Exception:
            return strings
        return raw if len(raw) == len(strings) else strings

    def _decode(self, ids) -> str:
        tok = self.adapter.tokenizer
        try:
            return tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()
        except TypeError:
            return self.adapter.decode(ids).strip()

    @staticmethod
    def _targets(spec, words, strings, is_special) -> list:
        valid = [not s for s in is_special]
        if not any(valid):
            raise EmptyAnswerError("the answer has no tokens to explain (only special tokens)")
        tg = resolve_targets(spec, words, len(strings), strings, valid)
        if not tg and isinstance(spec, str) and spec == "nouns":
            warnings.warn("no content words found in the answer "
                          f"{[w.text for w in words]}; explaining all answer tokens",
                          UserWarning, stacklevel=4)
            tg = resolve_targets("all", words, len(strings), strings, valid)
        if not tg:
            raise ValueError(f"no targets: {spec!r} selects nothing in the answer "
                             f"{[w.text for w in words]}")
        return tg

    # ------------------------------------------------------------------ forward + backward
    def _attribute(self, prepared, infos, rows, layer, score, d_id, shift, gradcam,
                   method="diffusion-cam"):
        with _weights_frozen(getattr(self.adapter, "model", None)):
            try:
                return self._attribute_once(prepared, infos, rows, layer, score, d_id, shift,
                                            gradcam, method)
            except fastvjp.FastMismatch as e:
                # the hand-written backward does not fit this model (its forward ran without a
                # graph above the hook): note why, and redo the call with autograd
                self._fast_off[layer] = str(e)
                return self._attribute_once(prepared, infos, rows, layer, score, d_id, shift,
                                            gradcam, method)

    def _row_batch(self, prepared, rows):
        """The padded (B, L, D) embeddings of ``rows`` ([prompt | response state] each), their
        lengths, the attention mask argument (None without padding) and the extras."""
        ad = self.adapter
        dev = prepared[0].inputs_embeds.device
        dtype = prepared[0].inputs_embeds.dtype
        seqs, lengths = [], []
        for i, s, r in rows:
            pe = prepared[i].inputs_embeds
            with torch.no_grad():
                re = ad.embed_tokens(r).to(pe.dtype)
            seqs.append(torch.cat([pe.detach(), re.detach()], 0))
            lengths.append(seqs[-1].shape[0])
        B, L = len(rows), max(lengths)
        D = seqs[0].shape[1]
        embeds = torch.zeros(B, L, D, dtype=dtype, device=dev)
        attn = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, x in enumerate(seqs):
            embeds[b, :x.shape[0]] = x
            attn[b, :x.shape[0]] = 1
        del seqs
        attn_arg = None if all(n == L for n in lengths) else attn
        extras_list = [ad.extend_extras(prepared[i], L) for i, _, _ in rows]
        return embeds, lengths, attn_arg, extras_list

    def _attribute_once(self, prepared, infos, rows, layer, score, d_id, shift, gradcam,
                        method="diffusion-cam"):
        ad = self.adapter
        block = ad.blocks()[layer]
        where = f"block {layer}"
        if method == "llava-cam":
            from ..baselines import llava_cam, mlp_input_norm

            name, block = mlp_input_norm(block, self.llava_cam_norm)
            where = f"block {layer}.{name}"
            thr = self.llava_cam_threshold

            def cam(a, g):
                return llava_cam(a, g, threshold=thr)
        else:
            def cam(a, g):
                return grad_cam(a, g, variant=gradcam)
        dev = prepared[0].inputs_embeds.device
        if dev.type == "cpu" and tuning_enabled(self.tune_allocator):
            tune_cpu_allocator()
        embeds, lengths, attn_arg, extras_list = self._row_batch(prepared, rows)
        B, L = embeds.shape[:2]
        extras = self._collate(extras_list, getattr(ad, "broadcast_extras", False))

        agg_only = getattr(self, "_aggregate_only", False)
        T = [0 if agg_only else len(infos[i][3]) for i, _, _ in rows]
        # the first NM[b] targets are the real ones; SICD's extra targets follow them and are
        # left out of the aggregate
        NM = [infos[i][4] for i, _, _ in rows]
        # the aggregate score is the sum of the target scores, so its gradient is the sum of
        # theirs: with per-target maps it needs no backward vector of its own
        agg_sum = not agg_only and min(T) > 0
        K = max(T) if agg_sum else max(T) + 1
        result = {}
        with torch.enable_grad():
            # gradients only where Grad-CAM reads them: the union of all grid positions
            pos_sets = [np.unique(np.concatenate([g.positions(lay.span_start).ravel()
                                                  for lay in prepared[i].layouts
                                                  for g in lay.grids])) for i, _, _ in rows]
            union = np.unique(np.concatenate(pos_sets))
            hook = BlockHook(block, where)
            self._hooks.append(hook)
            try:
                gather = None
                scored = None
                if extras is not _PER_ROW:
                    hook.positions = torch.as_tensor(union, dtype=torch.long, device=dev)
                    head = self._head_module() if self.head_rows_only else None
                    if self.fast_backward is not False and method != "llava-cam":
                        scored = self._scored_rows(rows, infos, prepared, shift, L, dev)
                    # the hand-written backward starts at a block's output: not LLaVA-CAM's norm
                    cap = None if method == "llava-cam" else self._fast_capture(
                        layer, dev, scored if self._rows_local.get(layer) else None)
                    try:
                        with cap or contextlib.nullcontext():
                            logits, gather = self._batched_forward(hook, head, embeds,
                                                                   attn_arg, extras)
                    except _HeadMismatch:
                        self._head_ok = False
                        if cap is not None:
                            cap.clear()
                        with cap or contextlib.nullcontext():
                            logits, gather = self._batched_forward(hook, None, embeds,
                                                                   attn_arg, extras)
                    hidden, leaf = hook.output, hook.leaf
                    hook.clear()
                    logit_rows = [logits[b] for b in range(B)]
                    hidden_rows = [hidden[b] for b in range(B)]
                    leaves = [leaf]
                    lookups = [union] * B
                else:   # extras that cannot be batched: one forward per row, same graph rules
                    cap = None
                    logit_rows, hidden_rows, leaves, lookups = [], [], [], []
                    logits = None
                    for b in range(B):
                        hook.positions = torch.as_tensor(pos_sets[b], dtype=torch.long,
                                                         device=dev)
                        with hook:
                            lg = ad.forward(embeds[b:b + 1, :lengths[b]], None, extras_list[b])
                        leaves.append(hook.leaf)
                        hidden_rows.append(hook.output[0])
                        lookups.append(pos_sets[b])
                        hook.clear()
                        logit_rows.append(lg[0])
                    hidden = None
                for b, lg in enumerate(logit_rows):
                    if lg.shape[0] < lengths[b] - shift:
                        raise RuntimeError(f"the adapter returned {lg.shape[0]} logit rows for a "
                                           f"sequence of {lengths[b]} positions")
                if gather is None and not logit_rows[0].requires_grad:
                    raise RuntimeError(
                        f"gradients cannot flow from the logits to {where}: the logits do "
                        "not depend on the hooked output with autograd (the adapter's forward "
                        "runs under torch.no_grad / inference_mode, detaches, or the blocks "
                        "above the hook are not differentiable)")
                if hidden_rows[0].shape[0] < lengths[0]:
                    raise ValueError(
                        f"{where} saw {hidden_rows[0].shape[0]} positions but the sequence "
                        f"has {lengths[0]}: the hooked hidden sequence does not contain the whole "
                        "image span (feasibility rule, method.md 1.8)")
                # scores (B, K): targets, aggregate at column T_b, zeros after -- one gather
                # of all scored logit rows, then a constant 0/1 matrix sums tokens into targets
                tokinfo = {}
                try:
                    S = self._score_matrix(logits if hidden is not None else logit_rows, rows,
                                           infos, prepared, K, agg_only, score, d_id, shift,
                                           gather, aggregate=not agg_sum, keep=tokinfo)
                except _HeadMismatch:
                    # the LM head is not applied row-wise to what we captured: redo the
                    # forward with the full logits in the graph
                    self._head_ok = False
                    hook.positions = torch.as_tensor(union, dtype=torch.long, device=dev)
                    if cap is not None:
                        cap.clear()
                    with cap or contextlib.nullcontext():
                        logits, _ = self._batched_forward(hook, None, embeds, attn_arg, extras)
                    hidden, leaves = hook.output, [hook.leaf]
                    hidden_rows = [hidden[b] for b in range(B)]
                    hook.clear()
                    S = self._score_matrix(logits, rows, infos, prepared, K, agg_only, score,
                                           d_id, shift, None, aggregate=not agg_sum,
                                           keep=tokinfo)
                logits = gather = None
                del logit_rows
                # backward vectors in chunks of at most backward_chunk; each chunk's gradients
                # become maps before the next chunk's exist
                C = K if self.backward_chunk is None else min(K, self.backward_chunk)
                # per row, image and grid (once, whatever the number of passes): the grid's
                # activations (h, w, D), its gradient-leaf indices and the maps made so far
                cells = []
                for b, (i, s, r) in enumerate(rows):
                    A = hidden_rows[b].detach()
                    per_image = []
                    for lay in prepared[i].layouts:
                        d = {}
                        for g in lay.grids:
                            p_abs = g.positions(lay.span_start)
                            p_leaf = np.searchsorted(lookups[b], p_abs)
                            d[g.name] = (A[torch.as_tensor(p_abs, device=A.device)],
                                         torch.as_tensor(p_leaf, device=A.device), [])
                        per_image.append(d)
                    cells.append(per_image)
                del hidden_rows
                # with agg_sum: per row, the running sum of its target gradients (n_leaf, D)
                G_agg = [None] * B

                def add_maps(b, G):     # Grad-CAM of gradients G (n, n_leaf, D) on row b's grids
                    for d in cells[b]:
                        for a, p_leaf, maps in d.values():
                            m = cam(a, G[:, p_leaf])                          # (n, h, w)
                            maps.append(m.cpu().numpy().astype(np.float32))

                how = []
                fast = None if cap is None else {"cap": cap, "saved": None, "hidden": hidden,
                                                 "positions": hook.positions, "layer": layer,
                                                 "tok": tokinfo, "g_tok": None, "k0": 0,
                                                 "scored": scored}
                for k0 in range(0, K, C):
                    k1 = min(K, k0 + C)
                    grads = None
                    if fast is not None:
                        fast["k0"] = k0
                        grads = self._fast_grads(S[:, k0:k1], k1 - k0, fast, leaves[0])
                    if grads is None:
                        grads = self._backward(S[:, k0:k1], leaves, k1 - k0,
                                               retain_graph=k1 < K)   # per leaf (k1-k0, b, n, D)
                    how.append(self.last_backward)
                    if hidden is not None:
                        G_rows = [grads[0][:, b] for b in range(B)]
                    else:
                        G_rows = [g[:, 0] for g in grads]
                    del grads
                    for b in range(B):
                        # columns after the row's own (T_b targets, + the aggregate unless
                        # agg_sum) are padding
                        n_valid = min(k1, T[b] + (0 if agg_sum else 1)) - k0
                        if n_valid <= 0:
                            continue
                        Gb = G_rows[b][:n_valid]
                        if agg_sum:
                            part = Gb[:max(0, min(n_valid, NM[b] - k0))].sum(0)
                            if k0 == 0 and k1 == K:
                                # one pass: the aggregate goes last in the same Grad-CAM call
                                add_maps(b, torch.cat([Gb, part[None]]))
                                continue
                            G_agg[b] = part if G_agg[b] is None else G_agg[b] + part
                        add_maps(b, Gb)
                    del G_rows
                if agg_sum:     # the aggregate map, last (index T_b) as without agg_sum
                    for b in range(B):
                        if G_agg[b] is not None:       # None: made in the single pass
                            add_maps(b, G_agg[b][None])
                    del G_agg
                # "batched", "loop", or e.g. "batched+loop" when the passes differed
                self.last_backward = "+".join(dict.fromkeys(how))
                del S
                if cap is not None:
                    cap.clear()
                fast = None
                for b, (i, s, r) in enumerate(rows):
                    result[(i, self._state_pos(rows, b))] = [
                        {name: np.concatenate(maps, axis=0) for name, (_, _, maps) in d.items()}
                        for d in cells[b]]
                del cells, leaves, hidden
            finally:
                if cap is not None:
                    cap.remove()
                    cap.clear()
                hook.remove()
                hook.clear()
                if hook in self._hooks:
                    self._hooks.remove(hook)
        return result

    def _tam(self, prepared, infos, rows, special):
        """Token Activation Maps (method.md 4, :mod:`diffcam.baselines.tam`) of every row: one
        forward without gradients and without hooks, then per row the logit lens at the image
        positions for the scored classes and the context tokens' classes only."""
        from ..baselines.tam import tam_group_scores
        from ..refine import rank_gaussian_filter

        ad = self.adapter
        embeds, lengths, attn_arg, extras_list = self._row_batch(prepared, rows)
        B = embeds.shape[0]
        extras = self._collate(extras_list, getattr(ad, "broadcast_extras", False))
        agg_only = getattr(self, "_aggregate_only", False)
        img_tok = int(getattr(ad, "image_token_id", -1))
        # an adapter whose forward does not give every position's own logits (DiffusionGemma:
        # the prompt rows come from an encoder that predicts nothing) names the lens apart
        lens = getattr(ad, "lens_logits", None) or ad.forward
        with torch.no_grad():
            if extras is not _PER_ROW:
                logits = lens(embeds, attn_arg, extras)
                z_rows = [logits[b] for b in range(B)]
            else:
                z_rows = [lens(embeds[b:b + 1, :lengths[b]], None, extras_list[b])[0]
                          for b in range(B)]
        del embeds
        result = {}
        for b, (i, s, r) in enumerate(rows):
            sample = prepared[i]
            ids, strings, words, tg = infos[i][:4]
            P = sample.prompt_length
            seq = [int(t) for t in torch.as_tensor(sample.input_ids).tolist()] + \
                [int(t) for t in r.tolist()]
            in_span = np.zeros(len(seq), dtype=bool)
            for lay in sample.layouts:
                in_span[lay.span_start:lay.span_end] = True
            ctx_pos = [q for q, t in enumerate(seq) if not in_span[q] and t >= 0
                       and t not in special and t != img_tok]
            ctx_ids = [seq[q] for q in ctx_pos]
            ctx_strings = list(ad.token_strings(ctx_ids)) if ctx_ids else []
            tokens, groups = [], []
            for t in tg:
                groups.append([])
                for j in t.tokens:
                    groups[-1].append(len(tokens))
                    tokens.append((P + j, ids[j], strings[j]))
            groups.append(list(range(len(tokens))))         # the aggregate, last
            if agg_only:
                groups = groups[-1:]
            img_pos = np.unique(np.concatenate([g.positions(lay.span_start).ravel()
                                                for lay in sample.layouts for g in lay.grids]))
            Z = z_rows[b]
            need = max(int(img_pos.max()), max(p for p, _, _ in tokens))
            if Z.shape[0] <= need:
                raise RuntimeError(f"the adapter returned {Z.shape[0]} logit rows; TAM reads "
                                   f"the logit lens up to position {need}")
            # only the columns TAM reads: the scored classes and the context tokens' classes
            cls = sorted({c for _, c, _ in tokens} | set(ctx_ids))
            col = {c: k for k, c in enumerate(cls)}
            Zs = Z[:, torch.as_tensor(cls, dtype=torch.long, device=Z.device)]
            img_t = torch.as_tensor(img_pos, dtype=torch.long, device=Z.device)
            if not bool(Zs[img_t].any()):
                raise RuntimeError(
                    f"TAM reads the logit lens at the image positions, but the adapter "
                    f"({getattr(ad, 'name', type(ad).__name__)}) returns all-zero logits there "
                    "(its forward scores the response only); give the adapter a "
                    "lens_logits(inputs_embeds, attention_mask, extras) method that returns "
                    "every position's own logits")
            scores, _ = tam_group_scores(
                Zs, img_t, ctx_pos,
                [col[c] for c in ctx_ids], ctx_strings,
                [(p, col[c], st) for p, c, st in tokens], groups)
            scores = scores.float().cpu().numpy()                          # (G, n_img)
            per_image = []
            for lay in sample.layouts:
                d = {}
                for g in lay.grids:
                    idx = np.searchsorted(img_pos, g.positions(lay.span_start))
                    m = np.ascontiguousarray(scores[:, idx], dtype=np.float32)   # (G, h, w)
                    if self.tam_kernel is not None:
                        m = np.asarray(rank_gaussian_filter(m, self.tam_kernel),
                                       dtype=np.float32)
                    d[g.name] = m
                per_image.append(d)
            result[(i, self._state_pos(rows, b))] = per_image
        self.last_backward = None
        return result

    @staticmethod
    def _state_pos(rows, b) -> int:
        i = rows[b][0]
        return sum(1 for bb in range(b) if rows[bb][0] == i)

    @staticmethod
    def _collate(extras_list, broadcast=False):
        """One extras dict for the batched forward, or _PER_ROW.  ``broadcast``: the adapter's
        forward accepts one sample's extras for a batch of rows (``Adapter.broadcast_extras``),
        so rows with equal extras (e.g. several states of one sample) share one forward."""
        if all(not e for e in extras_list):
            return {}
        if len(extras_list) == 1:
            return extras_list[0]
        if broadcast and all(_same_extras(e, extras_list[0]) for e in extras_list[1:]):
            return extras_list[0]
        return _PER_ROW

    @staticmethod
    def _score_matrix(logits, rows, infos, prepared, K, agg_only, score, d_id, shift,
                      gather=None, aggregate=True, keep=None):
        """Scores (B, K) of every row: per target the sum of its tokens' scores, the aggregate
        (sum of the target scores) in column T_b (column 0 with ``agg_only``; no aggregate
        column with ``aggregate=False``), zeros after.
        ``logits`` is the (B, L, V) tensor, or a list of per-row (L_b, V) tensors.
        ``keep`` (a dict): receives the per-token scores ``st`` (N,), the 0/1 matrix ``W``
        (B*K, N) with S = W @ st, and the tokens' (row, position) pairs ``toks``."""
        dev = logits[0].device
        B = len(rows)
        toks, W_idx, W_val = [], [], []       # token entries, matrix (row, k, entry) = weight
        y = []
        for b, (i, s, r) in enumerate(rows):
            ids, tg, n_main = infos[i][0], infos[i][3], infos[i][4]
            P = prepared[i].prompt_length
            entry = {}
            for t_k, t in enumerate(tg):
                for j in t.tokens:
                    if j not in entry:
                        entry[j] = len(toks)
                        toks.append((b, P + j - shift))
                        y.append(ids[j])
                    n = entry[j]
                    if not agg_only:
                        W_idx.append((b, t_k, n))
                    if aggregate and t_k < n_main:
                        W_idx.append((b, 0 if agg_only else len(tg), n))
        bi = torch.tensor([t[0] for t in toks], device=dev)
        pi = torch.tensor([t[1] for t in toks], device=dev)
        yy = torch.tensor(y, dtype=torch.long, device=dev)
        if gather is not None:
            z = gather(bi, pi).float()                                   # (N, V)
        elif torch.is_tensor(logits):
            z = logits[bi, pi].float()                                   # (N, V)
        else:
            z = torch.stack([logits[b][p] for b, p in toks]).float()
        if score == "vocab_sum":
            st = z.sum(-1)
        else:
            if score == "logprob":
                z = torch.log_softmax(z, -1)
            st = z.gather(-1, yy[:, None])[:, 0]
            if d_id is not None:
                st = st - z[:, d_id]
        W = np.zeros((B * K, len(toks)), dtype=np.float32)
        for b, k, n in W_idx:
            W[b * K + k, n] += 1.0
        if keep is not None:
            keep.update(st=st, W=W, toks=toks)
        return (torch.from_numpy(W).to(device=dev, dtype=st.dtype) @ st).reshape(B, K)

    def _head_module(self):
        """The LM head applied row-wise to the final hidden state, if the adapter names it
        (``head_module()`` / ``lm_head`` / ``_lm_head`` / the model's output embeddings)."""
        if not getattr(self, "_head_ok", True):
            return None
        ad = self.adapter
        fn = getattr(ad, "head_module", None)
        if callable(fn):
            return fn()
        for name in ("lm_head", "_lm_head"):
            m = getattr(ad, name, None)
            if isinstance(m, torch.nn.Module):
                return m
        get = getattr(ad.model, "get_output_embeddings", None)
        try:
            m = get() if callable(get) else None
        except Exception:
            m = None
        return m if isinstance(m, torch.nn.Module) else None

    def _batched_forward(self, hook, head, embeds, attn_arg, extras):
        """The grad-enabled forward.  With ``head``, the LM head's input is captured and the full
        logits are computed without a graph; the scores then apply the head to the scored rows
        only (returned ``gather``), so the backward never materialises (K, B, L, V) gradients.
        The head path is verified against the full logits (values) on every call."""
        cap = _HeadCapture(head) if head is not None else None
        with hook:
            if cap is None:
                return self.adapter.forward(embeds, attn_arg, extras), None
            with cap:
                logits = self.adapter.forward(embeds, attn_arg, extras)
        hin = cap.hidden
        cap.hidden = None
        if (cap.calls != 1 or hin is None or not hin.requires_grad or hin.dim() != 3
                or hin.shape[:2] != logits.shape[:2]):
            if logits.requires_grad:
                return logits, None
            raise _HeadMismatch()   # head fired but its result is not the logits: redo

        def gather(bi, pi):
            z = head(hin[bi, pi])
            ref = logits[bi, pi].detach()
            if z.shape != ref.shape:
                raise _HeadMismatch()
            tol = 1e-2 * float(ref.abs().max()) + 1e-3 if ref.numel() else 0.0
            if ref.numel() and float((z.detach().float() - ref.float()).abs().max()) > tol:
                raise _HeadMismatch()
            return z

        return logits, gather

    def _fast_capture(self, layer, dev, top_rows=None):
        """A :class:`fastvjp.BlockCapture` of the blocks above ``layer`` when the hand-written
        backward applies (see ``fast_backward``), else None.  With ``fast_check="once"`` the
        capture runs the checked re-implementation in place of the blocks for the kinds of call
        already checked on this layer (the last block keeping ``top_rows`` only)."""
        if (self.fast_backward is False or not self.batched_backward
                or (self.fast_backward == "auto" and dev.type != "cpu")):
            return None
        if layer not in self._fast_off:
            blocks = self.adapter.blocks()[layer + 1:]
            why = None if len(blocks) else "no block above the hook"
            for b in blocks:
                why = why or fastvjp.unsupported_reason(b)
            self._fast_off[layer] = why
        if self._fast_off[layer] is not None:
            return None
        blocks = self.adapter.blocks()[layer + 1:]
        trusted = None
        if self.fast_check == "once":
            trusted = self._fast_trusted.get(layer)
            if trusted is None or len(trusted) != len(blocks):
                trusted = self._fast_trusted[layer] = [dict() for _ in blocks]
        return fastvjp.BlockCapture(blocks, trusted=trusted, top_rows=top_rows)

    @staticmethod
    def _scored_rows(rows, infos, prepared, shift, L, dev):
        """The sequence positions whose logits are scored (as :meth:`_score_matrix` lists
        them: where a top-block gradient can be non-zero), sorted, when they are at most half
        of the ``L`` positions; else None (the top block then keeps every row).  They are used
        only where the head is known to work row by row (``_rows_local``)."""
        pos = set()
        for i, _, _ in rows:
            P = prepared[i].prompt_length
            for t in infos[i][3]:
                pos.update(P + j - shift for j in t.tokens)
        if not pos or len(pos) > L // 2:
            return None
        return torch.as_tensor(sorted(pos), dtype=torch.long, device=dev)

    def _top_grads(self, S, K, fast, top):
        """(K, B, L, D) gradients of the K score columns at the last block's output.

        Each scored token's score depends on its own row of ``top`` only when what follows the
        blocks (final norm, LM head) works row by row -- true of every transformers LM, and
        checked on the first call per layer against K vmapped backward vectors.  Then one
        ordinary backward of the summed token scores gives every token's row, and the K
        vectors are those rows added up per target (S = W @ st)."""
        layer = fast["layer"]
        ok = self._rows_local.get(layer)
        tok = fast["tok"]
        g = None
        if ok is not False and "st" in tok:
            if fast["g_tok"] is None:
                (fast["g_tok"],) = torch.autograd.grad(tok["st"].sum(), [top],
                                                       retain_graph=True)
            g_tok = fast["g_tok"]                                       # (B, L, D)
            B, L, D = g_tok.shape
            Kall = tok["W"].shape[0] // B
            k0 = fast["k0"]
            rows_b = np.array([b for b, _ in tok["toks"]], dtype=np.int64)
            rows_p = np.array([p for _, p in tok["toks"]], dtype=np.int64)
            Wk = tok["W"].reshape(B, Kall, -1)[:, k0:k0 + K]            # (B, K, N)
            bb, kk, nn = np.nonzero(Wk)
            keep = rows_b[nn] == bb
            bb, kk, nn = bb[keep], kk[keep], nn[keep]
            g = torch.zeros(K, B, L, D, dtype=g_tok.dtype, device=g_tok.device)
            if len(nn):
                dev = g_tok.device
                b_t = torch.as_tensor(bb, device=dev)
                p_t = torch.as_tensor(rows_p[nn], device=dev)
                k_t = torch.as_tensor(kk, device=dev)
                w_t = torch.as_tensor(Wk[bb, kk, nn], dtype=g_tok.dtype, device=dev)
                g.index_put_((k_t, b_t, p_t), g_tok[b_t, p_t] * w_t[:, None], accumulate=True)
            if ok:
                return g
        outputs = S.sum(0)
        if K == 1:
            (ref,) = torch.autograd.grad(outputs[0], [top], retain_graph=True)
            ref = ref[None]
        else:
            eye = torch.eye(K, dtype=outputs.dtype, device=outputs.device)
            (ref,) = torch.autograd.grad(outputs, [top], grad_outputs=eye, retain_graph=True,
                                         is_grads_batched=True)
        if g is not None:           # first call on this layer: is the head row-local?
            scale = float(ref.abs().max()) if ref.numel() else 0.0
            # two float32 backwards agree to rounding; half-precision ones to a few 1e-3
            tol = 1e-5 if ref.dtype in (torch.float32, torch.float64) else 1e-2
            same = bool(ref.numel() == 0 or
                        float((g - ref).abs().max()) <= tol * max(scale, 1e-30) + 1e-12)
            self._rows_local[layer] = same
        return ref

    def _fast_grads(self, S, K, fast, leaf):
        """Gradients of the K score columns of ``S`` at the hook's leaf positions, (K, B, n, D),
        through the hand-written backward of the captured blocks.  Raises FastMismatch when
        the captured forward does not fit it (the caller then uses autograd)."""
        cap = fast["cap"]
        cap.check()
        first, last = cap.records[0], cap.records[-1]
        top = last["y"]
        if not top.requires_grad:
            raise fastvjp.FastMismatch("the last block's output carries no graph")
        pos = fast["positions"]
        x0 = first["x"]
        if (x0.shape != fast["hidden"].shape
                or not torch.equal(x0.detach(), fast["hidden"].detach())):
            raise fastvjp.FastMismatch("the first block above the hook does not receive the "
                                       "hooked block's output")
        g_top = self._top_grads(S, K, fast, top)
        if fast["saved"] is None:
            rows = fast["scored"] if self._rows_local.get(fast["layer"]) else None
            fast["saved"] = fastvjp.prepare(cap, top_rows=rows)
        G = fastvjp.backward(cap, fast["saved"], g_top)             # (K, B, L, D)
        self.last_backward = "fast"
        return [G.index_select(2, pos).to(leaf.dtype)]

    def _backward(self, S, leaves, K, retain_graph: bool = False):
        outputs = S.sum(0)                                   # (K,): rows are independent
        err = None
        if self.batched_backward and K > 1:
            try:
                eye = torch.eye(K, dtype=outputs.dtype, device=outputs.device)
                # retain_graph=True even for the last chunk: a failed vmap falls back to the
                # loop below, which needs the graph
                g = torch.autograd.grad(outputs, leaves, grad_outputs=eye, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True)
                self.last_backward = "batched"
                return [self._check_grad(x, leaves[n]) for n, x in enumerate(g)]
            except Exception as e:       # a model that cannot be vmapped: loop, same result
                err = e
        per_k = []
        for k in range(K):
            g = torch.autograd.grad(outputs[k], leaves, retain_graph=retain_graph or k < K - 1,
                                    allow_unused=True)
            per_k.append([self._check_grad(x, leaves[n]) for n, x in enumerate(g)])
        self.last_backward = "loop" if err is None else f"loop ({type(err).__name__})"
        return [torch.stack([p[n] for p in per_k]) for n in range(len(leaves))]

    @staticmethod
    def _check_grad(g, leaf):
        if g is None:
            raise RuntimeError("gradients cannot flow: the scores do not depend on the hooked "
                               "block's output")
        return g


class _PerRow:
    pass


def _params_requiring_grad(model: torch.nn.Module) -> list:
    """The parameters of ``model`` (and its submodules) that require grad, each once: what
    ``[p for p in model.parameters() if p.requires_grad]`` gives, by a plain walk over the
    module tree (a third of the cost; it runs on every explain call)."""
    out, seen, stack = [], set(), [model]
    while stack:
        mod = stack.pop()
        if mod is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        for p in mod._parameters.values():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        stack.extend(mod._modules.values())
    return out


@contextlib.contextmanager
def _weights_frozen(model):
    """The maps need gradients at the hooked activations only.  A parameter that requires grad
    (a model loaded with ``from_pretrained`` and not frozen) would make autograd record the
    blocks *below* the hook and save the inputs of every linear layer above it for a weight
    gradient nobody asks for: switch ``requires_grad`` off for the pass, and back on after it
    (also when it raises)."""
    live = _params_requiring_grad(model) if isinstance(model, torch.nn.Module) else []
    try:
        for p in live:
            p.requires_grad_(False)
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


class _HeadMismatch(Exception):
    """The captured LM-head input does not reproduce the adapter's logits row-wise."""


class _HeadCapture:
    """Forward pre-hook on the LM head: keeps its input (with graph) and feeds the head a
    detached copy, so the full (B, L, V) logits carry no autograd graph."""

    def __init__(self, head):
        self.head = head
        self.hidden = None
        self.calls = 0
        self._handle = None

    def _pre(self, module, args):
        self.calls += 1
        if self.calls > 1 or not args or not torch.is_tensor(args[0]) or \
                not args[0].requires_grad:
            return None
        self.hidden = args[0]
        return (args[0].detach(),) + tuple(args[1:])

    def __enter__(self):
        self._handle = self.head.register_forward_pre_hook(self._pre)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None


_PER_ROW = _PerRow()


def _same_extras(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape
                    and (x is y or torch.equal(x, y))):
                return False
        elif x != y:
            return False
    return True


def _accepts_kw(fn) -> bool:
    try:
        import inspect
        sig = inspect.signature(fn)
        return "add_special_tokens" in sig.parameters or any(
            p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    except (TypeError, ValueError):
        return True


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
