"""ScriptHandler.handle with real Redis and Mongo and a real HTTP central-control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from consumers.rules import result_updates
from sendscript.dev.embedded import free_port
from sendscript.ipc import TaskHandle
from sendscript.locks import DeviceLocks
from sendscript.models import Task, TaskLogMessage, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import RECORDS, TASKS, RecordStore, TaskStore
from tests.integration.conftest import Central, FreeEvents
from worker.central import CentralClient
from worker.handler import ScriptHandler

WORKER = "w-test"
MARGIN_S = 60.0
SCRIPT = {"id": "tap", "args": {"x": 1}}


def handler_settings(settings: Settings) -> Settings:
    """The test's settings with a known lock margin."""
    return settings.model_copy(update={"lock_margin_s": MARGIN_S})


@pytest.fixture
async def handler(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central
) -> AsyncIterator[ScriptHandler]:
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    yield ScriptHandler(redis_client=redis_client, db=db, central=client,
                        settings=handler_settings(settings), worker_name=WORKER)
    await client.aclose()


@pytest.fixture
def locks(settings: Settings, redis_client: redis.asyncio.Redis) -> DeviceLocks:
    return DeviceLocks(redis_client, settings.keys)


async def stored_task(db: AsyncDatabase, device: str = "dev-1", **fields: Any) -> TaskHandle:
    task = Task(_id=new_id(), device_id=device, script=SCRIPT, timeout_s=30, **fields)
    await db[TASKS].insert_one(task.to_doc())
    return TaskHandle(task_id=task.id, device_id=device, attempt=task.attempt,
                      max_retries=task.max_retries, timeout_s=task.timeout_s,
                      priority=task.priority, queue=task.queue, script=task.script,
                      retry_base_s=task.retry_base_s)


async def test_sent(
    settings: Settings, handler: ScriptHandler, db: AsyncDatabase, central: Central,
    locks: DeviceLocks, redis_client: redis.asyncio.Redis,
) -> None:
    h = await stored_task(db)
    before = utcnow()

    done = await handler.handle(h)

    assert done.outcome == "sent" and done.error is None
    assert done.attempt == 1 and done.fence is not None and done.fence > 0
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "sent" and task["attempt"] == 1 and task["worker"] == WORKER
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert task["record_id"] == rec["_id"]
    assert rec["attempt"] == 1 and rec["device_id"] == "dev-1" and rec["worker"] == WORKER
    assert rec["lock_value"] == done.fence
    assert rec["status"] == "sent"
    assert before <= rec["started_at"] <= rec["sent_at"] <= utcnow() + timedelta(seconds=1)
    assert await locks.holders(["dev-1"]) == [done.fence]
    ttl = await redis_client.pttl(settings.keys.device_lock("dev-1"))
    expected_ttl = int((30 + MARGIN_S) * 1000)
    assert expected_ttl - 5_000 < ttl <= expected_ttl, "TTL longer than the task's timeout"
    assert central.requests == [{
        "method": "POST", "path": "/api/script/send",
        "json": {"deviceId": "dev-1", "taskId": h.task_id, "recordId": rec["_id"],
                 "script": SCRIPT},
    }]


async def test_busy_device_leaves_the_task_untouched(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks
) -> None:
    h = await stored_task(db)
    [other] = await locks.acquire_many([("dev-1", 60_000)])
    before = await db[TASKS].find_one({"_id": h.task_id})

    done = await handler.handle(h)

    assert done.outcome == "busy" and done.attempt == 0
    assert await db[TASKS].find_one({"_id": h.task_id}) == before
    assert await db[RECORDS].count_documents({}) == 0
    assert central.requests == []
    assert await locks.holders(["dev-1"]) == [other]


async def test_stale_task_releases_the_lock(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks
) -> None:
    running = await stored_task(db, "dev-1", status=TaskStatus.RUNNING, attempt=1)
    moved_on = await stored_task(db, "dev-2", attempt=2)
    stale_handle = moved_on.model_copy(update={"attempt": 1})
    before = [d async for d in db[TASKS].find({}).sort("_id")]

    done = await asyncio.gather(handler.handle(running), handler.handle(stale_handle))

    assert [d.outcome for d in done] == ["stale", "stale"]
    assert [d async for d in db[TASKS].find({}).sort("_id")] == before
    assert await db[RECORDS].count_documents({}) == 0
    assert central.requests == []
    assert await locks.holders(["dev-1", "dev-2"]) == [None, None]


