"""TaskLogConsumer.process on real Pulsar messages, with real Redis and Mongo behind it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

import pulsar
import pulsar.asyncio as apulsar
import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from consumers.task_log import TaskLogConsumer
from sendscript.fleet import FleetBuffer, add_to_hours, hour_of, last_day, slot_of
from sendscript.locks import DeviceLocks
from sendscript.models import ExecRecord, Task, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import RecordStatus, TaskStatus
from sendscript.store import DEVICES, LOGS, RECORDS, TASKS, LogStore, RecordStore, TaskStore
from tests.integration.conftest import FreeEvents

RECEIVE_TIMEOUT_S = 10.0


@dataclass
class Rig:
    consumer: TaskLogConsumer
    settings: Settings
    db: AsyncDatabase
    redis: redis.asyncio.Redis
    locks: DeviceLocks
    source: apulsar.Consumer
    producer: apulsar.Producer
    dlq: apulsar.Consumer

    async def deliver(self, payloads: Sequence[bytes | dict[str, Any]]) -> list[pulsar.Message]:
        """Publish payloads on the task-log topic and receive them back as Pulsar gives them."""
        for payload in payloads:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await self.producer.send(data)
        got = [await asyncio.wait_for(self.source.receive(), RECEIVE_TIMEOUT_S)
               for _ in payloads]
        for msg in got:
            await self.source.acknowledge(msg)
        return got

    async def dead_letters(self, n: int) -> list[pulsar.Message]:
        return [await asyncio.wait_for(self.dlq.receive(), RECEIVE_TIMEOUT_S) for _ in range(n)]

    async def sent_task(self, device: str, *, attempt: int = 1,
                        max_retries: int = 3) -> tuple[str, str, int]:
        """A task a worker has sent: task `sent`, its record `sent`, the device locked."""
        [fence] = await self.locks.acquire_many([(device, 60_000)])
        assert fence > 0
        task_id, record_id, now = new_id(), new_id(), utcnow()
        task = Task(_id=task_id, device_id=device, script={"id": "tap"}, status=TaskStatus.SENT,
                    attempt=attempt, max_retries=max_retries, record_id=record_id,
                    worker="w-1", master="m-1")
        record = ExecRecord(_id=record_id, task_id=task_id, attempt=attempt, device_id=device,
                            lock_value=fence, worker="w-1", started_at=now, sent_at=now,
                            status=RecordStatus.SENT)
        await self.db[TASKS].insert_one(task.to_doc())
        await self.db[RECORDS].insert_one(record.to_doc())
        return task_id, record_id, fence

    async def ready(self) -> list[Any]:
        """The ready list, oldest item first."""
        items = await self.redis.lrange(self.settings.keys.ready, 0, -1)
        return [json.loads(i) for i in reversed(items)]

    async def snapshot(self) -> dict[str, Any]:
        return {
            name: [d async for d in self.db[name].find({}).sort("_id")]
            for name in (TASKS, RECORDS, LOGS, DEVICES)
        }


def log(task_id: str, record_id: str, device: str, kind: str, message: str = "",
        ts: int | None = None) -> dict[str, Any]:
    return {"recordId": record_id, "taskId": task_id, "deviceId": device, "logType": kind,
            "message": message, "timestamp": ts if ts is not None else int(time.time() * 1000)}


@pytest.fixture
async def rig(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    pulsar_client: apulsar.Client,
) -> AsyncIterator[Rig]:
    # The fleet view written with every batch, as the tests read it right after one;
    # held results are tested on their own below.
    settings = settings.model_copy(update={"fleet_write_interval_s": 0.0})
    consumer = TaskLogConsumer(settings)
    # What run() sets up before it consumes.
    consumer.redis = redis_client
    consumer.tasks, consumer.records, consumer.logs = TaskStore(db), RecordStore(db), LogStore(db)
    consumer.devices = db[DEVICES]
    consumer.locks = DeviceLocks(redis_client, settings.keys)
    consumer.dlq = await pulsar_client.create_producer(settings.dlq_topic)
    source = await pulsar_client.subscribe(
        settings.task_log_topic, "test", consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    dlq = await pulsar_client.subscribe(
        settings.dlq_topic, "test", initial_position=pulsar.InitialPosition.Earliest,
    )
    producer = await pulsar_client.create_producer(settings.task_log_topic)
    yield Rig(consumer, settings, db, redis_client, DeviceLocks(redis_client, settings.keys),
              source, producer, dlq)
    await producer.close()
    await source.close()
    await dlq.close()
    await consumer.dlq.close()


async def test_success_applies_to_task_and_record_and_frees_the_device(
    rig: Rig, free_events: FreeEvents
) -> None:
    task_id, record_id, fence = await rig.sent_task("dev-1")
    before = utcnow()
    batch = await rig.deliver([
        log(task_id, record_id, "dev-1", "INFO", "started", 1_000),
        log(task_id, record_id, "dev-1", "SUCCESS", "all done", 2_000),
    ])

    result = await rig.consumer.process(batch)

    assert (result.saved, result.applied, result.released, result.dead_lettered) == (2, 1, 1, 0)
    assert result.unknown_records == []
    task = await rig.db[TASKS].find_one({"_id": task_id})
    assert task is not None
    assert task["status"] == "success"
    assert task["finished_at"] >= before and task["updated_at"] >= before
    assert task.get("last_error") is None
    assert task["attempt"] == 1
    rec = await rig.db[RECORDS].find_one({"_id": record_id})
    assert rec is not None
    assert rec["status"] == "success" and rec["finished_at"] >= before
    assert rec.get("error") is None
    logs = [d async for d in rig.db[LOGS].find({"record_id": record_id}).sort("timestamp")]
    assert [(d["log_type"], d["message"]) for d in logs] == [
        ("INFO", "started"), ("SUCCESS", "all done")]
    assert all(d["task_id"] == task_id and d["device_id"] == "dev-1" for d in logs)
    assert await rig.locks.holders(["dev-1"]) == [None]
    assert await free_events.collect() == [{"device_id": "dev-1", "fence": fence}]


async def test_applying_the_same_batch_twice_changes_nothing(
    rig: Rig, free_events: FreeEvents
) -> None:
    t1, r1, _ = await rig.sent_task("dev-1")
    t2, r2, _ = await rig.sent_task("dev-2")
    payloads = [
        log(t1, r1, "dev-1", "PROGRESS", "50%", 1_000),
        log(t1, r1, "dev-1", "SUCCESS", "ok", 2_000),
        log(t2, r2, "dev-2", "ERROR", "crashed", 2_500),
    ]
    batch = await rig.deliver(payloads)
    await rig.consumer.process(batch)
    after_first = await rig.snapshot()
    await free_events.collect()
    # The freed device is locked again by its next task before the redelivery.
    [next_fence] = await rig.locks.acquire_many([("dev-1", 60_000)])

    again = await rig.consumer.process(batch)                       # the same messages
    dup = await rig.consumer.process(await rig.deliver(payloads))   # published twice

    for result in (again, dup):
        assert (result.saved, result.applied, result.released) == (0, 0, 0)
    assert await rig.snapshot() == after_first
    assert await rig.locks.holders(["dev-1", "dev-2"]) == [next_fence, None]
    # Only dev-2, whose lock is gone, is announced again; dev-1 is someone else's now.
    assert {e["device_id"] for e in await free_events.collect()} == {"dev-2"}


async def test_a_duplicate_within_one_batch_is_applied_once(rig: Rig) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1")
    msg = log(task_id, record_id, "dev-1", "SUCCESS", "ok", 5_000)
    result = await rig.consumer.process(await rig.deliver([msg, msg]))
    assert (result.saved, result.applied, result.released) == (1, 1, 1)
    assert await rig.db[LOGS].count_documents({}) == 1
    assert (await rig.db[TASKS].find_one({"_id": task_id}))["status"] == "success"  # type: ignore[index]


@pytest.mark.parametrize("kind", ["ERROR", "error"])
async def test_an_error_with_a_final_code_fails_the_task(
    rig: Rig, free_events: FreeEvents, kind: str
) -> None:
    rig.settings.final_error_codes = frozenset({"E_NO_APP", "E_BAD_SCRIPT"})
    task_id, record_id, fence = await rig.sent_task("dev-1")
    msg = {**log(task_id, record_id, "dev-1", kind, "screen locked"), "errorCode": "E_NO_APP"}

    result = await rig.consumer.process(await rig.deliver([msg]))

    assert (result.applied, result.released, result.retries) == (1, 1, 0)
    expected = "ERROR [E_NO_APP]: screen locked"
    task = await rig.db[TASKS].find_one({"_id": task_id})
    assert task is not None
    assert task["status"] == "failed" and task["last_error"] == expected
    assert task["finished_at"] is not None and task["attempt"] == 1
    rec = await rig.db[RECORDS].find_one({"_id": record_id})
    assert rec is not None
    assert rec["status"] == "failed" and rec["error"] == expected
    assert await rig.locks.holders(["dev-1"]) == [None]
    assert await free_events.collect() == [{"device_id": "dev-1", "fence": fence}]
    assert await rig.ready() == [], "a final failure is not queued again"


@pytest.mark.parametrize("kind", ["ERROR", "SYSTEM_ERROR", "error"])
async def test_an_error_on_the_last_attempt_fails_the_task(rig: Rig, kind: str) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1", attempt=4, max_retries=3)

    result = await rig.consumer.process(
        await rig.deliver([log(task_id, record_id, "dev-1", kind, "screen locked")]))

    assert (result.applied, result.released, result.retries) == (1, 1, 0)
    error = f"{kind.upper()}: screen locked"
    task = await rig.db[TASKS].find_one({"_id": task_id})
    assert task is not None
    assert task["status"] == "failed"
    assert task["last_error"] == f"{error} (attempts exhausted: 4 of 4)"
    assert task["finished_at"] is not None
    rec = await rig.db[RECORDS].find_one({"_id": record_id})
    assert rec is not None
    assert rec["status"] == "failed" and rec["error"] == error
    assert await rig.locks.holders(["dev-1"]) == [None]
    assert await rig.ready() == []


@pytest.mark.parametrize(("kind", "code"), [
    ("ERROR", None), ("error", "E_FLAKY"), ("SYSTEM_ERROR", None), ("SYSTEM_ERROR", "E_NO_APP"),
])
async def test_an_error_with_attempts_left_waits_for_a_retry(
    rig: Rig, free_events: FreeEvents, kind: str, code: str | None
) -> None:
    rig.settings.final_error_codes = frozenset({"E_NO_APP"})  # ERROR only; SYSTEM_ERROR retries
    task_id, record_id, fence = await rig.sent_task("dev-1", attempt=2, max_retries=3)
    msg = log(task_id, record_id, "dev-1", kind, "adb lost")
    if code is not None:
        msg["error_code"] = code
    before = utcnow()

    result = await rig.consumer.process(await rig.deliver([msg]))

    assert (result.applied, result.released, result.retries) == (1, 1, 1)
    error = f"{kind.upper()}{f' [{code}]' if code else ''}: adb lost"
    task = await rig.db[TASKS].find_one({"_id": task_id})
    assert task is not None
    assert task["status"] == "retry_waiting" and task["attempt"] == 2
    assert task["last_error"] == error
    assert task.get("finished_at") is None
    assert "master" not in task, "any master may take the retry"
    # After attempt 2 with the default schedule: 5 s * 2 = 10 s, +/- 20 %.
    assert before + timedelta(seconds=8) <= task["run_at"] <= utcnow() + timedelta(seconds=12)
    rec = await rig.db[RECORDS].find_one({"_id": record_id})
    assert rec is not None and rec["status"] == "failed" and rec["error"] == error
    assert await rig.locks.holders(["dev-1"]) == [None]
    assert await free_events.collect() == [{"device_id": "dev-1", "fence": fence}]
    assert await rig.ready() == [{"task_id": task_id}]


async def redeliver_a_retry(rig: Rig) -> tuple[str, dict[str, Any], list[Any]]:
    """A SYSTEM_ERROR applied once, then the same batch again and the message published
    twice. Returns the task id, the Mongo state after the first time, and the results."""
    task_id, record_id, _ = await rig.sent_task("dev-1")
    payloads = [log(task_id, record_id, "dev-1", "SYSTEM_ERROR", "reboot", 1_000)]
    batch = await rig.deliver(payloads)
    first = await rig.consumer.process(batch)
    assert (first.applied, first.retries) == (1, 1)
    after_first = await rig.snapshot()
    assert after_first[TASKS][0]["status"] == "retry_waiting"
    again = await rig.consumer.process(batch)
    dup = await rig.consumer.process(await rig.deliver(payloads))
    return task_id, after_first, [again, dup]


async def test_a_redelivered_retry_is_not_applied_again(rig: Rig) -> None:
    _, after_first, results = await redeliver_a_retry(rig)
    for result in results:
        assert (result.saved, result.applied, result.released) == (0, 0, 0)
    assert await rig.snapshot() == after_first


async def test_a_redelivered_retry_is_not_queued_again(rig: Rig) -> None:
    task_id, _, results = await redeliver_a_retry(rig)
    assert await rig.ready() == [{"task_id": task_id}], "one push per retry"
    assert [r.retries for r in results] == [0, 0]


async def test_snake_case_messages_are_accepted(rig: Rig) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1")
    msg = {"record_id": record_id, "task_id": task_id, "device_id": "dev-1",
           "log_type": "SUCCESS", "message": None, "timestamp": 7}
    result = await rig.consumer.process(await rig.deliver([msg]))
    assert (result.saved, result.applied, result.dead_lettered) == (1, 1, 0)


async def test_result_for_unknown_record_is_saved_not_applied(rig: Rig) -> None:
    task_id, _, fence = await rig.sent_task("dev-1")
    before = await rig.snapshot()

    result = await rig.consumer.process(
        await rig.deliver([log(task_id, "no-such-record", "dev-1", "SUCCESS", "ok", 3_000)]))

    assert result.saved == 1 and result.applied == 0 and result.released == 0
    assert result.unknown_records == ["no-such-record"]
    after = await rig.snapshot()
    assert after[TASKS] == before[TASKS] and after[RECORDS] == before[RECORDS]
    [saved] = after[LOGS]
    assert saved["record_id"] == "no-such-record" and saved["log_type"] == "SUCCESS"
    assert await rig.locks.holders(["dev-1"]) == [fence]


async def test_a_late_result_of_an_old_attempt_leaves_the_new_attempt_alone(rig: Rig) -> None:
    task_id, old_record, _ = await rig.sent_task("dev-1")
    # The old attempt ended without its result (e.g. timed out); attempt 2 is now sent.
    old_fence_gone = await rig.redis.delete(rig.settings.keys.device_lock("dev-1"))
    assert old_fence_gone == 1
    [fence2] = await rig.locks.acquire_many([("dev-1", 60_000)])
    record2 = new_id()
    await rig.db[RECORDS].insert_one(ExecRecord(
        _id=record2, task_id=task_id, attempt=2, device_id="dev-1", lock_value=fence2,
        worker="w-2", started_at=utcnow(), status=RecordStatus.SENT).to_doc())
    await rig.db[TASKS].update_one({"_id": task_id},
                                   {"$set": {"attempt": 2, "record_id": record2}})

    result = await rig.consumer.process(
        await rig.deliver([log(task_id, old_record, "dev-1", "ERROR", "late")]))

    assert result.applied == 0
    task = await rig.db[TASKS].find_one({"_id": task_id})
    assert task is not None and task["status"] == "sent" and task["attempt"] == 2
    assert (await rig.db[RECORDS].find_one({"_id": record2}))["status"] == "sent"  # type: ignore[index]
    assert await rig.locks.holders(["dev-1"]) == [fence2], "the new attempt keeps its device"


async def test_a_task_put_back_after_its_worker_died_takes_success_not_error(
    rig: Rig,
) -> None:
    put_back = []
    for device in ("dev-ok", "dev-err"):
        task_id, record_id, _ = await rig.sent_task(device)
        # The worker died mid-send; the master put the task back, same attempt.
        await rig.db[TASKS].update_one({"_id": task_id}, {"$set": {"status": "pending"}})
        await rig.db[RECORDS].update_one({"_id": record_id}, {"$set": {"status": "running"}})
        put_back.append((task_id, record_id))
    (ok_task, ok_rec), (err_task, err_rec) = put_back

    result = await rig.consumer.process(await rig.deliver([
        log(ok_task, ok_rec, "dev-ok", "SUCCESS", "ran"),
        log(err_task, err_rec, "dev-err", "ERROR", "did not run"),
    ]))

    assert result.applied == 1 and result.released == 2
    # The device did run it: running it again would be the mistake.
    assert (await rig.db[TASKS].find_one({"_id": ok_task}))["status"] == "success"  # type: ignore[index]
    # An error does not end a task that is queued to run again.
    assert (await rig.db[TASKS].find_one({"_id": err_task}))["status"] == "pending"  # type: ignore[index]
    assert (await rig.db[RECORDS].find_one({"_id": err_rec}))["status"] == "failed"  # type: ignore[index]


async def test_a_put_back_task_is_marked_success_before_its_device_is_freed(
    rig: Rig, free_events: FreeEvents
) -> None:
    """A master dispatches a freed device's next task at once: a task its dead worker
    left pending (the device ran it) must be success by then, or it runs twice."""
    task_id, record_id, fence = await rig.sent_task("dev-back")
    await rig.db[TASKS].update_one({"_id": task_id}, {"$set": {"status": "pending"}})
    seen_at_event: list[str] = []

    async def master_reacting_to_the_event() -> None:
        while not seen_at_event:
            msg = await free_events._pubsub.get_message(ignore_subscribe_messages=True,
                                                        timeout=5)
            assert msg is not None, "no device-free event"
            doc = await rig.db[TASKS].find_one({"_id": task_id}, {"status": 1})
            seen_at_event.append(doc["status"])  # type: ignore[index]

    watcher = asyncio.create_task(master_reacting_to_the_event())
    await rig.consumer.process(await rig.deliver([
        log(task_id, record_id, "dev-back", "SUCCESS", "ran")]))
    await asyncio.wait_for(watcher, 10)
    assert seen_at_event == ["success"]
    assert await rig.locks.holders(["dev-back"]) == [None]
    assert fence > 0


async def test_an_error_that_applies_to_nothing_queues_nothing(rig: Rig) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1")
    await rig.db[TASKS].update_one({"_id": task_id}, {"$set": {"status": "pending"}})
    result = await rig.consumer.process(
        await rig.deliver([log(task_id, record_id, "dev-1", "ERROR", "did not run")]))
    assert result.applied == 0 and result.released == 1
    assert (await rig.db[TASKS].find_one({"_id": task_id}))["status"] == "pending"  # type: ignore[index]
    assert (await rig.db[RECORDS].find_one({"_id": record_id}))["status"] == "failed"  # type: ignore[index]
    assert await rig.ready() == []
    assert result.retries == 0


async def test_malformed_messages_go_to_the_dead_letter_topic(rig: Rig) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1")
    bad: list[tuple[bytes, str]] = [
        (b"{oops", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"taskId": "t", "deviceId": "d", "logType": "SUCCESS",
                     "timestamp": 1}).encode(), "recordId"),
        (json.dumps(log("t", "r", "d", "BOGUS")).encode(), "log"),
        (json.dumps(log("t", "r", "d", "INFO", ts=-5)).encode(), "timestamp"),
    ]
    good = log(task_id, record_id, "dev-1", "SUCCESS", "fine")
    batch = await rig.deliver([item for item, _ in bad] + [good])

    result = await rig.consumer.process(batch)

    assert result.dead_lettered == len(bad)
    assert result.applied == 1 and result.saved == 1, "the good message of the batch applies"
    letters = await rig.dead_letters(len(bad))
    by_data = {}
    for letter in letters:
        payload = json.loads(letter.data())
        assert payload["topic"].endswith(rig.settings.task_log_topic.split("/")[-1])
        assert payload["message_id"]
        assert letter.properties()["reason"] == payload["reason"][:500]
        by_data[payload["data"]] = payload["reason"]
    for item, expected in bad:
        reason = by_data[item.decode("utf-8", "replace")]
        assert expected in reason, (item, reason)
    stats = await rig.redis.hget(rig.settings.keys.stats, "dead_lettered")
    assert stats == str(len(bad)).encode()
    assert await rig.db[LOGS].count_documents({}) == 1


def with_lone_surrogate(payload: dict[str, Any], field: str) -> bytes:
    """Valid JSON whose `field` holds a lone surrogate: Python keeps it, BSON cannot."""
    data = json.dumps({**payload, field: "before MARK after"}).encode()
    return data.replace(b"MARK", b"\\ud800")


async def test_a_log_the_store_refuses_is_dead_lettered_and_the_rest_of_its_batch_applies(
    rig: Rig,
) -> None:
    rig.settings.task_log_max_message_chars = 10_000
    ok_task, ok_rec, _ = await rig.sent_task("dev-ok")
    bad_task, bad_rec, bad_fence = await rig.sent_task("dev-bad")
    big_task, big_rec, _ = await rig.sent_task("dev-big")
    # Pulsar's own limit (5 MiB in pulsar-lite and Apache Pulsar): no log can be
    # larger than the store's 16 MiB, but one can be far larger than worth storing.
    with pytest.raises(Exception, match=r"(?i)too ?big|size"):
        await rig.producer.send(b"x" * (6 * 1024 * 1024))
    poison = with_lone_surrogate(log(bad_task, bad_rec, "dev-bad", "SUCCESS"), "message")
    batch = await rig.deliver([
        log(ok_task, ok_rec, "dev-ok", "SUCCESS", "fine", 1_000),
        poison,
        log(big_task, big_rec, "dev-big", "SUCCESS", "y" * 4_000_000, 2_000),
    ])

    result = await rig.consumer.process(batch)

    assert (result.dead_lettered, result.saved, result.applied, result.released) == (1, 2, 2, 2)
    [letter] = await rig.dead_letters(1)
    payload = json.loads(letter.data())
    assert payload["data"] == poison.decode()
    assert "cannot be stored" in payload["reason"] and "surrogate" in payload["reason"]
    assert letter.properties()["reason"] == payload["reason"][:500]
    for task_id in (ok_task, big_task):
        assert (await rig.db[TASKS].find_one({"_id": task_id}))["status"] == "success"  # type: ignore[index]
    # The refused result is not applied: its device stays held until the result
    # timeout, like a result that never came.
    assert (await rig.db[TASKS].find_one({"_id": bad_task}))["status"] == "sent"  # type: ignore[index]
    assert await rig.locks.holders(["dev-bad"]) == [bad_fence]
    assert await rig.db[LOGS].count_documents({"task_id": bad_task}) == 0
    stored = await rig.db[LOGS].find_one({"task_id": big_task})
    assert stored is not None and len(stored["message"]) == 10_000
    assert stored["message"].endswith("[cut: 4000000 characters]")
    assert await rig.redis.hget(rig.settings.keys.stats, "dead_lettered") == b"1"

    # Delivered again (a redelivery), nothing changes and the poison is refused again.
    again = await rig.consumer.process(batch)
    assert (again.dead_lettered, again.saved, again.applied) == (1, 0, 0)


async def test_a_batch_of_nothing_but_refused_logs_is_dead_lettered_whole(rig: Rig) -> None:
    task_id, record_id, _ = await rig.sent_task("dev-1")
    payloads = [with_lone_surrogate(log(task_id, record_id, "dev-1", "INFO", ts=i), "message")
                for i in range(3)]
    result = await rig.consumer.process(await rig.deliver(payloads))
    assert (result.dead_lettered, result.saved, result.applied) == (3, 0, 0)
    assert len(await rig.dead_letters(3)) == 3
    assert await rig.db[LOGS].count_documents({}) == 0


async def test_results_keep_each_devices_last_result_and_hourly_counts(rig: Rig) -> None:
    t1, r1, _ = await rig.sent_task("dev-1")
    await rig.consumer.process(await rig.deliver([log(t1, r1, "dev-1", "SUCCESS", "ok")]))
    t2, r2, _ = await rig.sent_task("dev-1", max_retries=0)
    t3, r3, _ = await rig.sent_task("dev-2", max_retries=0)
    hour = hour_of(utcnow())
    # dev-2 ran tasks in this hour's slot a day ago: that count is dropped, not added to
    stale = {slot_of(hour): {"h": hour - 24, "ok": 5, "fail": 5}}
    await rig.db[DEVICES].insert_one({"_id": "dev-2", "hours": stale, "first_seen": utcnow()})
    await rig.consumer.process(await rig.deliver([
        log(t2, r2, "dev-1", "ERROR", "no app"), log(t3, r3, "dev-2", "SYSTEM_ERROR", "offline")]))

    docs = {d["_id"]: d async for d in rig.db[DEVICES].find({})}
    now = utcnow()
    one, two = docs["dev-1"], docs["dev-2"]
    assert (one["last_task_id"], one["last_record_id"], one["last_result"],
            one["last_error"]) == (t2, r2, "ERROR", "no app")
    assert (two["last_task_id"], two["last_result"], two["last_error"]) == (
        t3, "SYSTEM_ERROR", "offline")
    assert last_day(one["hours"], now) == (1, 1)
    assert last_day(two["hours"], now) == (0, 1)
    # the documents hold what the pure bucket rule says
    assert two["hours"] == add_to_hours(stale, hour_of(two["last_finished_at"]), 0, 1)
    known = await rig.redis.zrange(rig.settings.keys.devices_known, 0, -1)
    assert known == [b"dev-1", b"dev-2"]


async def test_held_results_are_written_together_each_device_once(rig: Rig) -> None:
    """With a write interval, batches' results wait: nothing is written until the
    interval has passed, then one update a device holds every result once, and the
    device's last result with the time its batch was applied."""
    rig.consumer.fleet_held = FleetBuffer(3600.0)
    sent: list[tuple[str, str, int]] = []
    applied_at = []
    for k in range(3):  # a task a device a batch: its lock is freed by the batch
        batch = []
        for i in range(3 * k, 3 * k + 3):
            sent.append(await rig.sent_task(f"held-{i % 3}", max_retries=0))
            t, r, _ = sent[i]
            batch.append(log(t, r, f"held-{i % 3}", "SUCCESS" if i % 2 else "ERROR", f"e{i}"))
        await rig.consumer.process(await rig.deliver(batch))
        applied_at.append(utcnow())
    assert await rig.db[DEVICES].count_documents({}) == 0
    assert len(rig.consumer.fleet_held.held) == 9
    await rig.consumer._write_fleet()
    assert rig.consumer.fleet_held.held == []
    docs = {d["_id"]: d async for d in rig.db[DEVICES].find({})}
    now = utcnow()
    assert sorted(docs) == ["held-0", "held-1", "held-2"]
    for d in range(3):
        mine = [i for i in range(9) if i % 3 == d]
        ok = sum(i % 2 for i in mine)
        doc = docs[f"held-{d}"]
        assert last_day(doc["hours"], now) == (ok, len(mine) - ok)
        last = mine[-1]
        assert (doc["last_task_id"], doc["last_record_id"]) == sent[last][:2]
        assert doc["last_error"] == ("" if last % 2 else f"e{last}")
        # applied with the third batch: after the second batch's time, before the third's
        assert applied_at[1] <= doc["last_finished_at"].replace(tzinfo=UTC) <= applied_at[2]
    known = await rig.redis.zrange(rig.settings.keys.devices_known, 0, -1)
    assert known == [b"held-0", b"held-1", b"held-2"]


async def test_held_results_are_left_to_the_timer_which_writes_them_once_due(rig: Rig) -> None:
    rig.consumer.fleet_held = FleetBuffer(0.2)
    t, r, _ = await rig.sent_task("timed-1")
    await rig.consumer.process(await rig.deliver([log(t, r, "timed-1", "SUCCESS")]))
    assert await rig.db[DEVICES].count_documents({}) == 0  # the batch did not write it
    writer = asyncio.create_task(rig.consumer._write_fleet_forever())
    try:
        deadline = time.monotonic() + 10
        while await rig.db[DEVICES].find_one({"_id": "timed-1"}) is None:
            assert time.monotonic() < deadline, "the held result was never written"
            await asyncio.sleep(0.05)
    finally:
        writer.cancel()
    assert rig.consumer.fleet_held.held == []
    doc = await rig.db[DEVICES].find_one({"_id": "timed-1"})
    assert doc is not None and (doc["last_task_id"], doc["last_result"]) == (t, "SUCCESS")
