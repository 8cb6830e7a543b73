"""The training loop. Reads top to bottom: set up → (resume) → epochs → checkpoints.

The whole uint8 dataset lives on the training device; each step gathers a batch by index,
augments it with batched tensor ops, and runs forward/backward. Data order and augmentation
draw from a generator seeded by (seed, epoch), and the resume file stores everything else that
changes (weights, optimizer, scheduler, scaler, global RNG, early-stopping state, history), so a
resumed run replays exactly what an uninterrupted one would have done.

What differs between tasks (loss, augmentation of image and target, metrics) comes from the
task object; what happens between epochs (logs, best checkpoint, early stopping, last.ckpt) from
the EpochBook (book.py), which the feature-cached probe (probe.py) shares.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cvrecipe.artifact.build import build_model
from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.artifact.inference import iter_logits
from cvrecipe.config import AugmentConfig, Config
from cvrecipe.data import ImageDataset
from cvrecipe.device import (autocast, autocast_dtype, backend_settings, epoch_generator, resolve_device,
                             seed_everything)
from cvrecipe.models import ImageModel
from cvrecipe.tasks import Task, get_task
from cvrecipe.train.book import EpochBook, split_metrics
from cvrecipe.train.ema import WeightEMA
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
    train_model: torch.nn.Module  # the model itself, or its torch.compile'd wrapper (same parameters)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    train_x: torch.Tensor  # (N, C, H, W) uint8 on the device
    train_y: torch.Tensor  # the task's targets on the device: (N,) int64 labels or (N, H, W) uint8 masks
    base_flip: torch.Tensor  # (N,) bool: per-run flip coins for augment.flip_mode=alternate
    steps_per_epoch: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None with half weights (the weights are the dtype)
    memory_format: torch.memory_format
    master: MasterWeights | None = None  # fp32 copies the optimizer updates, with train.half_weights


def fit(cfg: Config, ds: ImageDataset, run_dir: Path, resume: bool = False, console: Console | None = None,
        callbacks: list | None = None) -> list[dict]:
    """Train `cfg.model` on `ds`, writing checkpoints and metrics into `run_dir`. Returns the history.

    `callbacks`: objects with any of `on_train_start(model, cfg, run_dir)`, `on_epoch_end(row, model)`
    and `on_train_end(history, run_dir)`; used by experiment trackers.
    """
    tc = cfg.train
    device = resolve_device(tc.device)
    with backend_settings(device, tc.deterministic, tc.num_threads):
        seed_everything(tc.seed)
        return _fit(cfg, ds, run_dir, device, resume, console or Console(soft_wrap=True), callbacks or [])


def _fit(cfg: Config, ds: ImageDataset, run_dir: Path, device: torch.device, resume: bool, console: Console,
         callbacks: list) -> list[dict]:
    tc = cfg.train
    task = get_task(cfg.task, cfg)
    has_val = len(ds.val) > 0
    if not has_val and cfg.stop.early and cfg.checkpoint.monitor.startswith("val_"):
        raise ValueError(f"stop.early on checkpoint.monitor={cfg.checkpoint.monitor} needs a validation split, and "
                         f"{ds.name} has none with data.val_fraction=0; set data.val_fraction > 0")

    train_x, train_y = torch.from_numpy(ds.train.x).to(device), torch.from_numpy(ds.train.y).to(device)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = build_model(cfg, ds, train_x).to(device, memory_format=memory_format)
    finetune = Finetune(model, cfg.finetune, tc.epochs)
    book = EpochBook(cfg, task, run_dir, console, callbacks, has_val)
    if finetune.feature_cache:  # a linear probe on features computed once: no per-step backbone at all
        from cvrecipe.train.probe import fit_probe

        del train_x, train_y
        try:
            return fit_probe(cfg, ds, model, book, device, resume)
        finally:
            book.close()
    step = _build_step(cfg, task, model, finetune, train_x, train_y, device, memory_format)
    book.start(model, _restore(run_dir / "last.ckpt", step) if resume else None)
    try:
        return _epochs(cfg, ds, model, finetune, step, book, has_val, console)
    finally:
        book.close()  # on an error or a callback's exception too (e.g. a pruned tuning trial)


def _epochs(cfg: Config, ds: ImageDataset, model: ImageModel, finetune: Finetune, step: Step, book: EpochBook,
            has_val: bool, console: Console) -> list[dict]:
    task = step.task
    for epoch in book.epochs():
        finetune.on_epoch_start(epoch)  # freezes/unfreezes the backbone (a no-op without a strategy)
        if hasattr(model.net, "on_epoch_start"):  # e.g. the speedrun net freezing its whitening bias
            model.net.on_epoch_start(epoch)
        t0 = time.perf_counter()
        train = _train_epoch(cfg, ds, step, epoch, console)
        due = book.due(epoch)
        # the weights that are validated and saved: the average, when weights are averaged
        scored = _averaged(step) if has_val or due else None
        val = _validate(task, scored, ds, step) if has_val else None
        row = book.row(epoch, step.steps_per_epoch, step.optimizer.param_groups[0]["lr"], train, val,
                       time.perf_counter() - t0, step.steps_per_epoch * step.batch_size)
        if book.end_epoch(row, model, scored, due, lambda: _snapshot(step), finetune.deployable):
            break
    return book.finish()


def _build_step(cfg: Config, task: Task, model: ImageModel, finetune: Finetune, train_x: torch.Tensor,
                train_y: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> Step:
    tc = cfg.train
    dtype = autocast_dtype(device, tc.precision)
    batch_size = min(tc.batch_size, len(train_y) * tc.repeat)
    # the ragged last batch is dropped; order changes every epoch
    steps_per_epoch = len(train_y) * tc.repeat // batch_size
    groups, master = finetune.param_groups() or param_groups(model, cfg), None
    if tc.half_weights:  # weights in `dtype` instead of autocast; the optimizer may update fp32 copies
        to_half_weights(model, dtype)
        master = MasterWeights(model) if cfg.optim.master_weights else None
        groups = master.param_groups(groups) if master else groups
    optimizer = build_optimizer(model, cfg, groups)
    fp16_grads = dtype == torch.float16 and (not tc.half_weights or master is not None)
    return Step(task=task, model=model, train_model=torch.compile(model) if tc.compile else model,
                optimizer=optimizer, scheduler=finetune.scheduler(optimizer, cfg, steps_per_epoch),
                scaler=torch.amp.GradScaler(device.type, enabled=fp16_grads),
                ema=WeightEMA(model) if cfg.average.name != "none" else None, train_x=train_x, train_y=train_y,
                base_flip=torch.rand(len(train_y), generator=epoch_generator(tc.seed, -1, device), device=device) < 0.5,
                steps_per_epoch=steps_per_epoch, batch_size=batch_size, device=device,
                dtype=None if tc.half_weights else dtype, memory_format=memory_format, master=master)


def _train_epoch(cfg: Config, ds: ImageDataset, step: Step, epoch: int, console: Console) -> dict[str, float]:
    tc, avg = cfg.train, cfg.average
    steps, batch_size, device = step.steps_per_epoch, step.batch_size, step.device
    total_steps = tc.epochs * steps
    step.model.train()
    gen = epoch_generator(tc.seed, epoch, device)
    n = len(step.train_y)
    # train.repeat passes over the images per epoch, in one shuffled order (an image may recur in a batch)
    order = torch.randperm(n * tc.repeat, generator=gen, device=device) % n if tc.repeat > 1 else \
        torch.randperm(n, generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)  # summed on device: one sync per log interval, not per step
    meter = step.task.meter(len(ds.classes), device)
    columns = [TextColumn(f"epoch {epoch + 1}/{tc.epochs}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task("train", total=steps, info="")
        for i, (x, y) in enumerate(epoch_batches(step, cfg.augment, ds.hflip_ok, order, gen, epoch)):
            with autocast(device, step.dtype):
                logits = step.train_model(x)
            loss = step.task.loss(logits, y, tc.label_smoothing)
            step.optimizer.zero_grad(set_to_none=True)
            if step.master is not None:  # the optimizer holds the fp32 copies; the model's half grads are apart
                step.model.zero_grad(set_to_none=True)
            step.scaler.scale(loss).backward()
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
            loss_sum += loss.detach()
            meter.update(logits.detach(), y)
            if (i + 1) % tc.log_every == 0 or i + 1 == steps:
                mean_loss = loss_sum.item() / (i + 1)
                _check_finite(mean_loss, cfg, epoch, i, steps)
                rate = (i + 1) * batch_size / (time.perf_counter() - t0)
                progress.update(bar, completed=i + 1, info=f"loss {mean_loss:.4f}  {rate:,.0f} img/s")
    return {"loss": loss_sum.item() / steps, **meter.compute()}


def _check_finite(mean_loss: float, cfg: Config, epoch: int, i: int, steps: int) -> None:
    if math.isfinite(mean_loss):
        return
    spaced = " or earlier, with checkpoint.every_s" if cfg.checkpoint.every_s else ""
    kept = (f"the last good checkpoint (end of epoch {epoch}{spaced}) is kept as last.ckpt" if epoch
            else "no epoch had completed, so there is no checkpoint")
    raise TrainingDiverged(f"loss became {mean_loss} during epoch {epoch + 1} (by step {i + 1} of {steps}); "
                           f"stopping: {kept}. Try a lower optim.lr, train.grad_clip, or train.precision=fp32")


AUGMENT_CHUNK_BYTES = 256 * 2**20  # uint8 images augmented in one go on a GPU (reflect padding: 4x in float)


def epoch_batches(step: Step, augment: AugmentConfig, hflip_ok: bool, order: torch.Tensor, gen: torch.Generator,
                  epoch: int, chunk: int | None = None):
    """The epoch's (x, y) training batches in `order`: gathered from the on-device dataset and
    augmented by the task (images and targets together).

    On a GPU, several batches (the whole epoch for CIFAR-10) are augmented with one set of kernel
    launches: per batch that costs a dozen launches, a few % of a 5 ms step. On a CPU each batch is
    augmented as it is needed, so no second copy of the data is held in host memory. `chunk`
    (batches augmented together) overrides that choice.
    """
    batch_size, steps = step.batch_size, step.steps_per_epoch
    if chunk is None:
        chunk = 1
        if step.device.type == "cuda":
            chunk = max(1, min(steps, AUGMENT_CHUNK_BYTES // (batch_size * step.train_x[0].numel())))
    for first in range(0, steps, chunk):
        n = min(chunk, steps - first)
        idx = order[first * batch_size:(first + n) * batch_size]
        x, y = step.task.augment(step.train_x[idx], step.train_y[idx], augment, hflip_ok, gen, step.base_flip[idx],
                                 epoch)
        x = x.contiguous(memory_format=step.memory_format)  # batch slices of it stay contiguous
        for j in range(n):
            yield x[j * batch_size:(j + 1) * batch_size], y[j * batch_size:(j + 1) * batch_size]


def _averaged(step: Step) -> ImageModel:
    """The model with the weight average installed (a copy), or the model itself without one."""
    if step.ema is None:
        return step.model
    scored = copy.deepcopy(step.model)
    step.ema.copy_to(scored)
    return scored


def _validate(task: Task, model: ImageModel, ds: ImageDataset, step: Step) -> dict[str, float]:
    size = max(step.batch_size, 256)
    batches = iter_logits(model, ds.val.x, size, step.device, step.dtype, step.memory_format == torch.channels_last)

    def with_targets():  # iter_logits may take fewer images per batch (tiled models): follow its batches
        start = 0
        for outputs in batches:
            yield outputs, torch.from_numpy(ds.val.y[start:start + len(outputs)])
            start += len(outputs)

    return split_metrics(task, with_targets(), len(ds.classes))


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
