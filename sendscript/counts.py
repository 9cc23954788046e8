"""Tasks per status, kept in Redis as tasks move, read in one round trip.

An aggregate over `script_tasks` grows with the collection (1.1 s at 20,000 tasks
on the embedded server), so `status`, the console and `/metrics` read counts kept
here instead. How they stay exact without a hook in every compare-and-set:

- Tasks are grouped in *buckets* of their `created_at` (which never changes),
  `SENDSCRIPT_COUNTS_BUCKET_S` seconds wide. Redis holds each bucket's counts per
  status (`{prefix}:counts:buckets`) and their sum (`{prefix}:counts:total`).
- Every status change sets `updated_at` (`sendscript.status.task_cas`, inserts,
  manual retries). The leader master's keeper asks Mongo, through the index on
  `updated_at`, which tasks changed since its last pass, and once more, an overlap
  later, which changed in that pass's window (clocks apart and writes in flight:
  a change that became visible up to `SENDSCRIPT_COUNTS_OVERLAP_S` after the time
  it carries is read then), and recounts just their buckets: one bounded range
  of `created_at` each, read through the tasks' search documents (their index on
  `created_at`: sendscript/task_search.py), the tasks then read by id. The
  bucket's counts are replaced and the totals moved by the difference, atomically
  (Lua, below).
- Retention deletes tasks without touching `updated_at`: each bucket keeps the
  time its next task is due to be purged (`{prefix}:counts:purge`), and is
  recounted once that time and retention's lag (`SENDSCRIPT_COUNTS_PURGE_LAG_S`) have passed.
- A missing or lost state (first start, a Redis flush, tasks inserted straight
  into Mongo with their search documents) is rebuilt once by one pass over the
  collection. A task stored without a search document (by another program) is
  not counted, as it is not found by search either.
- The keeper remembers the status of each task of the buckets it read whole
  (`KnownBuckets`, in its memory). While a bucket keeps moving, the next passes
  apply the moved tasks it read anyway (status and all) to that memory instead of
  reading the whole bucket again; a bucket is read whole again once its memory is
  `SENDSCRIPT_COUNTS_REFRESH_S` old (which also catches writes that did not set
  `updated_at`), when retention is due in it, and after another keeper passed.
  Under a deep backlog every young bucket moves on every pass: reading each whole
  every pass cost the embedded server about a tenth of its CPU.
- A bucket that begins after the keeper's memory began watching (the watermark of
  its first pass) and is newer than any bucket it held is started empty instead:
  each of its tasks was stored after that, so each is read as it changes (its
  insert set `updated_at`), and a whole read would find nothing more. It is read
  whole once its memory is `SENDSCRIPT_COUNTS_REFRESH_S` old, as any other.

So the counts equal an aggregate over the collection as of the keeper's last pass
(`lag_s` in the answer, about `SENDSCRIPT_COUNTS_INTERVAL_S`), whoever moved the
tasks and whatever process died meanwhile: each pass reads Mongo's truth, never
a delta a dead process may have missed. Its cost is proportional to the tasks
that moved, not to the tasks stored.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import redis.asyncio
from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.settings import Settings
from sendscript.store import TASKS, UPDATED_INDEX, chunks
from sendscript.task_search import SEARCH

NO_TIME = 0  # the bucket of tasks without created_at (written by other programs)
FIELDS = {"_id": 1, "created_at": 1, "status": 1, "purge_at": 1}
RANGE_BUCKETS = 64  # buckets recounted by one range query at most
REBUILD_WINDOW_S = 3600
REBUILD_FLOOR_S = 400 * 86400  # no task is kept longer (retention)
KNOWN_MAX = 200_000  # tasks the keeper remembers at most (about 30 MB)


@dataclass(frozen=True)
class CountKeys:
    prefix: str

    @property
    def buckets(self) -> str:
        return f"{self.prefix}:counts:buckets"

    @property
    def total(self) -> str:
        return f"{self.prefix}:counts:total"

    @property
    def purge(self) -> str:
        return f"{self.prefix}:counts:purge"

    @property
    def meta(self) -> str:
        """since (the updated_at watermark, epoch s), late (where the next re-read of
        late changes starts), at (last pass), built, passes,
        recounted (buckets in the last pass), read_whole (of them, read whole),
        changed_tasks and read_tasks (task documents read), took_s, by (the keeper)."""
        return f"{self.prefix}:counts:meta"

    def all(self) -> list[str]:
        return [self.buckets, self.total, self.purge, self.meta]


# Replace buckets' counts and move the totals by the difference, atomically.
# KEYS[1] buckets hash, KEYS[2] totals hash, KEYS[3] purge zset.
# ARGV: triples (bucket, counts JSON with "_t": the read time, next purge epoch or "").
# A replacement read before the bucket's stored one is skipped: a keeper that lost
# its lease while paused never rolls a bucket back.
REPLACE = """
local applied = 0
for i = 1, #ARGV, 3 do
  local b, new, nxt = ARGV[i], cjson.decode(ARGV[i + 1]), ARGV[i + 2]
  local raw = redis.call('HGET', KEYS[1], b)
  local old = raw and cjson.decode(raw) or {}
  if (old['_t'] or 0) <= new['_t'] then
    for s, n in pairs(old) do
      if s ~= '_t' then redis.call('HINCRBY', KEYS[2], s, -n) end
    end
    local any = false
    for s, n in pairs(new) do
      if s ~= '_t' then redis.call('HINCRBY', KEYS[2], s, n); any = true end
    end
    if any then redis.call('HSET', KEYS[1], b, ARGV[i + 1])
    else redis.call('HDEL', KEYS[1], b) end
    if nxt ~= '' and any then redis.call('ZADD', KEYS[3], nxt, b)
    else redis.call('ZREM', KEYS[3], b) end
    applied = applied + 1
  end
