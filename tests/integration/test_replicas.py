"""SENDSCRIPT_REDIS_MIN_REPLICAS on a real master and replica (through Sentinel): locks
and pushes WAIT for the replica in the same round trip; when it does not confirm (it
is stopped with SIGSTOP), the lock is released and the acquire raises, and the
producer is told its push may be lost."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydantic import ValidationError

from sendscript import connect, roundtrips
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.dev.topologies import RedisNode, SentinelGroup
from sendscript.fencing import MongoEpochs
from sendscript.locks import DeviceLocks
from sendscript.queue import IntakeQueue
from sendscript.replicas import NotReplicated, ReplicaWait
from sendscript.settings import Settings, settings_errors
from sendscript.store import TASKS
from tests.support import unique_settings

TTL_MS = 60_000


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path_factory.mktemp("replicas")) as g:
        yield g


@pytest.fixture
def settings(servers: EmbeddedServers, group: SentinelGroup) -> Settings:
    return unique_settings(servers, redis_url=group.url, redis_min_replicas=1,
                           redis_wait_timeout_ms=300)


@contextmanager
def stopped(node: RedisNode) -> Iterator[None]:
    """The replica frozen: it neither receives nor acknowledges the master's stream."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.proc.send_signal(signal.SIGCONT)


async def test_a_lock_waits_for_the_replica_in_one_round_trip(
        settings: Settings, group: SentinelGroup) -> None:
    client = connect.redis_async(settings)
    mongo = connect.mongo_async(settings)
    try:
        locks = DeviceLocks(client, settings.keys,
                            MongoEpochs(connect.database(mongo), settings.key_prefix),
                            ReplicaWait.of(settings))
        assert (await locks.acquire_many([("d0", TTL_MS)]))[0] > 0  # adopts an epoch
        before = roundtrips.snapshot().get("redis", 0)
        fences = await locks.acquire_many([("d1", TTL_MS), ("d2", TTL_MS), ("d0", TTL_MS)])
        assert roundtrips.snapshot().get("redis", 0) - before == 1  # EVALSHA + WAIT
        assert fences[0] > 0 and fences[1] > 0 and fences[2] == 0  # d0 is still held
        # The replica holds the locks already: a failover now keeps them.
        with group.replica.client() as replica:
            assert replica.get(settings.keys.device_lock("d1")) == str(fences[0]).encode()
    finally:
        await client.aclose()
        await mongo.close()


async def test_a_lock_the_replica_does_not_confirm_is_released(
        settings: Settings, group: SentinelGroup) -> None:
    client = connect.redis_async(settings)
    try:
        locks = DeviceLocks(client, settings.keys, replicas=ReplicaWait.of(settings))
        with stopped(group.replica):
            with pytest.raises(NotReplicated, match=r"device lock: .* confirmed by 0 of the 1"):
                await locks.acquire_many([("d1", TTL_MS), ("d2", TTL_MS)])
            assert await locks.holders(["d1", "d2"]) == [None, None]  # released
        [fence] = await locks.acquire_many([("d1", TTL_MS)])  # the replica is back
        assert fence > 0
        # A busy device wrote nothing: no lock is at stake, whatever WAIT says.
        with stopped(group.replica):
            assert await locks.acquire_many([("d1", TTL_MS)]) == [0]
    finally:
        await client.aclose()


async def test_a_master_hand_back_waits_and_says_when_unconfirmed(
        settings: Settings, group: SentinelGroup) -> None:
    client = connect.redis_async(settings)
    try:
        queue = IntakeQueue(client, settings.keys, "m1", ReplicaWait.of(settings))
        await queue.hand_back(["a", "b"])
        with stopped(group.replica), pytest.raises(NotReplicated, match="hand-back of 1"):
            await queue.hand_back(["c"])
        assert await queue.backlog() == 3  # pushed on the master all the same
    finally:
        await client.delete(settings.keys.ready)
        await client.aclose()


def test_the_sdk_raises_a_clear_error_when_its_push_is_unconfirmed(
        settings: Settings, group: SentinelGroup) -> None:
    with SendScriptClient(settings) as sdk:
        try:
            first = sdk.submit("d1", {"id": "s"})
            with stopped(group.replica), pytest.raises(NotReplicated) as caught:
                sdk.submit_many([{"device_id": "d2", "script": {"id": "s"}},
                                 {"device_id": "d3", "script": {"id": "s"}}])
            text = str(caught.value)
            assert "may be lost if the master fails now" in text
            assert "are stored: do not submit them again" in text
            assert len(caught.value.task_ids) == 2
            for task_id in caught.value.task_ids:  # stored, and pushed on the master
                assert task_id in text
                assert sdk.get(task_id) is not None
            assert sdk._redis.llen(settings.keys.ready) == 3
            with stopped(group.replica), pytest.raises(NotReplicated, match="raw item"):
                sdk.push_raw([{"device_id": "d4", "script": {"id": "s"}}])
            assert first.created
        finally:
            sdk._db[TASKS].drop()
            sdk._redis.delete(settings.keys.ready)


def test_min_replicas_is_refused_on_a_cluster_url() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url="redis+cluster://127.0.0.1:7000", redis_min_replicas=1)
    assert settings_errors(caught.value) == [
        "SENDSCRIPT_REDIS_MIN_REPLICAS: WAIT needs redis:// or redis+sentinel://; "
        "leave it 0 on redis+cluster://"]
    assert ReplicaWait.of(Settings(redis_url="redis+cluster://127.0.0.1:7000")) is None
