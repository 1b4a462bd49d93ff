"""The public refinement API: types in and out, bad input, presets, backend choice."""

import os
import subprocess
import tempfile
import sys

import numpy as np
import pytest

import diffcam
from diffcam import BackendUnavailableError, RefineConfig
from diffcam.refine import reference as ref
from diffcam.refine.config import PARAM_FIELDS

from .refine.mapgen import make_batch, make_map


@pytest.fixture
def maps(rng):
    return make_batch(rng, 4, 27, 27, kinds=("peaks", "uniform", "sparse", "power"))


# ------------------------------------------------------------------ shapes and types
def test_single_map_and_batch(maps):
    one = diffcam.refine(maps[0])
    batch = diffcam.refine(maps)
    assert one.shape == (27, 27) and batch.shape == (4, 27, 27) and one.dtype == np.float32
    np.testing.assert_allclose(one, batch[0], atol=1e-6)


def test_matches_reference_pipeline(maps):
    p = RefineConfig.paper().to_params()
    want = ref.refine(maps, None, np.zeros(4), p)[0]
    np.testing.assert_allclose(diffcam.refine(maps), want, atol=1e-6)


def test_float64_and_list_inputs(maps):
    out64 = diffcam.refine(maps.astype(np.float64))
    assert out64.dtype == np.float64
    out_list = diffcam.refine(maps[0].tolist())
    assert isinstance(out_list, np.ndarray) and out_list.shape == (27, 27)


def test_torch_round_trip(maps):
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(maps)
    out = diffcam.refine(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == t.shape
    np.testing.assert_allclose(out.numpy(), diffcam.refine(maps), atol=0)
    out64 = diffcam.refine(t.double()[0])
    assert out64.dtype == torch.float64 and out64.shape == (27, 27)
    g = t.clone().requires_grad_(True)          # a tensor that needs grad is read, not kept
    assert diffcam.refine(g).requires_grad is False


def test_return_info(maps):
    out, info = diffcam.refine(maps, return_info=True)
    assert info.kernel_size.tolist() == [3, 3, 3, 3]
    assert set(info.branch) <= {"high_var", "high_mean", "low_mean", "default"}
    assert info.tau.shape == (4,) and info.sicd_applied.dtype == bool
    _, one = diffcam.refine(maps[0], return_info=True)
    assert isinstance(one.kernel_size, int) and isinstance(one.branch, str)
    assert isinstance(one.to_dict()["tau"], float)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_constant_maps_are_well_defined(value, preset):
    out = diffcam.refine(np.full((3, 14, 14), value, np.float32), config=preset)
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()


def test_tiny_maps():
    for shape in [(1, 1), (1, 5), (2, 2), (5, 1)]:
        out = diffcam.refine(np.random.default_rng(0).random(shape).astype(np.float32))
        assert out.shape == shape and np.isfinite(out).all()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad,exc,words", [
    (np.array([[0.1, np.nan]], np.float32), ValueError, "NaN"),
    (np.array([[0.1, np.inf]], np.float32), ValueError, "Inf"),
    (np.zeros((0, 5), np.float32), ValueError, "empty"),
    (np.zeros((2, 3, 0), np.float32), ValueError, "empty"),
    (np.zeros(5, np.float32), ValueError, "shape"),
    (np.zeros((1, 2, 3, 4), np.float32), ValueError, "shape"),
    (np.zeros((4, 4), np.int64), TypeError, "float"),
    (np.zeros((4, 4), bool), TypeError, "float"),
    (np.array([["a", "b"]]), TypeError, "float"),
    (np.array([[0.5, -0.1]], np.float32), ValueError, "negative"),
    (np.array([[0.5, 2.0]], np.float32), ValueError, "normalize=True"),
    (None, TypeError, "None"),
])
def test_bad_maps(bad, exc, words):
    with pytest.raises(exc, match=words) as info:
        diffcam.refine(bad)
    assert "maps" in str(info.value)


