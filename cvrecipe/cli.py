"""`cvrecipe <verb>`: a thin command line over cvrecipe.runs and cvrecipe.data."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

RECIPE_HELP = "recipe name in recipes/ (e.g. fashion-mnist) or path to a YAML file"
OVERRIDE_HELP = "dotted config overrides, e.g. train.lr=0.01 train.epochs=5 data.subset=2000"


def _add_recipe_args(p: argparse.ArgumentParser, default: str | None = "fashion-mnist") -> None:
    p.add_argument("recipe", nargs="?", default=default, help=f"{RECIPE_HELP} (default: {default})")
    p.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvrecipe", description="Train, evaluate and use image classifiers.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("run", help="train a recipe, then evaluate it (the main job)",
                         description="Train the recipe in a new run folder, then evaluate its best checkpoint "
                                     "on the held-out split and write eval.json.")
    _add_recipe_args(p)

    p = verbs.add_parser("train", help="train a recipe (or resume a run)",
                         description="Train the recipe in a new folder runs/<name> (runs/<name>-2, ... if taken).")
    _add_recipe_args(p)
    p.add_argument("--resume", metavar="RUN", type=Path,
                   help="continue the run in folder RUN from its last.ckpt (recipe and overrides are ignored)")
    p.add_argument("--deterministic", action="store_true",
                   help="use deterministic kernels (same as train.deterministic=true)")

    p = verbs.add_parser("eval", help="evaluate a run's best checkpoint",
                         description="Accuracy, top-5, per-class precision/recall/F1 and confusion matrix "
                                     "of RUN/best.safetensors, printed and written to RUN/eval.json.")
    p.add_argument("run", type=Path, help="run folder (e.g. runs/fashion-mnist)")
    p.add_argument("--data", help="evaluate on this dataset instead of the run's own (name or folder:PATH)")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="split to evaluate (default: test when the dataset has one, else val)")

    p = verbs.add_parser("predict", help="top-k classes for image files",
                         description="Classify image files (folders are searched recursively) with RUN's best checkpoint.")
    p.add_argument("run", type=Path, help="run folder or a .safetensors checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-k", "--top-k", type=int, default=5, help="number of classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = verbs.add_parser("data", help="dataset tools: info, prepare",
                         description="Inspect or pre-decode a dataset into the uint8 cache.")
    sub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    for name, text in (("info", "print splits, classes, image shape and skipped files"),
                       ("prepare", "decode into the cache now (later runs load it in well under a second)")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("data", help="dataset name (fashion-mnist, mnist, cifar10, cifar100, digits) or folder:PATH")
        q.add_argument("--image-size", type=int, help="resize images to this square size")
        q.add_argument("--channels", type=int, choices=[1, 3], help="force grayscale (1) or RGB (3)")

    verbs.add_parser("models", help="list registered models", description="List the registered model names.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`train --deterministic train.lr=0.1`): argparse leaves them over
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console(soft_wrap=True)
    try:
        return _dispatch(args, console)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; the last completed epoch is saved in last.ckpt (resume with --resume RUN)")
        return 130


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    from cvrecipe import runs
    from cvrecipe.config import load_config

    if args.verb == "run":
        runs.run(args.recipe, args.overrides, console)
    elif args.verb == "train":
        overrides = args.overrides + (["train.deterministic=true"] if args.deterministic else [])
        cfg = load_config(args.recipe, overrides)
        runs.train(cfg, resume_dir=args.resume, console=console)
    elif args.verb == "eval":
        runs.evaluate(args.run, args.data, args.split, console)
    elif args.verb == "predict":
        _print_predictions(runs.predict(args.run, args.images, args.top_k), args.json, console)
    elif args.verb == "data":
        _data(args, console)
    elif args.verb == "models":
        from cvrecipe.models import list_models

        console.print("\n".join(list_models()))
    return 0


def _print_predictions(results: list[dict], as_json: bool, console: Console) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        if "error" in r:
            console.print(f"{r['file']}: [red]unreadable[/] ({r['error']})", highlight=False)
        else:
            top = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            console.print(f"{r['file']}: {top}", highlight=False)


def _data(args: argparse.Namespace, console: Console) -> None:
    import time

    from cvrecipe.config import DataConfig
    from cvrecipe.data import load_source

    t0 = time.perf_counter()
    ds = load_source(args.data, DataConfig(name=args.data, image_size=args.image_size, channels=args.channels))
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


if __name__ == "__main__":
    sys.exit(main())
