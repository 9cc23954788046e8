"""Clients for Redis and Mongo with the timeouts and counters every role uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from pymongo import AsyncMongoClient, MongoClient, uri_parser
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.synchronous.database import Database
from redis.backoff import NoBackoff

from sendscript import redis_url, roundtrips
from sendscript.redis_url import RedisTarget
from sendscript.settings import Settings

DEFAULT_DB = "sendscript"


def _redis_kwargs(settings: Settings) -> dict:
    return {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
    }


def _target(settings: Settings) -> RedisTarget:
    settings.require("redis_url")
    return redis_url.parse(settings.redis_url or "")


def _auth(target: RedisTarget) -> dict:
    return {"username": target.username, "password": target.password}


def _sentinels(target: RedisTarget, module: Any, settings: Settings) -> Any:
    # The Sentinels get their own short timeouts: asking one that is down must not
    # hold a connection for longer than asking the next.
    sentinel_kwargs = {"socket_timeout": settings.redis_timeout_s,
                       "socket_connect_timeout": settings.redis_timeout_s}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    return module.Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)


def redis_async(settings: Settings, *, socket_timeout: float | None = None) -> redis.asyncio.Redis:
    """An asyncio client for the topology SENDSCRIPT_REDIS_URL names (sendscript.redis_url).

    No silent retries: a retried Lua acquire whose first run did land would leave a
    lock nobody knows the fence of. Callers decide what to retry. (A cluster's
    MOVED/ASK redirections are not retries: the command did not run.)"""
    target = _target(settings)
    kwargs = _redis_kwargs(settings)
    if socket_timeout is not None:
        kwargs["socket_timeout"] = socket_timeout
    no_retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    if target.kind == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], retry=no_retry,
            ssl=target.ssl, **_auth(target), **kwargs)
        # Nodes' connections are made from these kwargs: count them like the others'.
        client.connection_kwargs["connection_class"] = (
            roundtrips.CountingAsyncSSLConnection if target.ssl
            else roundtrips.CountingAsyncConnection)
        return client  # type: ignore[return-value]
    if target.kind == "sentinel":
        import redis.asyncio.sentinel as sentinel

        return _sentinels(target, sentinel, settings).master_for(
            target.service, redis_class=redis.asyncio.Redis, db=target.db,
            connection_class=roundtrips.CountingAsyncSentinelSSLConnection if target.ssl
            else roundtrips.CountingAsyncSentinelConnection, retry=no_retry,
            **_auth(target), **kwargs)
    return redis.asyncio.Redis.from_url(
        target.url, connection_class=roundtrips.counting_async_class(target.url),
        retry=no_retry, **kwargs)


def redis_sync(settings: Settings) -> redis.Redis:
    """A blocking client for the same topology, with the same rules as `redis_async`."""
    target = _target(settings)
    kwargs = _redis_kwargs(settings)
    no_retry = redis.retry.Retry(NoBackoff(), 0)
    if target.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(  # type: ignore[return-value]
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes], retry=no_retry,
            ssl=target.ssl, connection_class=roundtrips.CountingSSLConnection if target.ssl
            else roundtrips.CountingConnection, **_auth(target), **kwargs)
    if target.kind == "sentinel":
        import redis.sentinel as sentinel

        return _sentinels(target, sentinel, settings).master_for(
            target.service, redis_class=redis.Redis, db=target.db,
            connection_class=roundtrips.CountingSentinelSSLConnection if target.ssl
            else roundtrips.CountingSentinelConnection, retry=no_retry,
            **_auth(target), **kwargs)
    return redis.Redis.from_url(
        target.url, connection_class=roundtrips.counting_class(target.url),
        retry=no_retry, **kwargs)


def pulsar_kwargs(settings: Settings, timeout_s: float | None = None) -> dict:
    """Keyword arguments of pulsar.Client (sync or asyncio) for these settings: the
    timeouts, token auth and TLS. A multi-broker URL (pulsar://h1:6650,h2:6650) is
    the client's own: it connects to any of them for lookups."""
    import pulsar

    timeout = timeout_s if timeout_s is not None else settings.pulsar_timeout_s
    kwargs: dict[str, Any] = {
        "operation_timeout_seconds": max(1, int(timeout)),
        "connection_timeout_ms": int(timeout * 1000),
        "tls_allow_insecure_connection": settings.pulsar_tls_allow_insecure,
        "tls_validate_hostname": settings.pulsar_tls_validate_hostname,
    }
    if settings.pulsar_token:
        kwargs["authentication"] = pulsar.AuthenticationToken(settings.pulsar_token)
    if settings.pulsar_tls_trust_certs:
        kwargs["tls_trust_certs_file_path"] = str(settings.pulsar_tls_trust_certs)
    return kwargs


def replica_set(url: str) -> bool | None:
    """Whether a Mongo URL names a replica set: replicaSet=, several hosts, or
    mongodb+srv. None where the driver cannot parse it (it says why, in its words).

    A replica set reached through one host without replicaSet= looks standalone here:
    name replicaSet= (MongoDB's advice too), or set the concerns explicitly."""
    if url.startswith("mongodb+srv://"):  # parsing it would resolve DNS
        return True
    try:
        parsed = uri_parser.parse_uri(url, validate=False, warn=True)
    except Exception:
        return None
    options = {k.lower() for k in parsed["options"]}
    return len(parsed["nodelist"]) > 1 or "replicaset" in options


def retry_writes(url: str) -> bool | None:
    """retryWrites for a Mongo URL: None where the URL says (the driver reads it), else
    whether it names a replica set (`replica_set`).

    On a replica set, on: a write the driver sent as a primary stepped down is sent
    once more to the new one, which knows from its record whether it ran (single-
    document writes; the multi-document ones are retried by sendscript itself,
    sendscript/failover.py). On a standalone or embedded server, off: it buys
    nothing there but costs the server (SecantusDB keeps a record of every one; past
    10,000 of them each write costs 6-8 ms instead of 0.4). Without it nothing is
    lost either: every write here is a compare-and-set or an insert by id."""
    if "retrywrites=" in url.lower():
        return None
    found = replica_set(url)
    return None if found is None else found


@dataclass(frozen=True)
class MongoConcerns:
    """Client options that decide what an acknowledged write and a read promise."""

    w: str | int | None  # None: the server's default
    journal: bool
    read_concern: str | None  # None: the server's default (local)
    retry_writes: bool | None  # None: what the URL says, or the driver's default

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.w is not None:
            out["w"] = self.w
        if self.journal:
            out["journal"] = True
        if self.read_concern is not None:
            out["readConcernLevel"] = self.read_concern
        if self.retry_writes is not None:
            out["retryWrites"] = self.retry_writes
        return out


def mongo_concerns(url: str, write_concern: str = "auto", read_concern: str = "auto",
                   journal: bool = True) -> MongoConcerns:
    """The concerns for a URL and the settings (SENDSCRIPT_MONGO_WRITE_CONCERN,
    _READ_CONCERN, _JOURNAL). Pure.

    On a replica set (`auto`): w=majority with j=true. A claim, a status change or an
    exec record acknowledged by a primary alone can be rolled back when it steps down
    before a secondary has it; the task would then be claimed, or sent, again. Reads
    at majority: what decides dispatch (which claim won, which tasks a fire made
    pending, which record a result applies to) is what a failover cannot take back.
    Elsewhere the server's defaults, with j=true while SENDSCRIPT_MONGO_JOURNAL is on
    (a crash of the server must not lose an acknowledged claim)."""
    rs = bool(replica_set(url))
    if write_concern == "auto":
        w: str | int | None = "majority" if rs else None
    elif write_concern == "majority":
        w = "majority"
    else:
        w = int(write_concern)
    if read_concern == "auto":
        level: str | None = "majority" if rs else None
    else:
        level = read_concern
    return MongoConcerns(w=w, journal=journal, read_concern=level,
                         retry_writes=retry_writes(url))


def _mongo_kwargs(settings: Settings) -> dict:
    ms = int(settings.mongo_timeout_s * 1000)
    kwargs: dict = {
        "tz_aware": True,
        "serverSelectionTimeoutMS": ms,
        "connectTimeoutMS": ms,
        "socketTimeoutMS": ms,
        "event_listeners": [roundtrips.MongoCommandCounter()],
    }
    concerns = mongo_concerns(settings.mongo_url or "", settings.mongo_write_concern,
                              settings.mongo_read_concern, settings.mongo_journal)
    kwargs.update(concerns.kwargs())
    return kwargs


def mongo_async(settings: Settings) -> AsyncMongoClient:
    settings.require("mongo_url")
    return AsyncMongoClient(settings.mongo_url, **_mongo_kwargs(settings))


def mongo_sync(settings: Settings) -> MongoClient:
    settings.require("mongo_url")
    return MongoClient(settings.mongo_url, **_mongo_kwargs(settings))


def database(client: AsyncMongoClient | MongoClient) -> AsyncDatabase | Database:
    """The database the URL names, or `sendscript`."""
    return client.get_default_database(DEFAULT_DB)
