"""Device-lock fences across a Redis killed with SIGKILL under load, on a Redis of
this test's own (the session's shared servers are left alone).

A SIGKILL alone rarely loses anything: redis-server write()s the AOF before it
answers, and the kernel keeps what was written. What `appendfsync everysec`
leaves at risk is the last second of writes when the machine goes down with
the process; the test makes that loss real by also cutting the AOF back to the
length it had earlier (what a crash of the host does to unsynced pages), then
proves that no fence handed out after a restart repeats or undercuts one
handed out before it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers, RedisServer
from sendscript.fencing import EPOCHS, MongoEpochs, fence_floor
from sendscript.locks import DeviceLocks, epoch_key
from sendscript.settings import Settings
from tests.support import Inspect, Roles, needs_one_redis_server, unique_settings, wait_for

pytestmark = [pytest.mark.e2e, needs_one_redis_server]

TTL_MS = 60_000
WORKERS = 4
BATCH = 8


@pytest.fixture
def crash_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


class Load:
    """Coroutines standing in for workers, each with its own Redis client and epoch
    source: acquire a batch of devices, release them, again. Every fence is filed
    under the generation (Redis run) current when its acquire began."""

    def __init__(self, settings: Settings, db: AsyncDatabase) -> None:
        self.settings = settings
        self.db = db
        self.generation = 0
        self.fences: dict[int, list[int]] = defaultdict(list)
        self.errors = 0
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[redis.asyncio.Redis] = []

    def start(self) -> None:
        for n in range(WORKERS):
            client = connect.redis_async(self.settings)
            self._clients.append(client)
            locks = DeviceLocks(client, self.settings.keys,
                                MongoEpochs(self.db, self.settings.key_prefix))
            self._tasks.append(asyncio.create_task(self._run(n, locks)))

    async def _run(self, n: int, locks: DeviceLocks) -> None:
        while not self._stop:
            gen = self.generation
            # Devices of their own per run: a lock orphaned by the crash stays out of the way.
            devices = [f"w{n}-g{gen}-d{k}" for k in range(BATCH)]
            try:
                fences = await locks.acquire_many([(d, TTL_MS) for d in devices])
                self.fences[gen] += [f for f in fences if f]
                await locks.release_many(list(zip(devices, fences, strict=True)))
            except (redis.RedisError, OSError):
                self.errors += 1
                await asyncio.sleep(0.02)

    async def wait(self, gen: int, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.fences[gen]) < count:
            assert time.monotonic() < deadline, f"only {len(self.fences[gen])} fences in run {gen}"
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)
        self._tasks.clear()
        for client in self._clients:
            await client.aclose()
        self._clients.clear()


async def acquire_after_restart(locks: DeviceLocks, devices: list[str]) -> list[int]:
    # A connection of the old run may fail once; the clients never retry by themselves.
    for _ in range(3):
        try:
            return await locks.acquire_many([(d, TTL_MS) for d in devices])
        except redis.ConnectionError:
            continue
    raise AssertionError("Redis did not answer after its restart")


def run_id(probe: redis.Redis) -> str:
    return str(probe.info("server")["run_id"])


async def test_fences_rise_across_sigkill_and_lost_writes(
    servers: EmbeddedServers, crash_redis: RedisServer
) -> None:
    settings = unique_settings(servers, redis_url=crash_redis.url)
    keys = settings.keys
    mongo = connect.mongo_async(settings)
    db = connect.database(mongo)
    probe = redis.Redis(port=crash_redis.port, socket_timeout=5)
    holder_client = connect.redis_async(settings)
    holder = DeviceLocks(holder_client, keys, MongoEpochs(db, settings.key_prefix))
    aof = crash_redis.data_dir / "appendonly.aof"
    load = Load(settings, db)
    try:
        load.start()
        await load.wait(0, 400)

        # Run 1: SIGKILL in the middle of the load. The kill and the restart block
        # this event loop, so no acquire starts in between.
        handed_out = max(load.fences[0])
        crash_redis.kill()
        crash_redis.start()
        kept_1 = int(probe.get(keys.lock_fence) or 0)
        load.generation = 1
        await load.wait(1, 400)
        assert min(load.fences[1]) > max(load.fences[0])

        # Run 2: SIGKILL, and the writes of the last moment lost with the host.
        run_before = run_id(probe)
        durable = aof.stat().st_size
        seen = len(load.fences[1])
        await load.wait(1, seen + 400)
        # Locks held across the crash, taken after the durable point: they will be lost.
        victims = [f"victim-{k}" for k in range(4)]
        old = await holder.acquire_many([(v, TTL_MS) for v in victims])
        handed_out = max(load.fences[0] + load.fences[1] + old)
        crash_redis.kill()
        os.truncate(aof, durable)
        crash_redis.start()

        # The loss is real: the counter came back below fences already handed out,
        # and the epoch hash survived naming the run before (the case only the run
        # id check catches), while the victims' locks are gone.
        kept_2 = int(probe.get(keys.lock_fence) or 0)
        assert kept_2 < handed_out
        assert probe.hget(epoch_key(keys), "run_id") == run_before.encode()
        assert run_id(probe) != run_before
        assert probe.exists(*[keys.device_lock(v) for v in victims]) == 0

        load.generation = 2
        await load.wait(2, 400)
        new = await acquire_after_restart(holder, victims)
        await load.stop()

        before_2 = load.fences[0] + load.fences[1] + old
        assert min(load.fences[2] + new) > max(before_2)
        every = [f for gen in (0, 1, 2) for f in load.fences[gen]] + old + new
        assert len(set(every)) == len(every), "no fence handed out twice"
        # The hazard fences guard against: releases by the fences of before the
        # crash free none of the locks taken after it.
        assert await holder.release_many(list(zip(victims, old, strict=True))) == 0
        assert await holder.holders(victims) == new
        assert await holder.release_many(list(zip(victims, new, strict=True))) == len(victims)

        # Each run took an epoch of its own (more than one where workers raced).
        doc = await db[EPOCHS].find_one({"_id": settings.key_prefix})
        assert doc is not None and doc["epoch"] >= 3
        print(f"fences per run {[len(load.fences[g]) for g in range(3)]}, "
              f"acquire errors {load.errors}, epochs taken {doc['epoch']}; counter after "
              f"SIGKILL alone {kept_1} (last fence before {max(load.fences[0])}), after "
              f"SIGKILL + cut AOF {kept_2} (last fence before {handed_out})")
    finally:
        await load.stop()
        await holder_client.aclose()
        probe.close()
        await mongo.drop_database(db.name)
        await mongo.close()


# -- the whole service across a Redis SIGKILL ------------------------------------------

FAST = {
    "heartbeat_ttl_s": 2.0, "sweep_interval_s": 0.5, "leader_lease_s": 3.0,
    "orphan_grace_s": 2.0, "free_check_interval_s": 1.0, "running_stuck_s": 3.0,
    "retry_base_s": 0.3, "retry_cap_s": 2.0, "retry_jitter": 0.0,
    "redis_timeout_s": 1.5,
    # Locks of finished attempts that the lost writes bring back wait for this sweep.
    "orphan_lock_grace_s": 2.0,
}


@pytest.mark.parametrize("lost_writes", [False, True], ids=["sigkill", "sigkill-lost-writes"])
def test_service_keeps_devices_exclusive_across_a_redis_sigkill(
    servers: EmbeddedServers, crash_redis: RedisServer, tmp_path: Path, lost_writes: bool
) -> None:
    settings = unique_settings(servers, redis_url=crash_redis.url, **FAST)
    roles = Roles(settings, tmp_path / "logs")
    view = Inspect(settings)
    aof = crash_redis.data_dir / "appendonly.aof"
    try:
        roles.simulator(run_ms=100, progress=False)
        roles.consumer()
        roles.master()
        with SendScriptClient(settings) as client:
            ids = [s.task_id for s in client.submit_many(
                [{"device_id": f"crash-{i % 12}", "script": {"id": "a"}} for i in range(240)])]
        wait_for(lambda: view.count("success") >= 40, 60, "progress before the crash")
        durable = aof.stat().st_size
        if lost_writes:
            # Work done after this point is lost from Redis, though not from Mongo.
            wait_for(lambda: view.count("success") >= 70, 60, "progress after the durable point")

        epoch_before = epoch_of(view, settings)
        assert view.count("success") < len(ids), "the crash comes under load"
        crash_redis.kill()
        if lost_writes:
            os.truncate(aof, durable)
        crash_redis.start()
        wait_for(lambda: view.db.script_tasks.count_documents(
            {"_id": {"$in": ids}, "status": "success"}) == len(ids), 120, "every task", 0.5)

        assert all(p.running for p in roles.procs), roles.logs()
        assert roles.farm()["refused_busy"] == 0, "a device was asked to run two scripts at once"
        # The run after the restart adopted an epoch of its own, and the fences the
        # exec records hold never repeat and rise per device in the order they began.
        epoch_after = epoch_of(view, settings)
        assert epoch_after > epoch_before
        records = list(view.db.task_exec_records.find(
            {"task_id": {"$in": ids}}, {"device_id": 1, "lock_value": 1, "started_at": 1}))
        fences = [r["lock_value"] for r in records]
        assert len(set(fences)) == len(fences)
        assert any(f > fence_floor(epoch_before + 1) for f in fences), "the new run's fences"
        by_device: dict[str, list[tuple[object, int]]] = defaultdict(list)
        for r in records:
            by_device[r["device_id"]].append((r["started_at"], r["lock_value"]))
        for device, seq in by_device.items():
            in_order = [f for _, f in sorted(seq)]
            assert in_order == sorted(in_order), device
    except AssertionError:
        print(roles.logs())
        raise
    finally:
        roles.stop()
        view.close()


def epoch_of(view: Inspect, settings: Settings) -> int:
    doc = view.db[EPOCHS].find_one({"_id": settings.key_prefix})
    return 0 if doc is None else int(doc["epoch"])
