"""Fixtures of the integration tests: the production clients on the real embedded
servers (one key prefix, database and topic per test), a tiny real HTTP server
standing in for central-control, and helpers to read Redis pub/sub and Pulsar."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pulsar
import pulsar.asyncio as apulsar
import pytest
import redis.asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings
from sendscript.status import RETENTION
from sendscript.store import ensure_indexes


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[redis.asyncio.Redis]:
    client = connect.redis_async(settings)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{settings.keys.prefix}:*", count=500)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def mongo(settings: Settings) -> AsyncIterator[AsyncMongoClient]:
    client = connect.mongo_async(settings)
    yield client
    await client.drop_database(connect.database(client).name)
    await client.close()


@pytest.fixture
async def db(mongo: AsyncMongoClient) -> AsyncDatabase:
    database = connect.database(mongo)
    await ensure_indexes(database)
    return database


@pytest.fixture(scope="session")
async def pulsar_client(servers: EmbeddedServers) -> AsyncIterator[apulsar.Client]:
    client = apulsar.Client(
        servers.urls()["pulsar_url"],
        operation_timeout_seconds=10,
        connection_timeout_ms=10_000,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
    )
    yield client
    await client.close()


class FreeEvents:
    """A subscription to the device-free channel, opened before the action under test."""

    def __init__(self, client: redis.asyncio.Redis, channel: str) -> None:
        self._pubsub = client.pubsub()
        self._channel = channel

    async def open(self) -> None:
        await self._pubsub.subscribe(self._channel)
        # The subscribe confirmation: after it, every publish reaches us.
        while True:
            msg = await self._pubsub.get_message(timeout=5)
            assert msg is not None, "no subscribe confirmation"
            if msg["type"] == "subscribe":
                return

    async def collect(self, quiet_s: float = 0.3) -> list[dict[str, Any]]:
        """Every event published so far, waiting until none arrives for `quiet_s`."""
        out: list[dict[str, Any]] = []
        while True:
            msg = await self._pubsub.get_message(ignore_subscribe_messages=True,
                                                 timeout=quiet_s)
            if msg is None:
                return out
            out.append(json.loads(msg["data"]))

    async def close(self) -> None:
        await self._pubsub.aclose()


@pytest.fixture
async def free_events(settings: Settings) -> AsyncIterator[FreeEvents]:
    client = connect.redis_async(settings, socket_timeout=30)
    events = FreeEvents(client, settings.keys.device_free_channel)
    await events.open()
    yield events
    await events.close()
    await client.aclose()


class Central:
    """A real HTTP/1.1 server (keep-alive) standing in for the central-control API.

    Answers every request with `status` and `body` after `delay_s`, and keeps what it
    was sent (as soon as it has read it: a request counts even if the client gave up)."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b'{"success": true}'
        self.delay_s = 0.0
        # Run with each request before answering it (e.g. the device reports at once).
        self.on_request: Callable[[dict[str, Any]], Awaitable[None]] | None = None
        self.requests: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    def reply(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, value = header.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append({
                    "method": method,
                    "path": path,
                    "json": json.loads(body) if body else None,
                })
                if self.on_request is not None:
                    await self.on_request(self.requests[-1]["json"])
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                head = (f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(self.body)}\r\n\r\n")
                writer.write(head.encode() + self.body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def central() -> AsyncIterator[Central]:
    server = Central()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sdk(settings: Settings) -> Iterator[SendScriptClient]:
    """The producer SDK on the test's servers; its database dropped after."""
    window = RETENTION.dedupe_window_s  # the client configures this process's window
    client = SendScriptClient(settings)
    yield client
    client._mongo.drop_database(client._db.name)
    client._redis.delete(settings.keys.ready)
    client.close()
    RETENTION.dedupe_window_s = window
