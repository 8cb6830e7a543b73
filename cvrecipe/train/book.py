"""Per-epoch bookkeeping, shared by every training path (the loop and the feature-cached probe).

One object owns what happens between epochs: the metrics row (metrics.csv, TensorBoard, the
console line, callbacks), choosing best.safetensors by checkpoint.monitor, early stopping, the
checkpoint cadence (checkpoint.every_s) and the part of last.ckpt that is bookkeeping (epoch,
step, best value, epochs without improvement, history). The training path adds its own state
(weights, optimizer, ...) through the `snapshot` callable it hands to `end_epoch`.

With several processes every rank keeps the same bookkeeping (the rows come from rank 0), so they
all stop together; only rank 0's EpochBook writes anything, the others' are FollowerBooks.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from cvrecipe.artifact.checkpoint import save_resume, save_weights
from cvrecipe.config import Config
from cvrecipe.tasks import Task

STATE_KEYS = ("epoch", "step", "best", "bad_epochs", "history", "stopped_early")


def split_metrics(task: Task, batches, num_classes: int) -> dict[str, float]:
    """{loss, <task metrics>} over a whole split from (outputs, targets) batches on the CPU: the
    loss is the mean over all items (a sum, not a mean of batch means), the metrics accumulate."""
    meter = task.meter(num_classes, torch.device("cpu"))
    loss_sum, count = 0.0, 0
    for outputs, targets in batches:
        n = task.count(targets)
        loss_sum += task.loss(outputs, targets).item() * n
        count += n
        meter.update(outputs, targets)
    if count == 0:
        return {m: math.nan for m in task.metrics}
    return {"loss": loss_sum / count, **meter.compute()}


class EpochBook:
    def __init__(self, cfg: Config, task: Task, run_dir: Path, console: Console, callbacks: list | None = None,
                 has_val: bool = True):
        self.cfg, self.task, self.run_dir, self.console = cfg, task, Path(run_dir), console
        self.callbacks = callbacks or []
        self.has_val = has_val
        self.fields = ["epoch", "step", "lr", *(f"train_{m}" for m in task.metrics),
                       *(f"val_{m}" for m in task.metrics), "epoch_time_s", "images_per_s"]
        self.state = {"epoch": 0, "step": 0, "best": None, "bad_epochs": 0, "history": [], "stopped_early": False}
        self.writer: SummaryWriter | None = None
        self.last_write = time.perf_counter()

    # -- the run's start and end -----------------------------------------------------------------
    def start(self, model: torch.nn.Module, resumed: dict | None = None) -> None:
        """Open the logs (after a resume, TensorBoard drops events past the resumed step) and tell
        the callbacks. `resumed`: the last.ckpt dict, whose bookkeeping part is restored here."""
        if resumed is not None:
            self.state = {k: resumed[k] for k in STATE_KEYS}
            self.console.print(f"resuming {self.run_dir} at epoch {self.state['epoch'] + 1} (step {self.state['step']})")
        self._open_logs(resumed is not None)
        self.notify("on_train_start", model, self.cfg, self.run_dir)

    def _open_logs(self, resumed: bool) -> None:
        self.writer = SummaryWriter(str(self.run_dir), purge_step=self.state["step"] if resumed else None)

    def epochs(self) -> range:
        """The epochs still to train (none when a resumed run had already stopped early)."""
        return range(self.state["epoch"], 0 if self.state["stopped_early"] else self.cfg.train.epochs)

    def finish(self) -> list[dict]:
        self.close()
        self.notify("on_train_end", self.state["history"], self.run_dir)
        return self.state["history"]

    def close(self) -> None:
        """Close the logs (also when training stops on an error or a callback's exception)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def notify(self, event: str, *args) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(*args)

    # -- each epoch ------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Is a checkpoint due after (0-based) `epoch`? After the last epoch always; otherwise once
        checkpoint.every_s has passed since the last write (0: every epoch). On a fast GPU an epoch
        can take less time than writing its checkpoint, so writes can be spaced out."""
        return epoch + 1 == self.cfg.train.epochs or time.perf_counter() - self.last_write >= self.cfg.checkpoint.every_s

    def row(self, epoch: int, steps: int, lr: float, train: dict, val: dict | None, seconds: float,
            images: int) -> dict:
        self.state["step"] += steps
        val = val or {m: math.nan for m in self.task.metrics}
        return {"epoch": epoch + 1, "step": self.state["step"], "lr": lr,
                **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
                "epoch_time_s": round(seconds, 3), "images_per_s": round(images / seconds, 1)}

    def end_epoch(self, row: dict, model: torch.nn.Module, scored: torch.nn.Module | None, due: bool,
                  snapshot: Callable[[], dict],
                  deployable: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model) -> bool:
        """Log `row` and tell the callbacks (with the training `model`); keep `scored` (the weights
        that were validated: the average, when weights are averaged) as best.safetensors when it is
        the best so far (without a val split: when a checkpoint is due); update early stopping; write
        last.ckpt when due. `deployable(scored)` is what a checkpoint holds (LoRA: the merged
        weights). Returns True when training should stop early."""
        state, cfg = self.state, self.cfg
        state["history"].append(row)
        self._log(row)
        self.notify("on_epoch_end", row, model)
        value = row[cfg.checkpoint.monitor]
        if not self.has_val:  # nothing to select on: keep the latest weights
            if due:
                self._save_best(deployable, scored, {"epoch": row["epoch"]})
        elif improved(value, state["best"], cfg.monitor_mode, cfg.stop.min_delta):
            state["best"], state["bad_epochs"] = value, 0
            self._save_best(deployable, scored, {"epoch": row["epoch"], cfg.checkpoint.monitor: value})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = row["epoch"]
        state["stopped_early"] = cfg.stop.early and state["bad_epochs"] >= cfg.stop.patience
        if due or state["stopped_early"]:
            self._save_resume(snapshot)
            self.last_write = time.perf_counter()
        if state["stopped_early"]:
            self.console.print(f"early stopping: {cfg.checkpoint.monitor} has not improved for {cfg.stop.patience} "
                               f"epochs (best {state['best']:.4f})")
        return state["stopped_early"]

    def _save_best(self, deployable: Callable, scored: torch.nn.Module, extra: dict) -> None:
        save_weights(deployable(scored), self.run_dir / "best.safetensors", extra)

    def _save_resume(self, snapshot: Callable[[], dict]) -> None:
        save_resume({**dict(self.state), **snapshot()}, self.run_dir / "last.ckpt")

    def _log(self, row: dict) -> None:
        for key in self.fields[2:-2] + ["images_per_s"]:  # lr, train_*, val_*, throughput
            self.writer.add_scalar(key.replace("_", "/", 1), row[key], row["step"])
        self.writer.flush()
        tmp = self.run_dir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=self.fields)
            out.writeheader()
            out.writerows(self.state["history"])
        tmp.replace(self.run_dir / "metrics.csv")
        # a figure not measured (NaN) is left out: a detector has no val loss and no train mAP
        train = "  ".join(f"{m} {row[f'train_{m}']:.4f}" for m in self.task.metrics
                          if not math.isnan(row[f"train_{m}"]))
        val = "".join(f"val {m} {row[f'val_{m}']:.4f}  " for m in self.task.metrics
                      if not math.isnan(row[f"val_{m}"]))
        self.console.print(f"epoch {row['epoch']:>3}/{self.cfg.train.epochs}  train {train}  {val}"
                           f"lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s  {row['images_per_s']:,.0f} img/s")


class FollowerBook(EpochBook):
    """The bookkeeping of a rank other than 0: the same decisions (epochs, best value, early
    stopping) from the same rows, and no files, logs or callbacks."""

    def _open_logs(self, resumed: bool) -> None:
        pass

    def _log(self, row: dict) -> None:
        pass

    def _save_best(self, deployable: Callable, scored: torch.nn.Module, extra: dict) -> None:
        pass

    def _save_resume(self, snapshot: Callable[[], dict]) -> None:
        pass

    def notify(self, event: str, *args) -> None:
        pass


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
