"""Explain a whole dataset: batches through one Explainer, results in a resumable shard store.

:func:`run_dataset` takes a model (an adapter, or a name for :func:`diffcam.load`) and samples
(:class:`~diffcam.data.sample.Sample` objects, or a dataset spec such as ``"shapes:test:0:100"``
or ``"coco:/data/coco/val2017"``, see :func:`diffcam.run.sources.open_dataset`), explains them
batch by batch and commits the results shard by shard into a run folder
(:mod:`diffcam.run.store`).  Rerunning the same call continues where a crash or Ctrl-C stopped
it; a sample that raises is written to ``errors/`` with its traceback and the run goes on.
Scale-out: ``worker=(i, n)`` makes a process take every n-th sample (index ``i`` modulo ``n``);
start n of them (on one machine or on several that share the folder) and each writes its own
files; :func:`diffcam.run.ray_engine.run_dataset_ray` does that on a Ray cluster.

When a sample carries masks, every explained target whose word names a mask (``"circle"`` ->
``masks["circle"]``, plurals folded) is scored at run time with the paper's metrics
(:func:`diffcam.metrics.localization`) on its raw map (min-max normalised) and its Diffusion-CAM
map (refined with ``config``), so :func:`diffcam.run.summarize` reports a run without the
dataset.

>>> import diffcam, tempfile                                     # doctest: +SKIP
>>> s = diffcam.run.run_dataset("bundled", "shapes:test:0:8", tempfile.mkdtemp() + "/r",
...                             targets="all", progress=False)   # doctest: +SKIP
>>> s["done"], s["errors"]                                       # doctest: +SKIP
(8, 0)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..metrics.scoring import match_mask, score_explanation
from .store import RunStore

__all__ = ["run_dataset", "match_mask", "Progress"]


class Progress:
    """A one-line progress report on stderr: done / total, samples per second, time left,
    errors.  Rewritten in place on a terminal, a line every ``every`` seconds otherwise."""

    def __init__(self, total: Optional[int], enabled: bool = True, every: float = 10.0,
                 stream=None):
        self.total, self.enabled, self.every = total, enabled, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = -1e9
        self.done = self.skipped = self.errors = 0

    def update(self, done=0, skipped=0, errors=0, force=False):
        self.done += done
        self.skipped += skipped
        self.errors += errors
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        el = now - self.t0
        rate = self.done / el if el > 0 else 0.0
        n = self.done + self.skipped + self.errors
        tot = f"/{self.total}" if self.total is not None else ""
        left = ""
        if self.total is not None and rate > 0:
            rest = max(self.total - n, 0) / rate
            left = f", {rest / 60:.1f} min left" if rest >= 60 else f", {rest:.0f} s left"
        msg = (f"diffcam run: {n}{tot} samples ({self.done} explained, {self.skipped} already "
               f"done, {self.errors} errors), {rate:.2f} samples/s{left}")
        if self.tty:
            self.stream.write("\r" + msg + "\x1b[K" + ("\n" if force else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def _check_worker(worker) -> Tuple[int, int]:
    try:
        i, n = worker
        if isinstance(i, bool) or isinstance(n, bool):
            raise TypeError
        i, n = int(i), int(n)
    except (TypeError, ValueError):
        raise ValueError(f"worker must be a pair (index, count), got {worker!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"worker={worker!r}: expected 0 <= index < count")
    return i, n


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def _same_answer(a: str, b: str) -> bool:
    return " ".join(str(a).lower().split()) == " ".join(str(b).lower().split())


def _phrase_targets(sample) -> List[str]:
    """The grounded phrases of a sample (``meta["phrases"]`` entries with a span), for
    ``targets="phrases"``; ValueError naming the sample when it has none or no answer."""
    if sample.answer is None:
        raise ValueError(f"sample {sample.id!r}: targets='phrases' needs the caption as the "
                         "answer (answer='caption'); this sample has no answer")
    items = (sample.meta or {}).get("phrases") or []
    out = [p["text"] for p in items if isinstance(p, dict) and isinstance(p.get("text"), str)
           and p.get("span") is not None and p["text"].strip()]
    if not out:
        raise ValueError(f"sample {sample.id!r} has no grounded phrases (meta['phrases'] with "
                         "spans, as diffcam.data.grandf gives them) for targets='phrases'")
    return list(dict.fromkeys(out))


class _PhrasePicker:
    """The targets callable of ``targets="phrases"``: one Target per phrase found in the answer
    (:func:`~diffcam.attribution.targets._phrase_words`), named by the phrase so that it
    matches its mask; phrases the answer does not contain are left out (ValueError when none
    is left)."""

    def __init__(self, phrases: List[str]):
        self.phrases = phrases

    def __call__(self, words, tokens):
        from ..attribution.targets import Target, _phrase_words

        out = []
        for p in self.phrases:
            ws = _phrase_words(p, words)
            if ws:
                out.append(Target(p, tuple(sorted({j for w in ws for j in w.tokens}))))
        if not out:
            raise ValueError(f"none of the grounded phrases {self.phrases} is in the answer "
                             f"{[w.text for w in words]}")
        return out


def _image_sources(image) -> list:
    """Per image of a sample: its absolute file path, or None for an in-memory image."""
    items = image if isinstance(image, (list, tuple)) else [image]
    return [os.path.abspath(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else None
            for x in items]


def _record(index, sample, exp, seconds, cfg, save_refined, sources=None,
            save_images="auto") -> Tuple[dict, dict]:
    arrays = {}
    grids = []
    sources = sources if sources is not None else _image_sources(sample.image)
    for i, img in enumerate(exp.images):
        src = sources[i] if i < len(sources) else None
        if save_images is True or (save_images == "auto" and src is None):
            arrays[f"{sample.id}/{i}/image"] = np.asarray(img, np.uint8)
    for i, d in enumerate(exp.maps):
        grids.append({g: list(a.shape) for g, a in d.items()})
        for g, a in d.items():
            arrays[f"{sample.id}/{i}/{g}"] = np.asarray(a, np.float32)
    for i, d in enumerate(exp.interference_maps):
        for g, a in d.items():
            arrays[f"{sample.id}/{i}/{g}/interference"] = np.asarray(a, np.float32)
    r = None
    if save_refined:
        r = exp.refined(cfg)
        for i, d in enumerate(r.maps):
            for g, a in d.items():
                arrays[f"{sample.id}/{i}/{g}/refined"] = np.asarray(a, np.float32)
    rec = {"id": sample.id, "index": index, "status": "ok", "prompt": sample.prompt,
           "answer": exp.answer, "answer_given": sample.answer is not None,
           "tokens": list(exp.tokens), "token_ids": [int(t) for t in exp.token_ids],
           "targets": exp.target_names, "states": list(exp.states), "grids": grids,
           "interference": [t.to_dict() for t in exp.interference],
           "image_sizes": [list(np.shape(im)[:2]) for im in exp.images],
           "image_files": list(sources[:len(exp.images)]),
           "seconds": round(seconds, 4), "meta": sample.meta}
    rec["scores"], rec["tam"] = score_explanation(exp, sample.masks, cfg, r)
    if "expected" in sample.meta and sample.answer is None:
        rec["correct"] = _same_answer(exp.answer, sample.meta["expected"])
    return rec, arrays


def _free_device_memory():
    """Release the CUDA cache after an out-of-memory error (nothing to do on the CPU)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:                          # pragma: no cover - best effort only
        pass


