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
from cvrecipe.tasks import get_task

INIT_SAMPLE = 5000  # training images for data-dependent initialisation (the speedrun net's whitening)


def build_model(cfg: Config, ds: ImageDataset, train_x: torch.Tensor | None = None) -> ImageModel:
    """The configured model, with its input normalisation (and any data-dependent initialisation)
    computed from the training images; `train_x`: those images already on the training device,
    where the statistics are then computed (a GPU does it in milliseconds). The model comes back on
    the CPU, or on train_x's device when it had data-dependent initialisation to do there."""
    c, h, w = ds.image_shape
    task = get_task(cfg.task, cfg)
    h, w = task.input_size(cfg, (h, w))  # segmentation trains on crops: the model's input is a crop
    pixels = torch.from_numpy(ds.train.x) if train_x is None else train_x
    mean = std = None
    if cfg.data.normalize:
        mean, std = pixel_mean_std(pixels)
        mean, std = mean.tolist(), np.maximum(std, 1e-3).tolist()
    model = create_model(cfg.model.name, num_classes=len(ds.classes), in_channels=c, input_size=(h, w),
                         mean=mean, std=std, class_names=ds.classes, task=cfg.task, dropout=cfg.model.dropout,
                         **cfg.model.kwargs)
    model.meta.update(task.model_meta(cfg, (h, w)))  # e.g. how images larger than the input are run (tiles)
    if ds.colours:  # the classes' colours, for mask overlays wherever the model is used
        model.meta["class_colours"] = ds.colours
    if cfg.model.init_bias_prior:
        set_bias_to_prior(model, ds.train.y, len(ds.classes))
    if hasattr(model.net, "init_from_data"):  # e.g. the speedrun net's whitening layer
        model.to(pixels.device)  # computed where the images are
        sample = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(cfg.train.seed))[:INIT_SAMPLE]
        model.net.init_from_data(model, pixels[sample.sort().values.to(pixels.device)])
    return model
