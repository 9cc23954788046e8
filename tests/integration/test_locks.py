"""DeviceLocks on a real Redis: fenced acquire, compare-and-delete release, device-free events."""

from __future__ import annotations

import asyncio

import redis.asyncio

from sendscript.locks import DeviceLocks
from sendscript.settings import Settings
from tests.integration.conftest import FreeEvents

TTL_MS = 20_000


async def test_acquire_gives_increasing_fences_and_zero_when_locked(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)

    first = await locks.acquire_many([("dev-a", TTL_MS), ("dev-b", TTL_MS)])
    assert all(f > 0 for f in first)
    assert first[0] < first[1]

    second = await locks.acquire_many([("dev-a", TTL_MS), ("dev-c", TTL_MS)])
    assert second[0] == 0, "dev-a is locked already"
    assert second[1] > first[1]

    # The same device twice in one batch: only the first gets it.
    third = await locks.acquire_many([("dev-d", TTL_MS), ("dev-d", TTL_MS)])
    assert third[0] > second[1] and third[1] == 0

    assert await locks.holders(["dev-a", "dev-b", "dev-c", "dev-d", "dev-free"]) == [
        first[0], first[1], second[1], third[0], None,
    ]
    # The lock key holds the fence itself, as the contract says.
    assert await redis_client.get(settings.keys.device_lock("dev-a")) == str(first[0]).encode()
    assert await locks.acquire_many([]) == []
    assert await locks.holders([]) == []


async def test_acquire_sets_the_ttl(settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    await locks.acquire_many([("dev-short", 5_000), ("dev-long", 600_000)])

    short = await redis_client.pttl(settings.keys.device_lock("dev-short"))
    long = await redis_client.pttl(settings.keys.device_lock("dev-long"))
    assert 4_000 < short <= 5_000
    assert 590_000 < long <= 600_000


async def test_release_deletes_only_on_matching_fence(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [old] = await locks.acquire_many([("dev-a", TTL_MS)])
    assert await locks.release_many([("dev-a", old)]) == 1
    assert await locks.holders(["dev-a"]) == [None]

    [new] = await locks.acquire_many([("dev-a", TTL_MS)])
    assert new > old
    # A late or repeated release of the old attempt cannot free the newer lock.
    assert await locks.release_many([("dev-a", old)]) == 0
    assert await locks.holders(["dev-a"]) == [new]
    assert await locks.release_many([("dev-a", new + 1)]) == 0
    assert await locks.holders(["dev-a"]) == [new]

    assert await locks.release_many([("dev-a", new)]) == 1
    assert await locks.holders(["dev-a"]) == [None]
    # Nothing to release: no fence, or a zero fence (a failed acquire).
    assert await locks.release_many([]) == 0
    assert await locks.release_many([("dev-a", 0)]) == 0


async def test_release_keeps_the_newest_fence_per_device(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [old_a] = await locks.acquire_many([("dev-a", TTL_MS)])
    await locks.release_many([("dev-a", old_a)])
    [a, b] = await locks.acquire_many([("dev-a", TTL_MS), ("dev-b", TTL_MS)])

    # Old and new fence for dev-a, in both orders: the new one decides, and frees it.
    assert await locks.release_many([("dev-a", old_a), ("dev-a", a), ("dev-a", old_a)]) == 1
    assert await locks.holders(["dev-a", "dev-b"]) == [None, b]

    # dev-b holds b; a newer fence given alongside wins the de-duplication and,
    # not matching, leaves the lock alone.
    assert await locks.release_many([("dev-b", b + 10), ("dev-b", b)]) == 0
    assert await locks.holders(["dev-b"]) == [b]


async def test_release_publishes_device_free_for_released_and_absent_locks(
    settings: Settings, redis_client: redis.asyncio.Redis, free_events: FreeEvents
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [a, b] = await locks.acquire_many([("dev-a", TTL_MS), ("dev-b", TTL_MS)])

    released = await locks.release_many([
        ("dev-a", a),        # held by this fence: released, announced
        ("dev-b", b - 1),    # held by another fence: neither released nor announced
        ("dev-gone", 77),    # no lock at all (expired or released before): announced
    ])
    assert released == 1

    events = await free_events.collect()
    assert sorted(events, key=lambda e: e["device_id"]) == [
        {"device_id": "dev-a", "fence": a},
        {"device_id": "dev-gone", "fence": 77},
    ]
    assert await locks.holders(["dev-a", "dev-b"]) == [None, b]


async def test_release_announces_once_per_device(
    settings: Settings, redis_client: redis.asyncio.Redis, free_events: FreeEvents
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [a] = await locks.acquire_many([("dev-a", TTL_MS)])
    assert await locks.release_many([("dev-a", a), ("dev-a", a)]) == 1
    assert await free_events.collect() == [{"device_id": "dev-a", "fence": a}]


async def test_expired_lock_frees_the_device(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [first] = await locks.acquire_many([("dev-a", 100)])
    assert first > 0
    await asyncio.sleep(0.25)
    [second] = await locks.acquire_many([("dev-a", TTL_MS)])
    assert second > first
