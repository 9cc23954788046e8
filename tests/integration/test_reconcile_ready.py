"""The reconcile duty's look at the ready list, on a real Redis: an id counts as
queued when a reference on the list names it, and every id does while the list is
longer than a look reads (a deep backlog brings its tasks through the intake)."""

from __future__ import annotations

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.reconcile import HeldTasks
from sendscript.queue import push_refs, ref_item
from sendscript.settings import Settings
from sendscript.store import TaskStore


def held(settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase) -> HeldTasks:
    return HeldTasks(settings, redis_client, TaskStore(db), holds=lambda _: False,
                     on_tasks=lambda _: None)


async def test_ids_named_on_the_ready_list_count_as_queued(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    await push_refs(redis_client, settings.keys.ready, ["a", "c"])
    await redis_client.lpush(settings.keys.ready, '{"device_id": "d", "script": {}}')
    queued = await held(settings, redis_client, db)._on_ready_list(["a", "b", "c"])
    assert queued == {"a", "c"}


async def test_a_list_longer_than_a_look_reads_counts_every_id_queued(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("master.reconcile.READY_READ_MAX", 3)
    await redis_client.lpush(settings.keys.ready, *[ref_item(f"t{i}") for i in range(4)])
    assert await held(settings, redis_client, db)._on_ready_list(["x", "t1"]) == {"x", "t1"}
    await redis_client.rpop(settings.keys.ready)  # three left: read
    assert await held(settings, redis_client, db)._on_ready_list(["x", "t1"]) == {"t1"}
