"""The typed result of :meth:`diffcam.Explainer.explain`.

Structure of :attr:`Explanation.maps`
-------------------------------------
``maps[i]`` is a dict for image ``i`` of the sample (in prompt order), mapping each grid name of
that image's :class:`~diffcam.attribution.layout.ImageLayout` (e.g. ``"base"`` and ``"hires"``
for LLaVA anyres, ``"merged"`` for Qwen2-VL-style packing) to a float32 array of shape

    (len(targets) + 1, len(states), rows, cols)

axis 0: the targets in :attr:`targets` order, the last entry the aggregate map (gradient of the
sum of all target scores; with ``aggregate_only=True`` axis 0 holds the aggregate alone); axis 1: :attr:`states` in the order requested (``"final"`` or a step
number); then the grid's cells (newline columns never included).  Values are raw Grad-CAM maps,
min-max normalised to [0, 1] per map.

>>> import numpy as np
>>> from diffcam.attribution.layout import single_grid_layout
>>> from diffcam.attribution.targets import Target
>>> e = Explanation(answer="a dog", token_ids=[1, 2], tokens=["a", " dog"],
...                 words=[], targets=[Target("dog", (1,))], states=["final"],
...                 maps=[{"base": np.zeros((2, 1, 3, 3), np.float32)}],
...                 layouts=[single_grid_layout(4, 3, 3)])
>>> e.map("dog").shape, e.map(None).shape
((3, 3), (3, 3))
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np

from .layout import ImageLayout
from .targets import AGGREGATE, Target, Word

__all__ = ["Explanation", "SCHEMA"]

#: manifest.json schema identifier (bumped on incompatible changes)
SCHEMA = "diffcam.explanation/1"


def _png_name(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in s.strip())
    return keep[:40] or "tok"


@dataclass
class Explanation:
    """Diffusion-CAM maps of one (images, prompt) sample and everything needed to reproduce them.

    answer     the explained answer text (generated, or the given ``answer=``)
    token_ids  response token ids; ``tokens`` their strings
    words      :class:`~diffcam.attribution.targets.Word` s of the answer
    targets    :class:`~diffcam.attribution.targets.Target` s (name + response token indices);
               the maps have one more entry, the aggregate, last
    states     the explained states, ``"final"`` or step numbers
    maps       per image a dict grid name -> float32 (targets + 1, states, rows, cols)
    layouts    per image its ImageLayout (positions in the expanded sequence)
    images     per image the RGB uint8 array used (for overlays)
    prompt     the prompt text
    masked     (steps + 1, G) bool trajectory (None when the answer was given)
    settings   every setting of the call (layer, score, contrast, method, targets, states,
               generation config, ...); ``versions``: diffcam, torch, transformers, numpy;
               ``adapter``: the adapter's info()
    interference       the Targets whose maps SICD subtracts (method.md 2.4: the repeated
               function words and the padding, ``Explainer.explain(interference="auto")``)
    interference_maps  per image a dict grid name -> float32 (len(interference), states,
               rows, cols): their raw maps, like :attr:`maps`; empty when none were computed
    """

    answer: str
    token_ids: list
    tokens: list
    words: list
    targets: list
    states: list
    maps: list
    layouts: list
    images: list = field(default_factory=list)
    prompt: str = ""
    masked: Optional[np.ndarray] = None
    settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    interference: list = field(default_factory=list)
    interference_maps: list = field(default_factory=list)

    # ------------------------------------------------------------------ access
    @property
    def target_names(self) -> list:
        """Names along the maps' target axis."""
        if self.aggregate_only:
            return [AGGREGATE]
        return [t.name for t in self.targets] + [AGGREGATE]

    @property
    def aggregate_only(self) -> bool:
        """True when only the aggregate map was computed (target axis of length 1)."""
        return bool(self.settings.get("aggregate_only")) or (
            bool(self.maps) and bool(self.maps[0]) and
            next(iter(self.maps[0].values())).shape[0] == 1 and len(self.targets) > 0)

    def _target_index(self, word_or_index) -> int:
        if self.aggregate_only:
            if word_or_index is None or (isinstance(word_or_index, str) and word_or_index.strip()
                                         .lower() in ("aggregate", AGGREGATE)) \
                    or word_or_index in (0, -1):
                return 0
            raise KeyError(f"only the aggregate map was computed (aggregate_only=True); "
                           f"{word_or_index!r} has no map of its own")
        n = len(self.targets) + 1
        if word_or_index is None:
            return n - 1
        if isinstance(word_or_index, str):
            key = word_or_index.strip().lower()
            if key in ("aggregate", AGGREGATE):
                return n - 1
            for k, t in enumerate(self.targets):
                if t.name.strip().lower() == key:
                    return k
            raise KeyError(f"no target {word_or_index!r}; targets are "
                           f"{[t.name for t in self.targets]} (+ 'aggregate')")
        k = int(word_or_index)
        if not -n <= k < n:
            raise IndexError(f"target index {k} out of range: {n - 1} targets + the aggregate")
        return k % n

    def _state_index(self, state) -> int:
        if state is None:           # "final" when explained, else the first state
            return self.states.index("final") if "final" in self.states else 0
        for k, s in enumerate(self.states):
            if s == state:
                return k
        raise KeyError(f"state {state!r} was not explained; states are {self.states}")

    def default_grid(self, image: int = 0) -> str:
        """The grid with the most token cells (the high-resolution grid of anyres layouts; read
        from the layout, so it is the same after :meth:`refined` brought every grid to the
        image's size)."""
        names = list(self.maps[image])
        cells = {}
        if image < len(self.layouts):
            cells = {g.name: g.rows * g.cols for g in self.layouts[image].grids}
        return max(names, key=lambda n: cells.get(n, self.maps[image][n].shape[-2] *
                                                      self.maps[image][n].shape[-1]))

    def map(self, word_or_index=None, image: int = 0, grid: Optional[str] = None,
            state=None, refined: bool = False, config=None,
            interference="auto", size="auto") -> np.ndarray:
        """One (rows, cols) float32 map (with ``refined=True``: at the ``size`` it was refined at).

        word_or_index  a target name, "aggregate" / None (the aggregate), or an index along the
                       targets axis (``len(targets)`` or -1 is the aggregate)
        grid           grid name; default :meth:`default_grid`
        state          "final" or a step number; default "final" if explained, else the first
        refined        run ``diffcam.refine`` (``config``, default the paper preset) on it, with
                       SICD's ``interference`` maps chosen as in :meth:`refined` (equal to the
                       same map of ``refined(config, interference, size)``)
        size           where a refined map is refined: see :meth:`refined` (ignored for raw
                       maps, which stay at the grid's resolution)
        """
        if not 0 <= image < len(self.maps):
            raise IndexError(f"image={image} but this explanation has {len(self.maps)} image(s)")
        g = grid or self.default_grid(image)
        if g not in self.maps[image]:
            raise KeyError(f"no grid {g!r}; image {image} has {list(self.maps[image])}")
        k, s = self._target_index(word_or_index), self._state_index(state)
        arr = self.maps[image][g]
        m = arr[k, s]
        if refined:
            from .. import refine as _refine

            cfg = self._config(config)
            stack, _, _ = self._interference_stack(interference, cfg, image, g)
            from ..refine.resize import resize_stack

            hw = self._refine_size(image, size)
            m = resize_stack(m, hw)
            inter = resize_stack(stack[:, s], hw) if stack is not None else None
            m = _refine(np.ascontiguousarray(m), config=cfg, tokens=list(self.token_ids),
                        interference=inter)
        return np.asarray(m, dtype=np.float32)

    def _refine_size(self, image: int, size):
        """(height, width) at which image ``image``'s maps are refined, or None for the grid."""
        from ..refine.resize import _check_size

        if isinstance(size, str):
            if size == "grid":
                return None
            if size not in ("auto", "image"):
                raise ValueError(f"size={size!r}: expected 'auto', 'image', 'grid' or a "
                                 f"(height, width) pair")
            img = self.images[image] if image < len(self.images) else None
            if img is not None and np.ndim(img) >= 2:
                return tuple(int(x) for x in np.shape(img)[:2])
            if size == "image":
                raise ValueError(f"size='image' but image {image}'s pixels are not part of this "
                                 f"explanation; pass size=(height, width) or size='grid'")
            return None
        return _check_size(size)

    def interference_targets(self) -> list:
        """Indices along the target axis of the per-token maps of the answer's repeated
        function words (SICD's M_rep, method.md 2.4): targets whose tokens all belong to a
        function word ("a", "the", "of", ",", ...) that occurs more than once in the answer.
        Empty when no such target was explained -- ``targets="nouns"`` never has them;
        ``targets="all"`` has one per token."""
        from .targets import repeated_function_words

        if self.aggregate_only:
            return []
        rep = {j for w in repeated_function_words(self.words) for j in w.tokens}
        return [k for k, t in enumerate(self.targets)
                if t.tokens and all(j in rep for j in t.tokens)]

    def _interference_stack(self, interference, cfg, image: int, grid: str):
        """(stack (X, states, rows, cols) or None, target indices used, interference names
        used) of SICD's maps for image ``image``'s grid ``grid`` (see :meth:`refined`)."""
        if isinstance(interference, str) and interference == "auto" \
                and cfg.preset != "reference" and self.interference_maps:
            d = self.interference_maps[image] if image < len(self.interference_maps) else {}
            if grid in d and len(d[grid]):
                return d[grid], [], [t.name for t in self.interference]
        idx = self._interference_index(interference, cfg)
        if not idx:
            return None, [], []
        return self.maps[image][grid][idx], idx, []

    def _interference_index(self, interference, cfg) -> list:
        if interference is None:
            return []
        if isinstance(interference, str):
            if interference != "auto":
                raise ValueError(f"interference={interference!r}: expected 'auto', None or a "
                                 f"list of target names / indices")
            # the reference preset reproduces the released code: uniform constant, no maps
            return [] if cfg.preset == "reference" else self.interference_targets()
        idx = []
        for x in interference:
            k = self._target_index(x)
            if k == len(self.target_names) - 1:
                raise ValueError(f"interference: {x!r} is the aggregate map, not a per-token map")
            idx.append(k)
        return idx

    def _refine_array(self, arr: np.ndarray, cfg, inter) -> np.ndarray:
        """diffcam.refine over every map of one grid array (targets + 1, states, rows, cols);
        with ``inter`` (X, states, rows, cols) each map of state s gets inter[:, s] as its
        interference stack."""
        from .. import refine as _refine

        tokens = list(self.token_ids)
        if inter is None:
            flat = np.ascontiguousarray(arr.reshape(-1, *arr.shape[-2:]), dtype=np.float32)
            return np.asarray(_refine(flat, config=cfg, tokens=tokens),
                              dtype=np.float32).reshape(arr.shape)
        out = np.empty(arr.shape, dtype=np.float32)
        for s in range(arr.shape[1]):
            maps = np.ascontiguousarray(arr[:, s], dtype=np.float32)
            stack = np.ascontiguousarray(inter[:, s], dtype=np.float32)
            out[:, s] = _refine(maps, config=cfg, tokens=tokens,
                                interference=[stack] * len(maps))
        return out

    @staticmethod
    def _config(config):
        from ..refine import RefineConfig

        if config is None or isinstance(config, str):
            return RefineConfig.reference() if config == "reference" else RefineConfig.paper()
        return config

    def refined(self, config=None, interference="auto", size="auto") -> "Explanation":
        """A new Explanation whose maps are ``diffcam.refine(...)`` of these (every target, state
        and grid; one batched call per grid and, with interference maps, per state).

        config        a RefineConfig, "paper" (default) or "reference"
        interference  SICD's per-token maps (method.md 2.4): "auto" (default) uses
                      :attr:`interference_maps` (the repeated function words and the padding,
                      computed by ``Explainer.explain``), else the explained targets that are
                      repeated function words (:meth:`interference_targets`), except under
                      the ``reference`` preset, which reproduces the released code's uniform
                      constant; None never uses them; a list of target names or indices picks
                      targets by hand.  Without maps SICD falls back to the uniform constant
                      computed from the answer's token ids.
        size          the resolution the maps are refined at: "auto" (default) the image's
                      (height, width) when its pixels are in :attr:`images`, else the grid's;
                      "image" the image's (an error without it); "grid" the token grid's
                      own; or an explicit (height, width).  Grid maps are upsampled
                      bilinearly (:func:`diffcam.resize`) first.  The modules are defined on
                      image-resolution maps (AKD's size factor reads the map's height); on a
                      coarse token grid a 3 x 3 filter blurs a map over whole objects
                      (docs/benchmark.md measures both).

        ``settings['refine']`` records the config, ``settings['refine_interference']`` the
        target indices used, ``settings['refine_interference_maps']`` the names of the
        :attr:`interference` maps used, ``settings['refine_size']`` per image the (height,
        width) refined at (None: the grids' own).

        >>> import numpy as np
        >>> from diffcam.attribution.layout import single_grid_layout
        >>> from diffcam.attribution.targets import Target, Word
        >>> ws = [Word("a", (0,)), Word("dog", (1,)), Word("and", (2,)), Word("a", (3,)),
        ...       Word("cat", (4,))]
        >>> ts = [Target(w.text, w.tokens) for w in ws]
        >>> maps = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
        >>> e = Explanation("a dog and a cat", [5, 6, 7, 5, 8], ["a", "dog", "and", "a", "cat"],
        ...                 ws, ts, ["final"], [{"base": maps}], [single_grid_layout(1, 8, 8)])
        >>> e.interference_targets()
        [0, 3]
        >>> r = e.refined()
        >>> r.settings["refine_interference"], r.maps[0]["base"].shape
        ([0, 3], (6, 1, 8, 8))
        """
        from ..refine.resize import resize_stack

        cfg = self._config(config)
        sizes = [self._refine_size(i, size) for i in range(len(self.maps))]
        new_maps, rep_idx, names = [], [], []
        for i, (d, hw) in enumerate(zip(self.maps, sizes)):
            out = {}
            for name, arr in d.items():
                stack, rep_idx, names = self._interference_stack(interference, cfg, i, name)
                out[name] = self._refine_array(
                    resize_stack(arr, hw), cfg,
                    None if stack is None else resize_stack(stack, hw))
            new_maps.append(out)
        settings = dict(self.settings)
        settings["refine"] = cfg.to_dict()
        settings["refine_interference"] = list(rep_idx)
        settings["refine_interference_maps"] = list(names)
        settings["refine_size"] = [list(hw) if hw else None for hw in sizes]
        return replace(self, maps=new_maps, settings=settings)

    def score(self, masks, config=None) -> dict:
        """Score these maps against ground truth, as ``diffcam run`` scores a sample.

        masks   {name: boolean (H, W) mask} of the first image (any resolution: the maps are
                resized to the mask's; a plural or singular word names the same mask)
        config  the refinement of the "refined" scores: a RefineConfig, "paper" (default) or
                "reference"

        Every target whose word names a mask (:func:`diffcam.metrics.scoring.match_mask`) gets the
        paper's Obj-IoU, contrast, concentration and F3 (:func:`diffcam.metrics.localization`)
        on its raw map (min-max normalised) and on its refined map (at the image's
        resolution), first image, default grid, first state; every function-word target
        ("a", "the", "of"...) gets the TAM protocol's Func-IoU (:mod:`diffcam.metrics.tam`).
        Returns ``{"scores": {word: {"mask", "target", "grid", "raw": {...}, "refined":
        {...}}}, "tam": {"threshold": {"raw", "refined"}, "function_words": [{"word",
        "target", "raw", "refined"}]}}`` (``{}`` for either when nothing applies).

        >>> import numpy as np
        >>> from diffcam.attribution.layout import single_grid_layout
        >>> from diffcam.attribution.targets import Target, Word
        >>> ws = [Word("a", (0,)), Word("dog", (1,))]
        >>> maps = np.zeros((3, 1, 8, 8), np.float32)
        >>> maps[1, 0, :4, :4] = 1; maps[0, 0, 7, 7] = 1; maps[2] = maps[1]
        >>> e = Explanation("a dog", [5, 6], ["a", "dog"], ws, [Target(w.text, w.tokens)
        ...                 for w in ws], ["final"], [{"base": maps}],
        ...                 [single_grid_layout(1, 8, 8)])
        >>> mask = np.zeros((8, 8), bool); mask[:4, :4] = True
        >>> s = e.score({"dogs": mask})
        >>> s["scores"]["dog"]["raw"]["obj_iou"], s["tam"]["function_words"][0]["word"]
        (1.0, 'a')
        """
        from ..metrics.scoring import score_explanation

        if not isinstance(masks, dict) or not masks:
            raise TypeError(f"masks must be a non-empty dict name -> (H, W) mask, got "
                            f"{type(masks).__name__}" + (" (empty)" if masks == {} else ""))
        checked = {}
        for k, m in masks.items():
            if not isinstance(k, str) or not k.strip():
                raise ValueError(f"masks: every name must be a non-empty str, got {k!r}")
            a = np.asarray(m)
            if a.ndim != 2 or 0 in a.shape:
                raise ValueError(f"masks[{k!r}] must be a non-empty (H, W) mask, got shape "
                                 f"{a.shape}")
            if a.dtype.kind not in "biuf":
                raise TypeError(f"masks[{k!r}] must be boolean or numeric, got {a.dtype}")
            checked[k] = a != 0
        if self.aggregate_only:
            raise ValueError("only the aggregate map was computed (aggregate_only=True): no "
                             "word has a map to score")
        scores, tam = score_explanation(self, checked, self._config(config))
        return {"scores": scores, "tam": tam}

    def overlay(self, word_or_index=None, image: int = 0, grid: Optional[str] = None,
                state=None, refined: bool = False, alpha: float = 0.5, config=None):
        """A PIL image: the map colourised and blended over the input image."""
        try:
            from PIL import Image
        except ImportError as e:      # pragma: no cover
            raise ImportError("Explanation.overlay needs Pillow: pip install Pillow (or "
                              "pip install diffcam[viz]); diffcam.viz.png.overlay returns "
                              "a NumPy array without it") from e
        return Image.fromarray(self._overlay_array(word_or_index, image, grid, state, refined,
                                                   alpha, config))

    def _overlay_array(self, word_or_index, image, grid, state, refined, alpha, config=None):
        from ..viz.png import overlay as _overlay
        m = self.map(word_or_index, image=image, grid=grid, state=state, refined=refined,
                     config=config)
        img = self.images[image] if image < len(self.images) else None
        return _overlay(img, m, alpha=alpha)

    # ------------------------------------------------------------------ persistence
    def _manifest(self) -> dict:
        return {
            "schema": SCHEMA,
            "answer": self.answer,
            "prompt": self.prompt,
            "token_ids": [int(t) for t in self.token_ids],
            "tokens": list(self.tokens),
            "words": [{"text": w.text, "tokens": list(w.tokens)} for w in self.words],
            "targets": [t.to_dict() for t in self.targets],
            "states": list(self.states),
            "maps": [{name: list(arr.shape) for name, arr in d.items()} for d in self.maps],
            "maps_axes": ["target (last = aggregate)", "state", "row", "col"],
            "layouts": [lay.to_dict() for lay in self.layouts],
            "settings": self.settings,
            "versions": self.versions,
            "adapter": self.adapter,
            "interference": [t.to_dict() for t in self.interference],
            "interference_maps": [{name: list(arr.shape) for name, arr in d.items()}
                                  for d in self.interference_maps],
        }

    def save(self, directory, overwrite: bool = False, overlays: bool = True) -> str:
        """Write ``maps.npz`` (maps, images, trajectory), ``manifest.json`` and one overlay PNG per
        target (first state, default grid of each image) into ``directory``, atomically: all is
        written to a temporary directory next to it and then renamed.  An existing directory is
        refused unless ``overwrite=True``.  Returns the directory path."""
        from ..viz.png import write_png

        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(directory) + ".tmp")
        try:
            arrays = {}
            for i, d in enumerate(self.maps):
                for name, arr in d.items():
                    arrays[f"map__{i}__{name}"] = np.asarray(arr, dtype=np.float32)
            for i, d in enumerate(self.interference_maps):
                for name, arr in d.items():
                    arrays[f"interference__{i}__{name}"] = np.asarray(arr, dtype=np.float32)
            for i, img in enumerate(self.images):
                arrays[f"image__{i}"] = np.asarray(img, dtype=np.uint8)
            if self.masked is not None:
                arrays["masked"] = np.asarray(self.masked, dtype=bool)
            np.savez_compressed(os.path.join(tmp, "maps.npz"), **arrays)
            manifest = self._manifest()
            pngs = []
            if overlays and self.states:
                for i in range(len(self.maps)):
                    g = self.default_grid(i)
                    for k, name in enumerate(self.target_names):
                        fn = f"overlay_image{i}_{g}_{k:02d}_{_png_name(name)}.png"
                        write_png(os.path.join(tmp, fn),
                                  self._overlay_array(k, i, g, self.states[0], False, 0.5))
                        pngs.append(fn)
            manifest["overlays"] = pngs
            with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1, default=_json_default)
            if os.path.exists(directory):
                old = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(directory)
                                       + ".old")
                os.rename(directory, os.path.join(old, "x"))
                os.rename(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory) -> "Explanation":
        """Read an Explanation written by :meth:`save`."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "manifest.json")
        try:
            with open(path, encoding="utf-8") as f:
                man = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} holds no manifest.json: not a saved "
                                    "Explanation") from None
        if man.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {man.get('schema')!r}, this diffcam reads {SCHEMA!r}")
        with np.load(os.path.join(directory, "maps.npz")) as z:
            maps = [{name: z[f"map__{i}__{name}"] for name in d} for i, d in
                    enumerate(man["maps"])]
            images = []
            i = 0
            while f"image__{i}" in z.files:
                images.append(z[f"image__{i}"])
                i += 1
            masked = z["masked"] if "masked" in z.files else None
            inter_maps = [{name: z[f"interference__{i}__{name}"] for name in d} for i, d in
                          enumerate(man.get("interference_maps", []))]
        return cls(answer=man["answer"], token_ids=man["token_ids"], tokens=man["tokens"],
                   words=[Word(w["text"], tuple(w["tokens"])) for w in man["words"]],
                   targets=[Target(t["name"], tuple(t["tokens"])) for t in man["targets"]],
                   states=man["states"], maps=maps,
                   layouts=[ImageLayout.from_dict(d) for d in man["layouts"]], images=images,
                   prompt=man.get("prompt", ""), masked=masked, settings=man["settings"],
                   versions=man["versions"], adapter=man["adapter"],
                   interference=[Target(t["name"], tuple(t["tokens"]))
                                 for t in man.get("interference", [])],
                   interference_maps=inter_maps)

    def __repr__(self) -> str:
        grids = [{k: tuple(v.shape) for k, v in d.items()} for d in self.maps]
        return (f"Explanation(answer={self.answer!r}, targets={[t.name for t in self.targets]}, "
                f"states={self.states}, maps={grids})")


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)
