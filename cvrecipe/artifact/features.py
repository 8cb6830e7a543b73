"""A trained run's penultimate features as an embedder for the data audit (`data inspect --embed
RUN`): the audit lives in the data layer and takes any Embedder; this one needs the run's model.

A run is also a classifier whose predictions are out of sample on the images it never trained on:
when the audited data is the run's own, the embedder carries the run's predicted probabilities
(as its evaluation makes them, test-time views included) and names the splits they may be used
for: every split but train. The audit's label-error ranking then uses those predictions there, and
its K-fold probe only where the run has seen the labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cvrecipe.artifact.checkpoint import load_model
from cvrecipe.artifact.inference import head_layer, predict_logits
from cvrecipe.config import load_run_config
from cvrecipe.data import locate
from cvrecipe.data.embed import Embedder, batches

HELD_OUT = frozenset({"val", "test"})  # a run fits its data's train split (a val carved from it counts as seen)
PREDICT_BATCH = 4096  # images read (from memory or the cache's shards) and conformed at a time
PATH_SOURCES = ("folder:", "masks:", "boxes:")  # data names that carry a path; others are registered names


def run_embedder(run: str | Path, data: str | None = None) -> Embedder:
    """A trained classifier's penultimate features (its head layer's input); images are resized
    to the run's input size when they differ. With `data` (the audited dataset's name) naming the
    run's own training data, also the run's predicted probabilities for its held-out splits."""
    model = load_model(Path(run))
    head = head_layer(model)
    if head is None:
        raise ValueError(f"{run}: the model has no linear head whose input could serve as features")
    size = tuple(model.meta["input_size"])
    channels = model.meta["in_channels"]
    cfg = load_run_config(Path(run))
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format  # as its evaluation runs
    model.to(memory_format=layout)  # channels_last: ~1.6x faster convolutions on a CPU

    def conform(x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) → uint8 at the run's channels and input size."""
        if x.shape[1] != channels:
            x = x.expand(-1, 3, -1, -1) if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
        return x

    def features(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].flatten(1).float()))
        try:
            model(conform(x).float().div(255).contiguous(memory_format=layout))
        finally:
            hook.remove()
        return captured[0]

    if data is None or not same_source(cfg.data.name, data):
        return Embedder(f"run:{run}", features)

    def probabilities(x, hflip_ok: bool) -> np.ndarray:
        """(N, K) softmax of the run's logits for uint8 images x (N, C, H, W), averaged over the test-time
        views its evaluation uses (mirrored ones only where the run trained on mirrored images)."""
        logits = [predict_logits(model, conform(b), channels_last=cfg.train.channels_last, tta=cfg.eval.tta,
                                 tta_mirror=cfg.augment.hflip and hflip_ok) for b in batches(x, PREDICT_BATCH)]
        return F.softmax(torch.cat(logits).float(), 1).numpy().astype(np.float64)

    return Embedder(f"run:{run}", features, classes=list(model.meta["class_names"]), probabilities=probabilities,
                    held_out=HELD_OUT)


def same_source(trained: str, audited: str) -> bool:
    """Do two data names mean the same data? Paths compare as the files they resolve to (from here);
    registered names as written. Unresolvable or different: no (the audit then uses its probe)."""
    kind = next((p for p in PATH_SOURCES if trained.startswith(p)), None)
    if kind is None or not audited.startswith(kind):
        return trained == audited
    a, b = locate(trained[len(kind):]), locate(audited[len(kind):])
    return a.exists() and b.exists() and a.resolve() == b.resolve()
