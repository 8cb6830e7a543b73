"""The training loop. Reads top to bottom: set up → (resume) → epochs → checkpoints.

The whole uint8 dataset lives on the training device; each step gathers a batch by index,
augments it with batched tensor ops, and runs forward/backward. Data order and augmentation
draw from a generator seeded by (seed, epoch), and the resume file stores everything else that
changes (weights, optimizer, scheduler, scaler, global RNG, early-stopping state, history), so a
resumed run replays exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from cvrecipe.config import AugmentConfig, Config, TrainConfig
from cvrecipe.data import ImageDataset
from cvrecipe.data.dataset import pixel_mean_std
from cvrecipe.data.augment import augment_batch
from cvrecipe.device import autocast, autocast_dtype, backend_settings, resolve_device, seed_everything
from cvrecipe.evaluate.predict import predict_logits
from cvrecipe.models import ImageClassifier, create_model
from cvrecipe.models.head import set_bias_to_prior
from cvrecipe.train.batchnorm import recalibrate_batchnorm
from cvrecipe.train.checkpoint import load_resume, save_resume, save_weights
from cvrecipe.train.ema import WeightEMA
from cvrecipe.train.finetune import Finetune
from cvrecipe.train.optim import build_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s", "images_per_s"]


def build_model(cfg: Config, ds: ImageDataset, train_x: torch.Tensor | None = None) -> ImageClassifier:
    """The configured model, with its input normalisation (and any data-dependent initialisation)
    computed from the training images; `train_x`: those images already on the training device,
    where the statistics are then computed (a GPU does it in milliseconds). The model comes back on
    the CPU, or on train_x's device when it had data-dependent initialisation to do there."""
    c, h, w = ds.image_shape
    pixels = torch.from_numpy(ds.train.x) if train_x is None else train_x
    mean = std = None
    if cfg.data.normalize:
        mean, std = pixel_mean_std(pixels)
        mean, std = mean.tolist(), np.maximum(std, 1e-3).tolist()
    model = create_model(cfg.model.name, num_classes=len(ds.classes), in_channels=c, input_size=(h, w),
                         mean=mean, std=std, class_names=ds.classes, dropout=cfg.model.dropout, **cfg.model.kwargs)
    if cfg.model.init_bias_prior:
        set_bias_to_prior(model, ds.train.y, len(ds.classes))
    if hasattr(model.net, "init_from_data"):  # e.g. the speedrun net's whitening layer, from 5,000 images
        model.to(pixels.device)  # computed where the images are
        sample = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.train.seed))[:5000]
        model.net.init_from_data(model, pixels[sample.sort().values.to(pixels.device)])
    return model


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 100_003 + epoch)
    return gen


