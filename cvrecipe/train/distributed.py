"""Data-parallel training: the World a process belongs to, and what its ranks do together.

Processes are started by torchrun (`torchrun --nproc-per-node N -m cvrecipe train ...`, on one
machine or many) or by `cvrecipe train --nproc N`, which starts them through torchrun's launcher
API (launch.py). Every rank builds the same model from the same seed, draws the same (seed, epoch)
order of the training set and takes its own disjoint part of every step's global batch (feed.py);
DistributedDataParallel averages the gradients, so each step follows the gradient of the whole
global batch, as one process would. Only rank 0 writes (logs, metrics, checkpoints); training
metrics are reduced over the ranks, and validation gives each rank one contiguous part of the val
split and gathers the outputs to rank 0, so every image counts once. Checkpoints hold the plain
model, whatever the number of ranks, so a run resumes on any number of processes.

A single process is a World of size 1 whose collective methods return their input: the loop reads
the same with one process or many.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from cvrecipe.config import TrainConfig
from cvrecipe.device import resolve_device


class RanksLost(RuntimeError):
    """A collective failed: another rank died, hangs, or the network between them broke."""


@dataclass
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    timeout_s: float = 600.0
    _ddp: nn.Module | None = field(default=None, repr=False)
    _runs: nn.Module | None = field(default=None, repr=False)
    _trainable: tuple | None = field(default=None, repr=False)
    _listener: socket.socket | None = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The configured device; with several ranks on CUDA, this rank's GPU (cuda:LOCAL_RANK)."""
        device = resolve_device(name)
        if device.type == "cuda" and self.size > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # -- collectives (identity for a single process) ---------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the ranks (a new tensor; the argument is left alone)."""
        if self.size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key mean over the ranks. For metrics that are ratios over equal numbers of items per
        rank (every rank trains on the same number of images), the mean is the global ratio."""
        if self.size == 1:
            return values
        keys = sorted(values)
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(total)
        return {k: v / self.size for k, v in zip(keys, total.tolist())}

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (what rank 0 decided: a run folder, the epoch's row)."""
        if self.size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def augment_generator(self, gen: torch.Generator, seed: int, epoch: int) -> torch.Generator:
        """What draws this rank's augmentation in `epoch`: the epoch's generator itself (after the
        order was drawn from it) for a single process; with several ranks, one seeded by (seed,
        epoch, rank), so that ranks do not crop and flip their images alike."""
        if self.size == 1:
            return gen
        own = torch.Generator(device=gen.device)
        own.manual_seed(((seed * 100_003 + epoch) * 1_000_003 + self.rank + 1) % 2**63)
        return own

    def part(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous part of n items (sizes differ by at most one)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def rounds(self, n: int, batch: int) -> int:
        """Batches of `batch` in the largest rank's part of n items: how often gather_to_main is called."""
        largest = max(n * (r + 1) // self.size - n * r // self.size for r in range(self.size))
        return -(-largest // batch)

    def gather_to_main(self, items: Iterable, rounds: int) -> Iterator:
        """Every rank's items, on rank 0 as an iterator (rank order within a round); on the others
        they are sent at once and an empty iterator comes back. Each rank calls this with the same
        `rounds` and sends None once its items run out, so no item is padded or counted twice."""
        if self.size == 1:
            return iter(items)
        gathered = self._gather(iter(items), rounds)
        if self.is_main:
            return gathered
        collections.deque(gathered, maxlen=0)  # run the sends now
        return iter(())

    def _gather(self, mine: Iterator, rounds: int) -> Iterator:
        for _ in range(rounds):
            got = [None] * self.size if self.is_main else None
            dist.gather_object(next(mine, None), got, dst=0)
            if self.is_main:
                yield from (item for item in got if item is not None)

    # -- the module the step runs ----------------------------------------------------------------
    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """BatchNorm layers whose statistics cover the global batch (train.sync_bn), with several ranks."""
        return model if self.size == 1 else convert_sync_batchnorm(model)

    def replicate(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """What the training step calls: the model (compiled when asked), in DistributedDataParallel
        with several ranks. DDP synchronises the gradients of the parameters that were trainable
        when it was built, so it is rebuilt when that set changes (a backbone unfreezing, the
        speedrun net freezing its whitening bias); building it also copies rank 0's weights."""
        trainable = tuple(p.requires_grad for p in model.parameters())
        if self._runs is not None and (self.size == 1 or trainable == self._trainable):
            return self._runs
        self._trainable = trainable
        if self.size == 1:
            self._runs = torch.compile(model) if compile else model
            return self._runs
        device = next(model.parameters()).device
        self._ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self._runs = torch.compile(self._ddp) if compile else self._ddp
        return self._runs

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are averaged over the ranks
        only on the step's last micro-batch (DDP's no_sync before it)."""
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()


@contextlib.contextmanager
def join(train: TrainConfig) -> Iterator[World]:
    """The World of this process: torchrun's (WORLD_SIZE, RANK and LOCAL_RANK in the environment,
    the rendezvous store set up by its agent), else a single process. With several ranks the
    process group lives for the block (Gloo on CPU, NCCL on CUDA for tensors, Gloo for objects); a
    collective that gets no answer within train.rank_timeout_s, or whose peer went away, ends the
    block with RanksLost instead of hanging."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(timeout_s=train.rank_timeout_s)
        return
    world = World(size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), train.rank_timeout_s)
    device = world.device(train.device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=train.rank_timeout_s)
    store = _attempt_store(timeout) or _loopback_store(world, timeout)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=size, timeout=timeout)
    try:
        yield world
        dist.barrier()  # rank 0 serves the store: nobody leaves while another rank may still use it
    except Exception as err:
        if isinstance(err, dist.DistError) or _peer_trouble(err):
            raise RanksLost(f"rank {world.rank} of {world.size}: lost the other ranks ({_first_line(err)}); the job "
                            f"stops. A rank died, or hung for over train.rank_timeout_s={train.rank_timeout_s:g} s"
                            ) from err
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The key-value store the ranks meet in. Under torchrun (c10d rendezvous) it is the agent's
    store, which outlives a restart of the ranks: without a prefix per attempt, restarted ranks
    read the addresses their dead predecessors published and fail to connect (pytorch#135712), so
    each attempt (TORCHELASTIC_RESTART_COUNT) gets its own prefix. Elsewhere None: torch's env://."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/cvrecipe/{elastic_run_id()}/attempt_{attempt}", store)


def _loopback_store(world: World, timeout: datetime.timedelta) -> dist.Store | None:
    """On rank 0 of a job whose ranks meet on this machine's loopback address (MASTER_ADDR, as
    `cvrecipe train --nproc` sets it), the store env:// would serve, listening on that address only
    (torch's own listens on every interface); the other ranks connect through env:// as usual.
    None elsewhere."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    try:
        if world.rank != 0 or not addr or not port or not ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback:
            return None
    except (OSError, ValueError):
        return None
    world._listener = socket.create_server((addr, int(port)))  # kept open as long as the world: the store serves on it
    store = dist.TCPStore(addr, int(port), world.size, is_master=True, timeout=timeout, wait_for_workers=False,
                          multi_tenant=True, master_listen_fd=world._listener.fileno())
    return dist.PrefixStore("default_pg", store)  # the key prefix env:// gives the default group, as on the other ranks


_PEER_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
               "socket", "peer")


def _peer_trouble(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _PEER_WORDS)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


# -- torchrun's restarts: the ranks start again from scratch and find their run folder ---------------
ELASTIC_KEY = "elastic_run_id"  # in run.json: the torchrun job that started the run


def elastic_run_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restarted() -> bool:
    """Is this process a torchrun restart (--max-restarts) of ranks that failed?"""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def find_elastic_run(runs_dir: str | Path, run_id: str) -> Path | None:
    """The newest run folder under runs_dir that the torchrun job `run_id` started."""
    found = []
    for info in Path(runs_dir).glob("*/run.json"):
        try:
            data = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if data.get(ELASTIC_KEY) == run_id:
            found.append((info.stat().st_mtime, info.parent))
    return max(found)[1] if found else None


# -- SyncBatchNorm on CPU ----------------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) with its gradient: the backward of a sum over ranks is the sum over ranks of
    the gradients (each rank's loss depends on every rank's statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU tensors over Gloo (torch's SyncBatchNorm and DistributedDataParallel
    accept it on GPUs only): per-channel sums and sums of squares are added over the ranks (in
    float32) and the normalisation is written in plain ops, so autograd derives the backward. In
    eval mode, or with one process, it is an ordinary BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32)
        stats = _SumOverRanks.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased: what normalises the batch
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of `module` synchronised over the ranks: torch's SyncBatchNorm on a GPU,
    CpuSyncBatchNorm on a CPU. The new layers hold the same parameter objects (their requires_grad
    kept: the speedrun net's fixed scales stay fixed) and buffers, and state-dict keys do not change,
    so checkpoints load into the plain model."""
    if any(p.device.type != "cpu" for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cpu_sync(module)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        sync = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, _to_cpu_sync(child))
    return module
