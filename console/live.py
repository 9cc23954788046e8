"""Live parts of the pages, pushed over Server-Sent Events (the browser never polls).

One sampler per console process reads the overview once per interval, whatever the
number of browsers watching, turns the live roles' send and result counters into
rates (an hour of them is kept for the chart) and hands each snapshot to every open
stream. A task's page gets its own stream: the task's status and attempt, sent when
they change.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from fastapi.encoders import jsonable_encoder
from loguru import logger
from starlette.concurrency import run_in_threadpool

from console import data
from sendscript.store import TASKS

KEEPALIVE_S = 15.0


def sse(event: str, payload: Any) -> str:
    """One SSE message (JSON has no raw newlines, so one `data:` line is enough)."""
    return f"event: {event}\ndata: {json.dumps(jsonable_encoder(payload))}\n\n"


@dataclass
class Rates:
    """Per-second rates from cumulative counters, each over the last `smooth_s` (the
    roles publish their counters every heartbeat, slower than the samples: a plain
    difference would swing between 0 and twice the rate). A counter that went down (its
    role restarted) counts from its new value, never as a negative rate."""

    window_s: float = 3600.0
    smooth_s: float = 5.0
    points: deque[tuple[float, float, float]] = field(default_factory=deque)
    _raw: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add(self, now: float, sends: int, results: int) -> tuple[float, float, float] | None:
        raw = self._raw
        raw.append((now, sends, results))
        while len(raw) > 2 and raw[1][0] <= now - self.smooth_s:
            raw.popleft()
        dt = now - raw[0][0]
        if len(raw) < 2 or dt <= 0:
            return None
        moved = [0, 0]
        for before, after in pairwise(raw):
            for i in (0, 1):
                old, new = before[i + 1], after[i + 1]
                moved[i] += new - old if new >= old else new
        point = (now, round(moved[0] / dt, 2), round(moved[1] / dt, 2))
        self.points.append(point)
        while self.points and self.points[0][0] < now - self.window_s:
            self.points.popleft()
        return point

    def series(self) -> list[tuple[float, float, float]]:
        return list(self.points)


class Sampler:
    def __init__(self, stores: data.Stores, interval_s: float, counts_every_s: float,
                 counts: Callable[[], dict[str, int]] | None = None) -> None:
        self.stores = stores
        self.interval_s = interval_s
        self.counts_every_s = counts_every_s
        self.counts_fn = counts or (lambda: data.status_counts(stores))
        self.rates = Rates()
        self.latest: dict[str, Any] | None = None
        self._counts: dict[str, int] = {}
        self._counts_at = 0.0
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._wake = asyncio.Event()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=4)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(q)

    def poke(self) -> None:
        """Sample now (an action just changed something)."""
        self._counts_at = 0.0
        self._wake.set()

    def sample(self) -> dict[str, Any]:
        now = time.time()
        if now - self._counts_at >= self.counts_every_s:
            self._counts, self._counts_at = self.counts_fn(), now
        beats = data.heartbeats(self.stores)
        snap = data.overview(self.stores, by_status=self._counts, beats=beats)
        point = self.rates.add(now, *data.rate_totals(*beats))
        snap["rate"] = point
        snap["at"] = now
        return snap

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                snap = await run_in_threadpool(self.sample)
                self.latest = snap
                for q in list(self._subscribers):
                    if q.full():  # a slow browser skips a snapshot, never blocks the rest
                        q.get_nowait()
                    q.put_nowait(snap)
            except Exception as exc:  # a store away for a while: try again next interval
                logger.warning("console sampler: {!r}", exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass

    async def stream(self, disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        q = self.subscribe()
        try:
            yield sse("series", self.rates.series())
            if self.latest is not None:
                yield sse("overview", self.latest)
            while not await disconnected():
                try:
                    snap = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                yield sse("overview", snap)
        finally:
            self.unsubscribe(q)


_UNSEEN = object()


async def task_stream(stores: data.Stores, task_id: str, disconnected: Callable[[], Any],
                      interval_s: float) -> AsyncIterator[str]:
    """The task's status, attempt and last error each time they change."""
    last: Any = _UNSEEN  # the first state is always sent, even "gone"
    quiet = 0.0
    while not await disconnected():
        doc = await run_in_threadpool(stores.db[TASKS].find_one, {"_id": task_id},
                                      {"status": 1, "attempt": 1, "last_error": 1,
                                       "updated_at": 1})
        state = doc and (doc.get("status"), doc.get("attempt"), doc.get("last_error"))
        if state != last:
            last, quiet = state, 0.0
            yield sse("task", {"id": task_id, **(doc or {"gone": True})})
        elif quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keepalive\n\n"
        await asyncio.sleep(interval_s)
        quiet += interval_s
