"""Clients for Redis and Mongo with the timeouts and counters every role uses."""

from __future__ import annotations

import redis
import redis.asyncio
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.synchronous.database import Database
from redis.backoff import NoBackoff

from sendscript import roundtrips
from sendscript.settings import Settings

DEFAULT_DB = "sendscript"


def _redis_kwargs(settings: Settings) -> dict:
    # No silent retries: a retried Lua acquire whose first run did land would
    # leave a lock nobody knows the fence of. Callers decide what to retry.
    return {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 30,
    }


def redis_async(settings: Settings, *, socket_timeout: float | None = None) -> redis.asyncio.Redis:
    settings.require("redis_url")
    kwargs = _redis_kwargs(settings)
    if socket_timeout is not None:
        kwargs["socket_timeout"] = socket_timeout
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        connection_class=roundtrips.CountingAsyncConnection,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
        **kwargs,
    )


def redis_sync(settings: Settings) -> redis.Redis:
    settings.require("redis_url")
    return redis.Redis.from_url(
        settings.redis_url,
        connection_class=roundtrips.CountingConnection,
        retry=redis.retry.Retry(NoBackoff(), 0),
        **_redis_kwargs(settings),
    )


def _mongo_kwargs(settings: Settings) -> dict:
    ms = int(settings.mongo_timeout_s * 1000)
    kwargs = {
        "tz_aware": True,
        "serverSelectionTimeoutMS": ms,
        "connectTimeoutMS": ms,
        "socketTimeoutMS": ms,
        "event_listeners": [roundtrips.MongoCommandCounter()],
    }
    if settings.mongo_journal:
        # A write is acknowledged once it is in the journal: an acknowledged task,
        # claim or exec record must survive a crash of the server (kill -9), or a
        # task is lost or its attempt is sent twice.
        kwargs["journal"] = True
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
