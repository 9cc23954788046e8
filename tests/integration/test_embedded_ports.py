"""An embedded server whose picked port another process already listens on picks
another one: that process's answer must not pass for the server's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from sendscript.dev.embedded import RedisServer


def test_a_picked_port_that_something_else_listens_on_is_picked_anew(tmp_path: Path) -> None:
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    server = RedisServer(tmp_path)
    server.port = taken  # as if the pick had returned a port another server got first
    try:
        server.start()
        assert server.port != taken and server.running
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        client.close()
    finally:
        server.stop()
        squatter.close()


def test_a_named_port_that_is_taken_is_refused_with_a_reason(tmp_path: Path) -> None:
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    server = RedisServer(tmp_path, port=taken)  # named: kept, so refused, not moved
    try:
        with pytest.raises(RuntimeError, match=f"port {taken} is taken by another process"):
            server.start()
        assert not server.running
    finally:
        server.stop()
        squatter.close()