async def test_central_refusal_fails_the_task_and_releases_the_lock(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks
) -> None:
    central.reply(400, {"success": False, "message": "unknown script"})
    h = await stored_task(db)

    done = await handler.handle(h)

    assert done.outcome == "failed" and done.attempt == 1
    assert done.error is not None and "400" in done.error
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "failed" and task["attempt"] == 1
    assert "HTTP 400" in task["last_error"] and "unknown script" in task["last_error"]
    assert task["finished_at"] is not None
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert rec["status"] == "failed" and rec["error"] == task["last_error"]
    assert rec.get("sent_at") is None
    assert await locks.holders(["dev-1"]) == [None]
    assert len(central.requests) == 1


async def test_accepted_without_success_is_a_refusal(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks
) -> None:
    central.reply(200, {"success": False, "message": "device offline"})
    h = await stored_task(db)
    done = await handler.handle(h)
    assert done.outcome == "failed"
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and task["status"] == "failed"
    assert "device offline" in task["last_error"]
    assert await locks.holders(["dev-1"]) == [None]


async def test_attempts_exhausted(
    handler: ScriptHandler, db: AsyncDatabase, central: Central, locks: DeviceLocks
) -> None:
    h = await stored_task(db, attempt=4, max_retries=3)

    done = await handler.handle(h)

    assert done.outcome == "failed" and done.error is not None
    assert "attempts exhausted" in done.error
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "failed" and task["attempt"] == 4
    assert task["last_error"].startswith("attempts exhausted")
    assert task["finished_at"] is not None
    assert central.requests == []
    assert await db[RECORDS].count_documents({}) == 0
    assert await locks.holders(["dev-1"]) == [None]


async def test_last_allowed_attempt_is_still_sent(
    handler: ScriptHandler, db: AsyncDatabase, central: Central
) -> None:
    h = await stored_task(db, attempt=3, max_retries=3)
    done = await handler.handle(h)
    assert done.outcome == "sent" and done.attempt == 4
    assert len(central.requests) == 1


async def test_one_device_one_script_across_concurrent_handles(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    handler: ScriptHandler, locks: DeviceLocks,
) -> None:
    # Two workers (two handlers) and three tasks for one device, all at once.
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    other = ScriptHandler(redis_client=redis_client, db=db, central=client,
                          settings=handler_settings(settings), worker_name="w-other")
    try:
        handles = [await stored_task(db) for _ in range(3)]
        done = await asyncio.gather(handler.handle(handles[0]), other.handle(handles[1]),
                                    handler.handle(handles[2]), other.handle(handles[0]))
    finally:
        await client.aclose()
    outcomes = sorted(d.outcome for d in done)
    assert outcomes == ["busy", "busy", "busy", "sent"]
    assert len(central.requests) == 1
    [winner] = [d for d in done if d.outcome == "sent"]
    assert await locks.holders(["dev-1"]) == [winner.fence]
    assert await db[TASKS].count_documents({"status": "pending"}) == 2


async def test_a_result_before_the_send_is_marked_keeps_the_result(
    settings: Settings, handler: ScriptHandler, db: AsyncDatabase, central: Central,
    locks: DeviceLocks,
) -> None:
    """The device reports SUCCESS while central-control is still answering the worker."""
    records, tasks = RecordStore(db), TaskStore(db)

    async def device_reports(body: dict[str, Any]) -> None:
        msg = TaskLogMessage(recordId=body["recordId"], taskId=body["taskId"],
                             deviceId=body["deviceId"], logType="SUCCESS", timestamp=1)
        found = await records.find_many([msg.record_id])
        writes = result_updates([msg], found, {}, settings, utcnow())
        assert writes.retries == []
        await locks.release_many(writes.releases)
        assert await tasks.run_updates(writes.tasks) == 1
        assert await records.run_updates(writes.records) == 1

    central.on_request = device_reports
    h = await stored_task(db)

    done = await handler.handle(h)

    assert done.outcome == "sent"
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and task["status"] == "success"
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert rec["status"] == "success", "the result is not overwritten by 'sent'"
    assert rec["sent_at"] is not None, "the send time is still kept"
    assert await locks.holders(["dev-1"]) == [None]


