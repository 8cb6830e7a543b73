"""The CIFAR-10 speedrun through cvrecipe's own training path: accuracy over seeds, training time,
framework overhead against a bare PyTorch loop, the data path's share of a step, peak memory.

    python bench/speedrun.py --runs 5                       # cifar10-speedrun, seeds 0..4
    python bench/speedrun.py --recipe cifar10-speedrun-muon --runs 5
    python bench/speedrun.py --recipe cifar10-speedrun-cpu --runs 3     # batches of 256, for CPUs
    python bench/speedrun.py --runs 1 --reference-steps 20 train.compile=true
    python bench/speedrun.py --runs 5 --phases --variant "train.epochs=11"   # + where fit()'s time goes,
                                                                            # + the same seeds at 11 epochs

Training time is `fit()` from the first step to the last (device-synchronised; on CUDA also timed
with CUDA events), after the dataset is already in memory. One-time costs — a warm-up run that
loads kernels, autotunes convolutions and (with train.compile) compiles the graph — are reported
separately and not counted. Accuracy is on the test split, with and without the recipe's TTA.

The reference loop runs the same network, optimizer and schedule on pre-made, pre-augmented
tensors with nothing else (no augmentation, averaging, logging or checkpoints): the ratio of
cvrecipe's time per step to it is the framework overhead.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from cvrecipe.config import load_config
from cvrecipe.data import load_dataset
from cvrecipe.data.augment import augment_batch
from cvrecipe.device import autocast, autocast_dtype, backend_settings, resolve_device, seed_everything
from cvrecipe.artifact.inference import predict_logits
from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.build import build_model
from cvrecipe.device import epoch_generator
from cvrecipe.tasks import get_task
from cvrecipe.train import book, loop
from cvrecipe.train.feed import DeviceArrays, Feed
from cvrecipe.train.loop import fit
from cvrecipe.train.optim import build_optimizer, build_scheduler


class Timer:
    """Wall time between start() and stop(), synchronising the device at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events = None

    def start(self) -> "Timer":
        self._sync()
        if self.device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.events:
            self.events[1].record()
        self._sync()
        self.seconds = time.perf_counter() - self.t0
        self.cuda_seconds = self.events[0].elapsed_time(self.events[1]) / 1000 if self.events else None
        return self.seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_once(cfg, ds, device, quiet: Console) -> tuple[Timer, list[dict], Path]:
    """One full fit() in a throw-away run folder: (its timer, the epoch history, the run folder)."""
    run_dir = Path(tempfile.mkdtemp(prefix="speedrun-"))
    timer = Timer(device).start()
    history = fit(cfg, ds, run_dir, console=quiet)
    timer.stop()
    return timer, history, run_dir


def test_accuracy(run_dir: Path, ds, device, tta: int) -> float:
    model = load_model(run_dir / "best.safetensors", device)
    logits = predict_logits(model, ds.test.x, 1000, device, tta=tta)
    return (logits.argmax(1) == torch.from_numpy(ds.test.y)).float().mean().item()


def reference_loop(cfg, ds, device, steps: int) -> float:
    """Seconds per step of a bare PyTorch loop: same net/optimizer/schedule, pre-made batches,
    under the same backend settings as fit() (cuDNN autotuning on CUDA, thread count)."""
    with backend_settings(device, cfg.train.deterministic, cfg.train.num_threads):
        return _reference_loop(cfg, ds, device, steps)


def _reference_loop(cfg, ds, device, steps: int) -> float:
    tc = cfg.train
    seed_everything(tc.seed)
    dtype = autocast_dtype(device, tc.precision)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = build_model(cfg, ds).to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    gen = epoch_generator(tc.seed, 0, device)
    x_all, y_all = torch.from_numpy(ds.train.x).to(device), torch.from_numpy(ds.train.y).to(device)
    batches = []  # pre-augmented, contiguous in the training memory format: nothing left to do per step
    for _ in range(min(steps, 8)):
        idx = torch.randint(0, len(y_all), (tc.batch_size,), generator=gen, device=device)
        x = augment_batch(x_all[idx], cfg.augment, ds.hflip_ok, gen).contiguous(memory_format=memory_format)
        batches.append((x, y_all[idx]))

    def step(x, y):
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    for x, y in batches[:2]:  # warm-up, not timed
        step(x, y)
    timer = Timer(device).start()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return timer.stop() / steps


