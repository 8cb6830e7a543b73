"""Data-parallel training on this machine: throughput and loss curve for 1 and 2 processes (Gloo on CPU).

Each variant is a real `cvrecipe train` command line (the fashion-mnist-cnn recipe, the small CNN, on a
stratified subset, batch 256, no sanity checks), run in turn: one process (torch's default of one
thread per core), `--nproc 2` (one thread each, torchrun's default), and `--nproc 2` with
train.sync_bn=true. The global batch is the same in all of them, so the loss curves should agree
up to BatchNorm statistics (per process of 128 images unless sync_bn) and augmentation draws
(per process). Variants alternate over --rounds so that other load on the machine falls on all.

Printed per run: wall time of the command (process start, data, training, validation), images/s
of the epochs after the first (metrics.csv: training and validation), and per epoch train loss,
val loss and val accuracy.

    python bench/ddp.py                 # 12,000 images, 4 epochs, 2 rounds
    python bench/ddp.py --subset 3000 --epochs 2 --rounds 1
    python bench/ddp.py --recipe digits-quick --subset 200 --epochs 1 --rounds 1 --variants "1 process" "2 processes"
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "1 process": [],
    "2 processes": ["--nproc", "2"],
    "2 processes, sync_bn": ["--nproc", "2", "train.sync_bn=true"],
}


def run(variant: str, args, runs: Path) -> dict:
    name = variant.replace(" ", "").replace(",", "-")
    cmd = [sys.executable, "-m", "cvrecipe", "train", args.recipe, f"data.subset={args.subset}",
           f"train.epochs={args.epochs}", "train.batch_size=256", "train.sanity=false", f"runs_dir={runs}",
           f"name={name}", "checkpoint.every_s=3600", *args.overrides, *VARIANTS[variant]]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    run_dir = sorted(runs.glob(f"{name}*"), key=lambda p: p.stat().st_mtime)[-1]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rate = statistics.mean(float(r["images_per_s"]) for r in rows[1:] or rows)
    curve = [(float(r["train_loss"]), float(r["val_loss"]), float(r["val_acc"])) for r in rows]
    print(f"  {variant:22s} wall {wall:6.1f} s  {rate:7.0f} img/s (epochs 2+)  "
          + "  ".join(f"[{t:.3f} {v:.3f} {a:.3f}]" for t, v, a in curve), flush=True)
    return {"variant": variant, "wall": wall, "rate": rate, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=12000, help="training images (default 12,000)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--recipe", default="fashion-mnist-cnn", help="recipe to train (default fashion-mnist-cnn)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="overrides for the recipe, e.g. data.name=folder:PATH")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to run (default all; the first one listed is the 1x baseline)")
    args = parser.parse_args()
    print(f"{args.recipe}, {args.subset} training images, {args.epochs} epochs, global batch 256, "
          f"{os.cpu_count()} CPU cores; per epoch [train loss, val loss, val acc]")
    results = []
    with tempfile.TemporaryDirectory(prefix="cvrecipe-ddp-") as tmp:
        for _ in range(args.rounds):
            for variant in args.variants:
                results.append(run(variant, args, Path(tmp)))
    print()
    base = statistics.mean(r["rate"] for r in results if r["variant"] == args.variants[0])
    for variant in args.variants:
        mine = [r for r in results if r["variant"] == variant]
        rate, wall = statistics.mean(r["rate"] for r in mine), statistics.mean(r["wall"] for r in mine)
        last = [r["curve"][-1] for r in mine]
        print(f"{variant:22s} {rate:7.0f} img/s ({rate / base:.2f}x {args.variants[0]}), wall {wall:.1f} s, last epoch "
              f"train loss {statistics.mean(t for t, _, _ in last):.4f} val acc {statistics.mean(a for _, _, a in last):.4f}")


if __name__ == "__main__":
    main()
