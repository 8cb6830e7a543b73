"""Dynamic batching: gather concurrent requests into one forward pass.

Requests put their items (images) in a queue and await a future. One asyncio task forms
batches: it takes the oldest job, waits up to `max_wait_s` (measured from that job's arrival)
for more items, up to `max_batch_size`, and runs the batch on a single worker thread so the
event loop keeps accepting requests meanwhile. Jobs that arrive during a forward pass join the
next batch, so batches grow with load and throughput with concurrency.

The wait is skipped when no other request is on its way (`arriving() == 0`): a lone client
then gets the latency of an unbatched server.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from cvrecipe.serve.metrics import Metrics


class QueueFull(Exception):
    """More images are waiting than the queue allows."""


class ShuttingDown(Exception):
    """The batcher no longer takes new work."""


@dataclass
class _Job:
    items: list  # what `infer` takes, one entry per image
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """`infer(items) → (one output per item, context)` runs on the worker thread; each job's
    future gets the outputs of its own items and the context (the model that produced them)."""

    def __init__(self, infer: Callable[[list], tuple[list, Any]], max_batch_size: int,
                 max_wait_s: float, queue_size: int, metrics: Metrics, arriving: Callable[[], int]):
        self.infer = infer
        self.arriving = arriving  # requests accepted but not yet submitted (reading or checking their body)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._pending_items = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvrecipe-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cvrecipe-batcher")

    def submit(self, items: list) -> asyncio.Future:
        """Queue n ≤ max_batch_size items; the future resolves to (their outputs, context)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(items) > self.max_batch_size:
            raise ValueError(f"{len(items)} images in one job; at most max_batch_size={self.max_batch_size}")
        if self._pending_items + len(items) > self.queue_size:
            raise QueueFull(f"{self._pending_items} images are waiting (queue size {self.queue_size})")
        job = _Job(items, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._set_depth(self._pending_items + len(items))
        self._wakeup.set()
        return job.future

    async def close(self) -> None:
        """Stop taking work, finish every queued job, then stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    def _set_depth(self, n: int) -> None:
        self._pending_items = n
        self.metrics.queue_depth.set(n)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_more()
            jobs = self._take_batch()
            if jobs:
                await self._forward(jobs)

    async def _wait_for_more(self) -> None:
        """Wait until the batch is full, the oldest job has waited max_wait_s, nobody else is on
        the way, or shutdown."""
        deadline = self._pending[0].enqueued + self.max_wait_s
        while self._pending_items < self.max_batch_size and not self._closing and self.arriving() > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Job]:
        """Oldest jobs first, as many as fit in max_batch_size; jobs whose caller gave up are dropped."""
        jobs, n = [], 0
        while self._pending and n + len(self._pending[0].items) <= self.max_batch_size:
            job = self._pending.popleft()
            self._set_depth(self._pending_items - len(job.items))
            if not job.future.done():  # done here = cancelled by a timed-out request
                jobs.append(job)
                n += len(job.items)
        return jobs

    async def _forward(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        for job in jobs:
            self.metrics.queue_time.observe(start - job.enqueued)
        batch = [item for job in jobs for item in job.items]
        self.metrics.batch_size.observe(len(batch))
        try:
            outputs, context = await asyncio.get_running_loop().run_in_executor(self._worker, self.infer, batch)
        except Exception as err:  # noqa: BLE001 - a failed batch fails its requests, not the server
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.metrics.inference.observe(time.perf_counter() - start)
        self.metrics.images.inc(len(batch))
        offset = 0
        for job in jobs:
            n = len(job.items)
            if not job.future.done():
                job.future.set_result((outputs[offset:offset + n], context))
            offset += n