def _read_images(batch):
    """[((index, sample with its image file read), None) or ((index, sample), exception)]:
    image paths are decoded here (the prefetch thread); other images pass through."""
    from dataclasses import replace

    from ..attribution.images import load_image

    def read(x):
        return load_image(x) if isinstance(x, (str, os.PathLike)) else x

    out = []
    for index, sample in batch:
        img = sample.image
        try:
            if isinstance(img, (list, tuple)):            # several images of one prompt
                img = [read(x) for x in img]
            else:
                img = read(img)
        except Exception as exc:               # the sample fails alone, as in explain()
            out.append(((index, sample), exc))
            continue
        out.append(((index, replace(sample, image=img) if img is not sample.image else sample),
                    None))
    return out


def _settings(adapter, dataset_name, explain_kw, cfg, save_refined) -> dict:
    from .. import __version__

    info = {}
    try:
        info = dict(adapter.info())
    except Exception:                                    # pragma: no cover - odd adapters
        info = {"adapter": type(adapter).__name__}
    return {"model": info, "dataset": dataset_name, "explain": explain_kw,
            "refine": cfg.to_dict(), "save_refined": bool(save_refined),
            "diffcam": __version__}


def run_dataset(model, samples: Union[str, Iterable], out, *, targets="nouns",
                layer: Optional[int] = None, states=("final",), method: str = "diffusion-cam",
                score: str = "logit", config="paper", batch_size: int = 1,
                shard_size: int = 64, worker=(0, 1), resume: bool = True,
                retry_errors: bool = False, limit: Optional[int] = None,
                save_refined: bool = False, progress: bool = True,
                explainer_kwargs: Optional[dict] = None, prompt: Optional[str] = None,
                answer=None, prefetch: bool = True, model_path=None,
                model_kwargs: Optional[dict] = None, save_images="auto") -> Dict[str, Any]:
    """Explain every sample of a dataset into the run folder ``out``; returns a summary dict
    (``done`` explained now, ``skipped`` already done, ``errors``, ``seconds``, ``out``).

    model        an adapter, or a name for :func:`diffcam.load` (``"bundled"``, or a family
                 name with ``model_path`` the checkpoint and ``model_kwargs`` more arguments
                 of the family's loader: ``run_dataset("llada-v", ..., model_path=ckpt)``)
    samples      an iterable of :class:`~diffcam.data.sample.Sample`, or a dataset spec for
                 :func:`diffcam.run.sources.open_dataset` (``prompt`` and ``answer`` go to it)
    targets, layer, states, method, score
                 passed to :meth:`diffcam.Explainer.explain` for every batch; ``targets=
                 "phrases"`` explains each sample's grounded phrases instead (the texts of
                 ``meta["phrases"]`` that have a span, as :mod:`diffcam.data.grandf` gives
                 them; each phrase one target), sample by sample; it needs the samples'
                 answers to be their captions (``answer="caption"``), and a GranD-f spec
                 then keys its masks by phrase (``|keys=phrase``) unless it says otherwise
    config       the refinement (RefineConfig, "paper" or "reference") used for scoring and
                 for ``save_refined``
    batch_size   samples per explain() call (one forward and one backward for the batch;
                 default 1: on the CPU one by one is fastest -- bench/RESULTS.md -- while a GPU
                 gains from 4 or more); a batch that raises (a bad sample, or a batch too big
                 for the GPU's memory) is retried sample by sample so one bad sample fails alone
    shard_size   samples per committed shard (a crash loses at most this many)
    worker       (i, n): take the samples whose index is i modulo n
    resume       continue a run folder that holds the same settings (False: refuse an
                 existing run)
    retry_errors explain again the samples that raised in an earlier attempt
    limit        stop after the first ``limit`` samples of the dataset
    save_refined also store the refined maps (at the image's resolution: large)
    save_images  store the explained images (uint8) with the maps: "auto" (default) those
                 that were not read from a file (a file's path is recorded instead), True
                 all, False none -- what :func:`diffcam.run.gallery` draws on
    progress     report progress on stderr
    prefetch     read the next batch's image files in a background thread while the current
                 batch is explained (an unreadable file fails its own sample, as without it)
    """
    from .. import load as _load
    from ..attribution import Explainer
    from ..data.sample import Sample
    from ..refine import RefineConfig
    from .sources import open_dataset

    from ..attribution.explainer import METHODS, SCORES

    if method not in METHODS:       # checked here, not once per sample as an error
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if score not in SCORES:
        raise ValueError(f"score={score!r}: expected one of {SCORES}")
    if save_images not in ("auto", True, False):
        raise ValueError(f"save_images={save_images!r}: expected 'auto', True or False")
    batch_size = _positive_int("batch_size", batch_size)
    shard_size = _positive_int("shard_size", shard_size)
    if limit is not None:
        limit = _positive_int("limit", limit)
    wi, wn = _check_worker(worker)
    if isinstance(config, str):
        if config not in ("paper", "reference"):
            raise ValueError(f"config={config!r}: expected 'paper', 'reference' or a RefineConfig")
        cfg = RefineConfig.paper() if config == "paper" else RefineConfig.reference()
    elif isinstance(config, RefineConfig):
        cfg = config
    else:
        raise TypeError(f"config must be a RefineConfig, 'paper' or 'reference', got "
                        f"{type(config).__name__}")
    phrases = isinstance(targets, str) and targets == "phrases"
    total = None
    if isinstance(samples, (str, os.PathLike)):
        spec = os.fspath(samples)
        if phrases:
            if answer != "caption":
                raise ValueError("targets='phrases' explains the grounded phrases of each "
                                 "sample's caption: pass answer='caption' (--answer caption)")
            if spec.startswith("grandf:") and "|keys=" not in spec:
                spec += "|keys=phrase"          # phrase targets are scored against phrase masks
        ds = open_dataset(spec, prompt=prompt, answer=answer)
        dataset_name, total, samples = ds.spec, ds.count, iter(ds)
    else:
        if prompt is not None or answer is not None:
            raise ValueError("prompt= and answer= apply to a dataset spec; set them on the "
                             "Sample objects instead")
        dataset_name = "samples"
        if hasattr(samples, "__len__"):
            total = len(samples)
    if total is not None and limit is not None:
        total = min(total, limit)
    if total is not None and wn > 1:
        total = len(range(wi, total, wn))
    if model_path is not None or model_kwargs:
        if not isinstance(model, str):
            raise TypeError("model_path= / model_kwargs= need model to be a name for "
                            "diffcam.load")
        adapter = _load(model, model_path, **(model_kwargs or {}))
    else:
        adapter = _load(model)
    if isinstance(states, (str, int)):
        states = (states,)
    if isinstance(targets, (str, list, tuple)):
        target_desc = targets
    else:       # a callable: its name (a repr would hold an address and never match on resume)
        target_desc = "callable " + ".".join(
            x for x in (getattr(targets, "__module__", None),
                        getattr(targets, "__qualname__", type(targets).__name__)) if x)
    explain_kw = {"targets": target_desc,
                  "layer": layer, "states": list(states), "method": method, "score": score}
    settings = _settings(adapter, dataset_name, explain_kw, cfg, save_refined)
    settings["explainer"] = dict(explainer_kwargs or {})
    store = RunStore.create(out, settings, resume=resume)
    done = store.done_ids()
    failed = set() if retry_errors else set(store.errors(done))
    writer = store.writer(wi)
    prog = Progress(total, enabled=progress)
    stats = {"done": 0, "skipped": 0, "errors": 0}
    seen = set()
    sources: Dict[str, list] = {}       # id -> image file paths, taken before prefetching
    t0 = time.perf_counter()

    def fail(sample, exc):
        writer.error(sample.id, exc)
        stats["errors"] += 1
        prog.update(errors=1)

    def explain_group(ex, group):
        """group: [(index, Sample)], all with or all without answers."""
        answers = [s.answer for _, s in group]
        tg = targets
        if phrases:                         # one sample per group (run_batch)
            try:
                tg = _PhrasePicker(_phrase_targets(group[0][1]))
            except ValueError as exc:
                fail(group[0][1], exc)
                return
        kw = dict(targets=tg, layer=layer, states=states, method=method, score=score)
        t = time.perf_counter()
        try:
            exps = ex.explain([s.image for _, s in group], [s.prompt for _, s in group],
                              answer=None if answers[0] is None else answers, **kw)
            if len(group) == 1 and not isinstance(exps, list):
                exps = [exps]
            per = (time.perf_counter() - t) / len(group)
            results = [(g, e, per) for g, e in zip(group, exps)]
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if len(group) == 1:
                fail(group[0][1], exc)
                return
            if "out of memory" in str(exc).lower():
                _free_device_memory()       # a batch too big for the GPU: go one by one
            for g in group:                 # isolate the sample that raised
                explain_group(ex, [g])
            return
        for (index, sample), exp, per in results:
            try:
                rec, arrays = _record(index, sample, exp, per, cfg, save_refined,
                                      sources.pop(sample.id, None), save_images)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                fail(sample, exc)
                continue
            writer.add(rec, arrays)
            stats["done"] += 1
            prog.update(done=1)
            if len(writer) >= shard_size:
                writer.flush()

    def run_batch(ex, batch):
        if phrases:                         # targets differ per sample: one by one
            for b in batch:
                explain_group(ex, [b])
            return
        given = [b for b in batch if b[1].answer is not None]
        free = [b for b in batch if b[1].answer is None]
        for group in (free, given):
            if group:
                explain_group(ex, group)

    def batches():
        batch: List[Tuple[int, Any]] = []
        for index, sample in enumerate(samples):
            if limit is not None and index >= limit:
                break
            if index % wn != wi:
                continue
            if not isinstance(sample, Sample):
                raise TypeError(f"samples must yield diffcam.data.Sample objects, got "
                                f"{type(sample).__name__} at index {index}")
            if sample.id in seen:
                raise ValueError(f"sample id {sample.id!r} occurs twice (index {index}): "
                                 f"ids are the resume key and must be unique")
            seen.add(sample.id)
            if sample.id in done or sample.id in failed:
                stats["skipped"] += 1
                prog.update(skipped=1)
                continue
            sources[sample.id] = _image_sources(sample.image)
            batch.append((index, sample))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    pool = None
    if prefetch:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffcam-prefetch")
    try:
        with Explainer(adapter, **(explainer_kwargs or {})) as ex:
            it = batches()
            nxt = next(it, None)
            pending = pool.submit(_read_images, nxt) if pool and nxt else None
            while nxt is not None:
                cur, cur_loaded = nxt, pending
                nxt = next(it, None)
                pending = pool.submit(_read_images, nxt) if pool and nxt else None
                if cur_loaded is not None:
                    cur = []
                    for (index, sample), err in cur_loaded.result():
                        if err is None:
                            cur.append((index, sample))
                        else:
                            fail(sample, err)
                run_batch(ex, cur)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.flush()          # commit what is finished, also on Ctrl-C or a crash
        prog.update(force=True)
    stats.update(seconds=time.perf_counter() - t0, out=store.path,
                 previous_errors_skipped=len(failed & seen))
    return stats
