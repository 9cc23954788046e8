"""DeviceLocks on a real Redis: fenced acquire, compare-and-delete release, device-free
events, and fence epochs (Mongo) that keep fences rising across a Redis that lost writes."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript import connect, roundtrips
from sendscript.fencing import EPOCHS, MAX_EPOCH, MongoEpochs, fence_floor
from sendscript.locks import ADOPT, DeviceLocks, epoch_key
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


async def test_a_lock_taken_for_an_owner_says_whose_it_is_while_it_holds(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    [a, _, c] = await locks.acquire_many([("dev-a", TTL_MS, "task-1"), ("dev-b", TTL_MS),
                                          ("dev-c", TTL_MS, "task-3")])
    # Locked already: the holder's owner stays.
    assert await locks.acquire_many([("dev-a", TTL_MS, "task-2")]) == [0]
    assert await locks.owners(["dev-a", "dev-b", "dev-c", "dev-free"]) == [
        (a, "task-1"), None, (c, "task-3"), None]
    # Released, or locked again for no owner: the old entry says nothing any more.
    await locks.release_many([("dev-a", a), ("dev-c", c)])
    [c2] = await locks.acquire_many([("dev-c", TTL_MS)])
    assert c2 > c
    assert await locks.owners(["dev-a", "dev-c"]) == [None, None]
    assert await locks.owners([]) == []


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
    key = settings.keys.device_lock("dev-a")
    [first] = await locks.acquire_many([("dev-a", 100)])
    assert first > 0
    assert await redis_client.pttl(key) <= 100  # held with the TTL asked for (-2 once gone)
    for _ in range(250):  # nobody releases it: wait for Redis to expire the key
        if not await redis_client.exists(key):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the lock did not expire")
    [second] = await locks.acquire_many([("dev-a", TTL_MS)])
    assert second > first


# -- fence epochs: fences keep rising across a Redis that lost writes ----------------
#
# A restart is what the scripts see through the run id: the shared Redis cannot be
# restarted here (other tests use it), so a restart that lost writes is staged by
# what it leaves behind: an epoch hash naming another run id, and a counter that
# went back. tests/e2e/test_redis_crash.py does it with a real SIGKILL.

DEVICES = [f"dev-{i}" for i in range(4)]


async def run_id_of(client: redis.asyncio.Redis, settings: Settings) -> str:
    """The run id of the server that holds the epoch hash, as the scripts read it (on a
    cluster, INFO from the client answers for any one node)."""
    script = "return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"
    run_id = await client.eval(script, 1, epoch_key(settings.keys))
    return run_id.decode() if isinstance(run_id, bytes) else str(run_id)


async def stage_restart(client: redis.asyncio.Redis, settings: Settings,
                        counter: int | None) -> None:
    """What a restart that lost writes leaves: the hash of an earlier run, the
    counter gone back to `counter` (None: lost altogether)."""
    await client.hset(epoch_key(settings.keys), "run_id", "0" * 40)
    if counter is None:
        await client.delete(settings.keys.lock_fence)
    else:
        await client.set(settings.keys.lock_fence, counter)


async def stored_epoch(db: AsyncDatabase, settings: Settings) -> int | None:
    doc = await db[EPOCHS].find_one({"_id": settings.key_prefix})
    return None if doc is None else int(doc["epoch"])


async def test_first_acquire_adopts_an_epoch_then_stays_one_round_trip(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    locks = DeviceLocks(redis_client, settings.keys, MongoEpochs(db, settings.key_prefix))
    [first] = await locks.acquire_many([("dev-a", TTL_MS)])
    # A fresh prefix looks like a Redis that lost everything: epoch 1 is taken.
    assert first == fence_floor(1) + 1
    assert await stored_epoch(db, settings) == 1
    assert await redis_client.hgetall(epoch_key(settings.keys)) == {
        b"run_id": (await run_id_of(redis_client, settings)).encode(), b"epoch": b"1"}
    assert locks.adoptions == 1

    # Adopted: later acquires neither bump the epoch nor run the adopt script.
    before = roundtrips.snapshot().get("redis", 0)
    fences = await locks.acquire_many([("dev-b", TTL_MS), ("dev-c", TTL_MS)])
    assert fences == [first + 1, first + 2]
    assert roundtrips.snapshot().get("redis", 0) - before == 1, "one round trip per batch"
    assert await stored_epoch(db, settings) == 1 and locks.adoptions == 1
    # The lock keys still hold the fence itself, large as it is.
    assert await redis_client.get(settings.keys.device_lock("dev-c")) == str(fences[1]).encode()


@pytest.mark.parametrize("counter", [None, 5, "last"], ids=["all-lost", "went-back", "kept"])
async def test_a_restart_raises_fences_above_all_handed_out_before(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    counter: int | str | None,
) -> None:
    locks = DeviceLocks(redis_client, settings.keys, MongoEpochs(db, settings.key_prefix))
    before: list[int] = []
    for _ in range(3):
        fences = await locks.acquire_many([(f"dev-{i}", TTL_MS) for i in range(4)])
        assert await locks.release_many(list(zip(DEVICES, fences, strict=True))) == 4
        before += fences
    before += await locks.acquire_many([(d, TTL_MS) for d in DEVICES])
    last = max(before)
    # all-lost: the whole dataset; went-back: the epoch hash survived, the last
    # INCRs did not; kept: a restart that lost nothing (a harmless bump).
    await stage_restart(redis_client, settings, last if counter == "last" else counter)
    # The locks of before were lost with the rest (or expired meanwhile).
    await redis_client.delete(*[settings.keys.device_lock(d) for d in DEVICES])

    after = await locks.acquire_many([(d, TTL_MS) for d in DEVICES])
    assert min(after) > last
    assert after[0] == fence_floor(2) + 1
    assert await stored_epoch(db, settings) == 2
    assert await redis_client.hget(epoch_key(settings.keys), "run_id") == (
        await run_id_of(redis_client, settings)).encode()

    # The hazard itself: a stale release by a fence of before frees nothing now.
    assert await locks.release_many(list(zip(DEVICES * 4, before, strict=True))) == 0
    assert await locks.holders(DEVICES) == after


async def test_processes_seeing_the_restart_together_only_raise_the_counter(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    # Each "process" has its own client and its own epoch source, as workers do.
    clients = [connect.redis_async(settings) for _ in range(4)]
    try:
        workers = [DeviceLocks(c, settings.keys, MongoEpochs(db, settings.key_prefix))
                   for c in clients]
        first = await asyncio.gather(*[w.acquire_many([(f"dev-{n}-0", TTL_MS)])
                                       for n, w in enumerate(workers)])
        last = max(f for [f] in first)
        await stage_restart(redis_client, settings, 1)

        after = await asyncio.gather(*[w.acquire_many([(f"dev-{n}-{k}", TTL_MS)
                                                       for k in range(1, 4)])
                                       for n, w in enumerate(workers)])
        fences = [f for batch in after for f in batch]
        assert len(set(fences)) == len(fences) and min(fences) > last
        bumps = await stored_epoch(db, settings)
        assert bumps is not None and bumps >= 2
        # Whoever adopted last, the hash keeps the highest epoch taken, and every
        # fence is above the floor of the first epoch taken after the restart.
        stored = await redis_client.hgetall(epoch_key(settings.keys))
        assert int(stored[b"epoch"]) == bumps
        assert min(fences) > fence_floor(2)
    finally:
        for c in clients:
            await c.aclose()


async def test_adopt_refuses_a_run_it_did_not_see_and_never_lowers_the_counter(
    settings: Settings, redis_client: redis.asyncio.Redis
) -> None:
    adopt = redis_client.register_script(ADOPT)
    keys = [epoch_key(settings.keys), settings.keys.lock_fence]
    await redis_client.set(settings.keys.lock_fence, fence_floor(7) + 10)

    # Redis restarted since the acquire saw "another run": the epoch was taken too
    # early to be trusted, nothing changes.
    assert await adopt(keys=keys, args=["f" * 40, 9, fence_floor(9)]) == 0
    assert await redis_client.exists(epoch_key(settings.keys)) == 0
    assert int(await redis_client.get(settings.keys.lock_fence)) == fence_floor(7) + 10

    run_id = await run_id_of(redis_client, settings)
    # A lower epoch than the counter already passed: adopted, counter kept.
    assert await adopt(keys=keys, args=[run_id, 3, fence_floor(3)]) == 1
    assert int(await redis_client.get(settings.keys.lock_fence)) == fence_floor(7) + 10
    # A higher one raises it; a late lower one after it keeps the higher epoch.
    assert await adopt(keys=keys, args=[run_id, 8, fence_floor(8)]) == 1
    assert await adopt(keys=keys, args=[run_id, 4, fence_floor(4)]) == 1
    assert int(await redis_client.get(settings.keys.lock_fence)) == fence_floor(8)
    assert await redis_client.hgetall(epoch_key(settings.keys)) == {
        b"run_id": run_id.encode(), b"epoch": b"8"}
    # An epoch adopted on an earlier run is no floor for this one: the new one stands.
    await redis_client.hset(epoch_key(settings.keys), "run_id", "0" * 40)
    assert await adopt(keys=keys, args=[run_id, 2, fence_floor(2)]) == 1
    assert await redis_client.hget(epoch_key(settings.keys), "epoch") == b"2"
    assert int(await redis_client.get(settings.keys.lock_fence)) == fence_floor(8)


async def test_without_an_epoch_source_a_restart_is_adopted_at_epoch_zero(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    # Release-only roles and tests: fences are then as durable as Redis, no more.
    bare = DeviceLocks(redis_client, settings.keys)
    assert await bare.acquire_many([("dev-a", TTL_MS)]) == [1]
    await redis_client.hset(epoch_key(settings.keys), "epoch", 5)  # an earlier run's epoch
    await stage_restart(redis_client, settings, 0)
    assert await bare.acquire_many([("dev-b", TTL_MS)]) == [1]
    assert bare.adoptions == 2
    # The earlier run's epoch is not carried over: the run counts as adopted at 0...
    assert await redis_client.hget(epoch_key(settings.keys), "epoch") == b"0"

    # ... which a process with an epoch source does not accept: it adopts a real
    # epoch over it, and from then on both get fences above its floor.
    sourced = DeviceLocks(redis_client, settings.keys, MongoEpochs(db, settings.key_prefix))
    assert await sourced.acquire_many([("dev-c", TTL_MS)]) == [fence_floor(1) + 1]
    assert await bare.acquire_many([("dev-d", TTL_MS)]) == [fence_floor(1) + 2]
    assert (sourced.adoptions, bare.adoptions) == (1, 2)


async def test_epochs_are_distinct_and_increasing_under_concurrent_bumps(
    settings: Settings, db: AsyncDatabase
) -> None:
    epochs = [MongoEpochs(db, settings.key_prefix) for _ in range(3)]
    got = await asyncio.gather(*[epochs[i % 3].bump() for i in range(12)])
    assert sorted(got) == list(range(1, 13))
    # Prefixes sharing a database keep epochs of their own.
    assert await MongoEpochs(db, settings.key_prefix + "-other").bump() == 1


async def test_events_carry_large_fences_exactly(
    settings: Settings, redis_client: redis.asyncio.Redis, free_events: FreeEvents
) -> None:
    locks = DeviceLocks(redis_client, settings.keys)
    await locks.acquire_many([("dev-0", TTL_MS)])
    # The last epoch's fences: more digits than cjson prints exactly.
    await redis_client.set(settings.keys.lock_fence, fence_floor(MAX_EPOCH) + 12_345)
    [big] = await locks.acquire_many([("dev-big", TTL_MS)])
    assert big == fence_floor(MAX_EPOCH) + 12_346 and big < 2 ** 53
    assert await locks.holders(["dev-big"]) == [big]
    assert await locks.release_many([("dev-big", big), ("dev-gone", big - 1)]) == 1
    events = await free_events.collect()
    assert sorted(events, key=lambda e: e["device_id"]) == [
        {"device_id": "dev-big", "fence": big}, {"device_id": "dev-gone", "fence": big - 1}]
