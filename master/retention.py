"""Retention: the leader deletes finished tasks, their records and old logs when due.

Why not the server's TTL monitor alone: the embedded SecantusDB's sweeper decodes
every document of every collection that has a TTL index, under its global lock,
once a minute. With about 700,000 tasks stored that froze the server for 11-15 s a
minute, and the freeze grows with what is stored, not with what expires. So the
embedded server runs with its sweeper off, and the leader master deletes what is due
here, reading windows of the expiry field's index: its work is proportional to what
expires. On MongoDB the TTL indexes stay (`store.all_indexes`); both delete the same
documents, whichever comes first.

What is due, per collection: `script_tasks` and `task_exec_records` past their
`purge_at`; `task_logs` received more than the longest retention ago (the log TTL).

Each delete is fenced by the leader lease's token (`fence.guard` right before it,
`master.leadership`): a master that stopped leading deletes nothing more. The
delete names what it expects besides (still due), so even the one delete a
process paused between its check and its send may issue late removes only what
was due anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from master.leadership import Fence, NotLeading
from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import LOGS, RECORDS, TASKS

BATCH = 1000  # documents one query returns, and one delete removes, at most
READS = 200  # reads of one collection per sweep at most: the rest waits for the next
# Nothing due can be older than this: a window starts here on a new leader, and
# doubles across the empty years in a few queries.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FIRST_WIDTH = timedelta(hours=1)
MIN_WIDTH = timedelta(milliseconds=1)
MAX_WIDTH = timedelta(days=3650)
# The window is not allowed to close behind this much of the recent past: a document
# written by a host whose clock is behind ours can be due a little before our now.
OVERLAP = timedelta(seconds=60)


@dataclass
class PurgeWindow:
    """Which range of an expiry field to read next (pure: no I/O).

    Everything before `floor` is known deleted, so a sweep starts there and reads
    `pos <= value < min(pos + width, cutoff)` until it has read up to the cutoff.
    The server materialises a whole window, so the width adapts to keep a read near
    `BATCH` documents: halved when a read comes back full (the rest of that window
    is read again), doubled when it comes back sparse.
    """

    floor: datetime = EARLIEST
    width: timedelta = FIRST_WIDTH
    pos: datetime | None = None  # the running sweep's position

    def next(self, cutoff: datetime) -> tuple[datetime, datetime] | None:
        """The next window of a sweep up to `cutoff`, or None when it is done."""
        pos = self.floor if self.pos is None else self.pos
        if pos >= cutoff:
            self.pos = None
            return None
        self.pos = pos
        return pos, pos + min(self.width, cutoff - pos)

    def read(self, window: tuple[datetime, datetime], found: int, cutoff: datetime) -> None:
        """Record that a read of `window` found `found` documents (and deleted them)."""
        if found >= BATCH:
            self.width = max(self.width / 2, MIN_WIDTH)
            return
        hi = window[1]
        self.pos = hi
        self.floor = max(self.floor, min(hi, cutoff - OVERLAP))
        if found * 4 < BATCH:
            self.width = min(self.width * 2, MAX_WIDTH)


@dataclass
class Target:
    """One collection's expiry: documents whose `key` is before `cutoff(now)`."""

    collection: str
    key: str
    cutoff: Callable[[datetime], datetime]
    window: PurgeWindow = field(default_factory=PurgeWindow)


def targets(settings: Settings) -> list[Target]:
    log_keep = timedelta(seconds=max(settings.retention_success_s, settings.retention_failed_s))
    return [Target(TASKS, "purge_at", lambda now: now),
            Target(RECORDS, "purge_at", lambda now: now),
            Target(LOGS, "received_at", lambda now: now - log_keep)]


def due_in(key: str, lo: datetime, hi: datetime) -> dict[str, Any]:
    """The documents of one window: a range of the expiry field's index."""
    return {key: {"$gte": lo, "$lt": hi}}


class Retention:
    """The leader's retention sweep, every `SENDSCRIPT_RETENTION_SWEEP_S` seconds."""

    def __init__(self, settings: Settings, db: AsyncDatabase,
                 leading: Callable[[], bool] = lambda: True,
                 fence: Fence | None = None) -> None:
        self.settings = settings
        self.db = db
        self.leading = leading
        self.fence = fence
        self.targets = targets(settings)
        self.deleted: dict[str, int] = {t.collection: 0 for t in self.targets}

    async def run(self, stop: asyncio.Event) -> None:
        async def step() -> None:
            if self.leading():
                try:
                    await self.sweep(stop)
                except NotLeading as exc:  # logged and counted by the lease
                    logger.info("retention stopped: {}", exc)
            else:  # a new leader starts from the beginning: what it knew may be stale
                for target in self.targets:
                    target.window = PurgeWindow()

        await every(stop, self.settings.retention_sweep_s, "retention", step)

    async def sweep(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """Delete everything due now, window by window; answer the counts deleted."""
        now = utcnow()
        done: dict[str, int] = {}
        for target in self.targets:
            done[target.collection] = await self._sweep_one(target, now, stop)
        if any(done.values()):
            logger.info("retention deleted {}", {k: v for k, v in done.items() if v})
        return done

    async def _sweep_one(self, target: Target, now: datetime,
                         stop: asyncio.Event | None) -> int:
        col = self.db[target.collection]
        cutoff = target.cutoff(now)
        total = 0
        for _ in range(READS):
            if (window := target.window.next(cutoff)) is None:
                break
            if (stop is not None and stop.is_set()) or not self.leading():
                target.window.pos = None
                break
            lo, hi = window
            ids = [d["_id"] async for d in col.find(due_in(target.key, lo, hi),
                                                   {"_id": 1}).limit(BATCH)]
            if ids:
                # Still due as the delete runs: a task retried meanwhile has no purge_at.
                if self.fence is not None:
                    await self.fence.guard(f"retention delete in {target.collection}")
                result = await col.delete_many({"_id": {"$in": ids},
                                                target.key: {"$lt": hi}})
                total += result.deleted_count
            target.window.read(window, len(ids), cutoff)
        self.deleted[target.collection] += total
        return total
