"""Takes items off the Redis ready list, stores their tasks, hands them to the board.

An item is acknowledged (removed from this master's processing list) only after
its task is in Mongo, so a crash at any point loses nothing: the restarted
master reads its processing list first, and the tag-derived task id makes the
second store find the first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from loguru import logger
from pydantic import ValidationError

from sendscript.backoff import Backoff
from sendscript.models import Task, TaskRef, TaskSpec, describe_error, id_from_tag, utcnow
from sendscript.queue import Entry, IntakeQueue
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import TaskStore

WAIT_S = 1.0  # how long one blocking wait lasts; bounds how fast a stop is noticed


def parse_item(raw: bytes) -> TaskSpec | TaskRef:
    """A queue item as a task spec or a reference; ValueError says what is wrong."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        if "task_id" in obj and "device_id" not in obj:
            return TaskRef.model_validate(obj)
        return TaskSpec.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from None


class Intake:
    def __init__(
        self,
        settings: Settings,
        queue: IntakeQueue,
        tasks: TaskStore,
        on_tasks: Callable[[list[Task]], None],
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.tasks = tasks
        self.on_tasks = on_tasks
        self.taken = 0
        self.quarantined = 0

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        recovered = False
        while True:
            try:
                if not recovered:
                    if leftovers := await self.queue.unfinished():
                        logger.info("taking back {} item(s) left in processing", len(leftovers))
                        await self.ingest(leftovers)
                    recovered = True
                if stop.is_set():
                    await self._drain()
                    return
                entries = await self.queue.take(self.settings.intake_batch)
                if entries:
                    await self.ingest(entries)
                else:
                    await self.queue.wait(WAIT_S)
                backoff.succeeded("intake")
            except Exception as exc:
                await backoff.failed("intake", exc)

    async def _drain(self) -> None:
        """On stop: store what a last wait moved into staging, leave nothing behind."""
        while entries := await self.queue.take(self.settings.intake_batch):
            await self.ingest(entries)

    async def ingest(self, entries: list[Entry]) -> None:
        now = utcnow()
        prefix = self.settings.key_prefix
        fresh: dict[str, Task] = {}
        refs: dict[str, list[Entry]] = {}
        done: list[Entry] = []
        bad: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                parsed = parse_item(entry.item)
            except ValueError as exc:
                bad.append((entry, str(exc)))
                continue
            if isinstance(parsed, TaskRef):
                refs.setdefault(parsed.task_id, []).append(entry)
                continue
            task = Task.from_spec(parsed, task_id=id_from_tag(prefix, entry.tag), now=now)
            task.master = self.settings.master_id
            fresh[task.id] = task
            done.append(entry)

        stored_before = await self.tasks.insert_many(list(fresh.values()))
        lookup = set(refs) | stored_before
        found = {t.id: t for t in await self.tasks.find_many(lookup)}
        for task_id, ref_entries in refs.items():
            if task_id in found:
                done.extend(ref_entries)
            else:
                bad.extend((e, f"no task with task_id {task_id!r}") for e in ref_entries)

        ready = [t for t in fresh.values() if t.id not in stored_before]
        ready += [found[i] for i in lookup if i in found]
        pending = [t for t in ready if t.status == TaskStatus.PENDING]
        adopt = [t.id for t in pending if t.master != self.settings.master_id]
        await self.tasks.adopt(adopt, self.settings.master_id)
        await self.queue.ack(done, bad)
        for entry, reason in bad:
            logger.warning("quarantined queue item {!r}: {}", entry.item[:200], reason)
        self.taken += len(entries)
        self.quarantined += len(bad)
        if pending:
            self.on_tasks(pending)