@dataclass
class Step:
    """What one optimisation step needs, built once per fit()."""
    model: ImageClassifier
    train_model: torch.nn.Module  # the model itself, or its torch.compile'd wrapper (same parameters)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None
    train_x: torch.Tensor  # (N, C, H, W) uint8 on the device
    train_y: torch.Tensor  # (N,) int64 on the device
    base_flip: torch.Tensor  # (N,) bool: per-run flip coins for augment.flip_mode=alternate
    steps_per_epoch: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format


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
    dtype = autocast_dtype(device, tc.precision)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format

    has_val = len(ds.val) > 0
    if not has_val and tc.early_stopping:
        raise ValueError("train.early_stopping needs a validation split; set data.val_fraction > 0")

    train_x, train_y = torch.from_numpy(ds.train.x).to(device), torch.from_numpy(ds.train.y).to(device)
    model = build_model(cfg, ds, train_x).to(device, memory_format=memory_format)
    finetune = Finetune(model, cfg.finetune, tc.epochs)
    if finetune.feature_cache:  # a linear probe on features computed once: no per-step backbone at all
        from cvrecipe.train.probe import fit_probe

        del train_x, train_y
        return fit_probe(cfg, ds, model, run_dir, device, console, callbacks)
    batch_size = min(tc.batch_size, len(train_y))
    steps_per_epoch = len(train_y) // batch_size  # the ragged last batch is dropped; order changes every epoch
    optimizer = build_optimizer(model, tc, finetune.param_groups())
    scheduler = finetune.scheduler(optimizer, tc, steps_per_epoch)
    step = Step(model=model, train_model=torch.compile(model) if tc.compile else model, optimizer=optimizer,
                scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                ema=WeightEMA(model) if tc.ema != "none" else None, train_x=train_x, train_y=train_y,
                base_flip=torch.rand(len(train_y), generator=epoch_generator(tc.seed, -1, device), device=device) < 0.5,
                steps_per_epoch=steps_per_epoch, batch_size=batch_size, device=device, dtype=dtype,
                memory_format=memory_format)
    if tc.ema not in ("none", "ema", "lookahead"):
        raise ValueError(f"train.ema must be none, ema or lookahead, got '{tc.ema}'")
    if tc.bn_recalibrate < 0:
        raise ValueError(f"train.bn_recalibrate must be a number of training images (0 = off), got {tc.bn_recalibrate}")

    state = {"epoch": 0, "step": 0, "best": None, "bad_epochs": 0, "history": [], "stopped_early": False}
    if resume:
        state = _restore(run_dir / "last.ckpt", step)
        console.print(f"resuming {run_dir} at epoch {state['epoch'] + 1} (step {state['step']})")
    writer = SummaryWriter(str(run_dir), purge_step=state["step"] if resume else None)
    _notify(callbacks, "on_train_start", model, cfg, run_dir)
    last_write = time.perf_counter()

    for epoch in range(state["epoch"], tc.epochs):
        if state["stopped_early"]:
            break  # a resumed run that had already stopped early stays stopped
        finetune.on_epoch_start(epoch)  # freezes/unfreezes the backbone (a no-op without a strategy)
        if hasattr(model.net, "on_epoch_start"):  # e.g. the speedrun net freezing its whitening bias
            model.net.on_epoch_start(epoch)
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(cfg, ds, step, epoch, console)
        state["step"] += steps_per_epoch
        # on a fast GPU an epoch can take less time than writing its checkpoint: writes can be spaced out
        due = epoch + 1 == tc.epochs or time.perf_counter() - last_write >= tc.checkpoint_every_s
        # the weights that are validated and saved: the EMA when there is one
        scored = _averaged(step) if has_val or due else None
        if tc.bn_recalibrate and (has_val or epoch + 1 == tc.epochs):
            scored = _recalibrated(scored, step, tc)
        val_loss, val_acc = (_validate(scored, ds, batch_size, device, dtype, tc.channels_last) if has_val
                             else (math.nan, math.nan))
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "step": state["step"], "lr": optimizer.param_groups[0]["lr"],
               "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
               "epoch_time_s": round(elapsed, 3), "images_per_s": round(steps_per_epoch * batch_size / elapsed, 1)}
        state["history"].append(row)
        _log_epoch(row, writer, run_dir, state["history"], console, tc.epochs)
        _notify(callbacks, "on_epoch_end", row, model)

        value = row[tc.monitor]
        if not has_val:  # nothing to select on: keep the latest weights
            if due:
                save_weights(finetune.deployable(scored), run_dir / "best.safetensors", {"epoch": epoch + 1})
        elif _improved(value, state["best"], tc.mode, tc.min_delta):
            state["best"], state["bad_epochs"] = value, 0
            save_weights(finetune.deployable(scored), run_dir / "best.safetensors",
                         {"epoch": epoch + 1, tc.monitor: value})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped_early"] = tc.early_stopping and state["bad_epochs"] >= tc.patience
        if due or state["stopped_early"]:
            save_resume(_snapshot(state, step), run_dir / "last.ckpt")
            last_write = time.perf_counter()
        if state["stopped_early"]:
            console.print(f"early stopping: {tc.monitor} has not improved for {tc.patience} epochs "
                          f"(best {state['best']:.4f})")
            break
    writer.close()
    _notify(callbacks, "on_train_end", state["history"], run_dir)
    return state["history"]


def _notify(callbacks: list, event: str, *args) -> None:
    for callback in callbacks:
        handler = getattr(callback, event, None)
        if handler is not None:
            handler(*args)