end
return applied
"""


def bucket_of(created_at: datetime | None, width_s: int) -> int:
    if created_at is None:
        return NO_TIME
    ts = _epoch(created_at)
    return int(ts // width_s) * width_s or width_s  # never NO_TIME


def _epoch(at: datetime) -> float:
    if at.tzinfo is None:  # pymongo answers naive UTC
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass
class Tally:
    """One bucket's counts as read, and when its next task is due to be purged."""

    counts: Counter[str] = field(default_factory=Counter)
    next_purge: float | None = None

    def add(self, doc: dict[str, Any]) -> None:
        self.add_entry(*_entry(doc))

    def add_entry(self, status: str, purge: float | None) -> None:
        self.counts[status] += 1
        if purge is not None:
            self.next_purge = purge if self.next_purge is None else min(self.next_purge, purge)


def tally(docs: Iterable[dict[str, Any]], width_s: int) -> dict[int, Tally]:
    out: dict[int, Tally] = defaultdict(Tally)
    for doc in docs:
        out[bucket_of(doc.get("created_at"), width_s)].add(doc)
    return out


def ranges(buckets: Iterable[int], width_s: int, most: int = RANGE_BUCKETS
           ) -> list[tuple[int, int]]:
    """Contiguous runs of buckets, as [start, end) times, each at most `most` wide."""
    out: list[tuple[int, int]] = []
    for b in sorted(b for b in set(buckets) if b != NO_TIME):
        if out and out[-1][1] == b and (b - out[-1][0]) < most * width_s:
            out[-1] = (out[-1][0], b + width_s)
        else:
            out.append((b, b + width_s))
    return out


def replace_args(tallies: dict[int, Tally], read_at: float, lag_s: float) -> list[str]:
    args: list[str] = []
    for b, t in tallies.items():
        counts: dict[str, Any] = {s: n for s, n in t.counts.items() if n}
        counts["_t"] = read_at
        nxt = "" if t.next_purge is None else str(max(t.next_purge, read_at) + lag_s)
        args += [str(b), json.dumps(counts), nxt]
    return args


