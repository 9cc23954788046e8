"""The worker's side of the protections, with real Redis and Mongo and a real HTTP
central-control: quota answers undo the attempt, tasks past their deadline are not
sent, and every answer says what the send told of central-control (`central_ok`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.ipc import TaskHandle
from sendscript.locks import DeviceLocks
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS
from tests.integration.conftest import Central
from tests.integration.test_handler import WORKER, handler_settings, stored_task
from worker.central import CentralClient
from worker.handler import ScriptHandler


def protected(settings: Settings) -> Settings:
    return handler_settings(settings).model_copy(update={
        "central_quota_status": 402, "central_quota_codes": frozenset({"QUOTA_EXCEEDED"})})


class LateHandler(ScriptHandler):
    """Finds the deadline passed only at the check right before the POST: stands in for
    a claim and record that took long (the deadline itself is the real check's)."""

    checks = 0

    def _past_deadline(self, h: TaskHandle) -> bool:
        self.checks += 1
        return self.checks > 1


@pytest.fixture
async def client(central: Central) -> AsyncIterator[CentralClient]:
    c = CentralClient(central.url, connect_timeout_s=2, timeout_s=1)
    yield c
    await c.aclose()


@pytest.fixture
def handler(settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
            client: CentralClient) -> ScriptHandler:
    return ScriptHandler(redis_client=redis_client, db=db, central=client,
                         settings=protected(settings), worker_name=WORKER)


@pytest.fixture
def locks(settings: Settings, redis_client: redis.asyncio.Redis) -> DeviceLocks:
    return DeviceLocks(redis_client, settings.keys)


async def assert_untouched(db: AsyncDatabase, locks: DeviceLocks, h: TaskHandle,
                           status: str) -> None:
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == status and task["attempt"] == 0
    assert "record_id" not in task and "worker" not in task
    assert await db[RECORDS].count_documents({"task_id": h.task_id}) == 0
    assert await locks.holders([h.device_id]) == [None]


@pytest.mark.parametrize("status,body", [
    (402, {"success": False, "error": "no credit"}),
    (200, {"success": False, "code": "QUOTA_EXCEEDED"}),
    (503, {"success": False, "errorCode": "QUOTA_EXCEEDED"}),
])
async def test_a_quota_answer_uses_no_attempt(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks,
    status: int, body: dict[str, object],
) -> None:
    central.reply(status, body)
    h = await stored_task(db)

    done = await handler.handle(h)

    assert done.outcome == "quota" and done.attempt == 0 and done.central_ok is None
    assert len(central.requests) == 1
    await assert_untouched(db, locks, h, "pending")


async def test_a_task_past_its_deadline_is_not_sent(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks,
) -> None:
    h = (await stored_task(db)).model_copy(update={"deadline": utcnow() - timedelta(seconds=1)})

    done = await handler.handle(h)

    assert done.outcome == "expired" and "deadline" in (done.error or "")
    assert central.requests == []
    await assert_untouched(db, locks, h, "expired")


async def test_a_deadline_passed_during_the_claim_is_checked_before_the_post(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    client: CentralClient, central: Central, locks: DeviceLocks,
) -> None:
    late = LateHandler(redis_client=redis_client, db=db, central=client,
                       settings=protected(settings), worker_name=WORKER)
    h = (await stored_task(db)).model_copy(update={"deadline": utcnow()})

    done = await late.handle(h)

    assert done.outcome == "expired" and late.checks == 2
    assert central.requests == []
    await assert_untouched(db, locks, h, "expired")  # record gone, attempt undone, unlocked
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and "deadline" in task["last_error"]


async def test_a_deadline_still_ahead_sends(
    handler: ScriptHandler, db: AsyncDatabase, central: Central,
) -> None:
    h = (await stored_task(db)).model_copy(update={"deadline": utcnow() + timedelta(hours=1)})
    done = await handler.handle(h)
    assert done.outcome == "sent" and done.central_ok is True
    assert len(central.requests) == 1


@pytest.mark.parametrize("status,outcome,central_ok", [
    (503, "retry", False), (429, "retry", False), (409, "retry", None), (400, "failed", None),
])
async def test_what_a_refusal_says_of_central(
    handler: ScriptHandler, db: AsyncDatabase, central: Central,
    status: int, outcome: str, central_ok: bool | None,
) -> None:
    central.reply(status, {"success": False})
    done = await handler.handle(await stored_task(db, max_retries=3))
    assert (done.outcome, done.central_ok) == (outcome, central_ok)


async def test_a_read_timeout_is_sent_with_a_note_and_a_sick_central(
    handler: ScriptHandler, db: AsyncDatabase, central: Central,
) -> None:
    central.delay_s = 1.5  # the client's read timeout is 1 s
    done = await handler.handle(await stored_task(db))
    assert done.outcome == "sent" and done.central_ok is False


async def test_central_unreachable_is_unsent_and_sick(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    central: Central,
) -> None:
    await central.stop()
    client = CentralClient(central.url, connect_timeout_s=1, timeout_s=1)
    try:
        handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                                settings=protected(settings), worker_name=WORKER)
        done = await handler.handle(await stored_task(db))
    finally:
        await client.aclose()
        await central.start()  # the fixture stops it again
    assert done.outcome == "unsent" and done.central_ok is False
