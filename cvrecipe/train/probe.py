"""Linear probe on cached features: the frozen backbone runs once per image, then only the head trains.

With a frozen backbone and no augmentation every epoch would recompute identical features, so
they are computed once (eval mode, (N, F) float32) and the head trains on them: seconds instead
of minutes on a CPU. The checkpoint is still the whole model (backbone + trained head), so
evaluation, export and serving see an ordinary model. Resuming such a run trains it again from
the start (it takes seconds); last.ckpt is not written.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from cvrecipe.config import Config
from cvrecipe.data import ImageDataset
from cvrecipe.models import ImageClassifier
from cvrecipe.train.checkpoint import save_weights
from cvrecipe.train.loop import _improved, _log_epoch, _notify, epoch_generator
from cvrecipe.train.optim import build_optimizer, build_scheduler

FEATURE_BATCH = 256  # images per backbone forward when caching features


@torch.no_grad()
@torch.no_grad()
def backbone_features(model: ImageClassifier, x, device: torch.device, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """uint8 (N, C, H, W) images → (N, F) float32 features on `device`, computed in eval mode
    (channels-last: the backbone's depthwise convs run ~1.6x faster so on CPU)."""
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    x = torch.as_tensor(x)
    out = [model.net.features(model.normalize(x[i:i + batch_size].to(device))
                              .contiguous(memory_format=torch.channels_last)).float()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.net.head.in_features, device=device)


def fit_probe(cfg: Config, ds: ImageDataset, model: ImageClassifier, run_dir: Path, device: torch.device,
              console: Console, callbacks: list | None = None,
              features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Train `model.net.head` on cached backbone features; same metrics/checkpoint files as `fit`.
    `features`: (train, val) features already computed with `backbone_features` (benchmarks reuse them)."""
    tc = cfg.train
    model.net.freeze()
    t0 = time.perf_counter()
    if features is None:
        features = backbone_features(model, ds.train.x, device), backbone_features(model, ds.val.x, device)
        console.print(f"cached backbone features for {len(ds.train) + len(ds.val)} images in "
                      f"{time.perf_counter() - t0:.1f}s")
    train_f, val_f = features  # (N, F) float32 on `device`
    train_y, val_y = torch.from_numpy(ds.train.y).to(device), torch.from_numpy(ds.val.y).to(device)

    head = torch.nn.Sequential(model.net.dropout, model.net.head)  # the model's own modules: training updates it
    batch_size = min(tc.batch_size, len(train_y))
    steps_per_epoch = len(train_y) // batch_size
    optimizer = build_optimizer(head, tc)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    writer = SummaryWriter(str(run_dir))
    _notify(callbacks or [], "on_train_start", model, cfg, run_dir)
    history, best, step = [], None, 0
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        head.train()
        train_loss, train_acc = _probe_epoch(head, optimizer, scheduler, train_f, train_y, batch_size,
                                             epoch_generator(tc.seed, epoch, device), tc.label_smoothing)
        step += steps_per_epoch
        head.eval()
        with torch.no_grad():
            logits = head(val_f)
        val_loss = F.cross_entropy(logits, val_y).item() if len(val_y) else float("nan")
        val_acc = (logits.argmax(1) == val_y).float().mean().item() if len(val_y) else float("nan")
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc, "epoch_time_s": round(elapsed, 3),
               "images_per_s": round(steps_per_epoch * batch_size / elapsed, 1)}
        history.append(row)
        _log_epoch(row, writer, run_dir, history, console, tc.epochs)
        _notify(callbacks or [], "on_epoch_end", row, model)
        if not len(val_y) or _improved(row[tc.monitor], best, tc.mode, tc.min_delta):
            best = row[tc.monitor]
            save_weights(model, run_dir / "best.safetensors", {"epoch": epoch + 1, tc.monitor: best})
    writer.close()
    _notify(callbacks or [], "on_train_end", history, run_dir)
    return history


def _probe_epoch(head, optimizer, scheduler, feats, y, batch_size, gen, label_smoothing) -> tuple[float, float]:
    order = torch.randperm(len(y), generator=gen, device=y.device)
    steps = len(y) // batch_size
    loss_sum, correct = 0.0, 0
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        logits = head(feats[idx])
        loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        correct += (logits.argmax(1) == y[idx]).sum().item()
    return loss_sum / steps, correct / (steps * batch_size)
