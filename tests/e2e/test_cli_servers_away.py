"""A CLI command that cannot reach Mongo or Redis says which, in one line on stderr,
and exits 2 — whether the server refuses the connection or accepts it and never
answers (every call has a timeout: the command does not hang)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sendscript.dev.embedded import free_port
from sendscript.settings import Settings
from tests.support import settings_env

pytestmark = pytest.mark.e2e

# Commands whose first server call is to Redis, and those whose first is to Mongo, when
# the other server answers.
NEEDS_REDIS = [["status"], ["status", "--json"], ["status", "--watch"], ["pause", "list"],
               ["pause", "--reason", "test"], ["resume"], ["device", "list"],
               ["monitor", "progress", "--once"]]
NEEDS_MONGO = [["task", "list"], ["task", "info", "t-1"], ["token", "list"], ["group", "list"],
               ["schedule", "list"], ["agent", "list"], ["batch", "info", "b-1"],
               ["submit", "dev-1", "--script", '{"id": "tap"}']]
# A hang is what this catches, not slowness: the servers' timeouts are 1 s here.
HANG_S = 60


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def run(settings: Settings, args: list[str], **urls: str) -> subprocess.CompletedProcess:
    env = settings_env(settings, redis_timeout_s=1, mongo_timeout_s=1, **urls)
    env.update({"NO_COLOR": "1", "COLUMNS": "80"})  # a narrow terminal wraps long lines
    try:
        return subprocess.run([sys.executable, "-m", "sendscript", *args], env=env,
                              capture_output=True, text=True, timeout=HANG_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`sendscript {' '.join(args)}` hung: {exc.stdout!r}") from None


def assert_said_in_one_line(done: subprocess.CompletedProcess, server: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"sendscript: {server} did not answer: "), lines[0]
    assert len(lines[0]) > len(f"sendscript: {server} did not answer: "), "no reason given"
    assert done.stdout == "", done.stdout


@pytest.mark.parametrize("args", NEEDS_REDIS, ids=" ".join)
def test_redis_refusing_connections(settings: Settings, args: list[str]) -> None:
    done = run(settings, args, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert_said_in_one_line(done, "Redis")


@pytest.mark.parametrize("args", NEEDS_MONGO, ids=" ".join)
def test_mongo_refusing_connections(settings: Settings, args: list[str]) -> None:
    done = run(settings, args, mongo_url=f"mongodb://127.0.0.1:{free_port()}/away")
    assert_said_in_one_line(done, "Mongo")


@pytest.mark.parametrize(("args", "server"), [(["status"], "Redis"), (["task", "list"], "Mongo")])
def test_a_server_that_never_answers_times_out(settings: Settings, silent_port: int,
                                               args: list[str], server: str) -> None:
    url = (f"redis://127.0.0.1:{silent_port}/0" if server == "Redis"
           else f"mongodb://127.0.0.1:{silent_port}/away")
    done = run(settings, args, **{f"{server.lower()}_url": url})
    assert_said_in_one_line(done, server)
