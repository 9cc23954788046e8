"""The leader's upkeep of the tasks' search documents (`sendscript/task_search.py`).

- **Backfill.** An earlier version kept the search indexes on `script_tasks` and
  wrote no search documents. While those indexes are there, the leader writes every
  stored task's search document and then drops them (`backfill_search`): once
  after the upgrade, and again if a producer on an older SDK makes them again. Until
  it has, the console's search does not list the tasks stored before the upgrade
  (each is still found by its id).
- **Orphans.** A search document goes in just before its task and comes out just
  after it, so a crash between the two leaves one that no task answers (readers
  skip it). Once it is older than any task is kept (the longest retention, and
  `ORPHAN_MARGIN`), one whose task is gone is an orphan for sure: the leader deletes
  those (`drop_orphan_search`), reading forward by created_at from where it got to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import TASKS, chunks, drop_index, insert_search
from sendscript.task_search import (
    BACKFILL_BATCH,
    MOVED_INDEXES,
    SEARCH,
    SEARCH_PROJECTION,
    search_doc,
)

# Past the longest retention by this much, a search document's task, if it is gone, is
# not about to be stored: the two inserts of a store are milliseconds apart.
ORPHAN_MARGIN = timedelta(days=1)


class SearchUpkeep:
    """Every `SENDSCRIPT_RETENTION_SWEEP_S` seconds, when leading: a backfill if due,
    then the orphans."""

    def __init__(self, settings: Settings, db: AsyncDatabase,
                 leading: Callable[[], bool]) -> None:
        self.settings = settings
        self.db = db
        self.leading = leading
        self.written = 0
        self.orphans = 0
        self.orphan_age = timedelta(seconds=max(settings.retention_success_s,
                                                settings.retention_failed_s)) + ORPHAN_MARGIN
        self.checked_to = EARLIEST_CREATED  # search documents before this were checked

    async def run(self, stop: asyncio.Event) -> None:
        async def step() -> None:
            if self.leading():
                await self.backfill(stop)
                await self.drop_orphans(stop)
            else:  # a new leader starts from the beginning: what it knew may be stale
                self.checked_to = EARLIEST_CREATED

        await every(stop, self.settings.retention_sweep_s, "search upkeep", step)

    async def backfill(self, stop: asyncio.Event | None = None) -> int:
        written = await backfill_search(self.db, stop)
        if written:
            logger.info("search backfill: {} search document(s) written for tasks stored "
                        "before them", written)
        self.written += written
        return written

    async def drop_orphans(self, stop: asyncio.Event | None = None,
                           now: datetime | None = None) -> int:
        """Orphaned search documents created before `now` less the orphan age."""
        before = (now or utcnow()) - self.orphan_age
        dropped = 0
        while not (stop is not None and stop.is_set()) and self.leading():
            gone, self.checked_to = await drop_orphan_search(self.db, self.checked_to, before)
            dropped += gone
            if self.checked_to >= before:
                break
        if dropped:
            logger.warning("deleted {} search document(s) whose task was gone (a crash "
                           "between a task's two writes)", dropped)
        self.orphans += dropped
        return dropped


async def backfill_search(db: AsyncDatabase, stop: asyncio.Event | None = None) -> int:
    """Write the search documents of tasks an earlier version stored without them,
    then drop the indexes that served search on script_tasks then
    (`task_search.MOVED_INDEXES`). Those indexes being there is what says a backfill
    is due: a new install never has them, and a producer on an older SDK that makes
    them again gets what it stored copied at the next pass. Every write is an insert
    of a document that never changes, so two passes at once write it once. Answers
    the documents written; stops early (keeping the indexes) once `stop` is set."""
    present = await db[TASKS].index_information()
    moved = [name for name in MOVED_INDEXES if name in present]
    if not moved:
        return 0
    written = 0
    part: list[dict[str, Any]] = []
    async for doc in db[TASKS].find({}, SEARCH_PROJECTION, batch_size=BACKFILL_BATCH):
        part.append(search_doc(doc))
        if len(part) >= BACKFILL_BATCH:
            written += await insert_search(db, part)
            part = []
            if stop is not None and stop.is_set():
                return written
    written += await insert_search(db, part)
    for name in moved:
        await drop_index(db[TASKS], name)
    return written


# No task is created before this: where the leader's search for orphans starts.
EARLIEST_CREATED = datetime(2000, 1, 1, tzinfo=UTC)
ORPHAN_BATCH = 1000


async def drop_orphan_search(db: AsyncDatabase, after: datetime,
                             before: datetime) -> tuple[int, datetime]:
    """Of the search documents created in [after, before), the first `ORPHAN_BATCH` by
    created_at: delete those whose task is gone (`before` must be old enough that no
    task of them can still be on its way in). Answers how many it deleted and where
    the next call goes on from: `before` once the range is read."""
    docs = [d async for d in db[SEARCH].find(
        {"created_at": {"$gte": after, "$lt": before}}, {"created_at": 1})
        .sort("created_at", ASCENDING).limit(ORPHAN_BATCH)]
    ids = [d["_id"] for d in docs]
    live = {d["_id"] for part in chunks(ids)
            async for d in db[TASKS].find({"_id": {"$in": part}}, {"_id": 1})}
    gone = [i for i in ids if i not in live]
    for part in chunks(gone):
        await db[SEARCH].delete_many({"_id": {"$in": part}})
    if len(docs) < ORPHAN_BATCH:
        return len(gone), before
    last = docs[-1]["created_at"]
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    # The last instant is read again next time (it may go on past this read), unless
    # the whole read was that one instant (a fan-out wider than a read): then past it.
    return len(gone), last if last > after else last + timedelta(milliseconds=1)

