"""Plumbing shared by the public refinement functions: config, backend, SICD inputs, noise."""

from __future__ import annotations

import numpy as np

from .. import _backend
from ._arrays import Batch, host_array
from .config import RefineConfig


_PAPER = RefineConfig.paper()


def config_or_default(config) -> RefineConfig:
    if config is None:
        return _PAPER
    if isinstance(config, str):
        presets = {"paper": RefineConfig.paper, "reference": RefineConfig.reference}
        if config not in presets:
            raise ValueError(f"config={config!r}: expected a RefineConfig or one of 'paper', "
                             f"'reference'")
        return presets[config]()
    if not isinstance(config, RefineConfig):
        raise TypeError(f"config must be a RefineConfig (or 'paper' / 'reference'), got "
                        f"{type(config).__name__}")
    return config


def check_threads(threads) -> int:
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads={threads!r}: expected None or an int >= 0 (0 = all cores)")
    return int(threads)


def backend_for(batch: Batch, backend):
    return _backend.get_backend(backend, on_gpu=batch.on_gpu)


def call(mod, fname: str, *args, threads: int = 0):
    """Call a kernel; host backends take ``threads``, the CUDA glue does not."""
    fn = getattr(mod, fname)
    if getattr(mod, "__name__", "") == "diffcam.refine._cuda":
        return fn(*args)
    return fn(*args, threads=threads)


def add_reference_noise(batch: Batch, cfg: RefineConfig) -> Batch:
    """The released code's N(0, (noise * max M)^2) jitter, from a seeded generator.

    The noise is drawn on the host with NumPy for every backend, so all backends see the same
    jittered maps (a GPU batch gets it copied to its device).
    """
    if cfg.noise <= 0:
        return batch
    rng = np.random.default_rng(cfg.seed)
    noise = rng.standard_normal(tuple(batch.data.shape), dtype=np.float32)
    if batch.on_gpu:
        if batch.kind == "torch":
            import torch

            noise_dev = torch.from_numpy(noise).to(batch.data.device)
            scale = batch.data.reshape(batch.n, -1).max(dim=1).values.reshape(-1, 1, 1)
        else:
            import cupy

            noise_dev = cupy.asarray(noise)
            scale = batch.data.reshape(batch.n, -1).max(axis=1).reshape(-1, 1, 1)
        data = batch.data + noise_dev * (scale * np.float32(cfg.noise))
    else:
        scale = batch.data.reshape(batch.n, -1).max(axis=1).reshape(-1, 1, 1)
        data = np.ascontiguousarray(batch.data + noise * (scale * np.float32(cfg.noise)),
                                    dtype=np.float32)
    return Batch(data, batch.single, batch.kind, batch.on_gpu, batch.dtype, batch.device)


def repeated_token_ratio(tokens) -> float:
    """r of the released code: distinct token ids occurring more than once / number of tokens.

    >>> repeated_token_ratio([5, 7, 5, 9, 0, 0])
    0.3333333333333333
    """
    ids = host_array(tokens, "tokens", np.int64, ndim=1)
    if ids.size == 0:
        raise ValueError("tokens is empty; pass the answer's token ids (or None)")
    _, counts = np.unique(ids, return_counts=True)
    return float(np.count_nonzero(counts > 1)) / float(ids.size)


def _per_map_tokens(tokens, n: int):
    """None, or a list of n token sequences (one sequence is shared by every map)."""
    if tokens is None:
        return None
    if isinstance(tokens, (list, tuple)) and tokens and not np.isscalar(tokens[0]):
        if len(tokens) != n:
            raise ValueError(f"tokens has {len(tokens)} sequences for {n} maps; pass one sequence "
                             f"per map, or a single sequence shared by all maps")
        return list(tokens)
    arr = host_array(tokens, "tokens", np.int64)
    if arr.ndim == 2:
        if arr.shape[0] != n:
            raise ValueError(f"tokens has {arr.shape[0]} rows for {n} maps")
        return list(arr)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a sequence of token ids, got shape {arr.shape}")
    return [arr] * n


def _normalized_mean(stack, xp_torch: bool):
    flat = stack.reshape(stack.shape[0], -1)
    if xp_torch:
        lo = flat.min(dim=1, keepdim=True).values
        hi = flat.max(dim=1, keepdim=True).values
        return ((flat - lo) / (hi - lo + 1e-8)).mean(dim=0).reshape(stack.shape[1:])
    lo = flat.min(axis=1, keepdims=True)
    hi = flat.max(axis=1, keepdims=True)
    return ((flat - lo) / (hi - lo + 1e-8)).mean(axis=0).reshape(stack.shape[1:])


def sicd_inputs(batch: Batch, cfg: RefineConfig, tokens, interference):
    """(rep, rep_const) for the kernels: M_rep per map, or its uniform fallback constant."""
    n = batch.n
    if tokens is None and interference is None:         # the common case, kept cheap
        return None, np.zeros(n, dtype=np.float64)
    h, w = int(batch.data.shape[1]), int(batch.data.shape[2])
    seqs = _per_map_tokens(tokens, n)
    rep_const = np.zeros(n, dtype=np.float64)
    if seqs is not None:
        rep_const[:] = [cfg.rep_scale * repeated_token_ratio(s) for s in seqs]
    if interference is None:
        return None, rep_const
    stacks = _interference_stacks(interference, n, batch.single)
    use_torch = batch.kind == "torch"
    reps, have = [], np.zeros(n, dtype=bool)
    for i, st in enumerate(stacks):
        if use_torch:
            import torch

            st = st if isinstance(st, torch.Tensor) else torch.as_tensor(np.asarray(st))
            st = st.to(device=batch.data.device, dtype=torch.float32)
        else:
            st = host_array(st, f"interference[{i}]", np.float32)
        if st.ndim == 2:
            st = st[None]
        if st.ndim != 3 or tuple(st.shape[1:]) != (h, w):
            raise ValueError(f"interference[{i}] must hold maps of shape ({h}, {w}) like maps, got "
                             f"shape {tuple(st.shape)}")
        finite = bool(st.isfinite().all()) if use_torch else bool(np.isfinite(st).all())
        if not finite:
            raise ValueError(f"interference[{i}] contains NaN or Inf")
        if st.shape[0] == 0:
            reps.append(None)
            continue
        have[i] = True
        reps.append(_normalized_mean(st, use_torch))
    if not have.any():
        return None, rep_const
    if use_torch:
        import torch

        rep = torch.stack([r if r is not None else torch.full((h, w), float(rep_const[i]),
                                                              device=batch.data.device)
                           for i, r in enumerate(reps)]).contiguous()
    else:
        rep = np.stack([r if r is not None else np.full((h, w), rep_const[i], np.float32)
                        for i, r in enumerate(reps)]).astype(np.float32)
    return rep, rep_const


def _interference_stacks(interference, n: int, single: bool):
    if single:
        return [interference]
    if isinstance(interference, (list, tuple)):
        if len(interference) != n:
            raise ValueError(f"interference has {len(interference)} entries for {n} maps; pass one "
                             f"stack (R, H, W) per map")
        return list(interference)
    shape = getattr(interference, "shape", None)
    if shape is None or len(shape) != 4 or shape[0] != n:
        raise ValueError(f"interference for a batch of {n} maps must be a list of {n} stacks "
                         f"(R, H, W) or an array (N, R, H, W), got shape {shape}")
    return [interference[i] for i in range(n)]


def host(x):
    """A kernel's small per-map output as a host NumPy array."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
