"""Dynamic batching for `motian serve`: requests that arrive close together share one forward pass.

Each request puts its items on an asyncio queue and awaits a future. One worker task takes the
first waiting item, then keeps taking until it holds `max_batch` items or `max_wait_ms` have
passed since that first item, runs the whole batch in a single worker thread (onnxruntime and
PyTorch release the GIL, so the event loop keeps accepting requests meanwhile) and resolves each
item's future with its own result. One thread, not a pool: the model is one session, and a
second concurrent forward pass would only compete for the same cores.

Admission is bounded: at most `max_queue` items may wait (queued, or gathered into the batch
being formed); a request beyond that is refused at once with `QueueFull` (the server answers
503 + Retry-After) instead of growing latency without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More items are waiting than the batcher admits (`max_queue`)."""


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Gathers items from concurrent callers into batches for `run_batch(values) -> results`
    (one result per value, in order). Start it with `start()` inside the running loop, stop it
    with `await close()`, which finishes every admitted item first."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.waiting = 0  # admitted items not yet handed to a forward pass
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="motian-infer")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, values: list[Any]) -> list[Any]:
        """Admit `values` (all or none) and wait for their results; QueueFull when they do not
        fit. The items of one request may be split over consecutive batches."""
        if self.waiting + len(values) > self.max_queue:
            raise QueueFull(f"{self.waiting} items waiting, at most {self.max_queue} admitted")
        loop = asyncio.get_running_loop()
        items = [_Item(v, loop.create_future()) for v in values]
        self.waiting += len(items)
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(i.future for i in items)))

    async def close(self) -> None:
        """Run what is admitted, then stop the worker and its thread."""
        if self._worker is not None:
            self._queue.put_nowait(None)  # after every admitted item: FIFO
            await self._worker
        self._thread.shutdown(wait=True)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = first.enqueued + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - time.perf_counter()
                try:  # take what is already queued even when the wait is over
                    item = self._queue.get_nowait() if timeout <= 0 else \
                        await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self.waiting -= len(batch)
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        """One forward pass; each caller gets its result, or the error, on its future. A caller
        that went away (client disconnected: its future was cancelled) is simply skipped."""
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            results = await loop.run_in_executor(self._thread, self.run_batch,
                                                 [i.value for i in batch])
        except Exception as err:  # noqa: BLE001 - handed to every caller, the worker lives on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
