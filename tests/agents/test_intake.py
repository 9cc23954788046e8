"""A master's intake leaves pull tasks to the agents: stored, never queued, held or
scheduled by it, whether they come as specs, as references, due or delayed."""

from __future__ import annotations

import json
import time

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.models import PULL_HOLDER
from sendscript.settings import Settings
from sendscript.store import TASKS
from tests.integration.test_intake import make, spec


async def test_intake_stores_pull_tasks_and_hands_none_to_the_board(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    items = [spec("d1"), spec("d1", mode="pull"),
             json.dumps({"mode": "pull", "labels": ["chrome"], "script": {"id": "x"}}).encode(),
             spec("d2", mode="pull", run_at=time.time() + 30)]
    await redis_client.lpush(settings.keys.ready, *items)
    await intake.ingest(await queue.take(10))
    docs = [d async for d in db[TASKS].find({})]
    pull = [d for d in docs if d.get("mode") == "pull"]
    push = [d for d in docs if "mode" not in d]
    assert len(pull) == 3 and len(push) == 1
    assert board.ids == [push[0]["_id"]] and board.scheduled_ids == []
    assert {d["master"] for d in pull} == {PULL_HOLDER}
    assert push[0]["master"] == settings.master_id
    assert sorted(d["status"] for d in pull) == ["pending", "pending", "waiting"]
    assert await redis_client.llen(settings.keys.processing(settings.master_id)) == 0
    # A reference to a stored pull task (the SDK's push, a recovery's requeue): acked,
    # still not the master's.
    await redis_client.lpush(settings.keys.ready, json.dumps({"task_id": pull[0]["_id"]}))
    await intake.ingest(await queue.take(10))
    assert board.ids == [push[0]["_id"]]
    assert (await db[TASKS].find_one({"_id": pull[0]["_id"]}))["master"] == PULL_HOLDER
    assert await redis_client.llen(settings.keys.quarantine) == 0
