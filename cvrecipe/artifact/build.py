"""Build the configured model for a dataset: the network, its input normalisation and any
initialisation that depends on the training images."""
from __future__ import annotations

import numpy as np
import torch

from cvrecipe.config import Config
from cvrecipe.data import ImageDataset
from cvrecipe.data.dataset import pixel_mean_std
from cvrecipe.models import ImageModel, create_model
from cvrecipe.models.head import set_bias_to_prior
from cvrecipe.tasks import entry, get_task

INIT_SAMPLE = 5000  # training images for data-dependent initialisation (the speedrun net's whitening)
STATS_SAMPLE = 100_000  # images on disk whose pixel statistics normalise the input: reading them all costs a pass


def build_model(cfg: Config, ds: ImageDataset, train_x: torch.Tensor | None = None) -> ImageModel:
    """The configured model, with its input normalisation (and any data-dependent initialisation)
    computed from the training images; `train_x`: those images already on the training device,
    where the statistics are then computed (a GPU does it in milliseconds). The model comes back on
    the CPU, or on train_x's device when it had data-dependent initialisation to do there.

    Training images on disk (a ShardedArray, data larger than memory) are read for this in chunks;
    the input statistics then come from a seeded sample of at most STATS_SAMPLE of them (all of
    them for a smaller set, hence the same values as in memory)."""
    c, h, w = ds.image_shape
    task = get_task(cfg.task, cfg)
    h, w = task.input_size(cfg, (h, w))  # segmentation trains on crops: the model's input is a crop
    on_disk = not isinstance(ds.train.x, np.ndarray) and train_x is None
    pixels = ds.train.x if on_disk else torch.from_numpy(ds.train.x) if train_x is None else train_x
    mean = std = None
    if cfg.data.normalize:
        mean, std = pixel_mean_std(_stats_sample(pixels, cfg.train.seed) if on_disk else pixels)
        mean, std = mean.tolist(), np.maximum(std, 1e-3).tolist()
    model = create_model(cfg.model.name, num_classes=len(ds.classes), in_channels=c, input_size=(h, w),
                         mean=mean, std=std, class_names=ds.classes, outputs=entry(task.name).model_outputs,
                         **task.model_kwargs(config=cfg),
                         **cfg.model.kwargs)
    model.meta = {"task": task.name, **model.meta}  # what the outputs mean, read back by task_of(meta)
    model.meta.update(task.model_meta(cfg, (h, w)))  # e.g. how images larger than the input are run (tiles)
    if ds.colours:  # the classes' colours, for mask overlays wherever the model is used
        model.meta["class_colours"] = ds.colours
    if cfg.model.init_bias_prior:
        set_bias_to_prior(model, ds.train.y, len(ds.classes))
    if hasattr(model.net, "init_from_data"):  # e.g. the speedrun net's whitening layer
        sample = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.train.seed))[:INIT_SAMPLE]
        sample = sample.sort().values
        chosen = torch.from_numpy(pixels[sample.numpy()]) if on_disk else pixels[sample.to(pixels.device)]
        model.to(chosen.device)  # computed where the images are
        model.net.init_from_data(model, chosen)
    return model


def _stats_sample(pixels, seed: int):
    """All the images when there are at most STATS_SAMPLE, else a seeded sample (a view: read later, in chunks)."""
    if len(pixels) <= STATS_SAMPLE:
        return pixels
    keep = np.random.default_rng(seed).choice(len(pixels), STATS_SAMPLE, replace=False)
    return pixels.take(np.sort(keep))
