"""IntakeQueue on a real Redis: tagged take, staging, blocking wait, leftovers, ack, hand back."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio

from sendscript import connect
from sendscript.queue import IntakeQueue
from sendscript.settings import Settings
from tests.support import ON_CLUSTER

MASTER = "m-queue"


def items(n: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"device_id": f"d{i}", "script": {"id": "s", "n": i}}).encode()
            for i in range(start, start + n)]


async def test_take_tags_uniquely_and_moves_into_processing(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, MASTER)
    pushed = [*items(5), b"same", b"same"]
    await redis_client.lpush(keys.ready, *pushed)

    first = await queue.take(3)
    assert [e.item for e in first] == pushed[:3], "oldest first (LPUSH then take = FIFO)"
    assert await redis_client.llen(keys.ready) == 4
    rest = await queue.take(100)
    assert [e.item for e in rest] == pushed[3:]
    assert await queue.take(10) == []

    entries = first + rest
    tags = [e.tag for e in entries]
    assert len(set(tags)) == len(tags), "every entry gets a tag of its own, even equal items"
    seqs = [int(t.split(".", 1)[0]) for t in tags]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Exactly the returned entries sit in this master's processing list, newest at the head.
    processing = await redis_client.lrange(keys.processing(MASTER), 0, -1)
    assert processing == [e.raw_entry for e in reversed(entries)]
    assert await redis_client.llen(keys.ready) == 0


async def test_concurrent_takes_lose_and_duplicate_nothing(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    pushed = items(300)
    await redis_client.lpush(keys.ready, *pushed)
    other = connect.redis_async(settings)
    try:
        queues = [IntakeQueue(redis_client, keys, "m-one"), IntakeQueue(other, keys, "m-two")]

        async def drain(queue: IntakeQueue) -> list[bytes]:
            got: list[bytes] = []
            while batch := await queue.take(7):
                got += [e.raw_entry for e in batch]
                await asyncio.sleep(0)
            return got

        one, two = await asyncio.gather(*(drain(q) for q in queues))
        in_one = await redis_client.lrange(keys.processing("m-one"), 0, -1)
        in_two = await redis_client.lrange(keys.processing("m-two"), 0, -1)
    finally:
        await other.aclose()
    assert one and two, "both masters took some"
    assert sorted(in_one) == sorted(one) and sorted(in_two) == sorted(two)
    taken_items = sorted(e.split(b" ", 1)[1] for e in one + two)
    assert taken_items == sorted(pushed)


async def test_staging_is_drained_before_ready(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, MASTER)
    await redis_client.lpush(keys.ready, b"first")
    assert await queue.wait(1.0) is True
    assert await redis_client.lrange(keys.staging(MASTER), 0, -1) == [b"first"]
    await redis_client.lpush(keys.ready, b"second", b"third")

    taken = await queue.take(10)
    assert [e.item for e in taken] == [b"first", b"second", b"third"]
    assert await redis_client.llen(keys.staging(MASTER)) == 0
    assert await redis_client.llen(keys.processing(MASTER)) == 3


@pytest.mark.skipif(ON_CLUSTER, reason="SENDSCRIPT_TEST_REDIS=cluster: sees the wait parked "
                    "in one server's CLIENT LIST; it runs in the default mode")
async def test_wait_blocks_until_an_item_arrives_and_moves_one(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    # A connection of its own, named, to see the wait parked in Redis itself.
    name = f"{settings.key_prefix}-waiter"
    waiter = redis.asyncio.Redis.from_url(settings.redis_url or "", client_name=name)
    queue = IntakeQueue(waiter, keys, MASTER)
    try:
        assert await queue.wait(0.2) is False, "nothing to wait for: times out"

        async def parked() -> bool:
            return any(c.get("name") == name and c.get("cmd") == "blmove"
                       and "b" in c.get("flags", "") for c in await redis_client.client_list())

        waiting = asyncio.create_task(queue.wait(10.0))
        for _ in range(250):
            if await parked():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the wait never blocked in BLMOVE")
        assert not waiting.done(), "wait returned with an empty queue"
        await redis_client.lpush(keys.ready, b"x", b"y")
        assert await asyncio.wait_for(waiting, 3) is True

        assert await redis_client.lrange(keys.staging(MASTER), 0, -1) == [b"x"]
        assert await redis_client.lrange(keys.ready, 0, -1) == [b"y"]
        assert await queue.backlog() == 1
        # The moved item is the next one take() hands out.
        assert [e.item for e in await queue.take(1)] == [b"x"]
    finally:
        await waiter.aclose()


async def test_unfinished_returns_leftovers_oldest_first(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, MASTER)
    await redis_client.lpush(keys.ready, *items(4))
    taken = await queue.take(4)
    await queue.ack([taken[1]], [])

    # A restarted master (a new queue object, same master id) finds what was left.
    restarted = IntakeQueue(redis_client, keys, MASTER)
    leftovers = await restarted.unfinished()
    assert leftovers == [taken[0], taken[2], taken[3]]
    assert await IntakeQueue(redis_client, keys, "m-other").unfinished() == []


async def test_ack_removes_done_and_quarantines_refused(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, MASTER)
    await redis_client.lpush(keys.ready, b"good", b"not json \xff", b"same", b"same")
    good, bad, same1, same2 = await queue.take(10)
    before = datetime.now(UTC)

    await queue.ack([good, same1], [(bad, "not JSON: boom")])

    assert await queue.unfinished() == [same2], "one ack removes one entry, not its twin"
    [raw] = await redis_client.lrange(keys.quarantine, 0, -1)
    record = json.loads(raw)
    assert record["item"] == "not json \ufffd"
    assert record["reason"] == "not JSON: boom"
    assert record["master"] == MASTER
    at = datetime.fromisoformat(record["at"])
    assert before - timedelta(seconds=5) <= at <= datetime.now(UTC) + timedelta(seconds=5)
    assert await redis_client.hget(keys.stats, "quarantined") == b"1"

    await queue.ack([], [(same2, "second reason")])
    assert await queue.unfinished() == []
    assert await redis_client.llen(keys.quarantine) == 2
    assert await redis_client.hget(keys.stats, "quarantined") == b"2"
    # Acking what is gone already changes nothing, and counts nothing.
    await queue.ack([good], [])
    await queue.ack([], [])
    assert await redis_client.hget(keys.stats, "quarantined") == b"2"
    assert await redis_client.llen(keys.quarantine) == 2


async def test_hand_back_puts_ids_first(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, MASTER)
    await redis_client.lpush(keys.ready, b"older-1", b"older-2")

    await queue.hand_back(["t1", "t2"])
    await queue.hand_back([])
    assert await queue.backlog() == 4

    taken = await IntakeQueue(redis_client, keys, "m-next").take(2)
    assert sorted(json.loads(e.item)["task_id"] for e in taken) == ["t1", "t2"]
    assert [e.item for e in await queue.take(10)] == [b"older-1", b"older-2"]
