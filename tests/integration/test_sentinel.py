"""A redis+sentinel:// URL on a real master, replica and Sentinel: the clients find
the master through the Sentinel list (the first address is dead), and after a SIGKILL
of the master they follow the promoted replica without being made again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sendscript import connect
from sendscript.dev.embedded import EmbeddedServers
from sendscript.dev.topologies import SentinelGroup
from sendscript.locks import DeviceLocks
from sendscript.settings import Settings
from tests.support import unique_settings

TTL_MS = 60_000


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path / "sentinel", down_after_ms=1000) as g:
        yield g


@pytest.fixture
def settings(servers: EmbeddedServers, group: SentinelGroup) -> Settings:
    return unique_settings(servers, redis_url=group.url, redis_timeout_s=2.0)


async def _until_ok(step, what: str, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    """Callers retry what failed during a failover; so does this test."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await step()
        except redis.RedisError:
            assert time.monotonic() < deadline, f"no {what} after the failover"
            await asyncio.sleep(0.2)


async def test_clients_follow_a_failover(settings: Settings, group: SentinelGroup) -> None:
    client = connect.redis_async(settings)
    sync = connect.redis_sync(settings)
    try:
        locks = DeviceLocks(client, settings.keys)
        [before] = await locks.acquire_many([("dev-a", TTL_MS)])
        assert before > 0
        assert sync.get(settings.keys.device_lock("dev-a")) == str(before).encode()
        # The write reached the replica before the master dies (what WAIT would ensure).
        assert await client.wait(1, 5000) == 1
        group.kill_master()
        group.wait_failover()
        [other] = await _until_ok(lambda: locks.acquire_many([("dev-b", TTL_MS)]), "acquire")
        assert other > 0
        # The promoted replica kept the first lock: the device is still held.
        assert await locks.acquire_many([("dev-a", TTL_MS)]) == [0]
        for _ in range(150):
            try:
                assert sync.get(settings.keys.device_lock("dev-b")) == str(other).encode()
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.2)
        info = await client.info("server")
        assert int(info["tcp_port"]) == group.replica.port
    finally:
        await client.aclose()
        sync.close()
