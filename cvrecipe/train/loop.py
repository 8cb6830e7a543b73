"""The training loop. Reads top to bottom: set up → (resume) → epochs → checkpoints.

Each step takes a batch from the feed (feed.py: the whole uint8 training set on the device when it
fits the memory budget, else read from the cache's shards on disk ahead of the step), augmented
with batched tensor ops on the device, and runs forward/backward. Data order and augmentation draw
from a generator seeded by (seed, epoch), and the resume file stores everything else that changes
(weights, optimizer, scheduler, scaler, global RNG, early-stopping state, history), so a resumed
run replays exactly what an uninterrupted one would have done.

With several processes (distributed.py) every rank runs this same loop on its own part of each
step's global batch; the World it is given does the collectives, and is a no-op for one process.

What differs between tasks (loss, augmentation of image and target, metrics) comes from the
task object; what happens between epochs (logs, best checkpoint, early stopping, last.ckpt) from
the EpochBook (book.py), which the feature-cached probe (probe.py) shares.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cvrecipe.artifact.build import build_model
from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.artifact.inference import inference_batch_size, iter_logits
from cvrecipe.config import Config
from cvrecipe.data import ImageDataset, streamed
from cvrecipe.data.shards import slice_rows
from cvrecipe.device import autocast, autocast_dtype, backend_settings, epoch_generator, seed_everything
from cvrecipe.models import ImageModel
from cvrecipe.tasks import Task, get_task
from cvrecipe.train.book import EpochBook, FollowerBook, split_metrics
from cvrecipe.train.distributed import World
from cvrecipe.train.ema import WeightEMA
from cvrecipe.train.feed import DeviceArrays, Feed, ShardStream
from cvrecipe.train.finetune import Finetune
from cvrecipe.train.optim import build_optimizer, param_groups
from cvrecipe.train.precision import MasterWeights, to_half_weights


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@dataclass
class Step:
    """What one optimisation step needs, built once per fit()."""
    task: Task
    model: ImageModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    feed: Feed  # this rank's augmented micro-batches of each epoch
    world: World
    steps_per_epoch: int
    batch_size: int  # the global batch: images per optimisation step over all ranks
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None with half weights (the weights are the dtype)
    memory_format: torch.memory_format
    train_model: torch.nn.Module | None = None  # what the step calls: the model, compiled and/or in DDP
    master: MasterWeights | None = None  # fp32 copies the optimizer updates, with train.half_weights
    cpu_deadline: float | None = None  # time.process_time() at which train.budget_s is spent

    def over_budget(self) -> bool:
        """Has train.budget_s been spent? With several processes, when any rank has spent it (one
        all-reduce of a scalar per step, only with a budget), so that every rank stops at the same step."""
        if self.cpu_deadline is None:
            return False
        over = torch.tensor(float(time.process_time() >= self.cpu_deadline), device=self.device)
        return bool(self.world.sum(over).item())


def fit(cfg: Config, ds: ImageDataset, run_dir: Path, resume: bool = False, console: Console | None = None,
        callbacks: list | None = None, world: World | None = None) -> list[dict]:
    """Train `cfg.model` on `ds`, writing checkpoints and metrics into `run_dir`. Returns the history.

    `callbacks`: objects with any of `on_train_start(model, cfg, run_dir)`, `on_epoch_end(row, model)`
    and `on_train_end(history, run_dir)`; used by experiment trackers. `world`: the ranks this
    process trains with (distributed.join); None: a single process.
    """
    tc = cfg.train
    world = world or World()
    device = world.device(tc.device)
    cpu_start = time.process_time()  # train.budget_s counts from here: data to the device, the model built, training
    with backend_settings(device, tc.deterministic, tc.num_threads):
        seed_everything(tc.seed)
        return _fit(cfg, ds, run_dir, device, resume, console or Console(soft_wrap=True), callbacks or [], world,
                    cpu_start)


def _fit(cfg: Config, ds: ImageDataset, run_dir: Path, device: torch.device, resume: bool, console: Console,
         callbacks: list, world: World, cpu_start: float) -> list[dict]:
    tc = cfg.train
    task = get_task(cfg.task, cfg)
    has_val = len(ds.val) > 0
    if not has_val and cfg.stop.early and cfg.checkpoint.monitor.startswith("val_"):
        raise ValueError(f"stop.early on checkpoint.monitor={cfg.checkpoint.monitor} needs a validation split, and "
                         f"{ds.name} has none with data.val_fraction=0; set data.val_fraction > 0")

    source = _training_source(cfg, ds, device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = build_model(cfg, ds, source.x if isinstance(source, DeviceArrays) else None)
    model = model.to(device, memory_format=memory_format)
    if tc.sync_bn:
        model = world.sync_batchnorm(model)
    finetune = Finetune(model, cfg.finetune, tc.epochs)
    book = (EpochBook if world.is_main else FollowerBook)(cfg, task, run_dir, console, callbacks, has_val)
    if finetune.feature_cache:  # a linear probe on features computed once: no per-step backbone at all
        from cvrecipe.train.probe import fit_probe

        del source
        try:
            return fit_probe(cfg, ds, model, book, device, resume)
        finally:
            book.close()
    step = _build_step(cfg, task, model, finetune, source, ds.hflip_ok, device, memory_format, world)
    if world.is_main and not resume:
        warn_few_steps(cfg, step, len(source), console)
    if tc.budget_s is not None:
        step.cpu_deadline = cpu_start + tc.budget_s
    book.start(model, _restore(run_dir / "last.ckpt", step) if resume else None)
    try:
        return _epochs(cfg, ds, model, finetune, step, book, has_val, console)
    finally:
        book.close()  # on an error or a callback's exception too (e.g. a pruned tuning trial)


def _epochs(cfg: Config, ds: ImageDataset, model: ImageModel, finetune: Finetune, step: Step, book: EpochBook,
            has_val: bool, console: Console) -> list[dict]:
    tc, task, world = cfg.train, step.task, step.world
    for epoch in book.epochs():
        finetune.on_epoch_start(epoch)  # freezes/unfreezes the backbone (a no-op without a strategy)
        if hasattr(model.net, "on_epoch_start"):  # e.g. the speedrun net freezing its whitening bias
            model.net.on_epoch_start(epoch)
        step.train_model = world.replicate(model, tc.compile)  # after the freezing: DDP follows what trains
        t0 = time.perf_counter()
        train, steps = _train_epoch(cfg, step, epoch, console, len(ds.classes))
        spent = steps < step.steps_per_epoch or step.over_budget()  # train.budget_s: this epoch is the last
        due = world.from_main(book.due(epoch)) or spent
        # the weights that are validated and saved: the average, when weights are averaged
        scored = _averaged(step) if has_val or due else None
        val = _validate(task, scored, ds, step) if has_val else None
        row = world.from_main(book.row(epoch, steps, step.optimizer.param_groups[0]["lr"], train, val,
                                       time.perf_counter() - t0, steps * step.batch_size))
        if book.end_epoch(row, model, scored, due, lambda: _snapshot(step), finetune.deployable):
            break
        if spent:
            console.print(f"train.budget_s={tc.budget_s:g} CPU seconds spent: stopped after {row['step']} steps, in "
                          f"epoch {epoch + 1} of {tc.epochs}")
            break
    return book.finish()


FEW_STEPS = 100  # optimizer steps in a whole run below which most models have barely begun to learn


def warn_few_steps(cfg: Config, step: Step, images: int, console: Console) -> None:
    """Say so when the run takes fewer than FEW_STEPS optimizer steps: a small training split at a
    large batch gives a few steps per epoch (86 images at 32: 2, the ragged rest dropped), and a
    detector trained for 24 steps scores near zero where 8 images per step learn (docs/detection.md)."""
    tc = cfg.train
    total = tc.epochs * step.steps_per_epoch
    if total < FEW_STEPS:
        console.print(f"[yellow]train: {tc.epochs} epochs x {step.steps_per_epoch} steps of {step.batch_size} images "
                      f"({images} training images) = {total} optimizer steps in all, under {FEW_STEPS}: a smaller "
                      f"train.batch_size or more train.epochs gives the model more updates[/yellow]")


def _training_source(cfg: Config, ds: ImageDataset, device: torch.device) -> DeviceArrays | ShardStream:
    """The training split on the device, or, when the dataset is larger than the memory budget
    (load_dataset left its images on disk), a stream from its shards."""
    if streamed(ds):
        batch = max(1, cfg.train.batch_size // cfg.train.grad_accum)
        return ShardStream(ds.train, device, batch, cfg.data.prefetch, cfg.data.read_threads)
    return DeviceArrays(torch.from_numpy(ds.train.x).to(device), get_task(cfg.task, cfg).device_targets(ds.train.y, device))


def _build_step(cfg: Config, task: Task, model: ImageModel, finetune: Finetune, source: DeviceArrays | ShardStream,
                hflip_ok: bool, device: torch.device, memory_format: torch.memory_format, world: World) -> Step:
    tc = cfg.train
    dtype = autocast_dtype(device, tc.precision)
    batch_size = min(tc.batch_size, len(source) * tc.repeat)
    # the ragged last batch is dropped; order changes every epoch
    steps_per_epoch = len(source) * tc.repeat // batch_size
    micro, rest = divmod(batch_size, world.size * tc.grad_accum)
    if rest or not micro:
        raise ValueError(f"a global batch of {batch_size} does not split into {world.size} process(es) x "
                         f"train.grad_accum={tc.grad_accum} equal micro-batches; make train.batch_size a multiple "
                         f"of {world.size * tc.grad_accum}")
    groups, master = finetune.param_groups() or param_groups(model, cfg), None
    if tc.half_weights:  # weights in `dtype` instead of autocast; the optimizer may update fp32 copies
        to_half_weights(model, dtype)
        master = MasterWeights(model) if cfg.optim.master_weights else None
        groups = master.param_groups(groups) if master else groups
    optimizer = build_optimizer(model, cfg, groups)
    fp16_grads = dtype == torch.float16 and (not tc.half_weights or master is not None)
    base_flip = torch.rand(len(source), generator=epoch_generator(tc.seed, -1, device), device=device) < 0.5
    feed = Feed(source, task, cfg.augment, hflip_ok, base_flip, micro, steps_per_epoch, tc.grad_accum, world.rank,
                world.size, memory_format)
    return Step(task=task, model=model, optimizer=optimizer, scheduler=finetune.scheduler(optimizer, cfg, steps_per_epoch),
                scaler=torch.amp.GradScaler(device.type, enabled=fp16_grads),
                ema=WeightEMA(model) if cfg.average.name != "none" else None, feed=feed, world=world,
                steps_per_epoch=steps_per_epoch, batch_size=batch_size, device=device,
                dtype=None if tc.half_weights else dtype, memory_format=memory_format, master=master)


def _train_epoch(cfg: Config, step: Step, epoch: int, console: Console, num_classes: int) -> tuple[dict[str, float], int]:
    """One epoch's optimisation steps; its training metrics and the steps taken (fewer than an epoch's
    when train.budget_s was spent during it)."""
    tc, avg, world = cfg.train, cfg.average, step.world
    steps, accum, device = step.steps_per_epoch, step.feed.accum, step.device
    total_steps = tc.epochs * steps
    step.model.train()
    gen = epoch_generator(tc.seed, epoch, device)
    n = len(step.feed.source)
    # train.repeat passes over the images per epoch, in one shuffled order (an image may recur in a batch)
    order = torch.randperm(n * tc.repeat, generator=gen, device=device) % n if tc.repeat > 1 else \
        torch.randperm(n, generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)  # summed on device: one sync per log interval, not per step
    meter = step.task.meter(num_classes, device)
    columns = [TextColumn(f"epoch {epoch + 1}/{tc.epochs}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress, \
            contextlib.closing(step.feed.epoch(order, world.augment_generator(gen, tc.seed, epoch), epoch)) as batches:
        bar = progress.add_task("train", total=steps, info="")
        for i in range(steps):
            step.optimizer.zero_grad(set_to_none=True)
            if step.master is not None:  # the optimizer holds the fp32 copies; the model's half grads are apart
                step.model.zero_grad(set_to_none=True)
            for j in range(accum):  # gradient accumulation: the step's micro-batches on this rank
                x, y = next(batches)
                with world.accumulating(last=j == accum - 1):
                    with autocast(device, step.dtype):
                        logits = step.task.forward(step.train_model, x, y)
                    loss = step.task.loss(logits, y, tc.label_smoothing)
                    step.scaler.scale(loss / accum if accum > 1 else loss).backward()
                loss_sum += loss.detach()
                meter.update(_detached(logits), y)
            if step.master is not None:
                step.master.to_master()
            if tc.grad_clip:
                step.scaler.unscale_(step.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in step.optimizer.param_groups for p in g["params"]],
                                               tc.grad_clip)
            step.scaler.step(step.optimizer)
            step.scaler.update()
            if step.master is not None:
                step.master.to_model()
            step.scheduler.step()
            done = epoch * steps + i + 1  # optimisation steps so far in the run
            if step.ema is not None and done % avg.every == 0:
                # the average's decay ramps up as (progress)³: early weights are forgotten, late ones kept
                step.ema.update(step.model, avg.decay * (done / total_steps) ** 3, lookahead=avg.name == "lookahead")
            stop = step.over_budget()
            if (i + 1) % tc.log_every == 0 or i + 1 == steps or stop:
                mean_loss = world.sum(loss_sum).item() / ((i + 1) * accum * world.size)  # the same on every rank
                _check_finite(mean_loss, cfg, epoch, i, steps)
                rate = (i + 1) * step.batch_size / (time.perf_counter() - t0)
                progress.update(bar, completed=i + 1, info=f"loss {mean_loss:.4f}  {rate:,.0f} img/s")
            if stop:
                break
    items = (i + 1) * accum * world.size  # micro-batch losses summed over the ranks by the end of the epoch
    return {"loss": world.sum(loss_sum).item() / items, **world.mean(meter.compute())}, i + 1


def _detached(outputs):
    """The outputs without their graph: a tensor, or a dict of them (a detector's losses in train mode)."""
    if isinstance(outputs, dict):
        return {k: v.detach() for k, v in outputs.items()}
    return outputs.detach()


def _check_finite(mean_loss: float, cfg: Config, epoch: int, i: int, steps: int) -> None:
    if math.isfinite(mean_loss):
        return
    spaced = " or earlier, with checkpoint.every_s" if cfg.checkpoint.every_s else ""
    kept = (f"the last good checkpoint (end of epoch {epoch}{spaced}) is kept as last.ckpt" if epoch
            else "no epoch had completed, so there is no checkpoint")
    raise TrainingDiverged(f"loss became {mean_loss} during epoch {epoch + 1} (by step {i + 1} of {steps}); "
                           f"stopping: {kept}. Try a lower optim.lr, train.grad_clip, or train.precision=fp32")


def _averaged(step: Step) -> ImageModel:
    """The model with the weight average installed (a copy), or the model itself without one."""
    if step.ema is None:
        return step.model
    scored = copy.deepcopy(step.model)
    step.ema.copy_to(scored)
    return scored


def _validate(task: Task, model: ImageModel, ds: ImageDataset, step: Step) -> dict[str, float] | None:
    """Metrics over the val split on rank 0 (None on the others): each rank scores its own
    contiguous part, and rank 0 gathers the outputs, so every image counts exactly once."""
    world = step.world
    size = inference_batch_size(model, max(step.batch_size, 256))  # fewer per batch for a tiled model
    start, stop = world.part(len(ds.val))
    x, y = slice_rows(ds.val.x, start, stop), slice_rows(ds.val.y, start, stop)
    batches = iter_logits(model, x, size, step.device, step.dtype, step.memory_format == torch.channels_last)
    targets = (task.batch_targets(y, first, first + size) for first in range(0, len(y), size))
    pairs = world.gather_to_main(zip(batches, targets), world.rounds(len(ds.val), size))
    return split_metrics(task, pairs, len(ds.classes)) if world.is_main else None


def _snapshot(step: Step) -> dict:
    """The loop's part of last.ckpt (the EpochBook adds its own)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(), "scaler": step.scaler.state_dict(), "rng": rng,
            "ema": step.ema.state_dict() if step.ema is not None else None,
            "master": step.master.state_dict() if step.master is not None else None}


def _restore(path: Path, step: Step) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    ckpt = load_resume(path)
    step.model.load_state_dict(ckpt["model"])
    step.optimizer.load_state_dict(ckpt["optimizer"])
    step.scheduler.load_state_dict(ckpt["scheduler"])
    step.scaler.load_state_dict(ckpt["scaler"])
    if step.ema is not None and ckpt.get("ema") is not None:
        step.ema.load_state_dict(ckpt["ema"])
    if step.master is not None and ckpt.get("master") is not None:
        step.master.load_state_dict(ckpt["master"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt
