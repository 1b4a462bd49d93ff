"""The shard store of a dataset run: a folder that survives crashes and serves several workers.

Layout of a run folder::

    run.json                         settings of the run (written once; a resume must match)
    shards/w000-000000.npz           the maps of a group of samples (float32 raw maps per image
                                     and grid, refined maps when asked)
    shards/w000-000000.jsonl         one record per sample of that group: answer, tokens,
                                     targets, scores, timings, meta
    errors/w000.jsonl                one line per sample that raised (type, message, traceback)

Crash safety: a shard's ``.npz`` is written to a temporary file and renamed into place, then its
``.jsonl`` the same way; the ``.jsonl`` is the commit point (a sample counts as done only when
its record file exists, and a record file only exists next to its maps).  A crash loses at most
the samples of the shard being filled (``shard_size``) and leaves no half-written file under a
final name.  Worker ``i`` of ``n`` only writes files named ``w{i:03d}-...``, so workers on
several processes or machines can share one folder on a shared file system with no locking.

>>> import tempfile, numpy as np
>>> from diffcam.run.store import RunStore
>>> st = RunStore.create(tempfile.mkdtemp() + "/run", {"model": "demo"})
>>> w = st.writer(worker=0)
>>> w.add({"id": "a", "status": "ok"}, {"a/0/base": np.ones((2, 1, 3, 3), np.float32)})
>>> w.flush()
'w000-000000'
>>> sorted(st.done_ids()), st.maps("a")["a/0/base"].shape
(['a'], (2, 1, 3, 3))
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

__all__ = ["RunStore", "ShardWriter", "SCHEMA", "SettingsMismatch"]

SCHEMA = "diffcam.run/1"
_SHARD = re.compile(r"^w(\d{3,})-(\d{6,})\.jsonl$")


class SettingsMismatch(ValueError):
    """A resumed run was started with different settings than the folder's run.json."""


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)


def _dumps(obj) -> str:
    return json.dumps(obj, default=_json_default, sort_keys=True)


def _atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename onto ``path`` (same folder: the rename is atomic)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _normalise(obj):
    """JSON round trip, so that settings compare as they are stored."""
    return json.loads(_dumps(obj))


def _diff(a, b, prefix="") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{p}: not in run.json")
            elif k not in b:
                out.append(f"{p}: missing now")
            else:
                out.extend(_diff(a[k], b[k], p))
        return out
    return [] if a == b else [f"{prefix}: run.json has {a!r}, now {b!r}"]