class KnownBuckets:
    """The keeper's memory of the buckets it read whole: each task's status and purge
    time, and when the bucket was read (monotonic). Pure: the keeper reads, this
    decides what must be read whole and tallies what it knows."""

    def __init__(self, refresh_s: float, most: int = KNOWN_MAX) -> None:
        self.refresh_s = refresh_s
        self.most = most
        self._tasks: dict[int, dict[str, tuple[str, float | None]]] = {}
        self._read_at: dict[int, float] = {}
        self._moved_at: dict[int, float] = {}
        # Every change stamped after this (epoch seconds) is read by the passes that
        # keep this memory: the watermark of the first pass after it was cleared.
        self.watch_from: float | None = None
        self._newest = NO_TIME  # the newest bucket this memory has held

    def __len__(self) -> int:
        return sum(len(t) for t in self._tasks.values())

    def to_read(self, dirty: set[int], purged: set[int], now: float) -> set[int]:
        """The dirty buckets to read whole: unknown ones, ones retention may have
        deleted from, and ones known for longer than refresh_s."""
        return {b for b in dirty
                if b == NO_TIME or b in purged or b not in self._tasks
                or now - self._read_at[b] >= self.refresh_s}

    def start_new(self, dirty: set[int], purged: set[int], now: float) -> set[int]:
        """Start empty the dirty buckets that begin after `watch_from` and are newer
        than any this memory held: every task of one was stored (its insert stamping
        `updated_at`) after the watch began, so the passes read each as it changes.
        A bucket held before and forgotten is not one of them: it is read whole."""
        if self.watch_from is None:
            return set()
        new = {b for b in dirty - purged
               if b != NO_TIME and b > self.watch_from and b > self._newest}
        for b in new:
            self.load(b, (), now)
        return new

    def load(self, bucket: int, docs: Iterable[dict[str, Any]], now: float) -> None:
        self._tasks[bucket] = {str(d["_id"]): _entry(d) for d in docs}
        self._read_at[bucket] = self._moved_at[bucket] = now
        self._newest = max(self._newest, bucket)

    def note(self, bucket: int, docs: Iterable[dict[str, Any]], now: float) -> None:
        """Tasks of a known bucket read since it was loaded (moved or new)."""
        known = self._tasks[bucket]
        for d in docs:
            known[str(d["_id"])] = _entry(d)
        self._moved_at[bucket] = now

    def tally(self, bucket: int) -> Tally:
        t = Tally()
        for status, purge in self._tasks.get(bucket, {}).values():
            t.add_entry(status, purge)
        return t

    def forget(self, now: float) -> None:
        """Drop the buckets that stopped moving a refresh ago (their counts stay right
        in Redis; a later move reads them whole), then the least recently moved ones
        while more than `most` tasks are remembered."""
        for b in [b for b, at in self._moved_at.items() if now - at >= self.refresh_s]:
            self._drop(b)
        size = len(self)
        for b in sorted(self._moved_at, key=self._moved_at.__getitem__):
            if size <= self.most:
                break
            size -= len(self._tasks[b])
            self._drop(b)

    def clear(self) -> None:
        self._tasks.clear()
        self._read_at.clear()
        self._moved_at.clear()
        self.watch_from = None
        self._newest = NO_TIME

    def _drop(self, bucket: int) -> None:
        del self._tasks[bucket], self._read_at[bucket], self._moved_at[bucket]


def _entry(doc: dict[str, Any]) -> tuple[str, float | None]:
    purge = doc.get("purge_at")
    return str(doc.get("status")), _epoch(purge) if isinstance(purge, datetime) else None


@dataclass
class PassReport:
    recounted: int = 0  # buckets whose counts were replaced
    read_whole: int = 0  # of them, read whole (the others from the keeper's memory)
    read_tasks: int = 0  # task documents the pass read (changed ones and whole buckets)
    changed_tasks: int = 0
    rebuilt: bool = False
    took_s: float = 0.0


