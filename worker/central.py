"""The farm's central-control API: send one script to one device.

`POST {central_url}/api/script/send` with `{"deviceId", "taskId", "recordId",
"script"}`; 2xx with `{"success": true}` means accepted. Every failure becomes a
`CentralError` saying two things, decided here and nowhere else:

- whether it is worth another attempt (`retryable`): timeouts, connection
  errors, 408, 409 (the device is busy), 429 and 5xx are; other 4xx and a 2xx
  that says `success: false` are not;
- how far the request got: `never_sent` (it provably never left: connect
  refused, connect timeout, no pooled connection in time), `maybe_sent` (it was
  written and the answer was lost: read timeout, dropped connection), or
  neither (central-control answered and refused it).

It also says what the failure tells of central-control itself (`sick`, fed to the
circuit breaker in master/breaker.py): unreachable, timed out, 408, 429 or 5xx
say it is unwell; a busy device (409) or a refusal of this script does not. The
error code of an answer's body (`code`, `errorCode` or `error_code`) is kept, so
the worker can tell a quota answer (settings `central_quota_*`) from the rest, and
so is a `Retry-After` header (seconds, or an HTTP date), which adaptive rate limits
honour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from sendscript import tracing

DEVICE_BUSY = 409  # the device is running another script: try again later
RETRYABLE_STATUS = frozenset({408, DEVICE_BUSY, 429})
SICK_STATUS = frozenset({408, 429})  # with 5xx: central-control is unwell, not the device
# Failures before the request left: the script cannot have reached the farm.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class CentralError(Exception):
    """A send that was not accepted.

    `never_sent`: the request provably never left this process, so the attempt
    did not happen. `maybe_sent`: the request may have reached central-control
    and the device may be running the script; nobody can tell."""

    def __init__(self, reason: str, retryable: bool, status: int | None = None, *,
                 maybe_sent: bool = False, never_sent: bool = False,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        if maybe_sent and never_sent:
            raise ValueError("a send cannot be both maybe sent and never sent")
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.maybe_sent = maybe_sent
        self.never_sent = never_sent
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def sick(self) -> bool:
        """Does this failure say central-control itself is unwell (the breaker's input)?"""
        if self.status is None:  # no answer: unreachable, timed out, connection dropped
            return True
        return self.status in SICK_STATUS or self.status >= 500

    def __str__(self) -> str:
        kind = "retryable" if self.retryable else "final"
        return f"central-control {kind}: {self.reason}"


def classify_status(status: int) -> bool | None:
    """None when the status is a success, else whether it is worth retrying."""
    if 200 <= status < 300:
        return None
    return status in RETRYABLE_STATUS or status >= 500


def transport_error(exc: httpx.TransportError) -> CentralError:
    """What a failed HTTP exchange means for the attempt (no answer was read)."""
    if isinstance(exc, NOT_SENT):
        return CentralError(f"not sent ({type(exc).__name__}: {exc})", True, never_sent=True)
    if isinstance(exc, httpx.TimeoutException):
        return CentralError(f"timeout ({type(exc).__name__})", True, maybe_sent=True)
    return CentralError(f"connection error ({type(exc).__name__}: {exc})", True,
                        maybe_sent=True)


THROTTLED = 429


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """A `Retry-After` header in seconds (delta-seconds or an HTTP date); None when
    absent or unreadable (a malformed header is no reason to fail the send)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


CODE_FIELDS = ("code", "errorCode", "error_code")


def error_code(payload: object) -> str | None:
    """The error code an answer's JSON body carries, if any."""
    if isinstance(payload, dict):
        for name in CODE_FIELDS:
            value = payload.get(name)
            if value is not None and value != "":
                return str(value)
    return None


def check_response(response: httpx.Response) -> None:
    retryable = classify_status(response.status_code)
    if retryable is not None:
        body = response.text[:200].strip()
        try:
            code = error_code(response.json())
        except ValueError:
            code = None
        raise CentralError(f"HTTP {response.status_code} {body}".strip(), retryable,
                           response.status_code, code=code,
                           retry_after_s=retry_after(response.headers.get("retry-after")))
    try:
        payload = response.json()
    except ValueError as exc:
        raise CentralError("accepted with a body that is not JSON", False,
                           response.status_code) from exc
    if not isinstance(payload, dict) or payload.get("success") is not True:
        raise CentralError(f"refused: {str(payload)[:200]}", False, response.status_code,
                           code=error_code(payload))


KEEPALIVE_EXPIRY_S = 2.0
SEND_PATH = "/api/script/send"


def send_body(device_id: str, task_id: str, record_id: str,
              script: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a send (the contract's names)."""
    return {"deviceId": device_id, "taskId": task_id, "recordId": record_id, "script": script}


class Lanes:
    """Connections to central-control, each an `httpx.AsyncClient` of one connection
    (a lane), lent to one send at a time.

    Why not one client with a pool of `max_connections`: httpx's pool looks over every
    connection it holds, for each request waiting, on every request and every answer
    (a poll and a getpeername of each idle one). At 32 connections that costs more CPU
    than the rest of the request (`python -m bench.central_client`). A lane is made
    when none is free and fewer than `size` exist; the most recently used is lent
    first, so the fewest connections stay warm. A lane's connection idle longer than
    `KEEPALIVE_EXPIRY_S` is not reused: its next send opens a new one."""

    def __init__(self, make: Callable[[], httpx.AsyncClient], size: int,
                 wait_s: float) -> None:
        self._make = make
        self._size = size
        self._wait_s = wait_s
        self._free: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()
        self._all: list[httpx.AsyncClient] = []

    async def take(self) -> httpx.AsyncClient:
        """A free lane; `httpx.PoolTimeout` when none came free within `wait_s` (the
        send never left)."""
        if not self._free.empty():
            return self._free.get_nowait()
        if len(self._all) < self._size:
            lane = self._make()
            self._all.append(lane)
            return lane
        try:
            return await asyncio.wait_for(self._free.get(), self._wait_s)
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"no connection to central-control came free in {self._wait_s:g} s"
            ) from None

    def give_back(self, lane: httpx.AsyncClient) -> None:
        self._free.put_nowait(lane)

    async def aclose(self) -> None:
        for lane in self._all:
            await lane.aclose()


class CentralClient:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float = 3.0,
        timeout_s: float = 10.0,
        max_connections: int = 100,
        pool_timeout_s: float | None = None,
    ) -> None:
        # A send waits for a free connection at most `pool_timeout_s` (by default
        # `timeout_s`), and gives up without writing anything (never sent).
        pool = timeout_s if pool_timeout_s is None else pool_timeout_s
        tls = httpx.create_ssl_context()  # one for all lanes: each would load the CAs

        def lane() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=base_url.rstrip("/"), verify=tls,
                timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=pool),
                # An idle connection is dropped well before common servers close
                # theirs (uvicorn, node: 5 s): a request written as the server closes
                # it fails with a ReadError, which must count as maybe sent, locking
                # the device until the result timeout. httpx's default (5 s) races
                # uvicorn's.
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                    keepalive_expiry=KEEPALIVE_EXPIRY_S),
            )

        self._lanes = Lanes(lane, max_connections, pool)

    async def send_script(
        self, *, device_id: str, task_id: str, record_id: str, script: dict[str, Any],
        trace: dict[str, str] | None = None,
    ) -> None:
        """`trace`: the send's trace context, passed on as W3C `traceparent` (and
        `tracestate`) headers."""
        body = send_body(device_id, task_id, record_id, script)
        try:
            lane = await self._lanes.take()
            try:
                response = await lane.post(SEND_PATH, json=body,
                                           headers=tracing.headers(trace) or None)
            finally:
                self._lanes.give_back(lane)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        check_response(response)

    async def aclose(self) -> None:
        await self._lanes.aclose()
