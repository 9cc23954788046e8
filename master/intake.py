"""Takes items off the Redis ready list, stores their tasks, hands them on.

An item is acknowledged (removed from this master's processing list) only after
its task is in Mongo, so a crash at any point loses nothing: the restarted
master reads its processing list first, and the tag-derived task ids make the
second store find the first. Due tasks go to the device board; delayed ones to
the delay heap; a fan-out item becomes one task per device under one batch id.

A fan-out is stored a chunk a round (`intake_fanout_chunk` devices at most, in
device-id order), between the items taken behind it, so one big item cannot hold the
intake: it is acknowledged with its last chunk. While the store is slow (a busy
server) a chunk is cut to what it stores in `intake_fanout_budget_s` (`ChunkPace`),
so what is pushed behind a fan-out waits a fraction of a second whatever the load.
The last device stored is kept in Redis with the acknowledgements, so a restarted
master goes on from there; a chunk stored twice (a crash between the store and the
cursor) finds its tasks by their ids.

No item can stall the others: one that cannot be parsed, or whose task the store
refuses for good (too large, not encodable, refused by the server), is quarantined
with the reason and the rest of its batch is stored. Only errors retrying can cure
(a server away or timing out) leave the batch in processing for the next try.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from loguru import logger
from pydantic import ValidationError
from pymongo.asynchronous.collection import AsyncCollection

from sendscript import tracing
from sendscript.backoff import Backoff
from sendscript.groups import devices_of
from sendscript.models import (
    MAX_SCRIPT_BYTES,
    FanoutSpec,
    Task,
    TaskRef,
    TaskSpec,
    describe_error,
    id_from_tag,
    parse_json_object,
    utcnow,
)
from sendscript.queue import Entry, IntakeQueue
from sendscript.settings import Settings
from sendscript.status import SCHEDULED, TaskStatus
from sendscript.store import TaskStore

WAIT_S = 1.0  # how long one blocking wait lasts; bounds how fast a stop is noticed
Item = TaskSpec | FanoutSpec | TaskRef


def parse_item(raw: bytes, max_script_bytes: int | None = None) -> Item:
    """A queue item as a task spec, a fan-out or a reference; ValueError says what is
    wrong. A script over `max_script_bytes` (BSON) or not storable is refused here."""
    obj = parse_json_object(raw)
    context = {MAX_SCRIPT_BYTES: max_script_bytes} if max_script_bytes else None
    try:
        if "task_id" in obj and "device_id" not in obj:
            return TaskRef.model_validate(obj)
        if "device_id" not in obj and ("device_ids" in obj or "group" in obj):
            return FanoutSpec.model_validate(obj, context=context)
        return TaskSpec.model_validate(obj, context=context)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from None


@dataclass
class Fanout:
    """A fan-out item being stored chunk by chunk: the devices not yet stored."""

    entry: Entry
    item: FanoutSpec
    batch_id: str
    todo: list[str]  # sorted
    # Some of its devices are stored and a cursor says which: dropped with the ack.
    cursor_kept: bool = False


@dataclass
class Chunk:
    """The devices of one fan-out stored in this round, and their task ids; or why
    the fan-out is refused instead (a device's task would not be valid)."""

    fanout: Fanout
    devices: list[str]
    task_ids: list[str]
    refused: str | None = None


@dataclass
class Batch:
    """One intake batch, sorted out."""

    fresh: list[Task] = field(default_factory=list)
    owners: list[tuple[Entry, list[str]]] = field(default_factory=list)  # entry, its task ids
    chunks: list[Chunk] = field(default_factory=list)
    refs: dict[str, list[Entry]] = field(default_factory=dict)
    done: list[Entry] = field(default_factory=list)
    bad: list[tuple[Entry, str]] = field(default_factory=list)
    cursors: dict[str, str | None] = field(default_factory=dict)  # tag -> last device / drop


@dataclass
class ChunkPace:
    """How many devices of the fan-outs the next round stores: as many as the store
    takes about `budget_s` for at the rate the last chunks went, at least `floor`, at
    most the setting. Until a chunk was timed, `first`: a first chunk of the full
    setting on a busy server held what was pushed behind it over a second.

    A chunk's rate speaks of the load before it: the tasks of the chunks stored just
    before are dispatched while it is stored, and their writes slow the next one (a
    first chunk timed on a quiet server went five times as fast as the second). So a
    slower rate is believed at once and a faster one only halfway, and a chunk is at
    most `growth` times the last one timed. Pure."""

    budget_s: float
    floor: int = 50
    first: int = 100
    growth: float = 1.5
    rate: float | None = None  # devices a second
    last: int | None = None  # devices of the last chunk timed

    def stored(self, devices: int, elapsed_s: float) -> None:
        if devices <= 0 or elapsed_s <= 0:
            return
        rate = devices / elapsed_s
        self.rate = rate if self.rate is None or rate < self.rate else (self.rate + rate) / 2
        self.last = devices

    def size(self, most: int) -> int:
        if self.budget_s <= 0:
            return most
        if self.rate is None:
            return min(most, self.first)
        fits = int(self.rate * self.budget_s)
        if self.last is not None:
            fits = min(fits, int(self.last * self.growth))
        return min(most, max(self.floor, fits))


class Throttle(Protocol):
    """What backpressure (master/backpressure.py) and work sharing (master/sharing.py)
    tell intake."""

    async def wait_open(self, stop: asyncio.Event) -> bool: ...

    def room(self, batch: int) -> int: ...


class Intake:
    def __init__(
        self,
        settings: Settings,
        queue: IntakeQueue,
        tasks: TaskStore,
        groups: AsyncCollection,
        on_tasks: Callable[[list[Task]], None],
        on_scheduled: Callable[[list[Task]], Awaitable[None]],
        on_count: Callable[[str, int], Awaitable[None]],
        throttles: list[Throttle] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.tasks = tasks
        self.groups = groups
        self.on_tasks = on_tasks
        self.on_scheduled = on_scheduled
        self.on_count = on_count
        # When and how much intake may take: each must be open, the least room decides.
        self.throttles = throttles or []
        self.taken = 0
        self.quarantined = 0
        self.deduplicated = 0
        self._recheck = True
        self._fanouts: dict[str, Fanout] = {}  # by entry tag, in the order they are served
        self.pace = ChunkPace(settings.intake_fanout_budget_s)

    def report(self) -> dict[str, Any]:
        return {"taken": self.taken, "quarantined": self.quarantined}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        self._recheck = True  # what a crash left in processing comes first
        while True:
            try:
                if self._recheck:
                    self._recheck = False
                    leftovers = [e for e in await self.queue.unfinished()
                                 if e.tag not in self._fanouts]
                    if leftovers:
                        logger.info("taking back {} item(s) left in processing", len(leftovers))
                        await self.ingest_round(leftovers)
                if stop.is_set():
                    await self._drain()
                    return
                batch = self.settings.intake_batch
                chunk = self.pace.size(self.settings.intake_fanout_chunk)
                if not await self._open(stop):
                    continue  # stopping (the drain above runs next), or closed again
                for throttle in self.throttles:
                    batch, chunk = throttle.room(batch), throttle.room(chunk)
                entries = await self.queue.take(batch) if batch else []
                if entries or self._fanouts:
                    await self.ingest_round(entries, chunk)
                else:
                    await self.queue.wait(WAIT_S)
                backoff.succeeded("intake")
            except Exception as exc:
                self._recheck = True  # the batch stays in processing: take it again
                await backoff.failed("intake", exc)

    async def _open(self, stop: asyncio.Event) -> bool:
        """Each throttle open at once (one may close while another is awaited)."""
        for throttle in self.throttles:
            if not await throttle.wait_open(stop):
                return False
        return all([t.room(1) for t in self.throttles])

    async def _drain(self) -> None:
        """On stop: store what a last wait moved into staging, leave nothing behind.
        Only staging: the ready list stays for the masters that go on (taking it
        here would keep a stop busy for as long as the list is long)."""
        if entries := await self.queue.tag_staging():
            await self.ingest_round(entries)

    async def ingest(self, entries: list[Entry]) -> None:
        """Store `entries` whole, fan-outs too (a chunk a round until each is done):
        for a dead master's list, where nothing else waits behind."""
        await self.ingest_round(entries)
        while self._fanouts:
            await self.ingest_round([])

    async def ingest_round(self, entries: list[Entry], chunk: int | None = None) -> None:
        """Store `entries` and the next chunk (`chunk` devices, the setting's by default)
        of the fan-outs in progress; a fan-out is acknowledged with its last chunk.
        The items taken go first, each step stored, acknowledged and handed on alone:
        what was pushed behind a fan-out waits for no chunk of it."""
        await self._settle(await self._sort(entries))
        self.taken += len(entries)
        if self._fanouts:
            chunks = Batch()
            self._carve(chunks, chunk or self.settings.intake_fanout_chunk)
            began = time.monotonic()
            await self._settle(chunks)
            self.pace.stored(len(chunks.fresh), time.monotonic() - began)

    async def _settle(self, batch: Batch) -> None:
        """Store a batch's tasks, acknowledge its items, hand its tasks on."""
        if not (batch.fresh or batch.refs or batch.bad or batch.chunks):
            return
        stored = await self.tasks.store(batch.fresh)
        for entry, task_ids in batch.owners:
            reason = next((stored.refused[i] for i in task_ids if i in stored.refused), None)
            if reason is None:
                batch.done.append(entry)
            else:
                batch.bad.append((entry, reason))
        finished = self._settle_chunks(batch, stored.refused)
        lookup = set(batch.refs) | {t.id for t in stored.stored_before}
        found = {t.id: t for t in await self.tasks.find_many(lookup)}
        for task_id, ref_entries in batch.refs.items():
            if task_id in found:
                batch.done.extend(ref_entries)
            else:
                batch.bad.extend((e, f"no task with task_id {task_id!r}") for e in ref_entries)

        # Pull tasks are the agents' (agents/): never queued, held or dispatched here.
        tasks = [t for t in stored.created + [found[i] for i in lookup if i in found]
                 if not t.pull]
        pending = [t for t in tasks if t.status == TaskStatus.PENDING]
        scheduled = [t for t in tasks if t.status in SCHEDULED]
        await self.tasks.adopt([t.id for t in pending if t.master != self.settings.master_id],
                               self.settings.master_id)
        await self.queue.ack(batch.done, batch.bad, batch.cursors)
        self._advance(batch.chunks, finished)
        for entry, reason in batch.bad:
            logger.warning("quarantined queue item {!r}: {}", entry.item[:200], reason)
        for ours, existing in stored.deduplicated.items():
            how = "debounced" if ours in stored.debounced else "duplicate"
            logger.info("{} submission {} -> existing task {}", how, ours, existing)
        if stored.debounced:
            await self.on_count("debounced", len(stored.debounced))
        if stored.deduplicated:
            await self.on_count("deduplicated", len(stored.deduplicated))
        self.quarantined += len(batch.bad)
        self.deduplicated += len(stored.deduplicated)
        if pending:
            self.on_tasks(pending)
        if scheduled:
            await self.on_scheduled(scheduled)

    async def _sort(self, entries: list[Entry]) -> Batch:
        """Single specs become tasks of this batch; fan-outs join those in progress."""
        batch = Batch()
        parsed: list[tuple[Entry, Item]] = []
        for entry in entries:
            if entry.tag in self._fanouts:
                continue  # in progress already (handed again by a re-check)
            try:
                parsed.append((entry, parse_item(entry.item, self.settings.max_script_bytes)))
            except ValueError as exc:
                batch.bad.append((entry, str(exc)))
        fanouts = [(e, p) for e, p in parsed if isinstance(p, FanoutSpec)]
        groups = await self._groups({p.group for _, p in fanouts if p.group})
        cursors = await self.queue.fanout_cursors([e.tag for e, _ in fanouts])
        prefix, now = self.settings.key_prefix, utcnow()
        for entry, item in parsed:
            if isinstance(item, TaskRef):
                batch.refs.setdefault(item.task_id, []).append(entry)
            elif isinstance(item, TaskSpec):
                task = self._task(item, id_from_tag(prefix, entry.tag), None, now)
                batch.fresh.append(task)
                batch.owners.append((entry, [task.id]))
            else:
                members = item.device_ids or groups.get(item.group or "") or []
                if not members:
                    batch.bad.append((entry, f"device group {item.group!r} is unknown or empty"))
                    continue
                if not all(isinstance(d, str) for d in members):
                    # stored by another program: ids to sort and store must be strings
                    batch.bad.append((entry, f"device group {item.group!r} holds device ids "
                                             "that are not strings"))
                    continue
                devices = sorted(set(members))
                cursor = cursors.get(entry.tag)
                todo = [d for d in devices if cursor is None or d > cursor]
                self._fanouts[entry.tag] = Fanout(entry, item, id_from_tag(prefix, entry.tag),
                                                  todo, cursor_kept=cursor is not None)
        return batch

    def _task(self, spec: TaskSpec, task_id: str, batch_id: str | None,
              now: datetime) -> Task:
        task = Task.from_spec(spec, task_id=task_id, now=now, batch_id=batch_id)
        if tracing.ON:  # a raw item's spans join its traceparent, or a trace begun here
            task.trace = tracing.entry_span("sendscript.intake", task.trace,
                                            {"sendscript.task_id": task_id})
        # Far-future tasks stay unheld: whichever master loads them in time fires them.
        horizon = now + timedelta(seconds=self.settings.delay_horizon_s)
        if not task.pull and (task.status == TaskStatus.PENDING
                              or (task.run_at and task.run_at <= horizon)):
            task.master = self.settings.master_id
        return task

    def _carve(self, batch: Batch, budget: int) -> None:
        """This round's chunks: `budget` devices over the fan-outs in progress, each
        served in turn (those served go to the back of the line)."""
        served: list[str] = []
        now = utcnow()
        for tag, fanout in list(self._fanouts.items()):
            if budget <= 0:
                break
            devices = fanout.todo[:budget]
            ids = [id_from_tag(self.settings.key_prefix, f"{tag}:{d}") for d in devices]
            try:
                tasks = [self._fanout_task(fanout, d, i, now)
                         for d, i in zip(devices, ids, strict=True)]
            except ValueError as exc:
                # A group member or a device-suffixed dedupe key a task refuses: this
                # fan-out is quarantined with the reason, the others go on.
                batch.chunks.append(Chunk(fanout, [], [], refused=str(exc)))
                continue
            budget -= len(devices)
            batch.fresh.extend(tasks)
            batch.chunks.append(Chunk(fanout, devices, ids))
            served.append(tag)
        for tag in served:
            self._fanouts[tag] = self._fanouts.pop(tag)

    def _fanout_task(self, fanout: Fanout, device_id: str, task_id: str,
                     now: datetime) -> Task:
        try:
            return self._task(fanout.item.for_device(device_id), task_id, fanout.batch_id, now)
        except ValidationError as exc:
            raise ValueError(f"the task for device {device_id[:80]!r} is not valid: "
                             f"{describe_error(exc)}") from None

    def _settle_chunks(self, batch: Batch, refused: dict[str, str]) -> set[str]:
        """Per chunk stored: the item done (its last chunk), refused (quarantined, the
        tasks stored before stand) or its cursor moved on. Answers the tags finished."""
        finished: set[str] = set()
        for chunk in batch.chunks:
            fanout, tag = chunk.fanout, chunk.fanout.entry.tag
            reason = chunk.refused or next(
                (refused[i] for i in chunk.task_ids if i in refused), None)
            last = len(chunk.devices) == len(fanout.todo)
            if reason is not None:
                if fanout.cursor_kept:
                    reason += " (the devices before it in id order were stored)"
                batch.bad.append((fanout.entry, reason))
            elif last:
                batch.done.append(fanout.entry)
            else:
                batch.cursors[tag] = chunk.devices[-1]
                continue
            finished.add(tag)
            if fanout.cursor_kept:
                batch.cursors[tag] = None
        return finished

    def _advance(self, chunks: list[Chunk], finished: set[str]) -> None:
        """After the acknowledgement: what each fan-out has left (none: it is done)."""
        for chunk in chunks:
            tag = chunk.fanout.entry.tag
            if tag in finished:
                self._fanouts.pop(tag, None)
                continue
            chunk.fanout.todo = chunk.fanout.todo[len(chunk.devices):]
            chunk.fanout.cursor_kept = True

    async def _groups(self, names: set[str | None]) -> dict[str, list[str]]:
        wanted = [n for n in names if n]
        if not wanted:
            return {}
        return devices_of([d async for d in self.groups.find({"_id": {"$in": wanted}})])
