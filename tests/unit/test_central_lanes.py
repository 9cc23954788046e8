"""The central-control client's connections (lanes), against a real keep-alive HTTP
server on 127.0.0.1 that counts the connections it is given."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from worker.central import KEEPALIVE_EXPIRY_S, CentralClient, CentralError

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
          b"Content-Length: 17\r\n\r\n{\"success\": true}")


@dataclass
class Farm:
    connections: int = 0  # accepted, ever
    open_now: int = 0
    most_open: int = 0
    answered: list[str] = field(default_factory=list)
    hold: set[str] = field(default_factory=set)  # task ids read but never answered
    held: asyncio.Event = field(default_factory=asyncio.Event)
    pause_s: float = 0.0  # before each answer, so sends overlap


@asynccontextmanager
async def keep_alive_server(farm: Farm) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        farm.connections += 1
        farm.open_now += 1
        farm.most_open = max(farm.most_open, farm.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                task_id = json.loads(body)["taskId"]
                if task_id in farm.hold:
                    farm.held.set()
                    await reader.read()  # until the client closes
                    return
                await asyncio.sleep(farm.pause_s)
                farm.answered.append(task_id)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
            pass
        finally:
            farm.open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def send(task_id: str) -> dict[str, Any]:
    return {"device_id": "dev-1", "task_id": task_id, "record_id": f"r-{task_id}",
            "script": {"id": "s"}}


@asynccontextmanager
async def central(farm: Farm, **options: Any) -> AsyncIterator[CentralClient]:
    """A client of the farm's server, closed after."""
    async with keep_alive_server(farm) as url:
        c = CentralClient(url, connect_timeout_s=1.0, **options)
        try:
            yield c
        finally:
            await c.aclose()


async def test_sends_one_after_another_ride_one_connection() -> None:
    farm = Farm()
    async with central(farm, timeout_s=2.0, max_connections=8) as c:
        for i in range(10):
            await c.send_script(**send(f"t-{i}"))
    assert farm.answered == [f"t-{i}" for i in range(10)]
    assert farm.connections == 1


async def test_concurrent_sends_open_at_most_max_connections_and_reuse_them() -> None:
    farm = Farm(pause_s=0.01)
    async with central(farm, timeout_s=5.0, max_connections=4) as c:
        await asyncio.gather(*(c.send_script(**send(f"t-{i}")) for i in range(40)))
    assert sorted(farm.answered) == sorted(f"t-{i}" for i in range(40))
    assert farm.most_open <= 4 and farm.connections == 4


async def test_a_cancelled_send_gives_its_connection_back() -> None:
    farm = Farm(hold={"t-held"})
    async with central(farm, timeout_s=5.0, max_connections=1, pool_timeout_s=0.5) as c:
        held = asyncio.create_task(c.send_script(**send("t-held")))
        await asyncio.wait_for(farm.held.wait(), 5)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        await c.send_script(**send("t-next"))  # not a PoolTimeout
    assert farm.answered == ["t-next"]


async def test_a_failed_send_gives_its_connection_back() -> None:
    farm = Farm(hold={"t-slow"})
    async with central(farm, timeout_s=0.3, max_connections=1, pool_timeout_s=0.3) as c:
        with pytest.raises(CentralError) as info:
            await c.send_script(**send("t-slow"))
        assert info.value.maybe_sent is True
        await c.send_script(**send("t-next"))
    assert farm.answered == ["t-next"]


async def test_a_connection_idle_past_the_keepalive_expiry_is_not_reused() -> None:
    """uvicorn and node close idle keep-alive connections after 5 s; a request written on
    one as it closes fails with a ReadError, counted as maybe sent (the device stays
    locked until the result timeout). httpx keeps them 5 s by default: a race. The
    client drops them sooner."""
    assert KEEPALIVE_EXPIRY_S < 5.0
    farm = Farm()
    async with central(farm, timeout_s=2.0, max_connections=4) as c:
        await c.send_script(**send("t-1"))
        await c.send_script(**send("t-2"))
        assert farm.connections == 1
        await asyncio.sleep(KEEPALIVE_EXPIRY_S + 0.3)
        await c.send_script(**send("t-3"))
    assert farm.answered == ["t-1", "t-2", "t-3"]
    assert farm.connections == 2