def test_normalize_option():
    m = np.array([[0.0, 5.0], [10.0, 2.5]], np.float32)
    np.testing.assert_allclose(diffcam.refine(m, normalize=True), diffcam.refine(m / 10.0),
                               atol=1e-6)


def test_normalize_option_torch_cpu():
    """A CPU tensor with normalize=True (it is refined as NumPy inside; this used to raise)."""
    torch = pytest.importorskip("torch")
    m = np.array([[0.0, 5.0], [10.0, 2.5]], np.float32)
    out = diffcam.refine(torch.from_numpy(np.stack([m, 2 * m])), normalize=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 2)
    want = diffcam.refine(np.stack([m, m]) / 10.0)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("case", ["random", "nan_first", "nan_last", "nan_tail", "inf", "-inf",
                                  "single", "tail3", "neg_zero", "big"])
def test_host_range_matches_numpy(case):
    """as_batch's one-pass range (native for small arrays) against NumPy's min / max."""
    import math

    from diffcam.refine._arrays import host_range

    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 7, 5)).astype(np.float32)
    if case == "nan_first":
        a.flat[0] = np.nan
    elif case == "nan_last":
        a.flat[-1] = np.nan
    elif case == "nan_tail":
        a = a[:, :, :3].copy()          # 63 values: the scalar tail of the 4-lane loop
        a.flat[-2] = np.nan
    elif case == "inf":
        a.flat[17] = np.inf
    elif case == "-inf":
        a.flat[5] = -np.inf
    elif case == "single":
        a = np.array([[0.25]], np.float32)
    elif case == "tail3":
        a = np.array([[3.0, -1.0, 2.0]], np.float32)
    elif case == "neg_zero":
        a = np.array([[-0.0, 0.0], [0.0, -0.0]], np.float32)
    elif case == "big":
        a = rng.random((2, 300, 300), dtype=np.float32)   # above the native size limit
    lo, hi = host_range(a)
    if np.isnan(a).any():
        assert math.isnan(lo) or math.isnan(hi)
        with pytest.raises(ValueError, match="NaN"):
            diffcam.refine(np.abs(a))
    else:
        assert (lo, hi) == (float(a.min()), float(a.max()))


@pytest.mark.parametrize("k,exc", [(4, ValueError), (1, ValueError), (33, ValueError),
                                   (2.5, TypeError), ([3, 5, 7], ValueError)])
def test_bad_kernel_size(k, exc):
    with pytest.raises(exc, match="k"):
        diffcam.rank_gaussian_filter(np.zeros((2, 8, 8), np.float32), k)


def test_bad_config_fields():
    with pytest.raises(ValueError, match="kernel_size"):
        RefineConfig.paper().replace(kernel_size=6)
    with pytest.raises(ValueError, match="k_max"):
        RefineConfig.paper().replace(k_max=33)
    with pytest.raises(ValueError, match="pct_default"):
        RefineConfig.paper().replace(pct_default=120.0)
    with pytest.raises(TypeError, match="RefineConfig"):
        diffcam.refine(np.zeros((3, 3), np.float32), config={"k_max": 3})
    with pytest.raises(ValueError, match="config"):
        diffcam.refine(np.zeros((3, 3), np.float32), config="fast")


