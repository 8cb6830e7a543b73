"""`cvrecipe <verb>`: a thin command line over the jobs (cvrecipe.train.job, cvrecipe.evaluate.job),
the data tools, export and serve. A recipe and its overrides are loaded and checked first, before
anything heavy is imported or any data is read.

Every failure ends here as one line on stderr naming the file, key or limit (`error: ...`), with
exit status 2 for bad input (an argument, a config, a data set, a file the user gave) and 1 for a
run that failed; `--debug` or CVRECIPE_DEBUG=1 prints the traceback as well. Arguments are checked
before any work starts (a model loaded, a port bound, data read).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cvrecipe.monitor import commands as monitor_commands
from cvrecipe.videofile import is_video

RECIPE_HELP = "a shipped recipe's name (`cvrecipe recipes` lists them; e.g. fashion-mnist) or a YAML file's path"
OVERRIDE_HELP = "dotted config overrides, e.g. optim.lr=0.01 train.epochs=5 data.subset=2000"


def _add_recipe_args(p: argparse.ArgumentParser, default: str | None = "fashion-mnist") -> None:
    p.add_argument("recipe", nargs="?", default=default, help=f"{RECIPE_HELP} (default: {default})")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def _embedder(spec: str | None, data: str):
    """--embed: None, "lite0" (the data layer builds it), or a run folder whose features embed (and,
    when `data` is the run's own, whose predictions rank the label errors of the splits it held out)."""
    if spec in (None, "lite0"):
        return spec
    from cvrecipe.artifact.features import run_embedder

    return run_embedder(spec, data)


def _model_normalizer(cfg, ds):
    """The Normalize of the model the recipe would build on `ds`: what the data page's model view shows."""
    from cvrecipe.artifact.build import build_model

    return build_model(cfg, ds).normalize


def _embedding_audit_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--embed", nargs="?", const="lite0", metavar="RUN",
                   help="also audit by embedding: near duplicates and train/test leakage confirmed on the pixels, "
                        "and likely label errors (a K-fold probe + cleanlab); embeddings from the pretrained "
                        "EfficientNet-Lite0 (--embed) or a trained run's features (--embed RUN)")
    q.add_argument("--embed-size", type=int, default=64, help="px side the images are resized to for Lite0 (default 64)")
    q.add_argument("--reference", metavar="DATA", help="with --embed: audit DATA against this dataset (e.g. a "
                                                       "`monitor export` folder against the training data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvrecipe", description="Train, evaluate, export and serve image models.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback too (also CVRECIPE_DEBUG=1); accepted anywhere")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("run", help="train a recipe, then evaluate it (the main job)",
                         description="Train the recipe in a new run folder, then evaluate its best checkpoint "
                                     "on the held-out split and write eval.json and report.html.")
    _add_recipe_args(p)
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the sanity checks before training (same as train.sanity=false)")

    p = verbs.add_parser("train", help="train a recipe (or resume a run)",
                         description="Train the recipe in a new folder runs/<name> (runs/<name>-2, ... if taken).")
    _add_recipe_args(p)
    p.add_argument("--resume", metavar="RUN", type=Path,
                   help="continue the run in folder RUN from its last.ckpt (recipe and overrides are ignored)")
    p.add_argument("--deterministic", action="store_true",
                   help="use deterministic kernels (same as train.deterministic=true)")
    p.add_argument("--no-sanity", action="store_true",
                   help="skip the sanity checks before training (same as train.sanity=false)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel processes on this machine, started through torchrun's launcher (same as "
                        "train.nproc=N; with --resume: the process count to go on with)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: start failed processes again up to K times, from the last checkpoint")
    p.add_argument("--keep-failed", action="store_true",
                   help="keep the folder of a new run that fails before its first epoch ends (removed by default)")

    p = verbs.add_parser("eval", help="evaluate a run's best checkpoint",
                         description="The metrics of the run's task for RUN/best.safetensors (accuracy, top-5, "
                                     "per-class precision/recall/F1 and confusion matrix; pixel accuracy, mIoU "
                                     "and Dice for masks; COCO mAP for boxes), printed and written to RUN/eval.json.")
    p.add_argument("run", type=Path, help="run folder (e.g. runs/fashion-mnist)")
    p.add_argument("--data", help="evaluate on this dataset instead of the run's own (name or folder:PATH)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="split to evaluate (default: test when the dataset has one, else val)")
    p.add_argument("--tta", type=int, choices=[0, 1, 2],
                   help="test-time augmentation: 0 off, 1 image + mirror, 2 also 1-pixel shifts (default: the "
                        "run's eval.tta)")

    p = verbs.add_parser("predict", help="top-k classes (or masks, or boxes) for image files",
                         description="Classify image files (folders are searched recursively) with RUN's best "
                                     "checkpoint; a segmentation model writes a mask PNG per image instead; a "
                                     "detector answers boxes in each image's own pixels. Given video files "
                                     "(.mp4, .mkv, .mov, ...), a detector writes each one's frames with their "
                                     "boxes drawn (H.264) and per-frame JSON, and prints frames per second.")
    p.add_argument("run", type=Path, help="run folder or a .safetensors checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders, or video files")
    p.add_argument("-k", "--top-k", type=int, help="classes (default 5) or boxes (default 100) per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", type=Path, help="segmentation: folder for the mask PNGs; video: for the annotated "
                                            "video and its JSON (default RUN/predictions)")
    p.add_argument("--overlay", action="store_true", help="segmentation: also write the mask over the image as a PNG")
    p.add_argument("--annotate", type=Path, metavar="DIR",
                   help="detection: also write each image with its boxes drawn on it into DIR (<name>.annotated.png)")

    p = verbs.add_parser("data", help="dataset tools: info, prepare, inspect, synth-detect, cells",
                         description="Inspect or pre-decode a dataset into the uint8 cache, or write a synthetic one.")
    sub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    for name, text in (("info", "print splits, classes, image shape and skipped files"),
                       ("prepare", "decode into the cache now (later runs load it in well under a second)")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("data", help="dataset name (fashion-mnist, mnist, cifar10, cifar100, digits) or folder:PATH")
        q.add_argument("--image-size", type=int, help="resize images to this square size")
        q.add_argument("--channels", type=int, choices=[1, 3], help="force grayscale (1) or RGB (3)")
    text = ("audit the data: class balance, sizes and modes, pixel statistics, unreadable files, exact and near "
            "duplicates, train/test leakage, samples, and a batch as the model sees it")
    q = sub.add_parser("inspect", help="audit a dataset into an HTML report and audit.json", description=text)
    q.add_argument("data", help="dataset name (fashion-mnist, mnist, cifar10, cifar100, digits) or folder:PATH")
    q.add_argument("--out", type=Path, default=Path("data-report"), help="output folder (default data-report)")
    q.add_argument("--recipe", help="recipe whose preprocessing and augmentation to show (default: none)")
    q.add_argument("overrides", nargs="*", help=f"{OVERRIDE_HELP}; applied to --recipe (e.g. augment.hflip=true)")
    _embedding_audit_options(q)

    text = ("write a seeded synthetic detection set: Fashion-MNIST items alpha-composited at random scales and "
            "tints onto upsampled photos, 1-6 per image, in YOLO layout and COCO JSON (docs/detection.md)")
    q = sub.add_parser("synth-detect", help="write a synthetic detection set (YOLO + COCO)", description=text)
    q.add_argument("out", type=Path, help="output folder")
    q.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    q.add_argument("--test", type=int, default=500, help="test images (default 500)")
    q.add_argument("--size", default="128-256", help="image side range in pixels, MIN-MAX (default 128-256)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--objects", default="fashion-mnist", help="dataset whose items are pasted (default fashion-mnist)")
    q.add_argument("--backgrounds", default="cifar10",
                   help="dataset of background photos: a name or folder:PATH (default cifar10)")

    text = ("write the ISBI 2012 cells as a detection set: one box per 4-connected component of the non-membrane "
            "pixels, per tile, class cell; images 24-29 are the test split (docs/detection.md)")
    q = sub.add_parser("cells", help="write the ISBI 2012 cells as a detection set (YOLO + COCO)", description=text)
    q.add_argument("out", type=Path, help="output folder")
    q.add_argument("--masks", help="the ISBI 2012 membranes, masks:PATH layout (default ../shared/data/"
                                   "isbi2012-membrane.tar.gz beside the checkout)")
    q.add_argument("--tile", type=int, default=256, help="tile side in pixels; 0 = whole images (default 256)")
    q.add_argument("--min-area", type=int, default=20, help="smallest component kept, in pixels (default 20)")

    p = verbs.add_parser("doctor", help="sanity checks for a recipe, without training",
                         description="Loss at init, overfitting one batch, a zero-input baseline and a "
                                     "shuffled-label leak test, on copies of the recipe's initial model. "
                                     "Exit status 1 when a check fails.")
    _add_recipe_args(p)

    p = verbs.add_parser("report", help="HTML report of a run: curves, confusion, calibration, Grad-CAM",
                         description="Write RUN/report.html and RUN/plots/*.png for RUN's best checkpoint.")
    p.add_argument("run", type=Path, help="run folder (e.g. runs/fashion-mnist)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the validation split and store it in best.safetensors' metadata")

    p = verbs.add_parser("export", help="export a run to ONNX or TorchScript, checked against the eager model",
                         description="Write RUN/export/model.onnx or model.pt plus model.json (preprocessing, class "
                                     "names, source, sha256). The export is checked on up to 1,000 images of the run's "
                                     "held-out split and refused if it does not match the eager model.")
    p.add_argument("run", type=Path, help="run folder (e.g. runs/fashion-mnist)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="file format (default onnx)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX: accept any batch size (needed for batching in `serve`); otherwise the batch is 1")
    p.add_argument("--half", action="store_true", help="fp16 weights and activations (looser parity tolerance)")
    p.add_argument("--max-images", type=int, default=1000, help="images used by the parity check (default 1000)")

    p = verbs.add_parser("serve", help="HTTP server with dynamic batching, a web page, health and metrics",
                         description="Serve a run, an export folder or a model file over HTTP: POST /v1/predict, "
                                     "/v1/predict/batch (classifiers) or /v1/segment (segmentation), GET / (web "
                                     "page), /healthz, /readyz, /v1/model, /metrics.")
    p.add_argument("source", type=Path, help="run folder, export folder (model.json) or .onnx/.pt/.safetensors file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "torch"], default="auto",
                   help="auto (default) uses ONNX Runtime when an ONNX export exists, else torch")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="images per forward pass; 1 = no batching (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="time a batch waits to fill up (default 5 ms)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="images that may wait before requests get 503 (default 256)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="answer 504 after this many seconds (default 10)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="answer 413 to larger bodies (default 10 MiB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="answer 413 to images whose header declares more pixels (width x height), before decoding "
                        "(default 40,000,000, as data.max_pixels)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on predict and admin routes")
    p.add_argument("--cors-origin", help="allow browser calls from this origin (default: CORS off)")
    p.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")
    p.add_argument("--ort-optimization", choices=["disable", "basic", "extended", "all"], default="all",
                   help="ONNX Runtime graph optimisation level (default all)")
    monitor_commands.add_serve_options(p)
    monitor_commands.add_parser(verbs)

    p = verbs.add_parser("tune", help="hyperparameter search with Optuna: pruned, resumable, shared by workers",
                         description="Search the space in SPACE over RECIPE's keys: each trial is a run folder "
                                     "runs/<study>/trial-NNN/, stopped early by the pruner when it falls behind. "
                                     "Run the same command again to resume (or on another machine, with a shared "
                                     "--storage, to add workers). Ends with runs/<study>/best.yaml, report.html "
                                     "and a table of the top trials.")
    p.add_argument("recipe", nargs="?", help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", help=f"{OVERRIDE_HELP}; applied to every trial")
    p.add_argument("--space", help="search space: a YAML file's path or a shipped space's name (e.g. digits-quick; "
                                    "`cvrecipe recipes` lists them)")
    p.add_argument("--trials", type=int, default=20, help="trial budget, counted over every run and worker (default 20)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study's database (default sqlite:///runs/<study>/study.db; "
                                     "postgresql+psycopg://USER:PASSWORD@HOST/DB to share it between machines)")
    p.add_argument("--study", help="study name (default <recipe name>-tune)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes, each with cores/K torch threads")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="default tpe")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median", help="default median")
    p.add_argument("--metric", help="per-epoch metric to optimise (default: the recipe's checkpoint.monitor)")
    p.add_argument("--direction", choices=["max", "min"], help="default: the recipe's checkpoint.mode for its monitor")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (give each machine its own)")
    p.add_argument("--heartbeat", type=int, default=10, metavar="S",
                   help="seconds between a running trial's heartbeats; a trial silent for 2x this is retried")
    p.add_argument("--report", metavar="STUDY", help="only rebuild STUDY's best.yaml and report.html from its storage")

    verbs.add_parser("models", help="list registered models", description="List the registered model names.")
    verbs.add_parser("recipes", help="list the shipped recipes and search spaces",
                     description="List the recipes and search spaces that ship with cvrecipe, each with its "
                                 "one-line description; any of them runs by name (`cvrecipe run NAME`).")

    p = verbs.add_parser("config", help="print a recipe's resolved config with each field's doc",
                         description="Resolve RECIPE with the overrides, check it, and print it as YAML with "
                                     "each field's doc; or explain one field (type, allowed values, default, doc).")
    _add_recipe_args(p)
    p.add_argument("--explain", metavar="KEY", help="explain one field, e.g. --explain average.name; "
                                                    "--explain paths: how the paths a recipe names are found")
    return parser


# Errors that mean the input was wrong (exit status 2); anything else is a failed run (1), unless the
# error says otherwise with an `exit_status` attribute.
BAD_INPUT = (ValueError, LookupError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CVRECIPE_DEBUG", "") not in ("", "0")
    argv = monitor_commands.expand([a for a in argv if a != "--debug"])
    parser = build_parser()
    # overrides may come after options (`train --deterministic optim.lr=0.1`): argparse leaves them over
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "recipe", None) and "=" in args.recipe and hasattr(args, "overrides"):
        # `cvrecipe train optim.lr=0.1`: no recipe named, only overrides of the default one
        args.overrides.insert(0, args.recipe)
        args.recipe = "fashion-mnist"
    console = Console(soft_wrap=True)
    try:
        _check_arguments(args)
        with _plain_warnings():
            return _dispatch(args, console)
    except KeyboardInterrupt:
        console.print("interrupted; the last completed epoch is saved in last.ckpt (resume with --resume RUN)")
        return 130
    except Exception as err:  # noqa: BLE001 - the boundary: whatever failed, the user gets one line
        if debug:
            traceback.print_exc()
        # stderr, where scripts look for it (stdout stays the command's answer, e.g. predict --json)
        Console(soft_wrap=True, stderr=True).print(f"[bold red]error:[/] {escape(error_line(err, debug))}",
                                                   highlight=False)
        return getattr(err, "exit_status", 2 if isinstance(err, BAD_INPUT) else 1)


@contextlib.contextmanager
def _plain_warnings():
    """cvrecipe's own warnings (files a dataset skipped, ...) as one `warning: ...` line each on
    stderr, without Python's file:line prefix and source line; other warnings as Python prints them."""
    with warnings.catch_warnings():
        python_shows = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if category.__module__.startswith("cvrecipe"):
                Console(soft_wrap=True, stderr=True).print(f"[yellow]warning:[/] {escape(str(message))}",
                                                           highlight=False)
            else:
                python_shows(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _check_arguments(args: argparse.Namespace) -> None:
    """Numbers argparse takes as any int but that only make sense in a range: refused before any work."""
    if args.verb == "predict" and args.top_k is not None and args.top_k < 1:
        raise ValueError(f"-k/--top-k {args.top_k}: expected 1 or more classes (or boxes) per image")
    if args.verb == "serve" and not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected a TCP port from 0 to 65535 (0: any free port)")
    if args.verb == "train" and args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: expected 1 or more processes")
    if args.verb == "train" and args.max_restarts < 0:
        raise ValueError(f"--max-restarts {args.max_restarts}: expected 0 or more")
    if args.verb == "tune" and (args.workers < 1 or args.trials < 1):
        raise ValueError(f"--workers {args.workers} --trials {args.trials}: expected at least 1 of each")
    if args.verb == "export" and args.max_images < 1:
        raise ValueError(f"--max-images {args.max_images}: expected 1 or more images for the parity check")


def error_line(err: BaseException, debug: bool = False, limit: int = 600) -> str:
    """`err` as one line: its message with line breaks folded; errors that are not cvrecipe's own
    messages (a library's, a bug) also get their type and a pointer to --debug."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError) and err.args:  # str() of a KeyError is the repr of its key
        key = err.args[0]
        text = " ".join(key.split()) if isinstance(key, str) and " " in key else f"missing key {key!r}"
    own = isinstance(err, BAD_INPUT) or type(err).__module__.startswith("cvrecipe")  # messages written for users
    if not own:
        text = f"{type(err).__name__}: {text}"
    if len(text) > limit:
        text = text[:limit] + " ..."
    return text if own or debug else f"{text} (cvrecipe --debug ... shows the traceback)"


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    from cvrecipe.config import load_config

    no_sanity = ["train.sanity=false"] if getattr(args, "no_sanity", False) else []
    if args.verb == "config":
        return _config(args, console)
    if args.verb in ("run", "train", "doctor"):
        extra = ["train.deterministic=true"] if getattr(args, "deterministic", False) else []
        cfg = load_config(args.recipe, args.overrides + extra + no_sanity)  # checked whole, before any data
    if args.verb == "run":
        from cvrecipe.evaluate.job import run

        run(args.recipe, args.overrides + no_sanity, console)
    elif args.verb == "train":
        from cvrecipe.train.job import train

        train(cfg, resume_dir=args.resume, console=console, keep_failed=args.keep_failed, nproc=args.nproc,
              max_restarts=args.max_restarts)
    elif args.verb == "eval":
        from cvrecipe.evaluate.job import evaluate

        evaluate(args.run, args.data, args.split, console, args.tta)
    elif args.verb == "predict" and any(is_video(path) for path in args.images):
        return _predict_videos(args, console)
    elif args.verb == "predict":
        refused = _refused_by_headers(args.run, args.images)
        if refused is not None:  # nothing to run a model on: answered without loading torch or the model
            _print_predictions([{"file": name, "error": reason} for name, reason in refused], args, console)
            return 2  # every file given was refused: the command did nothing it was asked
        from cvrecipe.evaluate.job import predict, prediction_lines

        results = predict(args.run, args.images, args.top_k, args.out, args.overlay, args.annotate)
        _print_predictions(results, args, console, prediction_lines)
        return 2 if results and all("error" in r for r in results) else 0
    elif args.verb == "data" and args.data_verb == "inspect":
        from cvrecipe.data.report import inspect_data

        inspect_data(args.data, args.out, args.recipe, args.overrides, console=console,
                     embed=_embedder(args.embed, args.data), reference=args.reference, embed_size=args.embed_size,
                     normalizer=_model_normalizer)
    elif args.verb == "data" and args.data_verb == "synth-detect":
        _synth_detect(args, console)
    elif args.verb == "data" and args.data_verb == "cells":
        _cells(args, console)
    elif args.verb == "data":
        _data(args, console)
    elif args.verb == "doctor":
        from cvrecipe.train.sanity import doctor

        results = doctor(cfg, console)
        return 1 if any(r.status == "fail" for r in results) else 0
    elif args.verb == "report":
        from cvrecipe.evaluate.job import report

        report(args.run, args.calibrate, console)
    elif args.verb == "export":
        _export(args, console)
    elif args.verb == "serve":
        from cvrecipe.serve import ServeSettings, serve

        serve(ServeSettings(args.source, args.backend, args.host, args.port, args.max_batch_size, args.max_wait_ms,
                            args.queue_size, args.timeout_s, args.max_body_mb, max_pixels=args.max_pixels,
                            token=args.token, cors_origin=args.cors_origin, ort_threads=args.ort_threads,
                            ort_optimization=args.ort_optimization,
                            monitor=monitor_commands.settings_from_args(args)))
    elif args.verb == "monitor":
        return monitor_commands.run(args, console)
    elif args.verb == "tune":
        return _tune(args, console)
    elif args.verb == "models":
        from cvrecipe.models import list_models, list_pretrained
        from cvrecipe.tasks import DEFAULT_TASK, entry, task_names

        console.print("\n".join(list_models(entry(DEFAULT_TASK).model_outputs)))
        for task in (t for t in task_names() if t != DEFAULT_TASK):
            console.print(f"\n{task} (task={task}):")
            console.print("\n".join(list_models(entry(task).model_outputs)))
        console.print("\npretrained (RGB, bring their own preprocessing; see finetune.* in the config):")
        console.print("\n".join(list_pretrained()), markup=False)
    elif args.verb == "recipes":
        _recipes(console)
    return 0


def _predict_videos(args: argparse.Namespace, console: Console) -> int:
    """`predict RUN clip.mp4 ...`: an annotated video and per-frame JSON per video, frames per second printed."""
    images = [path for path in args.images if not is_video(path)]
    if images:
        raise ValueError(f"{images[0]}: give either videos or images to one predict command, not both")
    if args.annotate:
        raise ValueError(f"--annotate {args.annotate}: for images; a video's annotated copy is written to --out")
    from cvrecipe.evaluate.video import predict_video

    results = []
    for path in args.images:  # each video's line as soon as it is done: a later bad file loses nothing
        results.append(predict_video(args.run, Path(path), args.out, args.top_k))
        if not args.json:
            console.print(escape(results[-1].line()), highlight=False)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    return 0


def _refused_by_headers(run: Path, images: list[str]) -> list[tuple[str, str]] | None:
    """When every file given to `predict` is refused by its header alone (a decompression bomb, not an
    image), those refusals; else None and the model runs. Reads no pixels and imports no torch."""
    from cvrecipe.config import load_run_config
    from cvrecipe.imagefile import MAX_PIXELS, expand_image_paths, refusals

    files = expand_image_paths(images)
    max_pixels = load_run_config(run).data.max_pixels if (run / "config.yaml").is_file() else MAX_PIXELS
    refused = refusals(files, max_pixels)
    return refused if files and len(refused) == len(files) else None


def _print_predictions(results: list[dict], args: argparse.Namespace, console: Console, lines=None) -> None:
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for line in lines(args.run, results) if lines else [f"{escape(r['file'])}: [red]unreadable[/] "
                                                        f"({escape(r['error'])})" for r in results]:
        console.print(line, highlight=False)


def _tune(args: argparse.Namespace, console: Console) -> int:
    try:
        import optuna  # noqa: F401  (an optional dependency)
    except ImportError:
        raise RuntimeError("cvrecipe tune needs Optuna: pip install 'cvrecipe[tune]'") from None
    from cvrecipe.tune import prepare, rebuild_report, tune

    if args.report:
        rebuild_report(args.report, args.storage, console)
        return 0
    if not args.recipe or not args.space:
        raise ValueError("cvrecipe tune needs a RECIPE and --space NAME_OR_FILE (or --report STUDY)")
    settings = prepare(args.recipe, args.overrides, args.space, args.trials, args.storage, args.study, args.sampler,
                       args.pruner, args.metric, args.direction, args.seed, args.heartbeat)
    try:
        tune(settings, args.workers, console)
    except KeyboardInterrupt:
        console.print("interrupted; ended trials are kept and running ones queued again: run the same command "
                      "to resume")
        return 130
    return 0


def _recipes(console: Console) -> None:
    from cvrecipe.config import RECIPES_DIR, SPACES_DIR, shipped_recipes

    recipes = shipped_recipes()
    width = max(len(name) for name, _ in recipes)
    console.print(f"recipes ({RECIPES_DIR}):", markup=False, highlight=False)
    for name, description in recipes:
        console.print(f"  {name:<{width}}  {description}", markup=False, highlight=False)
    spaces = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    console.print(f"\nsearch spaces for `cvrecipe tune RECIPE --space NAME`: {spaces}", markup=False, highlight=False)


def _config(args: argparse.Namespace, console: Console) -> int:
    from cvrecipe.config import described, explain, load_config

    if args.explain:
        print(explain(args.explain))
        return 0
    print(described(load_config(args.recipe, args.overrides)), end="")
    return 0


def _data(args: argparse.Namespace, console: Console) -> None:
    import time

    from cvrecipe.config import DataConfig
    from cvrecipe.data import load_source

    t0 = time.perf_counter()
    ds = load_source(args.data, DataConfig(name=args.data, image_size=args.image_size, channels=args.channels),
                     lazy=True)  # the images stay on disk: a dataset larger than memory prepares too
    seconds = time.perf_counter() - t0
    console.print(f"{ds.name}: {len(ds.classes)} classes, image (C, H, W) {ds.image_shape}, loaded in {seconds:.2f}s")
    for split in ("train", "val", "test"):
        part = getattr(ds, split)
        if part is not None:
            console.print(f"  {split:5s} {len(part):>7} images")
    console.print(f"  classes: {', '.join(ds.classes[:20])}{' ...' if len(ds.classes) > 20 else ''}")
    if ds.skipped:
        console.print(f"  [yellow]{len(ds.skipped)} unreadable file(s) skipped:")
        for name, reason in ds.skipped[:20]:
            console.print(f"    {name}: {reason}", highlight=False)


def _synth_detect(args: argparse.Namespace, console: Console) -> None:
    from cvrecipe.data import load_source
    from cvrecipe.data.dataset import DataError
    from cvrecipe.data.synth_source import write_set

    try:
        low, high = (int(v) for v in args.size.split("-"))
    except ValueError:
        raise DataError(f"--size {args.size}: expected MIN-MAX in pixels, e.g. 128-256") from None
    counts = write_set(args.out, load_source, args.objects, args.backgrounds, args.train, args.test, (low, high),
                       args.seed)
    for split, (images, boxes) in counts.items():
        console.print(f"{split}: {images} images, {boxes} boxes", highlight=False)
    console.print(f"written to {args.out} (data.yaml for YOLO, annotations/instances_*.json for COCO)",
                  highlight=False)


def _cells(args: argparse.Namespace, console: Console) -> None:
    from cvrecipe.data.cells import MASKS, cells_set

    counts = cells_set(args.out, args.masks or MASKS, tile=args.tile, min_area=args.min_area)
    for split, (images, boxes) in counts.items():
        console.print(f"{split}: {images} images, {boxes} boxes", highlight=False)
    console.print(f"written to {args.out} (data.yaml for YOLO, annotations/instances_*.json for COCO)",
                  highlight=False)


def _export(args: argparse.Namespace, console: Console) -> None:
    from cvrecipe.export import export_run
    from cvrecipe.monitor.profile import profile_run

    result = export_run(args.run, args.format, args.dynamic_batch, args.half, max_images=args.max_images)
    entry = result.manifest["files"][result.path.name]
    console.print(f"exported {result.path} ({entry['precision']}, {entry['bytes'] / 1e6:.2f} MB, "
                  f"sha256 {entry['sha256'][:12]})", highlight=False)
    console.print(f"parity vs eager model: {result.parity.summary()}", highlight=False)
    console.print(f"metadata: {result.path.parent / 'model.json'}", highlight=False)
    console.print(f"reference profile for monitoring: {profile_run(args.run, result.path.parent)}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