def _train_epoch(cfg: Config, ds: ImageDataset, step: Step, epoch: int, console: Console) -> tuple[float, float]:
    tc = cfg.train
    steps, batch_size, device = step.steps_per_epoch, step.batch_size, step.device
    total_steps = tc.epochs * steps
    step.model.train()
    gen = epoch_generator(tc.seed, epoch, device)
    order = torch.randperm(len(step.train_y), generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)  # summed on device: one sync per log interval, not per step
    correct = torch.zeros((), device=device, dtype=torch.long)
    columns = [TextColumn(f"epoch {epoch + 1}/{tc.epochs}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn()]
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("train", total=steps, info="")
        batches = epoch_batches(step, cfg.augment, ds.hflip_ok, order, gen, epoch)
        for i, (x, y) in enumerate(batches):
            with autocast(device, step.dtype):
                logits = step.train_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            step.optimizer.zero_grad(set_to_none=True)
            step.scaler.scale(loss).backward()
            if tc.grad_clip:
                step.scaler.unscale_(step.optimizer)
                torch.nn.utils.clip_grad_norm_(step.model.parameters(), tc.grad_clip)
            step.scaler.step(step.optimizer)
            step.scaler.update()
            step.scheduler.step()
            done = epoch * steps + i + 1  # optimisation steps so far in the run
            if step.ema is not None and done % tc.ema_every == 0:
                # the average's decay ramps up as (progress)³: early weights are forgotten, late ones kept
                step.ema.update(step.model, tc.ema_decay * (done / total_steps) ** 3, lookahead=tc.ema == "lookahead")
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if (i + 1) % tc.log_every == 0 or i + 1 == steps:
                mean_loss = loss_sum.item() / (i + 1)
                if not math.isfinite(mean_loss):
                    spaced = " or earlier, with train.checkpoint_every_s" if tc.checkpoint_every_s else ""
                    kept = (f"the last good checkpoint (end of epoch {epoch}{spaced}) is kept as last.ckpt" if epoch
                            else "no epoch had completed, so there is no checkpoint")
                    raise TrainingDiverged(
                        f"loss became {mean_loss} during epoch {epoch + 1} (by step {i + 1} of {steps}); "
                        f"stopping: {kept}. Try a lower train.lr, train.grad_clip, or train.precision=fp32")
                rate = (i + 1) * batch_size / (time.perf_counter() - t0)
                progress.update(task, completed=i + 1, info=f"loss {mean_loss:.4f}  {rate:,.0f} img/s")
    return loss_sum.item() / steps, correct.item() / (steps * batch_size)


AUGMENT_CHUNK_BYTES = 256 * 2**20  # uint8 images augmented in one go on a GPU (reflect padding: 4x in float)


def epoch_batches(step: Step, augment: AugmentConfig, hflip_ok: bool, order: torch.Tensor, gen: torch.Generator,
                  epoch: int, chunk: int | None = None):
    """The epoch's (x, y) training batches in `order`: gathered from the on-device dataset and augmented.

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
        x = augment_batch(step.train_x[idx], augment, hflip_ok, gen, step.base_flip[idx], epoch)
        x = x.contiguous(memory_format=step.memory_format)  # batch slices of it stay contiguous
        y = step.train_y[idx]
        for j in range(n):
            yield x[j * batch_size:(j + 1) * batch_size], y[j * batch_size:(j + 1) * batch_size]


def _averaged(step: Step) -> ImageClassifier:
    """The model with the weight average installed (a copy), or the model itself without one."""
    if step.ema is None:
        return step.model
    scored = copy.deepcopy(step.model)
    step.ema.copy_to(scored)
    return scored


def _recalibrated(scored: ImageClassifier, step: Step, tc: TrainConfig) -> ImageClassifier:
    """`scored` with BatchNorm statistics recomputed for its weights (see batchnorm.py). The training
    model's own running averages carry on untouched, so a resumed run trains exactly as one that was
    not stopped. The sample of images is the same at every call of a run (seeded by train.seed)."""
    if scored is step.model:
        scored = copy.deepcopy(scored)
    recalibrate_batchnorm(scored, step.train_x, tc.bn_recalibrate, step.batch_size,
                          epoch_generator(tc.seed, -2, step.device), step.dtype, step.memory_format)
    return scored


def _validate(model, ds, batch_size, device, dtype, channels_last) -> tuple[float, float]:
    logits = predict_logits(model, ds.val.x, max(batch_size, 256), device, dtype, channels_last)
    y = torch.from_numpy(ds.val.y)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    if mode == "min":
        return value < best - min_delta
    if mode == "max":
        return value > best + min_delta
    raise ValueError(f"train.mode must be min or max, got '{mode}'")


def _log_epoch(row: dict, writer: SummaryWriter, run_dir: Path, history: list[dict], console: Console, epochs: int):
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
        writer.add_scalar(key.replace("_", "/", 1), row[key], row["step"])
    writer.flush()
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        out.writeheader()
        out.writerows(history)
    tmp.replace(run_dir / "metrics.csv")
    val = "" if math.isnan(row["val_loss"]) else f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
    console.print(f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                  f"{val}lr {row['lr']:.2e}  "
                  f"{row['epoch_time_s']:.1f}s  {row['images_per_s']:,.0f} img/s")


def _snapshot(state: dict, step: Step) -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {**state, "model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(), "scaler": step.scaler.state_dict(), "rng": rng,
            "ema": step.ema.state_dict() if step.ema is not None else None}


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
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {k: ckpt[k] for k in ("epoch", "step", "best", "bad_epochs", "history", "stopped_early")}