def test_bad_interference_and_tokens(maps):
    with pytest.raises(ValueError, match=r"interference\[0\].*\(27, 27\)"):
        diffcam.refine(maps[0], interference=np.zeros((2, 26, 27), np.float32))
    with pytest.raises(ValueError, match="interference"):
        diffcam.refine(maps, interference=[np.zeros((1, 27, 27), np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        diffcam.refine(maps[0], interference=np.full((1, 27, 27), np.nan, np.float32))
    with pytest.raises(ValueError, match="tokens"):
        diffcam.refine(maps, tokens=[[1, 2], [3, 3]])
    with pytest.raises(ValueError, match="tokens is empty"):
        diffcam.refine(maps[0], tokens=[])


def test_bad_threads_and_backend(maps):
    with pytest.raises(ValueError, match="threads"):
        diffcam.refine(maps, threads=-1)
    with pytest.raises(ValueError, match="backend='fast'"):
        diffcam.refine(maps, backend="fast")
    with pytest.raises(BackendUnavailableError, match="GPU|not available"):
        diffcam.refine(maps, backend="cuda")


# ------------------------------------------------------------------ presets
def test_reference_preset_is_seeded_and_close_to_noise_free(rng):
    dense = make_batch(rng, 3, 27, 27, kinds=("uniform", "peaks", "power"))
    a = diffcam.refine(dense, config=RefineConfig.reference(seed=1))
    b = diffcam.refine(dense, config=RefineConfig.reference(seed=1))
    c = diffcam.refine(dense, config=RefineConfig.reference(seed=2))
    quiet = diffcam.refine(dense, config=RefineConfig.reference().replace(noise=0.0))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() < 1e-4 and np.abs(a - quiet).max() < 1e-4


def test_reference_preset_quirks(rng):
    cfg = RefineConfig.reference()
    big = make_map(rng, 384, 384, "uniform")
    assert diffcam.adaptive_kernel_size(big, cfg) == 3
    assert diffcam.adaptive_kernel_size(big) > 3                  # paper: adaptive
    m = make_map(rng, 20, 20, "power")
    np.testing.assert_array_equal(diffcam.confidence_gating(m, cfg), m)


def test_sicd_uses_tokens_and_interference(rng):
    m = make_map(rng, 24, 24, "peaks")
    cfg = RefineConfig.paper().replace(gate=False)
    plain, lam0, _ = diffcam.causal_debiasing(m, cfg, return_info=True)
    _, lam_tok, _ = diffcam.causal_debiasing(m, cfg, tokens=[5, 6, 5, 7, 7], return_info=True)
    inter = np.stack([make_map(rng, 24, 24, "uniform") for _ in range(3)])
    out_i, lam_i, applied = diffcam.causal_debiasing(m, cfg, interference=inter, return_info=True)
    assert applied and lam_i > 0 and not np.allclose(out_i, plain)
    # M_rep is the mean of the min-max normalised maps
    norm = [(x - x.min()) / (x.max() - x.min() + 1e-8) for x in inter]
    want = ref.causal_debiasing_2d(m, np.mean(norm, 0), 0.0, cfg.to_params())[0]
    np.testing.assert_allclose(out_i, want, atol=1e-6)
    assert lam_tok != lam0 or lam0 == 0.5
    batch = np.stack([m, m])
    out_b = diffcam.refine(batch, interference=[inter, inter[:0]], tokens=[1, 1, 2])
    assert out_b.shape == (2, 24, 24)


# ------------------------------------------------------------------ backends
def test_backends_report():
    info = diffcam.backends()
    assert list(info) == ["native", "cuda", "numba", "numpy"]
    assert info["numpy"].available
    for name, a in info.items():
        assert a.available or a.reason, name


def test_every_available_backend_agrees(maps):
    outs = {name: diffcam.refine(maps, backend=name)
            for name, a in diffcam.backends().items() if a.available and name != "cuda"}
    for name, out in outs.items():
        np.testing.assert_allclose(out, outs["numpy"], atol=1e-6, err_msg=name)


def test_resize_api(maps):
    """diffcam.resize: the metrics' bilinear resize (float64 reference), every backend, every
    array kind, bad sizes named."""
    up = diffcam.resize(maps, (54, 81))
    assert up.shape == (4, 54, 81) and up.dtype == np.float32
    np.testing.assert_allclose(up, ref.resize_bilinear(maps, 54, 81), atol=1e-6)
    np.testing.assert_allclose(diffcam.resize(maps[1], 40),
                               ref.resize_bilinear(maps[1:2], 40, 40)[0], atol=1e-6)
    for name, a in diffcam.backends().items():
        if a.available and name != "cuda":
            np.testing.assert_allclose(diffcam.resize(maps, 33, backend=name),
                                       ref.resize_bilinear(maps, 33, 33), atol=1e-6, err_msg=name)
    # values stay within each map's range; the same size is the identity
    assert np.all(up.max(axis=(1, 2)) <= maps.max(axis=(1, 2)) + 1e-6)
    np.testing.assert_array_equal(diffcam.resize(maps, (27, 27)), maps)
    for bad, exc, words in [((0, 5), ValueError, "height"), ((5, -1), ValueError, "width"),
                            ((5.5, 5), TypeError, "height"), ("big", TypeError, "size"),
                            ((1, 2, 3), TypeError, "size"), ((5, 10 ** 6), ValueError, "width")]:
        with pytest.raises(exc, match=words):
            diffcam.resize(maps, bad)
    with pytest.raises(ValueError, match="NaN"):
        diffcam.resize(np.full((3, 3), np.nan, np.float32), 6)
    torch = pytest.importorskip("torch")
    t = diffcam.resize(torch.from_numpy(maps), (54, 81))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), up)


def _run(code, **env):
    e = dict(os.environ, **env)
    # run outside the source tree so the installed package (with its extensions) is imported
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=300, cwd=tempfile.gettempdir())