async def test_a_timed_out_send_keeps_the_device_locked(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    locks: DeviceLocks,
) -> None:
    central.delay_s = 1.0  # central-control takes the script, answers too late
    client = CentralClient(central.url, connect_timeout_s=1, timeout_s=0.3)
    slow = ScriptHandler(redis_client=redis_client, db=db, central=client,
                         settings=handler_settings(settings), worker_name=WORKER)
    try:
        first = await stored_task(db)
        done = await slow.handle(first)
        assert len(central.requests) == 1, "central-control received the script"
        # Nobody can tell whether it was accepted: it counts as sent, the device stays
        # locked for its result (or the result timeout), and the record says why.
        assert done.outcome == "sent" and done.fence is not None
        assert (await locks.holders(["dev-1"]))[0] == done.fence
        task = await db[TASKS].find_one({"_id": first.task_id})
        assert task is not None and task["status"] == "sent"
        [rec] = [d async for d in db[RECORDS].find({"task_id": first.task_id})]
        assert "timeout" in rec["send_error"] and rec["status"] == "sent"
        second = await stored_task(db)
        assert (await slow.handle(second)).outcome == "busy"
    finally:
        await client.aclose()


# -- retries -------------------------------------------------------------------------------------
def retry_settings(settings: Settings, **changes: Any) -> Settings:
    fields: dict[str, Any] = {"lock_margin_s": MARGIN_S, "retry_base_s": 20.0,
                              "retry_factor": 2.0, "retry_cap_s": 600.0, "retry_jitter": 0.2}
    fields.update(changes)
    return settings.model_copy(update=fields)


@pytest.mark.parametrize("status", [503, 429, 408, 409, 500])
async def test_a_retryable_refusal_waits_for_a_retry(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    locks: DeviceLocks, free_events: FreeEvents, status: int,
) -> None:
    central.reply(status, {"success": False, "message": "try later"})
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    try:
        h = await stored_task(db, attempt=1, max_retries=3)
        before = utcnow()
        done = await handler.handle(h)
        after = utcnow()
    finally:
        await client.aclose()

    # Attempt 2 failed: 20 s * 2 = 40 s, +/- 20 %.
    assert done.outcome == "retry" and done.attempt == 2 and done.fence is None
    assert done.error is not None and f"HTTP {status}" in done.error
    assert done.run_at is not None
    assert before + timedelta(seconds=32) <= done.run_at <= after + timedelta(seconds=48)
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "retry_waiting" and task["attempt"] == 2
    assert abs(task["run_at"] - done.run_at) < timedelta(milliseconds=1)
    assert task["last_error"] == done.error
    assert task["master"] == settings.master_id, "held by this master, whose heap fires it"
    assert task.get("finished_at") is None
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert rec["attempt"] == 2 and rec["status"] == "failed" and f"HTTP {status}" in rec["error"]
    assert rec.get("sent_at") is None
    assert await locks.holders(["dev-1"]) == [None]
    assert await free_events.collect() == [{"device_id": "dev-1", "fence": rec["lock_value"]}]
    assert len(central.requests) == 1


class CentralOnPort(Central):
    """The stand-in central-control, started on a port chosen beforehand (one the
    worker's client has been failing to reach)."""

    async def start_on(self, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("attempt", [0, 2])
async def test_a_connection_refused_undoes_the_attempt(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, locks: DeviceLocks,
    free_events: FreeEvents, attempt: int,
) -> None:
    client = CentralClient(f"http://127.0.0.1:{free_port()}", connect_timeout_s=1, timeout_s=1)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    try:
        h = await stored_task(db, attempt=attempt, max_retries=3)
        done = await handler.handle(h)
    finally:
        await client.aclose()
    # The request never left: no attempt happened, and nothing of it is left behind.
    assert done.outcome == "unsent" and done.attempt == attempt and done.fence is None
    assert done.error is not None and "not sent (ConnectError" in done.error
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "pending" and task["attempt"] == attempt
    assert "record_id" not in task and "worker" not in task
    assert task["last_error"] == done.error and task.get("finished_at") is None
    assert await db[RECORDS].count_documents({"task_id": h.task_id}) == 0
    assert await locks.holders(["dev-1"]) == [None], "the device is not held"
    [freed] = await free_events.collect()
    assert freed["device_id"] == "dev-1"


async def test_a_record_stored_past_the_sweeps_window_is_not_sent(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    locks: DeviceLocks,
) -> None:
    """A worker slower from its lock to its record than the leader's sweeps wait may
    have lost its lock to the orphaned-lock sweep (and its task to the stuck-running
    one): it must not send. The window here is a microsecond, so every real lock,
    claim and insert outlast it; in a multi-host run under a CPU quota and a Mongo
    failover, a worker took 16 s against an 8 s grace and two scripts met on a device."""
    slow = settings.model_copy(update={"orphan_lock_grace_s": 1e-6, "running_stuck_s": 60.0})
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client, settings=slow,
                            worker_name=WORKER)
    try:
        h = await stored_task(db, attempt=1, max_retries=3)
        done = await handler.handle(h)
    finally:
        await client.aclose()
    assert done.outcome == "error" and done.attempt == 1
    assert done.error is not None and "since the device lock was asked for" in done.error
    assert central.requests == []
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "pending" and task["attempt"] == 1, "no attempt used"
    assert "record_id" not in task and "worker" not in task
    assert await db[RECORDS].count_documents({"task_id": h.task_id}) == 0
    assert await locks.holders(["dev-1"]) == [None]


