"""/healthz and /readyz for one role process, on its own event loop.

`/healthz`: the process is alive and its loop is responsive (this answer runs on
that loop; the loop's lag, measured by a ticker, must stay under a bound).
`/readyz`: the role can do its work — its servers answer and, per role, its
workers are online (master) or it is subscribed (consumer). Both answer JSON,
200 or 503, for supervisord's checks or an orchestrator's probes.

A minimal HTTP/1.1 handler on asyncio streams (one request per connection): no
web framework in roles that serve nothing else, bound to 127.0.0.1 by default,
off unless the role's port setting is set.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

# A check answers (ok, detail); readiness is every check ok.
Check = Callable[[], Awaitable[tuple[bool, Any]]]
TICK_S = 0.25
MAX_LAG_S = 5.0  # a loop this late on its ticks is not responsive
CHECK_TIMEOUT_S = 2.0
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(self, host: str, port: int, checks: dict[str, Check],
                 role: str, check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.checks = checks
        self.role = role
        self.check_timeout_s = check_timeout_s
        self.lag_s = 0.0
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (a part of the role's loops)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("{} health endpoints on http://{}:{}/healthz", self.role, self.host,
                    self.port)
        ticker = asyncio.create_task(self._tick(stop))
        try:
            await stop.wait()
        finally:
            ticker.cancel()
            self._server.close()
            await self._server.wait_closed()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(TICK_S)
            self.lag_s = max(0.0, time.monotonic() - before - TICK_S)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        ok = self.lag_s < MAX_LAG_S
        return (200 if ok else 503), {"status": "ok" if ok else "unresponsive",
                                      "role": self.role, "loop_lag_s": round(self.lag_s, 3),
                                      "uptime_s": round(time.monotonic() - self.started, 1)}

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        checks = {n: {"ok": ok, "detail": detail} for n, (ok, detail) in zip(names, results,
                                                                              strict=True)}
        ready = all(c["ok"] for c in checks.values())
        return (200 if ready else 503), {"status": "ready" if ready else "not ready",
                                         "role": self.role, "checks": checks}

    async def _run(self, check: Check) -> tuple[bool, Any]:
        try:
            return await asyncio.wait_for(check(), self.check_timeout_s)
        except TimeoutError:
            return False, f"no answer within {self.check_timeout_s}s"
        except Exception as exc:
            return False, repr(exc)[:300]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method not in ("GET", "HEAD"):
                code, body = 405, {"error": "GET only"}
            elif path == "/healthz":
                code, body = self.healthz()
            elif path == "/readyz":
                code, body = await self.readyz()
            else:
                code, body = 404, {"error": "not found"}
            data = json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else data))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that sent no request, or left: nothing to answer
        finally:
            writer.close()


# -- checks the roles share -------------------------------------------------------------


def redis_check(client: Any) -> Check:
    async def check() -> tuple[bool, Any]:
        return bool(await client.ping()), "ping"
    return check


def mongo_check(client: Any) -> Check:
    async def check() -> tuple[bool, Any]:
        await client.admin.command("ping")
        return True, "ping"
    return check


class Running:
    """A health server run beside a role's own loops; `stop` ends it (no-op if off)."""

    def __init__(self, server: HealthServer | None) -> None:
        self.server = server
        self._stop = asyncio.Event()
        self._task = (asyncio.get_running_loop().create_task(server.run(self._stop),
                                                             name="health")
                      if server else None)
        if self._task is not None:
            self._task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("health endpoints not served: {!r}", task.exception())


def start_health(consumer: Any) -> Running:
    """The consumer's endpoints: ready while Redis and Mongo answer and it is
    subscribed to the task-log topic."""
    s = consumer.settings
    if not s.consumer_health_port:
        return Running(None)

    async def subscribed() -> tuple[bool, Any]:
        return bool(consumer.subscribed), s.task_log_topic

    return Running(HealthServer(s.health_host, s.consumer_health_port, {
        "redis": redis_check(consumer.redis), "mongo": mongo_check(consumer.mongo),
        "subscribed": subscribed}, "consumer"))


def master_checks(master: Any) -> dict[str, Check]:
    """The master's readiness: Redis and Mongo answer, its workers are online."""
    async def workers() -> tuple[bool, Any]:
        online = len(master.pool.online())
        return online > 0, f"{online}/{master.settings.workers} online"

    return {"redis": redis_check(master.redis), "mongo": mongo_check(master.mongo),
            "workers": workers}