def test_environment_override_and_disabled_extensions():
    code = ("import numpy as np, diffcam; m = np.random.rand(9, 9).astype('float32');"
            "print(diffcam.refine(m, return_info=True)[1].backend)")
    r = _run(code, DIFFCAM_BACKEND="numpy")
    assert r.returncode == 0 and r.stdout.strip() == "numpy", r.stderr
    r = _run(code, DIFFCAM_BACKEND="bogus")
    assert r.returncode != 0 and "DIFFCAM_BACKEND" in r.stderr
    r = _run(code + ";print(diffcam.backends()['native'].reason)", DIFFCAM_DISABLE_EXTENSIONS="1",
             DIFFCAM_BACKEND="")
    assert r.returncode == 0, r.stderr
    picked, reason = r.stdout.split("\n")[:2]
    assert picked in ("numba", "numpy") and "DIFFCAM_DISABLE_EXTENSIONS" in reason
    r = _run("import diffcam, numpy as np; diffcam.refine(np.ones((3,3),'float32'), backend='native')",
             DIFFCAM_DISABLE_EXTENSIONS="1")
    assert r.returncode != 0 and "not available" in r.stderr


def test_import_is_light():
    r = _run("import sys, diffcam; print(sorted(m for m in ('torch', 'transformers', 'numba', "
             "'scipy') if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


class _FakeDist:
    """An installed diffcam whose files include the compiled extension, in ``root``."""

    def __init__(self, root, names):
        from importlib.metadata import PackagePath

        self.root = root
        self.files = [PackagePath(f"diffcam/{n}") for n in names]

    def locate_file(self, f):
        return os.path.join(self.root, str(f))


def test_source_tree_shadowing_the_installed_package_is_named(tmp_path, monkeypatch):
    """Python run in the repository's root imports the source tree (no compiled extension)
    instead of the installed package: the reason says so and where the installed one is, and
    the automatic fallback warns instead of silently taking the slower backend."""
    import importlib
    import importlib.metadata
    import warnings

    from diffcam import _backend

    so = "_core.cpython-311-x86_64-linux-gnu.so"
    (tmp_path / "diffcam").mkdir()
    (tmp_path / "diffcam" / so).write_bytes(b"")
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: _FakeDist(str(tmp_path), ["__init__.py", so]))
    real = importlib.import_module

    def no_core(name, *a, **k):
        if name == "diffcam._core":
            raise ImportError("No module named 'diffcam._core'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", no_core)
    monkeypatch.delenv("DIFFCAM_BACKEND", raising=False)
    monkeypatch.delenv("DIFFCAM_DISABLE_EXTENSIONS", raising=False)
    _backend._probe.cache_clear()
    try:
        reason = diffcam.backends()["native"].reason
        assert "shadows the installed one in " + str(tmp_path / "diffcam") in reason
        with pytest.raises(BackendUnavailableError, match="shadows"):
            diffcam.refine(np.zeros((4, 4), np.float32), backend="native")
        monkeypatch.setattr(_backend, "_WARNED", set())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _backend.resolve_backend_name(None)
            _backend.resolve_backend_name(None)
        assert len(w) == 1 and "shadows" in str(w[0].message)       # once per reason
        # no installed copy with the extension: the plain reason, and the fallback says what
        # its first call costs
        monkeypatch.setattr(importlib.metadata, "distribution",
                            lambda name: _FakeDist(str(tmp_path), ["__init__.py"]))
        _backend._probe.cache_clear()
        reason = diffcam.backends()["native"].reason
        assert "not installed" in reason and "shadows" not in reason
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            name = _backend.resolve_backend_name(None)
        if name == "numba":
            assert len(w) == 1 and "compiles" in str(w[0].message)
            assert "DIFFCAM_BACKEND=numba" in str(w[0].message)
        # extensions hidden on purpose, or a backend chosen explicitly: no warning
        monkeypatch.setenv("DIFFCAM_DISABLE_EXTENSIONS", "1")
        _backend._probe.cache_clear()
        monkeypatch.setattr(_backend, "_WARNED", set())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _backend.resolve_backend_name(None)
            monkeypatch.delenv("DIFFCAM_DISABLE_EXTENSIONS")
            _backend._probe.cache_clear()
            monkeypatch.setenv("DIFFCAM_BACKEND", "numpy")
            _backend.resolve_backend_name(None)
        assert not w
    finally:
        monkeypatch.undo()
        _backend._probe.cache_clear()


