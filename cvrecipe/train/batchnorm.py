"""BatchNorm statistics recomputed for the weights that are evaluated ("precise BN").

During training each BatchNorm keeps a running average of batch statistics taken from the weights
of the last few steps (at the speedrun's momentum, the last ~8 steps), and a weight average
(Lookahead/EMA) then averages those buffers along with the weights. Neither is the statistics of
the weights that are finally evaluated; one forward pass over a sample of training images with
those weights gives exactly that.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from cvrecipe.device import autocast


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, count: int, batch_size: int,
                          generator: torch.Generator, dtype: torch.dtype | None = None,
                          memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Replace every BatchNorm's running mean and variance, in place, by the average of its batch
    statistics over `count` training images (uint8 (N, C, H, W) on the model's device; a random
    sample drawn with `generator`, all N if count ≥ N), in batches of `batch_size` as in training,
    without augmentation, under autocast `dtype` (the training precision; None = fp32).

    The average over batches of per-batch variances is what a BatchNorm normalises by in training.
    A model without BatchNorm is left as it is. The model's train/eval mode is kept.
    """
    if count <= 0:
        raise ValueError(f"train.bn_recalibrate must be a positive number of training images, got {count}")
    pick = torch.randperm(len(images), generator=generator, device=images.device)[:count]
    batches = (images[pick[start:start + batch_size]].contiguous(memory_format=memory_format)
               for start in range(0, len(pick), batch_size))
    with autocast(images.device, dtype):
        update_bn(batches, model)  # resets the buffers, then a cumulative average (momentum None)
