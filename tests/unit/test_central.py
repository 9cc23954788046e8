"""Central-control client: status classification and real HTTP round trips on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from worker.central import (
    DEVICE_BUSY,
    CentralClient,
    CentralError,
    check_response,
    classify_status,
    transport_error,
)


# -- classification ---------------------------------------------------------------------------
@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_classify_2xx_is_success(status: int) -> None:
    assert classify_status(status) is None


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 599])
def test_classify_retryable(status: int) -> None:
    assert classify_status(status) is True


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 422, 499, 301, 302])
def test_classify_final(status: int) -> None:
    assert classify_status(status) is False


def test_a_busy_device_is_retryable_and_the_only_rule_says_so() -> None:
    # 409: the device runs another script. One rule, here: the error the client
    # raises is what the retry policy reads, with nothing widening it elsewhere.
    assert DEVICE_BUSY == 409 and classify_status(409) is True
    with pytest.raises(CentralError) as info:
        check_response(response(409, b'{"success": false, "error": "device busy"}'))
    assert info.value.retryable is True and info.value.status == 409
    assert not info.value.maybe_sent and not info.value.never_sent


# -- how far a failed request got -------------------------------------------------------------
REQUEST = httpx.Request("POST", "http://central/api/script/send")


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno 111] Connection refused", request=REQUEST),
    httpx.ConnectTimeout("timed out", request=REQUEST),
    httpx.PoolTimeout("no connection", request=REQUEST),
])
def test_errors_before_the_request_left_are_never_sent(exc: httpx.TransportError) -> None:
    err = transport_error(exc)
    assert err.never_sent is True and err.maybe_sent is False
    assert err.retryable is True and err.status is None
    assert err.reason.startswith(f"not sent ({type(exc).__name__}")


@pytest.mark.parametrize("exc", [
    httpx.ReadTimeout("timed out", request=REQUEST),
    httpx.WriteTimeout("timed out", request=REQUEST),
    httpx.ReadError("reset", request=REQUEST),
    httpx.WriteError("broken pipe", request=REQUEST),
    httpx.RemoteProtocolError("Server disconnected without sending a response", request=REQUEST),
])
def test_errors_after_the_request_may_have_left_are_maybe_sent(
    exc: httpx.TransportError,
) -> None:
    err = transport_error(exc)
    assert err.maybe_sent is True and err.never_sent is False
    assert err.retryable is True and err.status is None


def test_an_error_is_never_both_maybe_and_never_sent() -> None:
    with pytest.raises(ValueError):
        CentralError("x", True, maybe_sent=True, never_sent=True)


def response(status: int, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.Response(status, content=body, headers={"content-type": content_type})


def test_check_response_accepts_success_true() -> None:
    check_response(response(200, b'{"success": true, "data": null}'))


@pytest.mark.parametrize(
    "body",
    [b'{"success": false, "msg": "device offline"}', b'{"success": "true"}', b'{"ok": true}',
     b"[true]", b"true", b'{"success": 1}'],
)
def test_check_response_2xx_without_success_true_is_final(body: bytes) -> None:
    with pytest.raises(CentralError) as info:
        check_response(response(200, body))
    assert info.value.retryable is False
    assert info.value.status == 200
    assert "refused" in info.value.reason


def test_check_response_2xx_not_json_is_final() -> None:
    with pytest.raises(CentralError) as info:
        check_response(response(200, b"<html>ok</html>", "text/html"))
    assert info.value.retryable is False
    assert "not JSON" in info.value.reason


def test_check_response_error_carries_status_and_body() -> None:
    with pytest.raises(CentralError) as info:
        check_response(response(503, b"overloaded" + b"x" * 500, "text/plain"))
    err = info.value
    assert err.retryable is True and err.status == 503
    assert err.reason.startswith("HTTP 503 overloaded")
    assert len(err.reason) < 230  # body cut to 200 characters
    assert str(err).startswith("central-control retryable: HTTP 503")


def test_final_error_str() -> None:
    assert str(CentralError("HTTP 404", False, 404)) == "central-control final: HTTP 404"


# -- a real tiny HTTP server -----------------------------------------------------------------
@dataclass
class Canned:
    status: int = 200
    body: bytes = b'{"success": true}'
    content_type: str = "application/json"
    answer: bool = True  # False: read the request, never answer
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first request


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@asynccontextmanager
async def http_server(canned: Canned) -> AsyncIterator[str]:
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            canned.requests.append((method, path, headers, body))
            canned.arrived.set()
            if not canned.answer:
                held.append(writer)
                await reader.read()  # until the client gives up and closes
                return
            reason = REASONS.get(canned.status, "Status")
            writer.write(
                f"HTTP/1.1 {canned.status} {reason}\r\n"
                f"Content-Type: {canned.content_type}\r\n"
                f"Content-Length: {len(canned.body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1") + canned.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()  # in case the client did not close first
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def client(base_url: str, timeout_s: float = 2.0) -> AsyncIterator[CentralClient]:
    c = CentralClient(base_url, connect_timeout_s=1.0, timeout_s=timeout_s)
    try:
        yield c
    finally:
        await c.aclose()


SEND: dict[str, Any] = {"device_id": "dev-1", "task_id": "t-1", "record_id": "r-1",
                        "script": {"id": "s-1", "args": {"n": 2}}}


async def test_send_script_posts_contract_body() -> None:
    canned = Canned()
    async with http_server(canned) as url, client(url) as c:
        await c.send_script(**SEND)
    assert len(canned.requests) == 1
    method, path, headers, body = canned.requests[0]
    assert (method, path) == ("POST", "/api/script/send")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"deviceId": "dev-1", "taskId": "t-1", "recordId": "r-1",
                                "script": {"id": "s-1", "args": {"n": 2}}}


async def test_send_script_base_url_with_trailing_slash_and_path() -> None:
    canned = Canned()
    async with http_server(canned) as url:
        async with client(url + "/") as c:
            await c.send_script(**SEND)
        async with client(url + "/farm/") as c:
            await c.send_script(**SEND)
    assert [r[1] for r in canned.requests] == ["/api/script/send", "/farm/api/script/send"]


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [
        (200, b'{"success": false, "msg": "busy"}', False),
        (200, b"not json at all", False),
        (400, b'{"msg": "bad script"}', False),
        (404, b"no route", False),
        (408, b"", True),
        (429, b"slow down", True),
        (500, b"boom", True),
        (503, b"", True),
    ],
)
async def test_send_script_error_classes(status: int, body: bytes, retryable: bool) -> None:
    canned = Canned(status=status, body=body)
    async with http_server(canned) as url, client(url) as c:
        with pytest.raises(CentralError) as info:
            await c.send_script(**SEND)
    assert info.value.retryable is retryable
    assert info.value.status == status
    assert len(canned.requests) == 1  # no hidden retry inside the client


async def test_send_script_read_timeout_is_retryable() -> None:
    canned = Canned(answer=False)
    async with http_server(canned) as url, client(url, timeout_s=0.3) as c:
        started = time.monotonic()
        with pytest.raises(CentralError) as info:
            await c.send_script(**SEND)
        took = time.monotonic() - started
    assert info.value.retryable is True
    assert info.value.status is None
    assert "timeout" in info.value.reason
    assert 0.25 <= took < 2.0
    assert len(canned.requests) == 1  # the request did arrive


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_send_script_connection_refused_is_retryable() -> None:
    async with client(f"http://127.0.0.1:{closed_port()}") as c:
        with pytest.raises(CentralError) as info:
            await c.send_script(**SEND)
    assert info.value.retryable is True
    assert info.value.status is None
    assert "not sent" in info.value.reason
    assert info.value.maybe_sent is False  # nothing left: safe to send again
    assert info.value.never_sent is True


async def test_send_script_read_timeout_is_maybe_sent() -> None:
    canned = Canned(answer=False)
    async with http_server(canned) as url, client(url, timeout_s=0.3) as c:
        with pytest.raises(CentralError) as info:
            await c.send_script(**SEND)
    assert info.value.maybe_sent is True and info.value.never_sent is False
    assert len(canned.requests) == 1


async def test_send_script_waiting_for_a_pooled_connection_is_never_sent() -> None:
    # One connection, held by a request that is never answered: the second send
    # waits for the pool and gives up before writing anything. The pool wait ends
    # well before the first request's read timeout frees the connection.
    canned = Canned(answer=False)
    async with http_server(canned) as url:
        c = CentralClient(url, connect_timeout_s=1.0, timeout_s=2.0, max_connections=1,
                          pool_timeout_s=0.3)
        try:
            first = asyncio.create_task(c.send_script(**SEND))
            await asyncio.wait_for(canned.arrived.wait(), 5)
            with pytest.raises(CentralError) as info:
                await c.send_script(**{**SEND, "task_id": "t-2"})
            with pytest.raises(CentralError):
                await first
        finally:
            await c.aclose()
    assert info.value.never_sent is True and "PoolTimeout" in info.value.reason
    assert [json.loads(r[3])["taskId"] for r in canned.requests] == ["t-1"]
