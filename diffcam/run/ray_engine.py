"""Scale a dataset run out over a Ray cluster: n workers, each ``run_dataset(worker=(i, n))``.

Every worker loads its own copy of the model and opens the dataset itself (so both are given by
name: a model name for :func:`diffcam.load` and a dataset spec for
:func:`diffcam.run.open_dataset`) and writes its own shard files into the shared run folder
(which must therefore be on a file system every node sees).  Resuming works as for a single
process: call it again with the same arguments.  Needs ``pip install "diffcam[ray]"``.

>>> import diffcam                                             # doctest: +SKIP
>>> diffcam.run.run_dataset_ray("bundled", "shapes:test:0:1000", "/shared/runs/r1",
...                             workers=8, num_gpus_per_worker=1)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional

__all__ = ["run_dataset_ray"]


def _worker(model, spec, out, worker, kwargs):
    from .runner import run_dataset

    return run_dataset(model, spec, out, worker=worker, progress=False, **kwargs)


def run_dataset_ray(model: str, samples: str, out, workers: int = 2,
                    num_cpus_per_worker: float = 1, num_gpus_per_worker: float = 0,
                    address: Optional[str] = None, progress: bool = True,
                    **kwargs) -> Dict[str, Any]:
    """Run :func:`~diffcam.run.run_dataset` as ``workers`` Ray tasks over one run folder and
    return the summed counts (``done``, ``skipped``, ``errors``), ``seconds`` (wall time) and
    ``workers`` (each task's own summary).

    model     a name or path for :func:`diffcam.load` (each worker loads it)
    samples   a dataset spec (each worker opens it); ``prompt=`` / ``answer=`` may be passed
    out       the run folder, shared by every node
    workers   number of tasks; ``num_cpus_per_worker`` / ``num_gpus_per_worker`` their
              resources (Ray schedules a task only where they are free)
    address   the cluster to join (None: an existing connection, else a local Ray instance)
    kwargs    every other argument of :func:`~diffcam.run.run_dataset` (not ``worker``)
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a name or path for diffcam.load: every Ray worker loads "
                        "its own copy")
    if not isinstance(samples, (str, os.PathLike)):
        raise TypeError("samples must be a dataset spec (e.g. 'shapes:test:0:100' or "
                        "'coco:PATH'): every Ray worker opens the dataset itself")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if "worker" in kwargs:
        raise ValueError("worker= is set by run_dataset_ray for each task")
    try:
        import ray
    except ImportError as e:
        raise ImportError("run_dataset_ray needs Ray: pip install ray (or pip install "
                          "'diffcam[ray]'); without it, start run_dataset(worker=(i, n)) in n "
                          "processes (diffcam run --worker i/n)") from e
    out = os.path.abspath(os.fspath(out))
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                      max_retries=0)(_worker)
    t0 = time.perf_counter()
    refs = [task.remote(os.fspath(model), os.fspath(samples), out, (i, workers), kwargs)
            for i in range(workers)]
    pending, results = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=10.0)
        for r in ready:
            results[refs.index(r)] = ray.get(r)
        if progress:
            sys.stderr.write(f"diffcam run (ray): {len(results)}/{workers} workers finished, "
                             f"{time.perf_counter() - t0:.0f} s\n")
            sys.stderr.flush()
    per = [results[i] for i in range(workers)]
    return {"done": sum(p["done"] for p in per), "skipped": sum(p["skipped"] for p in per),
            "errors": sum(p["errors"] for p in per), "seconds": time.perf_counter() - t0,
            "out": out, "workers": per}