class RunStore:
    """A run folder (see the module docstring).  Open one with :meth:`open` or :meth:`create`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        meta = os.path.join(self.path, "run.json")
        try:
            with open(meta, encoding="utf-8") as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} is not a diffcam run (no run.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta} is not valid JSON: {e}") from None
        if self.meta.get("schema") != SCHEMA:
            raise ValueError(f"{meta}: schema {self.meta.get('schema')!r}, this diffcam reads "
                             f"{SCHEMA!r}")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path) -> "RunStore":
        """Open an existing run folder."""
        return cls(path)

    @classmethod
    def create(cls, path, settings: dict, resume: bool = True) -> "RunStore":
        """Create the run folder with ``settings``, or (``resume=True``) reopen it when it
        already holds a run with the same settings.  Different settings raise
        :class:`SettingsMismatch` listing what differs; ``resume=False`` refuses a folder that
        already holds a run.  Safe when several workers start at once (run.json is created
        with an exclusive link; the losers compare their settings with the winner's)."""
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"out={path} exists and is not a folder")
        os.makedirs(os.path.join(path, "shards"), exist_ok=True)
        os.makedirs(os.path.join(path, "errors"), exist_ok=True)
        settings = _normalise(settings)
        meta_path = os.path.join(path, "run.json")
        doc = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": settings}
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".run.json.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=_json_default, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, meta_path)          # fails if run.json exists: first worker wins
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp)
        store = cls(path)
        if not created:
            if not resume:
                raise FileExistsError(f"{path} already holds a run; pass resume=True (the "
                                      f"default; CLI: drop --no-resume) to continue it, or "
                                      f"choose another folder")
            diff = _diff(store.meta.get("settings", {}), settings)
            if diff:
                raise SettingsMismatch(
                    f"{path} holds a run with other settings, so it cannot be resumed with "
                    f"these: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                    + ". Use another output folder, or the run's own settings.")
        return store

    @property
    def settings(self) -> dict:
        return self.meta.get("settings", {})

    # ------------------------------------------------------------------ reading
    def shard_files(self) -> List[str]:
        """Committed record files (``shards/w*-*.jsonl``), sorted."""
        folder = os.path.join(self.path, "shards")
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if _SHARD.match(f))

    def records(self) -> Iterator[dict]:
        """Every committed record, shard by shard (a sample written twice by a race of
        workers shows up once: the first record wins)."""
        seen = set()
        for path in self.shard_files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if rec["id"] in seen:
                        continue
                    seen.add(rec["id"])
                    rec["_shard"] = os.path.basename(path)[:-len(".jsonl")]
                    yield rec

    def done_ids(self) -> set:
        """Ids of the samples whose records are committed."""
        return {r["id"] for r in self.records()}

    def errors(self, done: Optional[set] = None) -> Dict[str, dict]:
        """id -> the last error recorded for it, for samples that have no committed record
        (a sample that failed and later succeeded is not an error any more); ``done``: the
        :meth:`done_ids` when the caller has them already."""
        done = self.done_ids() if done is None else done
        out: Dict[str, dict] = {}
        for path in sorted(glob.glob(os.path.join(self.path, "errors", "w*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        e = json.loads(line)
                    except json.JSONDecodeError:      # a line cut by a crash
                        continue
                    if e.get("id") not in done:
                        out[e["id"]] = e
        return out

    def maps(self, sample_id: str) -> Dict[str, np.ndarray]:
        """The arrays stored for one sample: keys ``"{id}/{image}/{grid}"`` (raw maps,
        (targets + 1, states, rows, cols)), ``"{id}/{image}/{grid}/interference"`` (SICD's
        interference maps, when the explanation has them) and ``"{id}/{image}/{grid}/refined"``
        when the run kept refined maps.  The first call indexes the records (again after new shards are
        committed); :meth:`iter_maps` reads everything shard by shard."""
        files = self.shard_files()
        if getattr(self, "_index_files", None) != files:     # (re)index when shards changed
            self._index = {r["id"]: r for r in self.records()}
            self._index_files = files
        rec = self._index.get(sample_id)
        if rec is None:
            raise KeyError(f"sample {sample_id!r} has no committed record in {self.path}")
        with np.load(os.path.join(self.path, "shards", rec["_shard"] + ".npz")) as z:
            return {k: z[k] for k in rec["arrays"]}

    def iter_maps(self) -> Iterator[tuple]:
        """(record, arrays) of every committed sample, reading each shard once."""
        by_shard: Dict[str, List[dict]] = {}
        for rec in self.records():
            by_shard.setdefault(rec["_shard"], []).append(rec)
        for shard, recs in by_shard.items():
            with np.load(os.path.join(self.path, "shards", shard + ".npz")) as z:
                for rec in recs:
                    yield rec, {k: z[k] for k in rec["arrays"]}

    # ------------------------------------------------------------------ writing
    def writer(self, worker: int = 0) -> "ShardWriter":
        """The writer of worker ``worker`` (its files: ``w{worker:03d}-*``)."""
        return ShardWriter(self, worker)


class ShardWriter:
    """Buffers the samples of one worker and commits them shard by shard."""

    def __init__(self, store: RunStore, worker: int):
        if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or worker < 0:
            raise ValueError(f"worker must be an int >= 0, got {worker!r}")
        self.store, self.worker = store, int(worker)
        self.records: List[dict] = []
        self.arrays: Dict[str, np.ndarray] = {}
        folder = os.path.join(store.path, "shards")
        self._clean_stale(folder)
        seqs = [int(m.group(2)) for m in (_SHARD.match(f) for f in os.listdir(folder))
                if m and int(m.group(1)) == self.worker]
        self.seq = max(seqs) + 1 if seqs else 0
        self.error_path = os.path.join(store.path, "errors", f"w{self.worker:03d}.jsonl")

    def _clean_stale(self, folder: str) -> None:
        """Remove this worker's leftovers of a crash: temporary files and maps whose record
        file was never committed."""
        prefix = f"w{self.worker:03d}-"
        names = set(os.listdir(folder))
        for f in names:
            stale_tmp = f.startswith("." + prefix) and f.endswith(".tmp")
            orphan = f.startswith(prefix) and f.endswith(".npz") and \
                f[:-4] + ".jsonl" not in names
            if stale_tmp or orphan:
                try:
                    os.unlink(os.path.join(folder, f))
                except OSError:
                    pass

    def add(self, record: dict, arrays: Dict[str, np.ndarray]) -> None:
        """Buffer one sample's record and arrays (keys must start with ``record['id'] + '/'``)."""
        sid = record["id"]
        for k in arrays:
            if not k.startswith(sid + "/"):
                raise ValueError(f"array key {k!r} of sample {sid!r} must start with {sid + '/'!r}")
        rec = dict(record)
        rec["arrays"] = sorted(arrays)
        self.records.append(rec)
        self.arrays.update(arrays)

    def __len__(self) -> int:
        return len(self.records)

    def flush(self) -> Optional[str]:
        """Commit the buffered samples as one shard (maps first, then the record file);
        returns the shard name, or None when nothing was buffered."""
        if not self.records:
            return None
        name = f"w{self.worker:03d}-{self.seq:06d}"
        folder = os.path.join(self.store.path, "shards")
        arrays = self.arrays

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        def write_jsonl(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for r in self.records:
                    f.write(_dumps(r) + "\n")

        _atomic_write(os.path.join(folder, name + ".npz"), write_npz)
        _atomic_write(os.path.join(folder, name + ".jsonl"), write_jsonl)
        self.seq += 1
        self.records, self.arrays = [], {}
        return name

    def error(self, sample_id: str, exc: BaseException) -> dict:
        """Append one error line (flushed and synced at once, so it survives a crash)."""
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        e = {"id": sample_id, "type": type(exc).__name__, "message": str(exc),
             "traceback": "".join(tb)[-4000:], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "worker": self.worker}
        with open(self.error_path, "a", encoding="utf-8") as f:
            f.write(_dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return e
