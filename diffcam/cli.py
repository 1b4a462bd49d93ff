"""The ``diffcam`` command line.

    diffcam demo [--out DIR] [--scenes N]    the bundled model explains held-out scenes
    diffcam backends                          which kernel backends can run here, and why not
    diffcam refine IN.npy OUT.npy [--preset paper|reference] [--backend NAME] [--normalize]
    diffcam bench [--quick] [--backend NAME] [--json PATH]
    diffcam eval [--val N] [--test N] [--cache DIR] [--out docs/benchmark.md]
                                              the paper's tables on the bundled benchmark
    diffcam compare [--test N] [--models diffusion,autoregressive] [--out docs/baselines.md]
                    [--json PATH]
                                              Diffusion-CAM against Grad-CAM, LLaVA-CAM, TAM
    diffcam explain IMAGE [--prompt TEXT] [--out DIR] [--model bundled] [--targets nouns]
                                              explain one image: answer, maps, overlays
    diffcam run DATASET --out DIR [--model bundled] [--targets nouns] [--worker I/N] ...
                                              explain a whole dataset into a resumable run
    diffcam report DIR [--json] [--scores PATH.csv|.parquet] [--gallery DIR]
                                              counts and scores of a run folder
"""

from __future__ import annotations

import argparse
import sys


def _cmd_backends(args) -> int:
    import diffcam

    for name, a in diffcam.backends().items():
        print(f"{name:>7}: {'available' if a.available else 'unavailable'}"
              + ("" if a.available else f" ({a.reason})"))
    try:
        from diffcam import _core

        print(f"native SIMD path: {_core.simd()}")
    except Exception:
        pass
    return 0


def _cmd_demo(args) -> int:
    from diffcam import demo

    if args.synthetic:
        demo.run_synthetic(args.out, scenes=args.scenes or 8, seed=args.seed,
                           backend=args.backend)
    else:
        demo.run(args.out, scenes=args.scenes or 6, start=args.seed, backend=args.backend)
    return 0


def _cmd_refine(args) -> int:
    import numpy as np

    import diffcam

    maps = np.load(args.input)
    out = diffcam.refine(maps, config=args.preset, backend=args.backend, normalize=args.normalize)
    np.save(args.output, out)
    print(f"refined {1 if out.ndim == 2 else out.shape[0]} map(s) -> {args.output}")
    return 0


def _cmd_bench(args) -> int:
    from diffcam import bench

    return bench.main(args.rest)


def _eval_command(args) -> str:
    """The canonical command line that reproduces an ``eval`` run."""
    import shlex

    parts = ["diffcam", "eval", "--val", str(args.val), "--test", str(args.test),
             "--kinds", ",".join(args.kinds), "--cache", args.cache, "--out", args.out,
             "--boot", str(args.boot)]
    for flag, value in (("--weights", args.weights), ("--layer", args.layer),
                        ("--threads", args.threads)):
        if value is not None:
            parts += [flag, str(value)]
    if args.gold_if_wrong:
        parts.append("--gold-if-wrong")
    if args.refine_at != "image":
        parts += ["--refine-at", args.refine_at]
    return shlex.join(parts)


