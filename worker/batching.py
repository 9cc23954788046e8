"""Group commit: calls made by concurrent coroutines in one loop tick run as one batch.

A worker with many tasks in flight would otherwise pay one round trip per task
for every step; with this, a step costs one round trip per batch, and a lone
task pays no delay beyond one loop tick.

Coalescers may share a `Lane`: then one batch of all of them runs at a time, and a
batch is cut when the lane is free, so what arrived while another step's batch ran
joins it. A worker's Mongo steps share one: the embedded server (pure Python, its
storage engine's binding releasing the interpreter lock on every call) spends about
a fifth more CPU on a document write when statements run side by side than in a row
(`python -m bench.mongo_lanes`), and a statement cut later carries more documents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Lane:
    """One batch at a time across the coalescers that share it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()


class Coalescer(Generic[In, Out]):
    def __init__(
        self, run_batch: Callable[[list[In]], Awaitable[Sequence[Out]]], max_batch: int = 500,
        lane: Lane | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._lane = lane
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def __call__(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let the other callers of this tick join the batch
            if self._lane is None:
                await self._run_next()
            else:
                async with self._lane.lock:
                    await self._run_next()

    async def _run_next(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as exc:  # every caller gets the failure of its batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
