"""Linear probe on cached features: the frozen backbone runs once per image, then only the head trains.

With a frozen backbone and no augmentation every epoch would recompute identical features, so
they are computed once (eval mode, (N, F) float32) and the head trains on them: seconds instead
of minutes on a CPU. The checkpoint is still the whole model (backbone + trained head), so
evaluation, export and serving see an ordinary model. The loop's bookkeeping (book.py) applies as
in any run: best checkpoint, early stopping, checkpoint cadence, and last.ckpt to resume from
(the features are computed again on resume: eval mode makes them the same).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from cvrecipe.artifact.checkpoint import load_resume
from cvrecipe.config import Config
from cvrecipe.data import ImageDataset
from cvrecipe.models import ImageModel
from cvrecipe.device import epoch_generator
from cvrecipe.train.book import EpochBook, split_metrics
from cvrecipe.train.optim import build_optimizer, build_scheduler

FEATURE_BATCH = 256  # images per backbone forward when caching features


@torch.no_grad()
def backbone_features(model: ImageModel, x, device: torch.device, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """uint8 (N, C, H, W) images → (N, F) float32 features on `device`, computed in eval mode
    (channels-last: the backbone's depthwise convs run ~1.6x faster so on CPU)."""
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    out = [model.net.features(model.normalize(torch.as_tensor(x[i:i + batch_size]).to(device))
                              .contiguous(memory_format=torch.channels_last)).float()
           for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.net.head.in_features, device=device)


def fit_probe(cfg: Config, ds: ImageDataset, model: ImageModel, book: EpochBook, device: torch.device,
              resume: bool = False, features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Train `model.net.head` on cached backbone features, with the loop's bookkeeping (`book`:
    metrics, best checkpoint, early stopping, checkpoint cadence, last.ckpt); `resume` continues
    from last.ckpt. `features`: (train, val) features already computed with `backbone_features`
    (benchmarks reuse them)."""
    tc = cfg.train
    model.net.freeze()
    t0 = time.perf_counter()
    if features is None:
        features = backbone_features(model, ds.train.x, device), backbone_features(model, ds.val.x, device)
        book.console.print(f"cached backbone features for {len(ds.train) + len(ds.val)} images in "
                           f"{time.perf_counter() - t0:.1f}s")
    train_f, val_f = features  # (N, F) float32 on `device`
    train_y, val_y = torch.from_numpy(ds.train.y).to(device), torch.from_numpy(ds.val.y).to(device)

    head = torch.nn.Sequential(model.net.dropout, model.net.head)  # the model's own modules: training updates it
    batch_size = min(tc.batch_size, len(train_y))
    steps_per_epoch = len(train_y) // batch_size
    optimizer = build_optimizer(head, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    resumed = _restore(book.run_dir / "last.ckpt", model, optimizer, scheduler) if resume else None
    book.start(model, resumed)
    for epoch in book.epochs():
        t0 = time.perf_counter()
        head.train()
        train = _probe_epoch(book.task, head, optimizer, scheduler, train_f, train_y, batch_size,
                             epoch_generator(tc.seed, epoch, device), tc.label_smoothing, len(ds.classes))
        head.eval()
        with torch.no_grad():
            val = split_metrics(book.task, [(head(val_f).cpu(), val_y.cpu())], len(ds.classes)) if len(val_y) else None
        row = book.row(epoch, steps_per_epoch, optimizer.param_groups[0]["lr"], train, val,
                       time.perf_counter() - t0, steps_per_epoch * batch_size)
        snapshot = lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),  # noqa: E731
                            "scheduler": scheduler.state_dict(), "rng": {"cpu": torch.get_rng_state()}}
        if book.end_epoch(row, model, model, book.due(epoch), snapshot):
            break
    return book.finish()


def _restore(path: Path, model: ImageModel, optimizer, scheduler) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    ckpt = load_resume(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    return ckpt


def _probe_epoch(task, head, optimizer, scheduler, feats, y, batch_size, gen, label_smoothing,
                 num_classes) -> dict[str, float]:
    order = torch.randperm(len(y), generator=gen, device=y.device)
    steps = len(y) // batch_size
    loss_sum, meter = 0.0, task.meter(num_classes, y.device)
    for i in range(steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        logits = head(feats[idx])
        loss = task.loss(logits, y[idx], label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
        meter.update(logits.detach(), y[idx])
    return {"loss": loss_sum / steps, **meter.compute()}
