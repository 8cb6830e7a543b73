"""Training from data larger than memory: streamed from the cache's shards against the in-memory path.

Generates a dataset of at least 3x the memory budget (default 6 GB of 64x64 RGB images against
data.memory_gb=2) as a cache entry of shards (the layout `cvrecipe data prepare` writes), then
trains the speedrun net at 64 px (the cifar10-speedrun-cpu recipe: bf16, batch 256) for a fixed
number of steps, each variant in its own process so that its peak resident memory is its own:

- memory:   the in-memory path (DeviceArrays) on the first images that fit the budget (per-step
            cost does not depend on how many images there are);
- stream:   the streamed path (ShardStream) over the whole dataset, in a random order across all
            shards, with the page cache warm (the files were just written);
- cold:     the same with the shards' pages dropped from the page cache first (posix_fadvise);
- workset:  the in-memory path on 2,048 images: the model's working set (torch, weights,
            activations), the baseline the others' peak memory is compared with.

Variants alternate (memory, stream, memory, stream, ...) so that load from other processes on the
machine falls on both. Printed: images/s per run, the stream/memory ratio, the share of each step
spent waiting for data, peak RSS (VmHWM) against budget + working set. The dataset is deleted at
the end unless --keep.

    python bench/stream.py                       # 6 GB, budget 2 GB, 20 timed steps per run, 2 rounds
    python bench/stream.py --gb 0.5 --budget-gb 0.15 --steps 5 --rounds 1   # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 64
CLASSES = 10
WARMUP_STEPS = 3  # not timed: allocator and kernel warm-up


def generate(entry: Path, gb: float, test: int = 2048, seed: int = 0) -> int:
    """A cache entry of `gb` GB of class-patterned 64x64 RGB training images (+ a small test split)."""
    from cvrecipe.data.cache import EntryWriter

    n = int(gb * 1e9) // (3 * SIZE * SIZE)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n + test)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    with EntryWriter(entry) as out:
        for split, first, count in (("train", 0, n), ("test", n, test)):
            writer = out.sharded(f"{split}_x", count, (3, SIZE, SIZE), np.uint8)
            for start in range(0, count, 4096):
                y = labels[first + start:first + min(start + 4096, count)]
                period = (4 + y % 5)[:, None, None]
                stripes = np.where((y % 2 == 0)[:, None, None], xx // period, yy // period) % 2
                base = stripes * 150 + rng.integers(0, 90, (len(y), SIZE, SIZE))
                images = np.stack([base * (0.5 + 0.25 * ((y[:, None, None] + c) % 3)) for c in range(3)], 1)
                writer.write_block(start, np.clip(images, 0, 255).astype(np.uint8))
            writer.close()
            out.add(f"{split}_y", labels[first:first + count].astype(np.int64))
        out.commit({"classes": [str(c) for c in range(CLASSES)], "hflip_ok": True})
    for path in entry.rglob("*.npy"):
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # written through, so the cold run can drop the pages
    return n


def drop_page_cache(entry: Path) -> None:
    for path in entry.rglob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    """One variant: build the real Step and Feed (cvrecipe.train.loop) and time `steps` steps."""
    import torch

    from cvrecipe.artifact.build import build_model
    from cvrecipe.config import load_config
    from cvrecipe.data import ImageDataset, Split
    from cvrecipe.data.cache import load_arrays
    from cvrecipe.device import autocast, backend_settings, seed_everything
    from cvrecipe.tasks import get_task
    from cvrecipe.train import loop
    from cvrecipe.train.distributed import World
    from cvrecipe.train.finetune import Finetune

    if args.variant == "cold":
        drop_page_cache(args.entry)
    cfg = load_config("cifar10-speedrun-cpu", [f"train.batch_size={args.batch}", f"data.memory_gb={args.budget_gb}",
                                               *args.overrides])
    arrays, meta = load_arrays(args.entry, lazy=True)
    x, y = arrays["train_x"], arrays["train_y"]
    if args.variant in ("memory", "workset"):
        fit_rows = 2048 if args.variant == "workset" else int(args.budget_gb * 2**30 * 0.9) // (3 * SIZE * SIZE)
        fit_rows = min(fit_rows, len(y))  # a small --gb may hold fewer images than that
        x, y = np.asarray(x.take(np.arange(fit_rows))), y[:fit_rows]  # read whole: the in-memory path
    ds = ImageDataset("generated", meta["classes"], train=Split(x, y), val=Split(x.take(np.arange(0)) if
                      not isinstance(x, np.ndarray) else x[:0], y[:0]))
    device = torch.device("cpu")
    with backend_settings(device, False, None):
        seed_everything(0)
        task = get_task("classification")
        source = loop._training_source(cfg, ds, device)
        mf = torch.channels_last
        model = build_model(cfg, ds, source.x if isinstance(source, loop.DeviceArrays) else None).to(device, memory_format=mf)
        step = loop._build_step(cfg, task, model, Finetune(model, cfg.finetune, 1), source, True, device, mf, World())
        step.train_model = model
        batches = _epochs(step.feed, len(source), device)  # the workset's 2,048 images are 8 steps an epoch
        waits, totals = [], []
        for i in range(WARMUP_STEPS + args.steps):
            t0 = time.perf_counter()
            bx, by = next(batches)
            t1 = time.perf_counter()
            step.optimizer.zero_grad(set_to_none=True)
            with autocast(device, step.dtype):
                loss = task.loss(step.train_model(bx), by, cfg.train.label_smoothing)
            loss.backward()
            step.optimizer.step()
            step.scheduler.step()
            loss.item()
            if i >= WARMUP_STEPS:
                waits.append(t1 - t0)
                totals.append(time.perf_counter() - t0)
        batches.close()
    print(json.dumps({"variant": args.variant, "images_per_s": args.steps * args.batch / sum(totals),
                      "wait_share": sum(waits) / sum(totals), "step_s": float(np.median(totals)),
                      "peak_rss": peak_rss(), "rows": len(x), "loss": float(loss)}))


def _epochs(feed, n: int, device):
    """The feed's batches, epoch after epoch (each epoch's order drawn as the loop draws it)."""
    import contextlib

    import torch

    from cvrecipe.device import epoch_generator

    epoch = 0
    while True:
        gen = epoch_generator(0, epoch, device)
        order = torch.randperm(n, generator=gen, device=device)
        with contextlib.closing(feed.epoch(order, gen, epoch)) as batches:
            yield from batches
        epoch += 1


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--entry", str(args.entry), "--steps", str(args.steps),
           "--batch", str(args.batch), "--budget-gb", str(args.budget_gb), "--set", *args.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {variant:8s} {result['images_per_s']:7.1f} img/s  step {result['step_s']:.2f} s  "
          f"waiting for data {result['wait_share']:6.1%}  peak RSS {result['peak_rss'] / 2**30:.2f} GiB  "
          f"({result['rows']:,} images)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=6.0, help="dataset size in GB (default 6)")
    parser.add_argument("--budget-gb", type=float, default=2.0, help="data.memory_gb (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="memory/stream pairs (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="where to generate (default: a temp dir under /work)")
    parser.add_argument("--keep", action="store_true", help="keep the generated dataset")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="overrides for cifar10-speedrun-cpu, e.g. model.kwargs.widths=[8,16,16] for a quick check")
    parser.add_argument("--child", choices=["memory", "stream", "cold", "workset"], help=argparse.SUPPRESS)
    parser.add_argument("--entry", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)

    base = args.dir or Path(tempfile.mkdtemp(prefix="cvrecipe-stream-", dir="/work" if Path("/work").is_dir() else None))
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < args.gb * 1e9 * 1.2 + 2e9:
        raise SystemExit(f"{base}: {free / 1e9:.1f} GB free, the benchmark needs {args.gb * 1.2 + 2:.1f} GB")
    args.entry = base / "entry"
    try:
        t0 = time.perf_counter()
        n = generate(args.entry, args.gb)
        size = sum(p.stat().st_size for p in args.entry.rglob("*.npy"))
        print(f"generated {n:,} images, {size / 1e9:.2f} GB in {len(list(args.entry.rglob('*.npy')))} files, "
              f"{time.perf_counter() - t0:.0f} s; budget data.memory_gb={args.budget_gb} "
              f"({size / (args.budget_gb * 2**30):.1f}x smaller than the data)", flush=True)
        results = [run_child(args, "workset")]
        for _ in range(args.rounds):
            results += [run_child(args, "memory"), run_child(args, "stream")]
        results.append(run_child(args, "cold"))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    summarise(results, args)


def summarise(results: list[dict], args) -> None:
    by = {v: [r for r in results if r["variant"] == v] for v in ("workset", "memory", "stream", "cold")}
    rate = {v: float(np.mean([r["images_per_s"] for r in rs])) for v, rs in by.items() if rs}
    pairs = [s["images_per_s"] / m["images_per_s"] for m, s in zip(by["memory"], by["stream"])]
    workset = by["workset"][0]["peak_rss"]
    budget = args.budget_gb * 2**30
    print(f"\nstreamed / in-memory images/s: {np.mean(pairs):.1%} (per pair: "
          f"{', '.join(f'{p:.1%}' for p in pairs)}); cold page cache: {rate['cold'] / rate['memory']:.1%}")
    print(f"waiting for data: {np.mean([r['wait_share'] for r in by['stream']]):.1%} of a streamed step warm, "
          f"{by['cold'][0]['wait_share']:.1%} cold, {np.mean([r['wait_share'] for r in by['memory']]):.1%} in memory")
    stream_peak = max(r["peak_rss"] for r in by["stream"] + by["cold"])
    print(f"peak RSS: streamed {stream_peak / 2**30:.2f} GiB, budget + working set "
          f"{(budget + workset) / 2**30:.2f} GiB (working set {workset / 2**30:.2f} GiB): "
          f"{'under' if stream_peak <= budget + workset else 'OVER'}; streamed above the working set "
          f"{(stream_peak - workset) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
