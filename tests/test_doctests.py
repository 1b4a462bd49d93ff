"""Every docstring example in the installed package runs and prints what it shows.

The examples are the first thing a user copies; this keeps them true.  Modules whose optional
dependencies are missing are skipped by name (not silently passed); ``diffcam.__main__`` runs
the command line on import and has no examples.
"""

import doctest
import importlib
import pkgutil

import pytest

import diffcam

OPTIONAL = {"pyarrow", "ray", "pycocotools", "PIL", "rich", "safetensors", "scipy", "cv2"}


def _modules():
    names = ["diffcam"]
    for info in pkgutil.walk_packages(diffcam.__path__, "diffcam."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        if getattr(e, "name", None) and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {e.name}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failed = []
    for test in finder.find(mod, name):      # only objects defined in this module
        out = []
        if runner.run(test, out=out.append).failed:
            failed.append("".join(out))
    assert not failed, "\n".join(failed)
