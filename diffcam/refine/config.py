"""Settings of the Diffusion-CAM refinement pipeline (docs/method.md, section 2).

Every constant of the method is a named field of :class:`RefineConfig`.  Two presets exist:

* :meth:`RefineConfig.paper` -- the method as the paper describes it (the default);
* :meth:`RefineConfig.reference` -- the behaviour of the authors' released code, quirks included.

The kernels of every backend (native C++, CUDA, Numba, the NumPy reference) receive the
configuration as one flat float64 vector, :meth:`RefineConfig.to_params`; the position of each
field in that vector is :data:`PARAM_FIELDS` (mirrored by ``csrc/refine/params.hpp``).

Example
-------
>>> from diffcam.refine.config import RefineConfig
>>> cfg = RefineConfig.paper()
>>> cfg.k_max
11
>>> RefineConfig.reference().steps      # the released code's 1 / step_ratio: k is always 3
2
>>> cfg.replace(steps=64).steps
64
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["RefineConfig", "PARAM_FIELDS", "BRANCH_NAMES", "MAX_KERNEL_SIZE"]

#: Largest kernel size any backend supports (odd sizes 3..31).
MAX_KERNEL_SIZE = 31

#: DACG branch codes as returned by the kernels (``RefineInfo.branch``).
BRANCH_NAMES = ("high_var", "high_mean", "low_mean", "default")

#: Order of the fields in the flat parameter vector.  Append only: C++ (params.hpp), CUDA and
#: Numba index this vector by position.
PARAM_FIELDS = (
    # AKD (0..10)
    "akd",              # 0  1.0 = run Adaptive Kernel Denoising
    "k_base",           # 1
    "k_max",            # 2
    "steps",            # 3  S, number of denoising steps
    "step_div",         # 4  F_step = min(S / step_div, step_cap)
    "step_cap",         # 5
    "std_factor",       # 6  F_std = min(std_factor * sigma_M, std_cap)
    "std_cap",          # 7
    "size_div",         # 8  F_size = min(H / size_div, size_cap)
    "size_cap",         # 9
    "kernel_size",      # 10 0 = adaptive, else this fixed odd size
    # DACG (11..21)
    "dacg",             # 11 1.0 = apply the gating (0: compute branch/tau only, map unchanged)
    "var_threshold",    # 12 sigma > this -> high_var
    "high_mean",        # 13 mu > this -> high_mean
    "low_mean",         # 14 mu < this -> low_mean
    "pct_high_var",     # 15
    "pct_high_mean",    # 16
    "pct_low_mean",     # 17
    "pct_default",      # 18
    "tau_floor",        # 19
    "blur_sigma",       # 20 sigma of the 3x3 Gaussian blur
    "reserved21",       # 21
    # CBA (22..29)
    "cba",              # 22
    "bg_w_median",      # 23 weight of S1 (median of positive pixels)
    "bg_w_pct",         # 24 weight of S2 (percentile of all pixels)
    "bg_w_mean",        # 25 weight of S3 (mean of positive pixels)
    "bg_w_max",         # 26 weight of S4 (max)
    "bg_percentile",    # 27 which percentile S2 is
    "gamma",            # 28
    "tau_bg_floor",     # 29
    # SICD (30..41)
    "sicd",             # 30
    "w_rep",            # 31
    "w_out",            # 32
    "outlier_sigmas",   # 33 M_out = 1[M > mu + outlier_sigmas * sigma]
    "lambda_min",       # 34
    "lambda_max",       # 35
    "gate",             # 36 1.0 = apply SICD only to pathological maps
    "gate_std",         # 37 pathological if std > gate_std ...
    "gate_skew",        # 38 ... or skewness > gate_skew
    "range_guard",      # 39 >0: discard the result when max-min shrinks by more than this fraction
    # shared (40..)
    "norm_eps",         # 40 epsilon of the min-max normalisation
    "final_normalize",  # 41 1.0 = min-max normalise the SICD output
)

_INDEX = {name: i for i, name in enumerate(PARAM_FIELDS)}


def _odd(x: int) -> bool:
    return x % 2 == 1


@dataclass(frozen=True)
class RefineConfig:
    """All constants of the refinement pipeline (docs/method.md section 2).

    Fields are grouped by module; each module can be switched off (``akd=False``...) for
    ablations.  Build presets with :meth:`paper` / :meth:`reference` and change fields with
    :meth:`replace`.

    Example
    -------
    >>> cfg = RefineConfig.paper().replace(sicd=False)
    >>> cfg.sicd
    False
    """

    # --- Adaptive Kernel Denoising (2.1)
    akd: bool = True
    k_base: int = 3
    k_max: int = 11
    steps: int = 32
    step_div: float = 16.0
    step_cap: float = 2.0
    std_factor: float = 5.0
    std_cap: float = 2.0
    size_div: float = 512.0
    size_cap: float = 1.5
    kernel_size: Optional[int] = None
    noise: float = 0.0
    seed: int = 0
    # --- Distribution-Aware Confidence Gating (2.2)
    dacg: bool = True
    var_threshold: float = 0.22
    high_mean: float = 0.35
    low_mean: float = 0.25
    pct_high_var: float = 90.0
    pct_high_mean: float = 75.0
    pct_low_mean: float = 80.0
    pct_default: float = 85.0
    tau_floor: float = 1e-6
    blur_sigma: float = 0.3
    # --- Contextual Background Attenuation (2.3)
    cba: bool = True
    bg_w_median: float = 0.15
    bg_w_pct: float = 0.15
    bg_w_mean: float = 0.20
    bg_w_max: float = 0.015
    bg_percentile: float = 60.0
    gamma: float = 0.5
    tau_bg_floor: float = 1e-6
    # --- Single-Instance Causal Debiasing (2.4)
    sicd: bool = True
    w_rep: float = 8.0
    w_out: float = 0.05
    outlier_sigmas: float = 2.0
    rep_scale: float = 0.05
    lambda_min: float = 0.0
    lambda_max: float = 0.5
    gate: bool = False
    gate_std: float = 0.35
    gate_skew: float = 0.5
    range_guard: float = 0.0
    # --- shared
    norm_eps: float = 1e-8
    final_normalize: bool = False
    preset: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()
        # the config is immutable: build the kernels' parameter vector once
        object.__setattr__(self, "_params", self._build_params())

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls) -> "RefineConfig":
        """The method as the paper describes it.

        The SICD weights ``w_rep``/``w_out`` and the gate are not given by the paper; they
        were chosen on the validation split of the bundled benchmark by a grid search of 650
        points (``diffcam eval``, 2026-12-07: the shipped weights, block 0 hooked, SICD's
        interference maps made of the repeated function words and the ``<eos>`` padding,
        docs/attribution.md): w_rep = 8, w_out = 0.05, no gate (SICD on every map; the gate's
        thresholds stay fields for ``gate=True``).  The ten best points of the grid lie
        within 0.007 F3 points of each other (w_rep 4 to 512: once lambda* < lambda_max only
        the ratio of w_rep and w_out matters), and all of them beat the earlier constants
        (w_rep = 1, w_out = 0, gated at std > 0.35 or skewness > 0.5) by +0.41 [+0.24,
        +0.58] F3 points on val.  On the test split the preset beats the raw map by +1.08
        [+0.88, +1.29] F3 points (docs/benchmark.md).

        >>> cfg = RefineConfig.paper()
        >>> (cfg.w_rep, cfg.w_out, cfg.gate, cfg.gate_std, cfg.gate_skew)
        (8.0, 0.05, False, 0.35, 0.5)

        >>> RefineConfig.paper().preset
        'paper'
        """
        return cls(preset="paper")

    @classmethod
    def reference(cls, seed: int = 0) -> "RefineConfig":
        """The released code's behaviour: seeded noise, k always 3, DACG an identity, SICD with
        the uniform constant, no lower bound on lambda, no gate and the 10 % range guard.

        >>> cfg = RefineConfig.reference()
        >>> (cfg.steps, cfg.dacg, cfg.gate, cfg.range_guard)
        (2, False, False, 0.1)
        """
        return cls(
            steps=2,
            noise=1e-6,
            seed=seed,
            dacg=False,
            w_rep=1.0,
            w_out=0.02,
            rep_scale=0.05,
            lambda_min=-math.inf,
            lambda_max=0.5,
            gate=False,
            range_guard=0.10,
            preset="reference",
        )

    def replace(self, **changes) -> "RefineConfig":
        """A copy with some fields changed (validated).

        >>> RefineConfig.paper().replace(k_max=7).k_max
        7
        """
        if "preset" not in changes:
            changes["preset"] = "custom"
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""

        def bad(name: str, why: str):
            raise ValueError(f"RefineConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("k_base", "k_max", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "expected an int")
        if self.k_base < 1:
            bad("k_base", "must be >= 1")
        if not (3 <= self.k_max <= MAX_KERNEL_SIZE) or not _odd(self.k_max):
            bad("k_max", f"must be odd and in [3, {MAX_KERNEL_SIZE}]")
        if self.steps < 1:
            bad("steps", "must be >= 1")
        if self.kernel_size is not None:
            k = self.kernel_size
            if isinstance(k, bool) or not isinstance(k, int):
                bad("kernel_size", "expected an odd int or None")
            if not _odd(k) or not (3 <= k <= MAX_KERNEL_SIZE):
                bad("kernel_size", f"must be odd and in [3, {MAX_KERNEL_SIZE}]")
        for name in ("step_div", "size_div"):
            if not (getattr(self, name) > 0):
                bad(name, "must be > 0")
        for name in ("step_cap", "std_factor", "std_cap", "size_cap", "noise", "tau_floor",
                     "tau_bg_floor", "blur_sigma", "w_rep", "w_out", "rep_scale", "norm_eps",
                     "gate_std", "range_guard"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(name, "must be a finite number >= 0")
        if self.blur_sigma <= 0:
            bad("blur_sigma", "must be > 0")
        if self.norm_eps <= 0:
            bad("norm_eps", "must be > 0")
        for name in ("pct_high_var", "pct_high_mean", "pct_low_mean", "pct_default",
                     "bg_percentile"):
            v = getattr(self, name)
            if not (0.0 <= v <= 100.0):
                bad(name, "a percentile must be in [0, 100]")
        if not (0.0 <= self.gamma <= 1.0):
            bad("gamma", "must be in [0, 1]")
        if not (self.range_guard < 1.0):
            bad("range_guard", "must be < 1")
        if math.isnan(self.lambda_min) or math.isnan(self.lambda_max):
            bad("lambda_min", "lambda bounds must not be NaN")
        if not (self.lambda_min <= self.lambda_max) or math.isinf(self.lambda_max):
            bad("lambda_max", "must be finite and >= lambda_min")
        for name in ("var_threshold", "high_mean", "low_mean", "outlier_sigmas", "gate_skew",
                     "bg_w_median", "bg_w_pct", "bg_w_mean", "bg_w_max"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                bad(name, "must be a finite number")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            bad("seed", "must be an int >= 0")

    # -------------------------------------------------------------- kernel side
    def to_params(self):
        """The flat float64 parameter vector every backend's kernels take (read-only, cached).

        >>> p = RefineConfig.paper().to_params()
        >>> float(p[PARAM_FIELDS.index("k_max")])
        11.0
        """
        return self._params

    def _build_params(self):
        import numpy as np

        p = np.zeros(len(PARAM_FIELDS), dtype=np.float64)
        for name, i in _INDEX.items():
            if name.startswith("reserved"):
                continue
            v = getattr(self, name)
            if name == "kernel_size":
                v = 0 if v is None else v
            p[i] = float(v)
        p.flags.writeable = False
        return p

    def to_dict(self) -> dict:
        """Plain dict of every field (JSON-friendly; infinities as strings).

        >>> RefineConfig.reference().to_dict()["lambda_min"]
        '-inf'
        """
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and math.isinf(v):
                v = "inf" if v > 0 else "-inf"
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RefineConfig":
        """Inverse of :meth:`to_dict`.

        >>> cfg = RefineConfig.reference()
        >>> RefineConfig.from_dict(cfg.to_dict()) == cfg
        True
        """
        kw = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in names:
                raise ValueError(f"RefineConfig has no field {k!r}")
            if v in ("inf", "-inf"):
                v = float(v)
            kw[k] = v
        return cls(**kw)
