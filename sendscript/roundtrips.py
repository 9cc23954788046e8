"""Counts round trips to Redis and Mongo per process, for the performance budget.

Every client made by `sendscript.connect` counts here. Each process adds its
counts to one Redis hash now and then, so a benchmark reads the service's total
without asking any process.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel as asentinel
import redis.sentinel as sentinel
from pymongo import monitoring

_counts: Counter[str] = Counter()
_flushed: Counter[str] = Counter()
# Set while the counters themselves are written, so that write is not counted.
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("roundtrips_quiet", default=False)
# Commands pymongo sends for its own upkeep rather than for our work.
_MONGO_UPKEEP = frozenset({"hello", "ismaster", "isMaster", "ping", "endSessions", "buildInfo"})


def count(server: str) -> None:
    if not _quiet.get():
        _counts[server] += 1


def snapshot() -> dict[str, int]:
    return dict(_counts)


class _CountingAsync:
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        count("redis")
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class _Counting:
    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        count("redis")
        super().send_packed_command(command, check_health)  # type: ignore[misc]


# One counting class per connection kind redis-py may make for a URL: a plain class
# given for a rediss:// or unix:// URL would silently replace the TLS or socket one.
class CountingAsyncConnection(_CountingAsync, redis.asyncio.Connection):
    pass


class CountingAsyncSSLConnection(_CountingAsync, redis.asyncio.SSLConnection):
    pass


class CountingAsyncUnixConnection(_CountingAsync, redis.asyncio.UnixDomainSocketConnection):
    pass


class CountingAsyncSentinelConnection(_CountingAsync, asentinel.SentinelManagedConnection):
    pass


class CountingAsyncSentinelSSLConnection(_CountingAsync,
                                         asentinel.SentinelManagedSSLConnection):
    pass


class CountingConnection(_Counting, redis.Connection):
    pass


class CountingSSLConnection(_Counting, redis.SSLConnection):
    pass


class CountingUnixConnection(_Counting, redis.UnixDomainSocketConnection):
    pass


class CountingSentinelConnection(_Counting, sentinel.SentinelManagedConnection):
    pass


class CountingSentinelSSLConnection(_Counting, sentinel.SentinelManagedSSLConnection):
    pass


def counting_async_class(url: str) -> type[redis.asyncio.Connection]:
    """The counting connection class for a one-server URL (redis://, rediss://, unix://)."""
    scheme = url.partition("://")[0].lower()
    return {"rediss": CountingAsyncSSLConnection,
            "unix": CountingAsyncUnixConnection}.get(scheme, CountingAsyncConnection)


def counting_class(url: str) -> type[redis.Connection]:
    scheme = url.partition("://")[0].lower()
    return {"rediss": CountingSSLConnection,
            "unix": CountingUnixConnection}.get(scheme, CountingConnection)


class MongoCommandCounter(monitoring.CommandListener):
    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in _MONGO_UPKEEP:
            count("mongo")

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def _take_unflushed(pipe: Any, hash_key: str, role: str) -> dict[str, int]:
    """Queue HINCRBYs for what was counted since the last flush; the deltas."""
    delta = {k: v - _flushed[k] for k, v in _counts.items() if v != _flushed[k]}
    for server, n in delta.items():
        pipe.hincrby(hash_key, f"{role}:{server}", n)
    return delta


async def flush(client: redis.asyncio.Redis, hash_key: str, role: str) -> None:
    """Add what this process counted since the last flush to the shared hash."""
    token = _quiet.set(True)
    try:
        pipe = client.pipeline(transaction=False)
        if delta := _take_unflushed(pipe, hash_key, role):
            await pipe.execute()
            _flushed.update(delta)
    finally:
        _quiet.reset(token)


def flush_sync(client: redis.Redis, hash_key: str, role: str) -> None:
    token = _quiet.set(True)
    try:
        pipe = client.pipeline(transaction=False)
        if delta := _take_unflushed(pipe, hash_key, role):
            pipe.execute()
            _flushed.update(delta)
    finally:
        _quiet.reset(token)