def _native_core():
    mod, why = diffcam._backend._probe("native")
    if mod is None:
        pytest.skip(f"native backend unavailable: {why}")
    return mod


def test_native_refine_info_and_rep_const_options():
    """The native kernel's options for the API's fast calls: info=False returns just the maps
    (the same maps as info=True), rep_const=None means zeros, with or without rep."""
    core = _native_core()
    rng = np.random.default_rng(5)
    maps = make_batch(rng, 6, 20, 17)
    p = RefineConfig.paper().to_params()
    full = core.refine(maps, None, np.zeros(6), p, threads=1)
    only = core.refine(maps, None, None, p, threads=1, info=False)
    assert isinstance(only, np.ndarray)
    np.testing.assert_array_equal(only, full[0])
    rep = np.ascontiguousarray(rng.random(maps.shape, dtype=np.float32))
    np.testing.assert_array_equal(core.refine(maps, rep, None, p, threads=2)[0],
                                  core.refine(maps, rep, np.zeros(6), p, threads=2)[0])
    with pytest.raises(ValueError, match="rep must be"):
        core.refine(maps, rep[:, :3], None, p, info=False)


def test_native_value_check_agrees_with_the_api():
    """refine(..., max_value=1.0) and refine_default return None exactly for the maps the API's
    as_batch rejects (NaN, +-Inf, negatives, values above 1 + 1e-6: the float32 neighbours of
    the bound), so the shortcut never refines a map the general path would refuse, and refines
    every map it accepts -- at any position in the batch (the 8-wide SSE2 scan and its tail)."""
    core = _native_core()
    p = RefineConfig.paper().to_params()
    bound = np.float32(1.0 + 1e-6)
    over = np.nextafter(bound, np.float32(2)) if float(bound) <= 1.0 + 1e-6 else bound
    under = np.nextafter(over, np.float32(0))
    values = [0.0, 1.0, float(under), float(over), -0.0, -1e-45, -1.0, np.nan, np.inf, -np.inf,
              3.0e38, 1e-45]
    for h, w in ((1, 1), (3, 5), (7, 9)):
        for v in values:
            for pos in {0, h * w - 1, (h * w) // 2}:
                m = np.full((2, h, w), 0.5, np.float32)
                m.reshape(-1)[h * w + pos] = v
                out = core.refine(m, None, None, p, info=False, max_value=1.0)
                default = core.refine_default(m, p)
                assert (default is None) == (out is None), (v, h, w, pos)
                try:
                    diffcam.refine(m, config=RefineConfig.paper())
                    api_ok = True
                except ValueError:
                    api_ok = False
                assert (out is not None) == api_ok, (v, h, w, pos)
                if out is not None:
                    np.testing.assert_array_equal(
                        out, core.refine(m, None, None, p, info=False))
                    np.testing.assert_array_equal(default, out)
    # a bound beyond the float range still rejects infinities
    m = np.full((1, 3, 3), 0.5, np.float32)
    m[0, 1, 1] = np.inf
    assert core.refine(m, None, None, p, info=False, max_value=1e300) is None
    m[0, 1, 1] = 3e38
    assert core.refine(m, None, None, p, info=False, max_value=1e300) is not None


def test_native_refine_default_takes_only_its_case():
    """_core.refine_default refines C-contiguous float32 NumPy maps of rank 2 or 3 in the shape
    they come in (the same maps as refine on the (N, H, W) view) and returns None for
    everything else, which the API then sends down its general path; bad params raise as in
    refine."""
    core = _native_core()
    p = RefineConfig.paper().to_params()
    rng = np.random.default_rng(11)
    batch = make_batch(rng, 3, 14, 14)
    want = core.refine(batch, None, None, p, info=False)
    got = core.refine_default(batch, p)
    assert got.shape == batch.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    one = core.refine_default(batch[1], p)
    assert one.shape == (14, 14)
    np.testing.assert_array_equal(one, want[1])
    not_taken = [batch.tolist(), batch.astype(np.float64), batch.astype(np.float16),
                 np.asfortranarray(batch), batch[:, ::2], batch.reshape(-1), batch[None],
                 np.zeros((0, 4, 4), np.float32), np.zeros((4, 0), np.float32),
                 np.zeros((), np.float32), None, 0.5]
    for arg in not_taken:
        assert core.refine_default(arg, p) is None, arg
    with pytest.raises(ValueError, match="params"):
        core.refine_default(batch, p[:5])
    with pytest.raises(ValueError, match="k_max"):
        bad = p.copy()
        bad[PARAM_FIELDS.index("k_max")] = 40
        core.refine_default(batch, bad)


def test_refine_module_call_is_the_pipeline_function():
    """diffcam.refine is a package that calls the pipeline function itself (no forwarding)."""
    from diffcam.refine import pipeline

    assert type(diffcam.refine).__call__ is pipeline.refine
    m = make_map(np.random.default_rng(2), 9, 9, "peaks").astype(np.float32)
    np.testing.assert_array_equal(diffcam.refine(m, "paper"), pipeline.refine(m, "paper"))


@pytest.fixture
def shortcut_taken(monkeypatch):
    """A list that gets, for every call of refine's one-call path (pipeline._default_call),
    whether it refined (True) or stepped aside for the general path (False)."""
    from diffcam.refine import pipeline

    taken = []
    real = pipeline._default_call

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(pipeline, "_default_call", spy)
    return taken


def test_default_call_shortcut_equals_the_general_path(monkeypatch, shortcut_taken):
    """refine(maps), or refine(maps, config, backend="native", threads=t) for a config without
    the reference preset's noise, skips the argument plumbing for valid float32 NumPy maps on
    the native backend: bit-identical to the general path (the same call with
    return_info=True), for one map and a batch; anything else -- other dtypes, layouts,
    invalid values, the reference preset, other backends, a DIFFCAM_BACKEND choice -- takes
    the general path with its errors."""
    rng = np.random.default_rng(3)
    maps = [make_map(rng, 27, 27, kind) for kind in ("peaks", "sparse", "uniform", "levels")]
    taken = shortcut_taken
    native = diffcam.backends()["native"].available
    for m in maps + [np.stack(maps), np.zeros((5, 5), np.float32), np.ones((3, 4), np.float32)]:
        m = np.ascontiguousarray(m, dtype=np.float32)
        got = diffcam.refine(m)
        want = diffcam.refine(m, config=RefineConfig.paper(), return_info=True)[0]
        assert got.dtype == np.float32 and got.shape == m.shape
        np.testing.assert_array_equal(got, want)
    assert taken and all(t == native for t in taken)
    # a config of its own (or "paper") takes the shortcut too, with its own params
    taken.clear()
    own = RefineConfig.paper().replace(kernel_size=5, gamma=0.5, w_out=0.3)
    for cfg in ("paper", own, RefineConfig.paper().replace(akd=False, gate=True)):
        got = diffcam.refine(maps[1], cfg)
        np.testing.assert_array_equal(got, diffcam.refine(maps[1], cfg, return_info=True)[0])
    assert taken == [native] * 3
    # backend="native" and threads: the shortcut, with the same maps for any thread count
    if native:
        taken.clear()
        batch = np.ascontiguousarray(np.stack(maps * 8), dtype=np.float32)
        want = diffcam.refine(batch, own, return_info=True)[0]
        for t in (1, 2, 0):
            np.testing.assert_array_equal(
                diffcam.refine(batch, own, backend="native", threads=t), want)
        assert taken == [True] * 3
    taken.clear()
    for kw in ({"backend": "numpy"}, {"threads": True}, {"threads": 2.0}, {"backend": "NATIVE"}):
        try:
            diffcam.refine(maps[1], **kw)
        except (ValueError, TypeError, BackendUnavailableError):
            pass
    assert taken == [False] * 4
    assert not np.array_equal(diffcam.refine(maps[1], own), diffcam.refine(maps[1]))
    # the reference preset's seeded noise is drawn in Python: never the shortcut
    taken.clear()
    np.testing.assert_array_equal(
        diffcam.refine(maps[1], "reference"),
        diffcam.refine(maps[1], RefineConfig.reference(), return_info=True)[0])
    diffcam.refine(maps[1], RefineConfig.reference())
    assert taken == [False, False]
    taken.clear()
    m = np.ascontiguousarray(maps[0], dtype=np.float32)
    diffcam.refine(m.astype(np.float64))                   # another dtype
    diffcam.refine(np.asfortranarray(np.stack([m, m]).transpose(1, 2, 0)).transpose(2, 0, 1))
    big = np.ascontiguousarray(np.repeat(m[None], 100, axis=0))      # a bigger batch
    np.testing.assert_array_equal(diffcam.refine(big),
                                  diffcam.refine(big, RefineConfig.paper(), return_info=True)[0])
    assert taken == [False, False, native]
    for bad, match in ((np.full((4, 4), np.nan, np.float32), "NaN"),
                       (-m, "negative"), (m + 2, "above")):
        with pytest.raises(ValueError, match=match):
            diffcam.refine(bad)
    monkeypatch.setenv("DIFFCAM_BACKEND", "numpy")
    taken.clear()
    np.testing.assert_allclose(diffcam.refine(m), diffcam.refine(m, backend="numpy"), atol=0)
    assert taken == [False, False]
    # the automatic choice, or native named (an error of the general path when it is disabled)
    for env in ((" Native ",) if native else ()) + ("auto", ""):
        monkeypatch.setenv("DIFFCAM_BACKEND", env)
        taken.clear()
        np.testing.assert_array_equal(diffcam.refine(m),
                                      diffcam.refine(m, RefineConfig.paper(), return_info=True)[0])
        assert taken == [native]
    monkeypatch.setenv("DIFFCAM_BACKEND", "numba")
    taken.clear()
    diffcam.refine(m)
    assert taken == [False]


def test_float_dtypes_round_trip():
    """float64 maps come back float64, float16 maps float32 (float16 cannot hold the refined
    values' precision); the values are those of the float32 maps, on every path."""
    m32 = make_map(np.random.default_rng(4), 11, 13, "peaks").astype(np.float32)
    want = diffcam.refine(m32)
    for dt, back in ((np.float64, np.float64), (np.float16, np.float32)):
        x = m32.astype(dt)
        for got in (diffcam.refine(x), diffcam.refine(x, RefineConfig.paper(), threads=1)):
            assert got.dtype == back
            np.testing.assert_array_equal(
                got, diffcam.refine(x.astype(np.float32)).astype(back))
    np.testing.assert_array_equal(diffcam.refine(m32.astype(np.float64)), want.astype(np.float64))


def test_native_causal_debiasing_rep_const_none():
    """The native causal_debiasing takes rep_const=None as zeros, like refine."""
    core = _native_core()
    maps = make_batch(np.random.default_rng(6), 4, 12, 9)
    p = RefineConfig.paper().to_params()
    for a, b in zip(core.causal_debiasing(maps, None, None, p),
                    core.causal_debiasing(maps, None, np.zeros(4), p)):
        np.testing.assert_array_equal(a, b)


def test_default_call_with_native_named_but_unavailable(monkeypatch):
    """DIFFCAM_BACKEND=native where the extension cannot be used: refine(maps) with every
    default raises the general path's BackendUnavailableError (the shortcut steps aside)."""
    from diffcam import _backend

    m = make_map(np.random.default_rng(4), 9, 9, "peaks").astype(np.float32)
    monkeypatch.setenv("DIFFCAM_BACKEND", "native")
    if _backend._probe("native")[0] is not None:
        np.testing.assert_array_equal(diffcam.refine(m), diffcam.refine(m, "paper"))
        monkeypatch.setattr(_backend, "_probe", lambda name: (None, "simulated: not built"))
    assert _backend.auto_native() is None
    with pytest.raises(BackendUnavailableError, match="native"):
        diffcam.refine(m)


def test_default_call_takes_cpu_torch_tensors(shortcut_taken):
    """Contiguous float32 CPU torch tensors (grad or not) take the one-call path too, through a
    NumPy view: a torch tensor of the same shape comes back, equal to the general path's, with
    no grad and no memory shared with the input; other tensors take the general path."""
    torch = pytest.importorskip("torch")
    taken = shortcut_taken
    native = diffcam.backends()["native"].available
    rng = np.random.default_rng(8)
    batch = torch.from_numpy(make_batch(rng, 3, 14, 14))
    cases = [batch, batch[1], batch.clone().requires_grad_(True),
             batch.transpose(1, 2),                   # not contiguous: the general path
             batch.double()]                          # float64: the general path
    for t in cases:
        got = diffcam.refine(t)
        want = diffcam.refine(t, return_info=True)[0]
        assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape
        assert not got.requires_grad and got.data_ptr() != t.data_ptr()
        assert torch.equal(got, want)
    assert taken == [native, native, native, False, False]
    if hasattr(torch, "_neg_view"):           # a lazy negation: NumPy cannot view it
        taken.clear()
        lazy = torch._neg_view(-batch)
        assert torch.equal(diffcam.refine(lazy), diffcam.refine(batch))
        assert taken == [False, native]
    # NaN / Inf in a CPU tensor: the general path's ValueError (it used to fail on the NumPy
    # copy with an AttributeError), with or without the shortcut
    for value, word in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        bad = batch.clone()
        bad[0, 0, 0] = value
        for kw in ({}, {"return_info": True}):
            with pytest.raises(ValueError, match=word):
                diffcam.refine(bad, **kw)