def _check_kinds_set_threads(args) -> None:
    """``--kinds`` must name question kinds of the shapes world; ``--threads`` sets torch's."""
    from diffcam.data import shapes

    bad = [k for k in args.kinds if k not in shapes.KINDS]
    if bad:
        raise ValueError(f"unknown question kind(s) {bad}; expected some of {shapes.KINDS}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _cmd_eval(args) -> int:
    import os
    import time

    from diffcam.models import tables

    if args.val < 1 or args.test < 1:
        raise ValueError("--val and --test need at least one scene each")
    _check_kinds_set_threads(args)
    t0 = time.perf_counter()
    report = tables.run_benchmark(val=args.val, test=args.test, kinds=args.kinds,
                                  cache_dir=args.cache, weights=args.weights, layer=args.layer,
                                  n_boot=args.boot, progress=not args.quiet,
                                  command=_eval_command(args), gold_if_wrong=args.gold_if_wrong,
                                  refine_at=args.refine_at)
    text = tables.render_markdown(report)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    sel = report["selection"]
    print(f"chosen SICD constants (val): {sel.constants()}")
    for row, _ in report["headline"]:
        print(f"  test {row.label:<45} F3 {100 * row.f3:6.2f} %  Obj-IoU {100 * row.obj_iou:6.2f} %"
              f"  ({row.n_maps} maps)")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _compare_command(args) -> str:
    """The canonical command line that reproduces a ``compare`` run."""
    import shlex

    parts = ["diffcam", "compare", "--test", str(args.test), "--models", ",".join(args.models),
             "--kinds", ",".join(args.kinds), "--sanity", str(args.sanity), "--faith",
             str(args.faith), "--faith-steps", str(args.faith_steps), "--cache",
             args.cache, "--out", args.out, "--boot", str(args.boot)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.json is not None:
        parts += ["--json", args.json]
    return shlex.join(parts)


def _cmd_compare(args) -> int:
    import os
    import time

    from diffcam.models import compare

    if args.sanity < 0 or args.faith < 0:
        raise ValueError("--sanity and --faith must be >= 0")
    if args.faith_steps < 1:
        raise ValueError("--faith-steps must be >= 1")
    _check_kinds_set_threads(args)
    t0 = time.perf_counter()
    report = compare.run(models=args.models, test=args.test, kinds=args.kinds,
                         cache_dir=args.cache, n_boot=args.boot, sanity=args.sanity,
                         progress=not args.quiet, command=_compare_command(args),
                         faith_scenes=args.faith, faith_steps=args.faith_steps)
    text = compare.render_markdown(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    if args.json:
        import json

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(compare.to_json(report), f, indent=2)
        os.replace(tmp, args.json)
    for kind, rep in report["models"].items():
        for row, _ in rep["rows"]:
            print(f"  {kind:<14} {row.label:<30} F3 {100 * row.f3:6.2f} %  "
                  f"Obj-IoU {100 * row.obj_iou:6.2f} %  ({row.n_maps} maps)")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _worker_arg(text: str):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--worker {text!r}: expected 0 <= I < N")
    return i, n


def _states_arg(text: str):
    out = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        if x == "final":
            out.append(x)
            continue
        try:
            out.append(int(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--states {text!r}: expected 'final' and/or step "
                                             f"numbers, comma-separated") from None
    if not out:
        raise argparse.ArgumentTypeError("--states is empty")
    return tuple(out)


def _threads_and_targets(args, phrases: bool = False):
    """Apply ``--threads`` (torch's CPU threads) and parse ``--targets`` (nouns | all | words;
    ``phrases`` where the command takes it)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.targets == "phrases" and not phrases:
        raise ValueError("--targets phrases applies to diffcam run (each sample's grounded "
                         "phrases); name the words or phrases here, comma-separated")
    if args.targets in ("nouns", "all", "phrases"):
        return args.targets
    return [w for w in args.targets.split(",") if w.strip()]


def _model_arg(text: str):
    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"--model-arg {text!r}: expected KEY=VALUE")
    import json

    try:
        value = json.loads(value)          # numbers, true/false, null, lists; else a string
    except ValueError:
        pass
    return key.strip(), value


def _load_model(args):
    import diffcam

    kw = dict(args.model_arg or [])
    if args.model_path is None and not kw:
        return diffcam.load(args.model)
    return diffcam.load(args.model, args.model_path, **kw)


def _explain_options(p) -> None:
    """The options ``diffcam run`` and ``diffcam explain`` share: model, targets, layer,
    states, method, threads."""
    p.add_argument("--model", default="bundled", help="model name for diffcam.load: bundled, "
                   "or a family (llada-v, lavida, mmada, dream-vl, diffusion-gemma) with "
                   "--model-path")
    p.add_argument("--model-path", default=None, help="checkpoint folder of a family model")
    p.add_argument("--model-arg", type=_model_arg, action="append", metavar="KEY=VALUE",
                   help="an argument of the model's loader, e.g. kind=autoregressive (bundled) "
                        "or torch_dtype=float16 (families); repeatable; JSON values")
    p.add_argument("--targets", default="nouns",
                   help="nouns | all | comma-separated words or phrases | phrases "
                        "(diffcam run: each sample's grounded phrases) (default nouns)")
    p.add_argument("--layer", type=int, default=None, help="hooked block (default: the adapter's)")
    p.add_argument("--states", type=_states_arg, default=("final",),
                   help="'final' and/or denoising steps, comma-separated (trajectory maps; "
                        "steps need generated answers)")
    p.add_argument("--method", default="diffusion-cam",
                   choices=("diffusion-cam", "grad-cam", "llava-cam", "tam"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _cmd_run(args) -> int:
    from diffcam.run import format_summary, run_dataset, summarize

    targets = _threads_and_targets(args, phrases=True)
    common = dict(targets=targets, layer=args.layer, states=args.states, method=args.method,
                  config=args.preset,
                  batch_size=args.batch, shard_size=args.shard, resume=not args.no_resume,
                  retry_errors=args.retry_errors, limit=args.limit,
                  save_refined=args.save_refined, prompt=args.prompt, answer=args.answer,
                  model_path=args.model_path, model_kwargs=dict(args.model_arg or []))
    if args.ray:
        from diffcam.run import run_dataset_ray

        stats = run_dataset_ray(args.model, args.dataset, args.out, workers=args.ray,
                                num_gpus_per_worker=args.gpus_per_worker,
                                progress=not args.quiet, **common)
    else:
        stats = run_dataset(args.model, args.dataset, args.out, worker=args.worker,
                            progress=not args.quiet, **common)
    print(f"explained {stats['done']}, already done {stats['skipped']}, errors "
          f"{stats['errors']} in {stats['seconds']:.1f} s -> {stats['out']}")
    if not args.quiet:
        print(format_summary(summarize(args.out)))
    return 0


def _cmd_explain(args) -> int:
    import os

    import diffcam
    from diffcam.attribution.images import load_image

    targets = _threads_and_targets(args)
    # what can fail without the model fails before loading it (seconds to minutes)
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    load_image(args.image)
    adapter = _load_model(args)
    with diffcam.Explainer(adapter, layer=args.layer) as ex:
        exp = ex.explain(args.image, args.prompt, targets=targets, method=args.method,
                         answer=args.answer, states=args.states)
    out = exp if args.raw else exp.refined(args.preset)
    path = out.save(args.out, overwrite=args.overwrite)
    print(f"answer: {exp.answer}")
    print(f"maps of {', '.join(exp.target_names)} ({'raw' if args.raw else args.preset}) -> "
          f"{path}")
    return 0


def _cmd_report(args) -> int:
    from diffcam.run import format_summary, summarize

    s = summarize(args.run)
    if args.scores:
        from diffcam.run import write_scores

        n = write_scores(args.run, args.scores)
        print(f"wrote {n} rows to {args.scores}", file=sys.stderr)
    if args.function_scores:
        from diffcam.run import write_scores

        n = write_scores(args.run, args.function_scores, which="function_words")
        print(f"wrote {n} rows to {args.function_scores}", file=sys.stderr)
    if args.gallery:
        from diffcam.run import gallery

        path = gallery(args.run, args.gallery, n=args.n, metric=args.metric)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        import json

        print(json.dumps(s, indent=1))
    else:
        print(format_summary(s))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffcam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the bundled model explains held-out scenes: overlays, maps "
                                    "and the paper's metrics")
    p.add_argument("--out", default="diffcam-demo")
    p.add_argument("--scenes", type=int, default=None, help="number of scenes (default 6; 8 "
                   "with --synthetic)")
    p.add_argument("--seed", type=int, default=0, help="first test scene (synthetic: RNG seed)")
    p.add_argument("--synthetic", action="store_true",
                   help="refinement core only, on synthetic maps (no torch needed)")
    p.add_argument("--backend", default=None)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("backends", help="list kernel backends")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("refine", help="refine maps stored in a .npy file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--preset", default="paper", choices=["paper", "reference"])
    p.add_argument("--backend", default=None)
    p.add_argument("--normalize", action="store_true")
    p.set_defaults(func=_cmd_refine)

    p = sub.add_parser("bench", help="run the benchmark suite", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("eval", help="the paper's ablation and sensitivity tables on the bundled "
                                    "benchmark (writes docs/benchmark.md)")
    p.add_argument("--val", type=int, default=150, help="val scenes (SICD constants chosen here)")
    p.add_argument("--test", type=int, default=200, help="test scenes (every table)")
    p.add_argument("--kinds", type=lambda s: tuple(k for k in s.split(",") if k),
                   default=("describe", "colour", "presence", "count"),
                   help="question kinds asked of every scene, comma-separated")
    p.add_argument("--cache", default="~/.cache/diffcam/eval",
                   help="folder of the cached maps (reruns are instant)")
    p.add_argument("--out", default="docs/benchmark.md", help="markdown file written")
    p.add_argument("--weights", default=None, help="model folder (default: the bundled weights)")
    p.add_argument("--layer", type=int, default=None, help="hooked block (default: the adapter's)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (use 1 on a busy machine: torch's thread pool slows "
                        "down by an order of magnitude when other processes take the cores)")
    p.add_argument("--gold-if-wrong", action="store_true",
                   help="also score the correct answer's maps (teacher forcing) when the model "
                        "answers wrongly")
    p.add_argument("--refine-at", choices=("image", "grid"), default="image",
                   help="refine the maps at the image's 96x96 resolution (upsampled first; "
                        "default) or on the 12x12 token grid")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="Diffusion-CAM against Grad-CAM, LLaVA-CAM and TAM on "
                                       "the bundled benchmark (writes docs/baselines.md)")
    p.add_argument("--test", type=int, default=200, help="test scenes")
    p.add_argument("--models", type=lambda s: tuple(k for k in s.split(",") if k),
                   default=("diffusion", "autoregressive"),
                   help="shipped models compared, comma-separated")
    p.add_argument("--kinds", type=lambda s: tuple(k for k in s.split(",") if k),
                   default=("describe", "colour", "presence", "count"),
                   help="question kinds asked of every scene, comma-separated")
    p.add_argument("--sanity", type=int, default=20,
                   help="test scenes of the randomisation check (0: skip it)")
    p.add_argument("--faith", type=int, default=10,
                   help="test scenes of the deletion / insertion curves (0: skip them)")
    p.add_argument("--faith-steps", type=int, default=10,
                   help="steps of the deletion / insertion curves")
    p.add_argument("--cache", default="~/.cache/diffcam/eval",
                   help="folder of the cached maps (reruns are instant)")
    p.add_argument("--out", default="docs/baselines.md", help="markdown file written")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the numbers as JSON here")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("run", help="explain a whole dataset into a resumable run folder")
    p.add_argument("dataset", help="shapes:SPLIT[:START:STOP[:KINDS]], coco:PATH, "
                   "grandf:PATH[|images=DIR][|keys=head|phrase] (GranD-f grounded captions) or "
                   "the path of a COCO-style dataset (instances json or its folder)")
    p.add_argument("--out", required=True, help="run folder (rerun the command to resume)")
    _explain_options(p)
    p.add_argument("--preset", default="paper", choices=("paper", "reference"),
                   help="refinement used for the scores (and --save-refined)")
    p.add_argument("--prompt", default=None, help="prompt of every image (COCO, GranD-f)")
    p.add_argument("--answer", default=None, choices=("gold", "caption"),
                   help="explain the expected answer (shapes: gold) or the first caption "
                        "(COCO, GranD-f: caption) instead of the model's own")
    p.add_argument("--batch", type=int, default=1, help="samples per forward/backward "
                   "(default 1, the fastest on a CPU; try 4-8 on a GPU)")
    p.add_argument("--shard", type=int, default=64, help="samples per committed shard")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--worker", type=_worker_arg, default=(0, 1), metavar="I/N",
                   help="take every N-th sample starting at I (run N of these to scale out)")
    p.add_argument("--ray", type=int, default=0, metavar="N",
                   help="start N workers as Ray tasks instead (needs ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray")
    p.add_argument("--no-resume", action="store_true", help="refuse an existing run folder")
    p.add_argument("--retry-errors", action="store_true",
                   help="explain again the samples that raised before")
    p.add_argument("--save-refined", action="store_true",
                   help="also store the refined maps (image resolution: large)")
    p.add_argument("--quiet", action="store_true", help="no progress, no summary")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("explain", help="explain one image: the answer, its maps and overlays")
    p.add_argument("image", help="image file (PNG, JPEG, ... read with Pillow)")
    p.add_argument("--prompt", default="<image> describe the image .",
                   help="the prompt, with the model's image marker (default: the bundled "
                        "model's describe prompt)")
    p.add_argument("--out", default="diffcam-explain", help="folder written (maps.npz, "
                   "manifest.json, one overlay PNG per word)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--answer", default=None, help="explain this answer instead of generating")
    _explain_options(p)
    p.add_argument("--preset", default="paper", choices=("paper", "reference"),
                   help="refinement of the saved maps")
    p.add_argument("--raw", action="store_true", help="save the raw maps, unrefined")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("report", help="counts and scores of a run folder")
    p.add_argument("run", help="run folder written by diffcam run")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--scores", default=None, metavar="PATH",
                   help="also write one row per scored map to PATH (.csv, or .parquet with "
                        "pyarrow)")
    p.add_argument("--function-scores", default=None, metavar="PATH",
                   help="also write one row per function-word map (the TAM protocol's "
                        "Func-IoU) to PATH (.csv or .parquet)")
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="also draw the --n worst and best maps (PNG strips + index.html)")
    p.add_argument("--n", type=int, default=8, help="maps at each end of the gallery")
    p.add_argument("--metric", default="refined_f3",
                   help="column of the score rows that orders the gallery")
    p.set_defaults(func=_cmd_report)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:          # the benchmark runner parses its own options
        from diffcam import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"diffcam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