def data_path_seconds(cfg, ds, device) -> float:
    """Seconds per batch to gather, augment and lay out one epoch's training batches, exactly as
    the loop does it (cvrecipe.train.feed.Feed; on a GPU, several batches at once)."""
    tc = cfg.train
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    source = DeviceArrays(torch.from_numpy(ds.train.x).to(device), torch.from_numpy(ds.train.y).to(device))
    steps = len(source) // tc.batch_size
    base_flip = torch.rand(len(source), generator=epoch_generator(tc.seed, -1, device), device=device) < 0.5
    feed = Feed(source, get_task(cfg.task, cfg), cfg.augment, ds.hflip_ok, base_flip, tc.batch_size, steps,
                memory_format=memory_format)
    gen = epoch_generator(tc.seed, 0, device)
    order = torch.randperm(len(source), generator=gen, device=device)
    for _ in feed.epoch(order, gen, 0):  # warm-up, not timed
        pass
    timer = Timer(device).start()
    for _ in feed.epoch(order, gen, 1):
        pass
    return timer.stop() / steps


class PhaseTimes:
    """Device-synchronised time spent in the named functions of the training loop and its
    bookkeeping (cvrecipe.train.loop, cvrecipe.train.book) during a fit()."""

    PHASES = ((loop, "build_model"), (loop, "_train_epoch"), (loop, "_averaged"), (loop, "_validate"),
              (loop, "Finetune"), (book.EpochBook, "_log"), (book, "save_weights"), (book, "save_resume"),
              (book, "SummaryWriter"))

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.saved = device, {}, {}

    def __enter__(self) -> "PhaseTimes":
        for owner, name in self.PHASES:
            self.saved[owner, name] = getattr(owner, name)
            setattr(owner, name, self._timed(name, self.saved[owner, name]))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in self.saved.items():
            setattr(owner, name, fn)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            timer = Timer(self.device).start()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + timer.stop()
        return timed


def run_seeds(cfg, ds, device, seeds, quiet: Console) -> list[dict]:
    runs = []
    for seed in seeds:
        cfg.train.seed = seed
        timer, history, run_dir = train_once(cfg, ds, device, quiet)
        seconds, cuda_seconds = timer.seconds, timer.cuda_seconds
        # epochs = training steps + end-of-epoch averaging/validation; the rest of fit() is set-up
        # (model, whitening from data, dataset to device) and checkpoints and logs
        epoch_seconds = sum(row["epoch_time_s"] for row in history)
        accuracy = test_accuracy(run_dir, ds, device, cfg.eval.tta)
        plain = test_accuracy(run_dir, ds, device, 0)
        runs.append({"seed": seed, "train_seconds": seconds, "cuda_event_seconds": cuda_seconds,
                     "epoch_seconds": epoch_seconds, "setup_and_checkpoint_seconds": seconds - epoch_seconds,
                     "epoch_times": [row["epoch_time_s"] for row in history],
                     "test_accuracy": accuracy, "test_accuracy_no_tta": plain})
        print(f"seed {seed}: test accuracy {accuracy * 100:.2f}% (TTA {cfg.eval.tta}), {plain * 100:.2f}% without; "
              f"training {seconds:.2f}s" + (f" (CUDA events {cuda_seconds:.2f}s)" if cuda_seconds else "")
              + f" = epochs {epoch_seconds:.2f}s + set-up/checkpoints/logs {seconds - epoch_seconds:.2f}s",
              flush=True)
    return runs