def test_the_send_window_is_half_the_shortest_of_the_margin_and_the_graces(
        settings: Settings) -> None:
    from worker.handler import send_window_s

    assert send_window_s(settings.model_copy(update={
        "lock_margin_s": 60.0, "orphan_lock_grace_s": 8.0, "running_stuck_s": 6.0})) == 3.0
    assert send_window_s(settings.model_copy(update={
        "lock_margin_s": 60.0, "orphan_lock_grace_s": 30.0, "running_stuck_s": 60.0})) == 15.0
    assert send_window_s(settings.model_copy(update={
        "lock_margin_s": 5.0, "orphan_lock_grace_s": 30.0, "running_stuck_s": 60.0})) == 2.5
    # A sweep that never waits (grace 0) leaves the others to bound it.
    assert send_window_s(settings.model_copy(update={
        "lock_margin_s": 60.0, "orphan_lock_grace_s": 0.0, "running_stuck_s": 40.0})) == 20.0


async def test_central_unreachable_for_a_while_uses_no_attempt(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    port = free_port()
    client = CentralClient(f"http://127.0.0.1:{port}", connect_timeout_s=1, timeout_s=5)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    central = CentralOnPort()
    try:
        h = await stored_task(db, max_retries=1)
        # More tries than the task has attempts: none of them counts.
        outcomes = [(await handler.handle(h)).outcome for _ in range(4)]
        assert outcomes == ["unsent"] * 4
        await central.start_on(port)
        done = await handler.handle(h)
    finally:
        await client.aclose()
        if central._server is not None:
            await central.stop()
    assert done.outcome == "sent" and done.attempt == 1
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and task["status"] == "sent" and task["attempt"] == 1
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert rec["attempt"] == 1 and rec["status"] == "sent" and task["record_id"] == rec["_id"]
    assert [r["json"]["recordId"] for r in central.requests] == [rec["_id"]]
    assert await locks.holders(["dev-1"]) == [done.fence]


async def test_a_task_moved_on_during_an_unsent_attempt_is_left_alone(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    """Cancelled while the worker was failing to connect: the undo matches nothing,
    the cancel stands, and the lock is still released."""
    port = free_port()
    cancelled = asyncio.Event()

    class Cancelling(CentralClient):
        async def send_script(self, **kw: Any) -> None:
            await db[TASKS].update_one({"_id": kw["task_id"]},
                                       {"$set": {"status": "cancelled"}})
            cancelled.set()
            await super().send_script(**kw)

    client = Cancelling(f"http://127.0.0.1:{port}", connect_timeout_s=1, timeout_s=1)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    try:
        h = await stored_task(db)
        done = await handler.handle(h)
    finally:
        await client.aclose()
    assert cancelled.is_set() and done.outcome == "unsent"
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and task["status"] == "cancelled" and task["attempt"] == 1
    assert await locks.holders(["dev-1"]) == [None]


@pytest.mark.parametrize("status", [400, 403, 404, 422])
async def test_a_final_refusal_fails_at_once_with_attempts_left(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    locks: DeviceLocks, status: int,
) -> None:
    central.reply(status, {"success": False})
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    try:
        h = await stored_task(db, max_retries=5)
        done = await handler.handle(h)
    finally:
        await client.aclose()
    assert done.outcome == "failed" and done.run_at is None and done.attempt == 1
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "failed" and task["finished_at"] is not None
    assert f"HTTP {status}" in task["last_error"] and "exhausted" not in task["last_error"]
    assert await locks.holders(["dev-1"]) == [None]


async def test_a_retryable_refusal_on_the_last_attempt_fails(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    locks: DeviceLocks,
) -> None:
    central.reply(503, {"success": False})
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(redis_client=redis_client, db=db, central=client,
                            settings=retry_settings(settings), worker_name=WORKER)
    try:
        h = await stored_task(db, attempt=3, max_retries=3)
        done = await handler.handle(h)
    finally:
        await client.aclose()
    assert done.outcome == "failed" and done.attempt == 4 and done.run_at is None
    assert done.error is not None and done.error.endswith("(attempts exhausted: 4 of 4)")
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None
    assert task["status"] == "failed" and task["attempt"] == 4
    assert task["last_error"] == done.error and "HTTP 503" in task["last_error"]
    assert task["finished_at"] is not None
    [rec] = [d async for d in db[RECORDS].find({"task_id": h.task_id})]
    assert rec["status"] == "failed" and rec["attempt"] == 4
    assert await locks.holders(["dev-1"]) == [None]
    assert len(central.requests) == 1, "max_retries + 1 sends in all, no more"


@pytest.mark.parametrize(("task_base", "queue", "low", "high"), [
    (100.0, "bulk", 80.0, 120.0),   # the task's own base
    (None, "bulk", 400.0, 600.0),   # its queue's
    (None, "other", 16.0, 24.0),    # the default
])
async def test_the_retry_delay_takes_the_task_then_the_queue_then_the_default_base(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase, central: Central,
    task_base: float | None, queue: str, low: float, high: float,
) -> None:
    central.reply(503, {"success": False})
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(
        redis_client=redis_client, db=db, central=client, worker_name=WORKER,
        settings=retry_settings(settings, queue_retry_base_s={"bulk": 500.0}),
    )
    try:
        h = await stored_task(db, queue=queue, retry_base_s=task_base)
        before = utcnow()
        done = await handler.handle(h)
    finally:
        await client.aclose()
    assert done.outcome == "retry" and done.run_at is not None
    assert before + timedelta(seconds=low) <= done.run_at
    assert done.run_at <= utcnow() + timedelta(seconds=high)


async def test_a_worker_stalled_past_its_send_window_undoes_instead_of_sending(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    central: Central, locks: DeviceLocks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between its record and its POST a worker stalls (here parked by the test-only
    hold file; in production a slow store ridden out) longer than its lock can be
    trusted: the lock's margin, or the orphaned-lock sweep's grace, may have run out
    and another attempt may hold the device. It undoes the attempt and sends nothing."""
    point = tmp_path / "point"
    monkeypatch.setenv("SENDSCRIPT_TEST_CRASH_POINT", str(point))
    held = Path(f"{point}.hold-before-send-dev-1.held")
    Path(f"{point}.hold-before-send-dev-1").write_text("")  # noqa: ASYNC240 (a test's file)
    client = CentralClient(central.url, connect_timeout_s=2, timeout_s=5)
    handler = ScriptHandler(
        redis_client=redis_client, db=db, central=client, worker_name=WORKER,
        settings=settings.model_copy(update={"lock_margin_s": 0.8, "orphan_lock_grace_s": 30}))
    assert handler.send_window_s == 0.4
    h = await stored_task(db)
    try:
        running = asyncio.create_task(handler.handle(h))
        for _ in range(200):
            if held.exists():  # noqa: ASYNC240
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the handler did not reach the send")
        await asyncio.sleep(0.6)  # past the window
        held.unlink()  # noqa: ASYNC240
        done = await asyncio.wait_for(running, 10)
    finally:
        await client.aclose()

    assert done.outcome == "error" and "since the device lock was asked for" in (done.error or "")
    assert central.requests == []
    task = await db[TASKS].find_one({"_id": h.task_id})
    assert task is not None and task["status"] == "pending" and task["attempt"] == 0
    assert await db[RECORDS].count_documents({"task_id": h.task_id}) == 0
    assert await locks.holders(["dev-1"]) == [None]
