"""Device health's Lua on the real Redis: the same rule as the in-memory model, the
bench published on the channel, resume, late results counted; and the master's part
(gate, answers flushed, view reloaded) against it, as two masters would see it."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import timedelta

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.bus import Bus, Go, Hold
from master.device_health import Benching
from master.events import Incident, TaskAnswered, WakeRequested
from master.recovery import Found, Recovery
from sendscript import connect, device_health
from sendscript.device_health import BenchPolicy, DeviceHealth, Outcome
from sendscript.ipc import TaskDone
from sendscript.locks import DeviceLocks
from sendscript.models import Task, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import RecordStore, TaskStore
from tests.integration.test_recovery import sent_task

POLICY = BenchPolicy(after=3, base_s=60, cap_s=200)
T0 = 1_700_000_000_000


async def test_the_script_follows_the_model_on_random_batches(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    keys = settings.keys
    model = DeviceHealth(POLICY)
    rand = random.Random(7)
    now = T0
    benches = 0
    for _ in range(150):
        now += rand.choice([0, 1_000, 30_000, 70_000])
        batch = [Outcome(rand.choice("abc"), rand.random() < 0.25, f"why {rand.random():.3f}")
                 for _ in range(rand.randint(1, 6))]
        batch = [Outcome(o.device_id, o.ok, "" if o.ok else o.reason) for o in batch]
        got = await device_health.record(redis_client, keys, POLICY, batch, now_ms=now)
        want = model.apply(batch, now)
        assert got == want
        benches += len(got)
        stored = {k.decode(): json.loads(v)
                  for k, v in (await redis_client.hgetall(keys.device_health)).items()}
        assert {d: (e["streak"], e["level"]) for d, e in stored.items()} == {
            d: (e.streak, e.level) for d, e in model.entries.items()}
        assert await device_health.load(redis_client, keys, now_ms=now) == {
            d: u / 1000 for d, u in model.benched.items() if u > now}
    assert benches >= 5  # the sequence did bench, repeatedly
    stats = await redis_client.hgetall(keys.stats)
    assert int(stats[b"devices_benched"]) == benches


async def test_bench_is_published_resume_lifts_and_late_results_count(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    keys = settings.keys
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.devices_channel)
    try:
        benched = await device_health.record(
            redis_client, keys, POLICY, [Outcome("d1", False, "result timeout")] * 3, late=2)
        assert [b.device_id for b in benched] == ["d1"]
        assert await _next_message(pubsub) == {"benched": ["d1"]}
        assert int(await redis_client.hget(keys.stats, "late_results")) == 2
        await device_health.record(redis_client, keys, POLICY, [], late=1)
        assert int(await redis_client.hget(keys.stats, "late_results")) == 3

        sync = connect.redis_sync(settings)
        try:
            listed = device_health.benched_sync(sync, keys)
            assert list(listed) == ["d1"]
            assert (listed["d1"]["streak"], listed["d1"]["level"]) == (3, 1)
            assert listed["d1"]["why"] == "result timeout"
            assert 59 <= listed["d1"]["left_s"] <= 60
            assert device_health.resume_sync(sync, keys, "d1") is True
            assert device_health.resume_sync(sync, keys, "d1") is False
            assert device_health.benched_sync(sync, keys) == {}
        finally:
            sync.close()
        assert await _next_message(pubsub) == {"resumed": "d1"}
        assert await redis_client.hget(keys.device_health, "d1") is None
    finally:
        await pubsub.aclose()


async def _next_message(pubsub: redis.asyncio.client.PubSub) -> object:
    """The next published message (the subscription's confirmation is skipped)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = await pubsub.get_message(timeout=1)
        if message is not None:
            return json.loads(message["data"])
    raise AssertionError("no message on the devices channel")


def _task(device: str) -> Task:
    return Task(_id=new_id(), device_id=device, script={"id": "s"})


def _answer(task: Task, outcome: str, error: str | None,
            central_ok: bool | None = None) -> TaskAnswered:
    done = TaskDone(task_id=task.id, device_id=task.device_id, outcome=outcome, attempt=1,
                    error=error, central_ok=central_ok)
    return TaskAnswered(task, done, "w0", 0.0, 0.0)


async def _until(predicate, what: str, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_two_masters_one_benches_from_refused_sends_both_hold_resume_wakes(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    s = settings.model_copy(update={"bench_after": 2, "bench_alert_count": 0,
                                    "heartbeat_interval_s": 30.0})
    buses = [Bus(), Bus()]
    parts = [Benching(s, bus, redis_client) for bus in buses]
    for bus, part in zip(buses, parts, strict=True):
        bus.attach(part)
        bus.add_gate(part.gate)
    seen: list[list[object]] = [[], []]
    for bus, got in zip(buses, seen, strict=True):
        bus.subscribe(Incident, got.append)
        bus.subscribe(WakeRequested, got.append)
    stop = asyncio.Event()
    loops = [asyncio.create_task(p.run(stop)) for p in parts]
    try:
        await _until(lambda: all(p.reloads for p in parts), "the first loads")
        task = _task("sick")
        refused = "central-control final: HTTP 404 no such device"
        buses[0].emit(_answer(task, "failed", refused))
        buses[0].emit(_answer(task, "retry", "central-control retryable: HTTP 503", False))
        buses[0].emit(_answer(task, "retry", "central-control retryable: HTTP 409 busy"))
        buses[0].emit(_answer(task, "failed", refused))
        # The second master hears of it on the channel (its reload is 30 s away).
        await _until(lambda: all("sick" in p.gate.until for p in parts), "both to see it")
        assert parts[0].recorded == 2 and parts[0].benched_here == 1
        for p in parts:
            assert isinstance(p.gate.admit(task, utcnow()), Hold)
            assert isinstance(p.gate.admit(_task("well"), utcnow()), Go)
        for got in seen:
            assert Incident("device_benched", "sick", True, got[0].detail) in got  # type: ignore[union-attr]
            assert any(isinstance(i, Incident) and i.kind == "devices_benched" and i.active
                       for i in got)
        await device_health.resume(redis_client, s.keys, "sick")
        await _until(lambda: all(WakeRequested(["sick"]) in got for got in seen),
                     "both to wake the device")
        for p, got in zip(parts, seen, strict=True):
            assert isinstance(p.gate.admit(task, utcnow()), Go)
            assert Incident("device_benched", "sick", False, "bench over") in got
            assert not p.many
    finally:
        stop.set()
        await asyncio.gather(*loops, return_exceptions=True)


async def test_the_sweeps_result_timeouts_feed_the_streak_of_sent_tasks_only(
        settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase) -> None:
    s = settings.model_copy(update={"bench_after": 2, "retry_base_s": 20.0})
    recovery = Recovery(s, redis_client, TaskStore(db), RecordStore(db))
    locks = DeviceLocks(redis_client, s.keys)
    for _ in range(2):  # one at a time: each holds its device's lock until timed out
        now = utcnow()
        await sent_task(db, locks, "silent", sent_at=now - timedelta(seconds=60))
        await sent_task(db, locks, "stuck", sent_at=now - timedelta(seconds=60),
                        status=TaskStatus.RUNNING)
        found = Found()
        await recovery.time_out_results(now, found)
        assert len(found.timed_out) == 2
    sync = connect.redis_sync(settings)
    try:
        listed = device_health.benched_sync(sync, s.keys)
    finally:
        sync.close()
    assert list(listed) == ["silent"]
    assert (listed["silent"]["streak"], listed["silent"]["why"]) == (2, "result timeout")
    assert await redis_client.hget(s.keys.device_health, "stuck") is None