def summarise(runs: list[dict]) -> dict:
    def mean_std(key):
        values = [r[key] for r in runs]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    (acc, acc_sd), (plain, plain_sd) = mean_std("test_accuracy"), mean_std("test_accuracy_no_tta")
    (secs, secs_sd), (epochs, _) = mean_std("train_seconds"), mean_std("epoch_seconds")
    return {"runs": runs, "test_accuracy_mean": acc, "test_accuracy_std": acc_sd, "test_accuracy_no_tta_mean": plain,
            "test_accuracy_no_tta_std": plain_sd, "train_seconds_mean": secs, "train_seconds_std": secs_sd,
            "epoch_seconds_mean": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.compile=true")
    parser.add_argument("--recipe", default="cifar10-speedrun")
    parser.add_argument("--runs", type=int, default=5, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+runs-1")
    parser.add_argument("--variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="also run the same seeds with these overrides on top (repeatable)")
    parser.add_argument("--phases", action="store_true",
                        help="one more run that reports the time of each part of fit() (device-synchronised)")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="steps of the bare reference loop (default: one epoch's worth)")
    parser.add_argument("--warmup-images", type=int, default=4096, help="training images in the warm-up run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_intermixed_args()  # overrides may come before and after the options
    quiet = Console(quiet=True)

    cfg = load_config(args.recipe, args.overrides)
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    load_seconds = time.perf_counter() - t0
    steps_per_epoch = len(ds.train) // cfg.train.batch_size
    print(f"{args.recipe} {' '.join(args.overrides)} on {device} ({_hardware(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; data ready in {load_seconds:.1f}s; "
          f"{cfg.train.epochs} epochs x {steps_per_epoch} steps of {cfg.train.batch_size}", flush=True)

    # one-time costs: a short run on a few thousand images (kernels, autotuning, compilation)
    warm = load_config(args.recipe, [*args.overrides, "train.epochs=1", f"data.subset={args.warmup_images}"])
    warm_ds = load_dataset(warm.data, seed=0)
    warmup_seconds = train_once(warm, warm_ds, device, quiet)[0].seconds
    print(f"warm-up (one-time, not counted): {warmup_seconds:.1f}s", flush=True)

    seeds = range(args.first_seed, args.first_seed + args.runs)
    summary = {"recipe": args.recipe, "overrides": args.overrides, "device": str(device), "hardware": _hardware(device),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "warmup_seconds": warmup_seconds,
               **summarise(run_seeds(cfg, ds, device, seeds, quiet))}

    if args.phases:
        with PhaseTimes(device) as phases:
            total = train_once(cfg, ds, device, quiet)[0].seconds
        summary["phases"] = {**phases.seconds, "rest": total - sum(phases.seconds.values()), "total": total}
        print("where fit() spends its time (one more run): "
              + ", ".join(f"{k} {v:.3f}s" for k, v in summary["phases"].items()), flush=True)

    ref_steps = args.reference_steps or steps_per_epoch
    reference = reference_loop(cfg, ds, device, ref_steps)
    data_seconds = data_path_seconds(cfg, ds, device)
    framework = summary["train_seconds_mean"] / (cfg.train.epochs * steps_per_epoch)
    in_epochs = summary["epoch_seconds_mean"] / (cfg.train.epochs * steps_per_epoch)
    summary.update({
        "cvrecipe_step_seconds": framework, "cvrecipe_step_seconds_in_epochs": in_epochs,
        "reference_step_seconds": reference, "overhead_ratio": framework / reference,
        "overhead_ratio_in_epochs": in_epochs / reference, "data_path_seconds_per_batch": data_seconds,
        "data_path_fraction": data_seconds / in_epochs,
        "peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_device_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    })
    s = summary
    print(f"\ntest accuracy {s['test_accuracy_mean'] * 100:.2f} ± {s['test_accuracy_std'] * 100:.2f} % "
          f"(n={args.runs}, TTA {cfg.eval.tta}; {s['test_accuracy_no_tta_mean'] * 100:.2f} ± "
          f"{s['test_accuracy_no_tta_std'] * 100:.2f} % without TTA)")
    print(f"training time {s['train_seconds_mean']:.2f} ± {s['train_seconds_std']:.2f} s per run "
          f"(warm-up {warmup_seconds:.1f} s once, not counted); of which epochs {s['epoch_seconds_mean']:.2f} s, "
          f"set-up, checkpoints and logs {s['train_seconds_mean'] - s['epoch_seconds_mean']:.2f} s")
    print(f"time per step: cvrecipe {framework * 1000:.2f} ms (whole fit() / steps; {in_epochs * 1000:.2f} ms "
          f"inside the epochs), bare PyTorch loop {reference * 1000:.2f} ms -> ratio {s['overhead_ratio']:.3f} "
          f"({s['overhead_ratio_in_epochs']:.3f} inside the epochs)")
    print(f"data path (gather + augment): {data_seconds * 1000:.2f} ms per batch = "
          f"{s['data_path_fraction'] * 100:.2f} % of a step")
    print(f"peak host memory {s['peak_host_memory_gib']:.2f} GiB"
          + (f", peak device memory {s['peak_device_memory_gib']:.2f} GiB" if s["peak_device_memory_gib"] else ""))

    summary["variants"] = {}
    for variant in args.variant:
        print(f"\n== variant: {variant}", flush=True)
        vcfg = load_config(args.recipe, [*args.overrides, *variant.split()])
        v = summary["variants"][variant] = summarise(run_seeds(vcfg, ds, device, seeds, quiet))
        print(f"variant {variant}: test accuracy {v['test_accuracy_mean'] * 100:.2f} ± {v['test_accuracy_std'] * 100:.2f} % "
              f"({v['test_accuracy_no_tta_mean'] * 100:.2f} ± {v['test_accuracy_no_tta_std'] * 100:.2f} % without TTA), "
              f"training {v['train_seconds_mean']:.2f} ± {v['train_seconds_std']:.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
