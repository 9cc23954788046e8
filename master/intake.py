"""Takes items off the Redis ready list, stores their tasks, hands them on.

An item is acknowledged (removed from this master's processing list) only after
its task is in Mongo, so a crash at any point loses nothing: the restarted
master reads its processing list first, and the tag-derived task ids make the
second store find the first. Due tasks go to the device board; delayed ones to
the delay heap; a fan-out item becomes one task per device under one batch id.

No item can stall the others: one that cannot be parsed, or whose task the store
refuses for good (too large, not encodable, refused by the server), is quarantined
with the reason and the rest of its batch is stored. Only errors retrying can cure
(a server away or timing out) leave the batch in processing for the next try.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from loguru import logger
from pydantic import ValidationError
from pymongo.asynchronous.collection import AsyncCollection

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
class Batch:
    """One intake batch, sorted out."""

    fresh: list[Task] = field(default_factory=list)
    owners: list[tuple[Entry, list[str]]] = field(default_factory=list)  # entry, its task ids
    refs: dict[str, list[Entry]] = field(default_factory=dict)
    done: list[Entry] = field(default_factory=list)
    bad: list[tuple[Entry, str]] = field(default_factory=list)


class Throttle(Protocol):
    """What backpressure tells intake (master/backpressure.py)."""

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
        throttle: Throttle | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.tasks = tasks
        self.groups = groups
        self.on_tasks = on_tasks
        self.on_scheduled = on_scheduled
        self.on_count = on_count
        self.throttle = throttle  # backpressure: when and how much intake may take
        self.taken = 0
        self.quarantined = 0
        self.deduplicated = 0
        self._recheck = True

    def report(self) -> dict[str, Any]:
        return {"taken": self.taken, "quarantined": self.quarantined}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        self._recheck = True  # what a crash left in processing comes first
        while True:
            try:
                if self._recheck:
                    self._recheck = False
                    if leftovers := await self.queue.unfinished():
                        logger.info("taking back {} item(s) left in processing", len(leftovers))
                        await self.ingest(leftovers)
                if stop.is_set():
                    await self._drain()
                    return
                batch = self.settings.intake_batch
                if self.throttle is not None:
                    if not await self.throttle.wait_open(stop):
                        continue  # stopping (the drain above runs next)
                    batch = self.throttle.room(batch)
                entries = await self.queue.take(batch)
                if entries:
                    await self.ingest(entries)
                else:
                    await self.queue.wait(WAIT_S)
                backoff.succeeded("intake")
            except Exception as exc:
                self._recheck = True  # the batch stays in processing: take it again
                await backoff.failed("intake", exc)

    async def _drain(self) -> None:
        """On stop: store what a last wait moved into staging, leave nothing behind.
        Only staging: the ready list stays for the masters that go on (taking it
        here would keep a stop busy for as long as the list is long)."""
        if entries := await self.queue.tag_staging():
            await self.ingest(entries)

    async def ingest(self, entries: list[Entry]) -> None:
        batch = await self._sort(entries)
        stored = await self.tasks.store(batch.fresh)
        for entry, task_ids in batch.owners:
            reason = next((stored.refused[i] for i in task_ids if i in stored.refused), None)
            if reason is None:
                batch.done.append(entry)
            else:
                batch.bad.append((entry, reason))
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
        await self.queue.ack(batch.done, batch.bad)
        for entry, reason in batch.bad:
            logger.warning("quarantined queue item {!r}: {}", entry.item[:200], reason)
        for ours, existing in stored.deduplicated.items():
            how = "debounced" if ours in stored.debounced else "duplicate"
            logger.info("{} submission {} -> existing task {}", how, ours, existing)
        if stored.debounced:
            await self.on_count("debounced", len(stored.debounced))
        if stored.deduplicated:
            await self.on_count("deduplicated", len(stored.deduplicated))
        self.taken += len(entries)
        self.quarantined += len(batch.bad)
        self.deduplicated += len(stored.deduplicated)
        if pending:
            self.on_tasks(pending)
        if scheduled:
            await self.on_scheduled(scheduled)

    async def _sort(self, entries: list[Entry]) -> Batch:
        batch = Batch()
        now = utcnow()
        horizon = now + timedelta(seconds=self.settings.delay_horizon_s)
        parsed: list[tuple[Entry, Item]] = []
        for entry in entries:
            try:
                parsed.append((entry, parse_item(entry.item, self.settings.max_script_bytes)))
            except ValueError as exc:
                batch.bad.append((entry, str(exc)))
        groups = await self._groups({p.group for _, p in parsed
                                     if isinstance(p, FanoutSpec) and p.group})
        prefix, me = self.settings.key_prefix, self.settings.master_id
        for entry, item in parsed:
            if isinstance(item, TaskRef):
                batch.refs.setdefault(item.task_id, []).append(entry)
                continue
            if isinstance(item, TaskSpec):
                specs = [(item, id_from_tag(prefix, entry.tag))]
                batch_id = None
            else:
                devices = item.device_ids or groups.get(item.group or "")
                if not devices:
                    batch.bad.append((entry, f"device group {item.group!r} is unknown or empty"))
                    continue
                specs = [(item.for_device(d), id_from_tag(prefix, f"{entry.tag}:{d}"))
                         for d in dict.fromkeys(devices)]
                batch_id = id_from_tag(prefix, entry.tag)
            for spec, task_id in specs:
                task = Task.from_spec(spec, task_id=task_id, now=now, batch_id=batch_id)
                # Far-future tasks stay unheld: whichever master loads them in time fires them.
                if not task.pull and (task.status == TaskStatus.PENDING
                                      or (task.run_at and task.run_at <= horizon)):
                    task.master = me
                batch.fresh.append(task)
            batch.owners.append((entry, [task_id for _, task_id in specs]))
        return batch

    async def _groups(self, names: set[str | None]) -> dict[str, list[str]]:
        wanted = [n for n in names if n]
        if not wanted:
            return {}
        return devices_of([d async for d in self.groups.find({"_id": {"$in": wanted}})])