class CountKeeper:
    """The leader's pass over what moved (see the module's doc); a loop for the master."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, db: AsyncDatabase,
                 leading: Callable[[], bool] = lambda: True,
                 guard: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.client = client
        self.col = db[TASKS]
        self.search = db[SEARCH]
        self.keys = CountKeys(settings.keys.prefix)
        self.leading = leading
        # The leader's token check (master.leadership) before the rebuild's delete:
        # the one rewrite that removes what a pass did not read again.
        self.guard = guard
        self.width = int(settings.counts_bucket_s)
        self._replace = client.register_script(REPLACE)
        self.last = PassReport()
        self.book = KnownBuckets(settings.counts_refresh_s)
        # Written with each pass: a pass by another keeper between two of ours moved
        # the watermark past changes we never read, so our memory is stale then.
        self.me = uuid.uuid4().hex

    async def run(self, stop: asyncio.Event) -> None:
        from sendscript.backoff import every

        async def step() -> None:
            if self.leading():
                await self.run_pass()

        await every(stop, self.settings.counts_interval_s, "task counts", step)

    async def ensure_index(self) -> None:
        await self.col.create_indexes([UPDATED_INDEX])

    async def run_pass(self) -> PassReport:
        started = time.monotonic()
        meta = await self.client.hgetall(self.keys.meta)
        if meta.get(b"by", b"").decode() != self.me:
            self.book.clear()
        if not meta.get(b"built"):
            report = await self.rebuild()
        else:
            since = float(meta.get(b"since", 0.0))
            # late missing (an earlier version's state): re-read one whole overlap
            late = float(meta.get(b"late", since - self.settings.counts_overlap_s))
            report = await self._incremental(since, late)
        report.took_s = round(time.monotonic() - started, 3)
        await self.client.hset(self.keys.meta, mapping={
            "at": time.time(), "recounted": report.recounted, "took_s": report.took_s,
            "changed_tasks": report.changed_tasks, "read_whole": report.read_whole,
            "read_tasks": report.read_tasks,
            "by": self.me})
        await self.client.hincrby(self.keys.meta, "passes", 1)
        self.last = report
        return report

    async def rebuild(self) -> PassReport:
        """Count every task once (first start, lost state): one pass, no sort."""
        read_at = time.time()
        self.book.clear()  # not kept: a rebuild reads every task stored
        tallies: dict[int, Tally] = defaultdict(Tally)
        # Back in time an hour at a time (each a bounded range of the created_at index;
        # one scan of everything times out on a large collection), until every task
        # stored when we began is counted, or past any retention.
        stored = await self.col.estimated_document_count()
        seen = 0
        async for doc in self._created({"created_at": None}):
            tallies[NO_TIME].add(doc)
            seen += 1
        top = _dt(read_at + 3600)
        floor = _dt(read_at - REBUILD_FLOOR_S)
        while seen < stored and top > floor:
            bottom = top - timedelta(seconds=REBUILD_WINDOW_S)
            async for doc in self._created({"created_at": {"$gte": bottom, "$lt": top}}):
                tallies[bucket_of(doc.get("created_at"), self.width)].add(doc)
                seen += 1
            top = bottom
        if self.guard is not None:
            await self.guard("rebuild task counts")
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.buckets, self.keys.total, self.keys.purge)
        await pipe.execute()
        await self._apply(tallies, read_at)
        since = read_at - self.settings.counts_overlap_s
        await self.client.hset(self.keys.meta, mapping={
            "since": since, "late": since - self.settings.counts_overlap_s, "built": 1})
        logger.info("task counts rebuilt over {} bucket(s)", len(tallies))
        return PassReport(recounted=len(tallies), rebuilt=True)

    async def _incremental(self, since: float, late: float) -> PassReport:
        """Tasks changed since the last pass (`since`), and again those of the windows
        that are now an overlap old (`late` to `since` less the overlap): each change
        read twice, not once a pass for as long as an overlap reaching back would."""
        read_at = time.time()
        late_to = since - self.settings.counts_overlap_s
        changed: dict[int, list[dict[str, Any]]] = defaultdict(list)
        n = 0
        windows = [{"$gt": _dt(since)}]
        if late_to > late:
            windows.append({"$gt": _dt(late), "$lte": _dt(late_to)})
        for window in windows:
            async for d in self.col.find({"updated_at": window}, FIELDS):
                changed[bucket_of(d.get("created_at"), self.width)].append(d)
                n += 1
        purged = {int(b) for b in await self.client.zrangebyscore(self.keys.purge, "-inf",
                                                                    read_at)}
        dirty = set(changed) | purged
        now = time.monotonic()
        if self.book.watch_from is None:  # this pass reads every change after `since`
            self.book.watch_from = since
        self.book.start_new(dirty, purged, now)
        whole = self.book.to_read(dirty, purged, now)
        for b in dirty - whole:  # read whole below: newer than these
            self.book.note(b, changed[b], now)
        read = await self.recount(whole, now)
        await self._apply({b: self.book.tally(b) for b in dirty}, read_at)
        self.book.forget(now)
        await self.client.hset(self.keys.meta, mapping={"since": read_at,
                                                        "late": max(late, late_to)})
        return PassReport(recounted=len(dirty), read_whole=len(whole), changed_tasks=n,
                          read_tasks=n + read)

    async def recount(self, buckets: set[int], now: float) -> int:
        """Read these buckets whole into the keeper's memory; the tasks read."""
        read: dict[int, list[dict[str, Any]]] = {b: [] for b in buckets}  # empty: removed
        for lo, hi in ranges(buckets, self.width):
            async for d in self._created({"created_at": {"$gte": _dt(lo), "$lt": _dt(hi)}}):
                b = bucket_of(d.get("created_at"), self.width)
                if b in read:
                    read[b].append(d)
        if NO_TIME in buckets:
            read[NO_TIME] = [d async for d in self._created({"created_at": None})]
        for b, docs in read.items():
            self.book.load(b, docs, now)
        return sum(len(docs) for docs in read.values())

    async def _created(self, created: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The tasks whose search documents match `created` (a condition on created_at,
        read through their created_at index: script_tasks has none), read by id."""
        ids = [d["_id"] async for d in self.search.find(created, {"_id": 1})]
        for part in chunks(ids):
            async for doc in self.col.find({"_id": {"$in": part}}, FIELDS):
                yield doc

    async def _apply(self, tallies: dict[int, Tally], read_at: float) -> None:
        items = list(tallies.items())
        for i in range(0, len(items), 500):
            args = replace_args(dict(items[i:i + 500]), read_at, self.settings.counts_purge_lag_s)
            await self._replace(keys=[self.keys.buckets, self.keys.total, self.keys.purge],
                                args=args)


# -- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    by_status: dict[str, int]
    built: bool
    lag_s: float | None  # seconds since the keeper's last pass

    def to_dict(self) -> dict[str, Any]:
        return {"by_status": self.by_status, "built": self.built, "lag_s": self.lag_s}


def _counts(total: dict[bytes, bytes], meta: dict[bytes, bytes]) -> Counts:
    at = meta.get(b"at")
    return Counts({k.decode(): int(v) for k, v in sorted(total.items()) if int(v)},
                  bool(meta.get(b"built")),
                  round(time.time() - float(at), 1) if at else None)


def read_sync(client: redis.Redis, prefix: str) -> Counts:
    keys = CountKeys(prefix)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.total)
    pipe.hgetall(keys.meta)
    total, meta = pipe.execute()
    return _counts(total, meta)


async def read(client: redis.asyncio.Redis, prefix: str) -> Counts:
    keys = CountKeys(prefix)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.total)
    pipe.hgetall(keys.meta)
    total, meta = await pipe.execute()
    return _counts(total, meta)
