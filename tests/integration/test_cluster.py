"""The Redis half on a real 3-node Redis Cluster (redis+cluster://): the intake, lock,
rate-limit, device-health and pause scripts, the MULTI blocks and pub/sub, through
the production clients. Several tests are the one-server tests, imported and run
here again with the cluster's settings; the keys they leave all share one slot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
from redis.cluster import key_slot

from sendscript import connect, pauses
from sendscript.dev.embedded import EmbeddedServers
from sendscript.dev.topologies import RedisClusterNodes
from sendscript.queue import IntakeQueue
from sendscript.settings import Settings
from tests.integration.test_counts import (  # noqa: F401  (run here on the cluster)
    test_counts_equal_an_aggregate_after_every_kind_of_move,
)
from tests.integration.test_device_health import (  # noqa: F401
    test_bench_is_published_resume_lifts_and_late_results_count,
    test_the_script_follows_the_model_on_random_batches,
)
from tests.integration.test_limits import (  # noqa: F401
    test_concurrent_reservations_never_exceed_the_limit,
    test_no_interval_of_the_duration_holds_twice_the_limit_at_a_window_edge,
)
from tests.integration.test_locks import (  # noqa: F401
    test_acquire_gives_increasing_fences_and_zero_when_locked,
    test_release_deletes_only_on_matching_fence,
    test_release_publishes_device_free_for_released_and_absent_locks,
)
from tests.integration.test_queue import (  # noqa: F401
    test_ack_removes_done_and_quarantines_refused,
    test_concurrent_takes_lose_and_duplicate_nothing,
    test_hand_back_puts_ids_first,
    test_take_tags_uniquely_and_moves_into_processing,
)
from tests.support import unique_settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(Path(tmp_path_factory.mktemp("cluster")))
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def settings(servers: EmbeddedServers, cluster: RedisClusterNodes) -> Settings:
    return unique_settings(servers, redis_url=cluster.url)


def test_every_key_sits_under_the_prefix_in_a_hash_tag(settings: Settings) -> None:
    keys = settings.keys
    assert keys.prefix == "{" + settings.key_prefix + "}"
    names = [keys.ready, keys.quarantine, keys.staging("m"), keys.processing("m"),
             keys.intake_seq, keys.lock_fence, keys.device_lock("d"), keys.masters,
             keys.master_alive("m"), keys.stats, keys.rate_limit("global"), keys.pauses,
             keys.breaker, keys.drop_rate, keys.device_health, keys.devices_benched]
    assert {key_slot(n.encode()) for n in names} == {key_slot(keys.prefix.encode())}


async def test_a_staged_item_moves_with_blmove_and_multi(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    keys = settings.keys
    queue = IntakeQueue(redis_client, keys, "m-cluster")
    waiter = asyncio.create_task(queue.wait(5.0))
    await asyncio.sleep(0.2)
    item = json.dumps({"device_id": "d1", "script": {"id": "s"}}).encode()
    await redis_client.lpush(keys.ready, item)
    assert await asyncio.wait_for(waiter, 10)
    [entry] = await queue.take(10)
    assert entry.item == item
    await queue.ack([entry], [])
    assert await redis_client.llen(keys.processing("m-cluster")) == 0


async def test_pause_change_is_stored_and_published(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    keys = settings.keys
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.pauses_channel)
    try:
        await pauses.pause(redis_client, keys, pauses.scope_of(queue="bulk"), "test", "me")
        message = None
        for _ in range(50):
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                break
        assert message is not None and json.loads(message["data"])["active"] is True
        sync = connect.redis_sync(settings)
        try:
            assert list(pauses.list_sync(sync, keys)) == ["queue:bulk"]
        finally:
            sync.close()
    finally:
        await pubsub.aclose()


async def test_the_keys_left_behind_share_one_slot(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    await test_take_tags_uniquely_and_moves_into_processing(settings, redis_client)
    await test_acquire_gives_increasing_fences_and_zero_when_locked(settings, redis_client)
    found = [k async for k in redis_client.scan_iter(match=f"{settings.keys.prefix}:*")]
    assert len(found) >= 4
    assert {key_slot(k) for k in found} == {key_slot(settings.keys.prefix.encode())}
