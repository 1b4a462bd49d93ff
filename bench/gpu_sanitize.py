"""A short, checked pass over every CUDA kernel, for compute-sanitizer on a GPU machine.

    compute-sanitizer --tool racecheck --error-exitcode 9 python bench/gpu_sanitize.py

It runs each kernel of ``diffcam._cuda`` once or twice on small batches that take every code
path: token grids (shared-memory stage kernel), 64x64 (dynamic shared memory above 48 KiB,
opt-in), 140x150 (global-memory stage kernel with radix select), mixed kernel sizes in one
filter launch, the metrics kernels; then compares the results with the float64 reference and
exits non-zero on a mismatch.  bench/gpu_check.sh runs it under memcheck, racecheck and
synccheck, which see what the CPU emulation of tests/refine/cuda_emu.py cannot (true
concurrency, out-of-bounds device accesses).  ``--emulate`` runs the same checks on that
emulation instead (tests/refine/test_cuda.py runs it so, to keep this script working, and
with ``--quick`` in the ThreadSanitizer build of the emulation's thread mode).
"""

from __future__ import annotations

import sys

import numpy as np


def run_checks(cu, dev, sync, quick=False) -> int:
    """Every kernel of the CUDA glue module `cu` on device arrays made by `dev`; prints one line
    per check and returns the number of mismatches.  `quick`: fewer and smaller batches (every
    stage-kernel path once, with the paper preset)."""
    from diffcam.refine import reference as ref
    from diffcam.refine.config import RefineConfig

    rng = np.random.default_rng(0)
    bad = 0

    def check(name, got, want, atol):
        nonlocal bad
        g = got.detach().cpu().numpy() if hasattr(got, "detach") else np.asarray(got)
        err = float(np.max(np.abs(g.astype(np.float64) - want))) if g.size else 0.0
        status = "ok" if err <= atol else "MISMATCH"
        bad += status != "ok"
        print(f"{name:<40} max|err| {err:.2e}  {status}")

    for cfg_name, cfg in (("paper", RefineConfig.paper()),
                          ("reference", RefineConfig.reference()),
                          ("k7+final", RefineConfig.paper().replace(kernel_size=7,
                                                                    final_normalize=True))):
        p = cfg.to_params()
        shapes = ((8, 27, 27), (2, 64, 64), (1, 140, 150))
        if quick:  # one map of each path with the paper preset, two token grids otherwise
            shapes = ((2, 27, 27), (1, 64, 64), (1, 140, 150)) if cfg_name == "paper" else ((2, 27, 27),)
        for shape in shapes:
            maps = rng.random(shape).astype(np.float32) ** 3
            rep = rng.random(shape).astype(np.float32) * 0.1
            rc = np.full(shape[0], 0.02)
            got = cu.refine(dev(maps), dev(rep), rc, p)
            sync()
            want = ref.refine(maps, rep, rc, p)
            check(f"refine {cfg_name} {shape}", got[0], want[0], 1e-4)
    maps = rng.random((6, 33, 29)).astype(np.float32)
    ks = np.array([1, 3, 5, 9, 15, 31], np.int32)
    if quick:
        maps, ks = maps[:3, :20], np.array([1, 5, 15], np.int32)
    check("rank filter mixed k", cu.rank_gaussian_filter(dev(maps), dev(ks)),
          ref.rank_gaussian_filter(maps, ks), 1e-5)
    u8 = ref.to_uint8(maps)
    check("otsu", cu.otsu_threshold_u8(dev(u8)), ref.otsu_threshold_u8(u8), 0)
    check("resize", cu.resize_bilinear(dev(maps), 50, 41), ref.resize_bilinear(maps, 50, 41), 1e-5)
    masks = (rng.random((len(maps), 2, 48, 48)) < 0.3).astype(np.uint8)
    check("localization", cu.localization(dev(maps), dev(masks)),
          ref.localization(maps, masks), 1e-6)
    sync()
    print("mismatches:", bad)
    return bad


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--emulate" in argv:  # the CPU emulation (a smoke test of this script, no GPU needed)
        from pathlib import Path
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "refine"))
        import cuda_emu

        with cuda_emu.emulated_backend(cuda_emu.load()) as cu:
            bad = run_checks(cu, np.ascontiguousarray, lambda: None, quick="--quick" in argv)
            return 1 if bad else 0
    import torch

    from diffcam.refine import _cuda

    ok, reason = _cuda.available()
    if not ok or not torch.cuda.is_available():
        print(f"no GPU: {reason}")
        return 2

    def dev(a):
        return torch.as_tensor(np.ascontiguousarray(a), device="cuda")

    return 1 if run_checks(_cuda, dev, torch.cuda.synchronize) else 0


if __name__ == "__main__":
    sys.exit(main())
