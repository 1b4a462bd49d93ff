"""diffcam._allocator: glibc malloc tuning for the CPU attribution pass."""

import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffcam import _allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _run(code: str, env_extra=None) -> str:
    """Run ``code`` in a fresh interpreter (the tuning is process-wide and one-way)."""
    import os
    env = dict(os.environ)
    env.pop(_allocator.ENV, None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("value,expected", [("0", False), ("false", False), ("OFF", False),
                                            ("no", False), ("1", True), ("yes", True)])
def test_env_switch(monkeypatch, value, expected):
    monkeypatch.setenv(_allocator.ENV, value)
    assert _allocator.tuning_enabled() is expected
    assert _allocator.tuning_enabled(True) is True        # an explicit choice wins
    assert _allocator.tuning_enabled(False) is False


def test_default_is_on(monkeypatch):
    monkeypatch.delenv(_allocator.ENV, raising=False)
    assert _allocator.tuning_enabled() is True


@pytest.mark.parametrize("kw,err", [({"mmap_threshold": 0}, ValueError),
                                    ({"trim_threshold": -5}, ValueError),
                                    ({"mmap_threshold": 2 ** 31}, ValueError),
                                    ({"trim_threshold": 1.5}, TypeError),
                                    ({"mmap_threshold": True}, TypeError)])
def test_bad_thresholds(kw, err):
    with pytest.raises(err, match=next(iter(kw))):
        _allocator.tune_cpu_allocator(**kw)


def test_fresh_process_state_and_idempotence():
    out = _run("""
        from diffcam._allocator import tune_cpu_allocator, allocator_state
        before = allocator_state()
        a = tune_cpu_allocator()
        b = tune_cpu_allocator()
        s = allocator_state()
        print(before["tuned"], before["reason"] == "not tried", a, b, s["tuned"],
              s["mmap_threshold"], s["trim_threshold"], s["reason"] != "")
    """).split()
    assert out[:2] == ["False", "True"]
    if GLIBC:
        assert out[2:] == ["True", "True", "True", str(32 << 20), str(256 << 20), "True"]
    else:                                             # a no-op that says why
        assert out[2:6] == ["False", "False", "False", "None"]


@pytest.mark.skipif(not GLIBC, reason="the tuning only acts on Linux with glibc")
def test_heap_keeps_freed_blocks():
    """The effect itself, seen by glibc's ``mallinfo2``: eight 2 MB blocks allocated, written
    and freed three times.  With the defaults the heap is trimmed back after every round (the
    next round faults its pages in again); after tuning the 16 MB stay in the heap, free."""
    code = """
        import ctypes, sys
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "mallinfo2"):
            print("no-mallinfo2"); sys.exit(0)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        class MI2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = MI2
        if sys.argv[-1] == "tune":
            from diffcam._allocator import tune_cpu_allocator
            assert tune_cpu_allocator()
        n = 2 << 20
        kept = []
        for _ in range(3):
            ps = [libc.malloc(n) for _ in range(8)]
            for p in ps:
                ctypes.memset(p, 1, n)
            for p in ps:
                libc.free(p)
            kept.append(libc.mallinfo2().fordblks >> 20)
        print(min(kept))
    """
    import os
    kept = {}
    for arg in ("tune", "plain"):
        env = dict(os.environ)
        env.pop(_allocator.ENV, None)
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), arg], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        if out.stdout.strip() == "no-mallinfo2":
            pytest.skip("this glibc has no mallinfo2 (before 2.33)")
        kept[arg] = int(out.stdout)
    assert kept["tune"] >= 16 and kept["plain"] < 2, kept


def test_explainer_tunes_on_first_cpu_call_and_respects_opt_out():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    code = """
        import numpy as np
        from diffcam import Explainer
        from diffcam._allocator import allocator_state
        from diffcam.testing import tiny_llava_anyres
        img = np.zeros((32, 32, 3), np.uint8)
        ad = tiny_llava_anyres(seed=0)
        ex = Explainer(ad, tune_allocator={arg})
        before = allocator_state()["tuned"]
        exp = ex.explain(img, "<image> describe", answer="a red cat", targets="all")
        print(before, allocator_state()["tuned"], exp.settings["allocator_tuned"])
    """
    on = _run(code.replace("{arg}", "None")).split()
    off = _run(code.replace("{arg}", "False")).split()
    env_off = _run(code.replace("{arg}", "None"), {_allocator.ENV: "0"}).split()
    assert on == ["False", str(GLIBC), str(GLIBC)]
    assert off == env_off == ["False", "False", "False"]


def test_explainer_rejects_bad_flag():
    pytest.importorskip("torch")
    from diffcam import Explainer
    from diffcam.testing import tiny_llava_anyres
    with pytest.raises(TypeError, match="tune_allocator"):
        Explainer(tiny_llava_anyres(seed=0), tune_allocator="yes")


def test_maps_do_not_depend_on_the_tuning():
    pytest.importorskip("torch")
    code = """
        import numpy as np, sys
        from diffcam import Explainer
        from diffcam.testing import tiny_llava_anyres
        img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        ex = Explainer(tiny_llava_anyres(seed=0), tune_allocator={arg})
        exp = ex.explain(img, "<image> describe the image", targets="all",
                         answer="a red cat and a dog sitting on the box near the big tree")
        np.save(sys.argv[-1], exp.maps[0]["hires"])
    """
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for arg in ("True", "False"):
            path = os.path.join(d, f"{arg}.npy")
            out = subprocess.run([sys.executable, "-c", textwrap.dedent(code.replace("{arg}", arg)),
                                  path], capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            paths.append(path)
        a, b = (np.load(p) for p in paths)
    np.testing.assert_array_equal(a, b)
