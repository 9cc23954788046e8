"""What a send to central-control costs the worker in CPU: its lanes against one pool.

    python -m bench.central_client --requests 5000 --concurrency 1,8,32 --rounds 3

Starts a keep-alive HTTP server on 127.0.0.1 in a process of its own that answers
every `POST /api/script/send` with `{"success": true}` after `--answer-ms`, and
sends the same requests from this process two ways, `--concurrency` at a time:

- lanes: `worker.central.CentralClient` as the worker makes it (one
  `httpx.AsyncClient` of one connection per send in flight);
- one pool: one `httpx.AsyncClient` with a pool of as many connections, as the
  worker made it before.

The order of the two alternates by round, so the drift of a shared machine falls on
both alike. Printed per concurrency: this process's CPU per request (from
`time.process_time`, medians over the rounds) and the ratio one pool / lanes. The
server counts what it answered; a figure counts only if every request was answered
once and every send succeeded. Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from sendscript.dev.embedded import free_port
from worker.central import (
    KEEPALIVE_EXPIRY_S,
    SEND_PATH,
    CentralClient,
    check_response,
    send_body,
)

BODY = b'{"success": true}'
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
          + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
COUNT = "/count"


def serve(port: int, answer_ms: float) -> None:
    """The server process: answers sends, and `GET /count` with how many it answered."""
    answered = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if head.startswith(b"GET " + COUNT.encode()):
                    body = json.dumps({"answered": answered}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    continue
                if answer_ms:
                    await asyncio.sleep(answer_ms / 1000)
                answered += 1
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


Send = Callable[[int], Awaitable[None]]


def sent(i: int) -> dict[str, Any]:
    """The i-th send's arguments, the same both ways."""
    return {"device_id": f"phone-{i % 200:05d}", "task_id": f"t-{i}", "record_id": f"r-{i}",
            "script": {"id": "bench", "args": {"n": i}}}


def lanes(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    client = CentralClient(url, connect_timeout_s=3.0, timeout_s=10.0,
                           max_connections=concurrency)

    async def send(i: int) -> None:
        await client.send_script(**sent(i))
    return send, client.aclose


def one_pool(url: str, concurrency: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(10.0, connect=3.0),
        limits=httpx.Limits(max_connections=concurrency,
                            max_keepalive_connections=concurrency,
                            keepalive_expiry=KEEPALIVE_EXPIRY_S))

    async def send(i: int) -> None:
        check_response(await client.post(SEND_PATH, json=send_body(**sent(i))))
    return send, client.aclose


WAYS = {"lanes": lanes, "one pool": one_pool}


async def run_way(url: str, way: str, requests: int, concurrency: int) -> tuple[float, int]:
    """CPU seconds of this process for `requests` sends, `concurrency` at a time (after
    a warm-up that opens the connections), and how many succeeded."""
    send, close = WAYS[way](url, concurrency)
    gate = asyncio.Semaphore(concurrency)
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        async with gate:
            await send(i)
            ok += 1

    try:
        await asyncio.gather(*(one(i) for i in range(concurrency * 4)))
        ok = 0
        started = time.process_time()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.process_time() - started, ok
    finally:
        await close()


async def answered(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as c:
        return int((await c.get(COUNT)).json()["answered"])


async def measure(a: argparse.Namespace, url: str) -> tuple[list[dict[str, Any]], bool]:
    rows: list[dict[str, Any]] = []
    complete = True
    for concurrency in a.concurrency:
        cpu: dict[str, list[float]] = {way: [] for way in WAYS}
        for r in range(a.rounds):
            order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
            for way in order:
                before = await answered(url)
                spent, ok = await run_way(url, way, a.requests, concurrency)
                got = await answered(url) - before - concurrency * 4
                if ok != a.requests or got != a.requests:
                    print(f"{way}, {concurrency} at a time: {ok} of {a.requests} sends "
                          f"succeeded, {got} answered", file=sys.stderr)
                    complete = False
                cpu[way].append(spent / a.requests * 1e6)
        us = {way: statistics.median(v) for way, v in cpu.items()}
        rows.append({"concurrency": concurrency, "us_per_request": us,
                     "pool_over_lanes": us["one pool"] / us["lanes"]})
    return rows, complete


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.central_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 8, 32], help="sends in flight, comma-separated (1,8,32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--answer-ms", type=float, default=0.0,
                   help="the server's delay before each answer (0)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    port = free_port("127.0.0.1")
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(port, a.answer_ms), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.run(answered(url))
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        rows, complete = asyncio.run(measure(a, url))
    finally:
        server.terminate()
        server.join(5)
    if a.json:
        print(json.dumps({"rows": rows, "complete": complete}, indent=2))
    else:
        print(f"{a.requests} sends a way and round, {a.rounds} rounds, answered after "
              f"{a.answer_ms:g} ms: this process's CPU a request (us, median)")
        print(f"{'in flight':>9}  {'lanes':>8}  {'one pool':>8}  one pool / lanes")
        for row in rows:
            us = row["us_per_request"]
            print(f"{row['concurrency']:>9}  {us['lanes']:>8.0f}  {us['one pool']:>8.0f}  "
                  f"{row['pool_over_lanes']:>15.2f}x")
    if not complete:
        print("not every send succeeded and was answered once: no figure counts",
              file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
