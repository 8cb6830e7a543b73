"""The feed: where an epoch's training batches come from, between the dataset and the step.

Two sources of the same rows, behind one method (`gather`: the uint8 images and targets of each
list of indices, on the training device):

- DeviceArrays: the whole training split on the device (the fast path whenever it fits the memory
  budget): a batch is a gather by index, in memory.
- ShardStream: the split on disk, in the cache's shards (data larger than memory): threads read
  the rows of the next batches into host buffers (pinned on a GPU, so the copy overlaps the step)
  while the current batch trains.

The Feed takes this rank's part of the epoch's (seed, epoch) order, has the source gather it a
chunk of batches at a time, augments each chunk on the device through the task (images and
targets together) and yields the micro-batches. Both sources give the same rows in the same order
and the augmentation draws from the same generator in the same sequence, so a streamed epoch is
the in-memory epoch, bit for bit.
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cvrecipe.config import AugmentConfig
from cvrecipe.data import ShardedArray, Split
from cvrecipe.tasks import Task

AUGMENT_CHUNK_BYTES = 256 * 2**20  # uint8 images augmented in one go on a GPU (reflect padding: 4x in float)


class DeviceArrays:
    """The training split on the device: (N, C, H, W) uint8 images and (N, ...) targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def gather(self, pieces: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in pieces:
            yield self.x[idx], self.y[idx]


class ShardStream:
    """The training split on disk (images a ShardedArray; targets in memory or a ShardedArray of
    per-pixel masks). `gather` keeps reads of the next `prefetch` batches (at least one piece) in
    flight on `threads` threads: host memory holds those, the piece being used and nothing else
    of the split."""

    def __init__(self, split: Split, device: torch.device, batch: int, prefetch: int = 4, threads: int = 2):
        self.x, self.y, self.device = split.x, split.y, device
        self.batch, self.prefetch, self.threads = batch, prefetch, max(1, threads)
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.y)

    def gather(self, pieces: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not pieces:
            return
        lengths = [len(p) for p in pieces]
        host = np.split(torch.cat(pieces).cpu().numpy(), np.cumsum(lengths)[:-1])  # one device sync per epoch
        ahead = max(1, self.prefetch * self.batch // max(lengths))  # pieces: one batch on a CPU, many on a GPU
        with ThreadPoolExecutor(self.threads, thread_name_prefix="shard-reader") as pool:
            pending = collections.deque(pool.submit(self._read, rows) for rows in host[:ahead])
            coming = iter(host[ahead:])
            while pending:
                x, y = pending.popleft().result()
                rows = next(coming, None)
                if rows is not None:
                    pending.append(pool.submit(self._read, rows))
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows(self.x, rows), self._rows(self.y, rows)

    def _rows(self, array, rows: np.ndarray) -> torch.Tensor:
        if not isinstance(array, ShardedArray):
            return torch.from_numpy(array[rows])
        if not self.pin:
            return torch.from_numpy(array.read(rows))
        out = torch.empty((len(rows), *array.row_shape), dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype,
                          pin_memory=True)  # page-locked: the copy to the GPU runs while the step does
        array.read(rows, out.numpy())
        return out


@dataclass
class Feed:
    """An epoch's micro-batches for this rank. With `ranks` processes and `accum` micro-batches per
    step, optimisation step i covers positions [i·B, (i+1)·B) of the epoch's order (B = the global
    batch); rank r takes the r-th of `ranks` equal slices of it and splits that into `accum`
    micro-batches of `batch` images. Over the ranks that is exactly the single-process order."""
    source: DeviceArrays | ShardStream
    task: Task
    augment: AugmentConfig
    hflip_ok: bool
    base_flip: torch.Tensor  # (N,) bool: per-run flip coins for augment.flip_mode=alternate
    batch: int  # images per micro-batch on this rank
    steps: int  # optimisation steps per epoch
    accum: int = 1  # micro-batches per optimisation step
    rank: int = 0
    ranks: int = 1
    memory_format: torch.memory_format = torch.contiguous_format
    chunk: int | None = None  # micro-batches augmented together; None: 1 on a CPU, up to 256 MB on a GPU

    def mine(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's positions of `order`, in the order it trains on them."""
        per_step = self.batch * self.accum
        return order[:self.steps * per_step * self.ranks].view(self.steps, self.ranks, per_step)[:, self.rank].reshape(-1)

    def epoch(self, order: torch.Tensor, gen: torch.Generator, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (x, y) micro-batches of one epoch, augmented; `gen` draws the augmentation."""
        mine, batch = self.mine(order), self.batch
        batches = self.steps * self.accum
        chunk = self.chunk or self._default_chunk(batches, order.device)
        pieces = [mine[first * batch:min(first + chunk, batches) * batch] for first in range(0, batches, chunk)]
        for idx, (x, y) in zip(pieces, self.source.gather(pieces)):
            x, y = self.task.augment(x, y, self.augment, self.hflip_ok, gen, self.base_flip[idx], epoch)
            x = x.contiguous(memory_format=self.memory_format)  # batch slices of it stay contiguous
            for j in range(len(idx) // batch):
                yield x[j * batch:(j + 1) * batch], y[j * batch:(j + 1) * batch]

    def _default_chunk(self, batches: int, device: torch.device) -> int:
        """On a GPU several batches (the whole epoch for CIFAR-10) are augmented with one set of
        kernel launches: per batch that costs a dozen launches, a few % of a 5 ms step. On a CPU
        each batch is augmented as it is needed, so no second copy of the data is held in host memory."""
        if device.type != "cuda":
            return 1
        return max(1, min(batches, AUGMENT_CHUNK_BYTES // (self.batch * self._image_bytes())))

    def _image_bytes(self) -> int:
        x = self.source.x
        return int(np.prod(x.shape[1:])) * (x.element_size() if isinstance(x, torch.Tensor) else x.dtype.itemsize)
