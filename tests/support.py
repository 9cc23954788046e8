"""What the tests share: settings for one test, the roles as processes, waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from sendscript import connect
from sendscript.dev.embedded import EmbeddedServers, free_port
from sendscript.dev.processes import RoleProcess
from sendscript.dev.topologies import RedisClusterNodes
from sendscript.settings import Settings

# SENDSCRIPT_TEST_REDIS=cluster: the session's servers give every test a 3-node Redis
# Cluster (redis+cluster://, keys under a hash-tagged prefix) instead of one server.
REDIS_TOPOLOGY = os.environ.get("SENDSCRIPT_TEST_REDIS", "server").strip().lower() or "server"
if REDIS_TOPOLOGY not in ("server", "cluster"):
    raise RuntimeError(f"SENDSCRIPT_TEST_REDIS must be 'server' or 'cluster', "
                       f"got {REDIS_TOPOLOGY!r}")
ON_CLUSTER = REDIS_TOPOLOGY == "cluster"

# For tests that need one Redis server of their own (they kill or restart it, or
# read its AOF): they run in the default mode, and say why they skip in this one.
needs_one_redis_server = pytest.mark.skipif(
    ON_CLUSTER, reason="SENDSCRIPT_TEST_REDIS=cluster: this test kills or restarts one "
                       "Redis server; it runs in the default mode")


class ClusterServers(EmbeddedServers):
    """The embedded Mongo and Pulsar, with a 3-node Redis Cluster for Redis."""

    def __init__(self, data_dir: Path | str) -> None:
        super().__init__(data_dir, ("mongo", "pulsar"))
        self.cluster = RedisClusterNodes(self.data_dir / "redis-cluster")

    def start(self) -> dict[str, str]:
        self.cluster.start()
        try:
            return super().start()
        except Exception:
            self.cluster.stop()
            raise

    def urls(self) -> dict[str, str]:
        return {"redis_url": self.cluster.url, **super().urls()}

    def stop(self) -> None:
        super().stop()
        self.cluster.stop()


def session_servers(data_dir: Path) -> EmbeddedServers:
    """Embedded servers (not started) for the Redis topology SENDSCRIPT_TEST_REDIS names."""
    return ClusterServers(data_dir) if ON_CLUSTER else EmbeddedServers(data_dir)


def unique_settings(servers: EmbeddedServers, **overrides: Any) -> Settings:
    """Settings of their own for one test: key prefix, database and topic."""
    tag = uuid.uuid4().hex[:10]
    urls = servers.urls()
    base: dict[str, Any] = {
        "redis_url": urls["redis_url"],
        "mongo_url": urls["mongo_url"].rstrip("/") + f"/t_{tag}",
        "pulsar_url": urls["pulsar_url"],
        "key_prefix": f"t{tag}",
        "task_log_topic": f"persistent://public/default/t-{tag}-task-log",
        "master_id": f"m-{tag}",
        "workers": 2,
        "worker_concurrency": 16,
        "heartbeat_interval_s": 0.5,
        "free_check_interval_s": 2.0,
        "shutdown_grace_s": 15.0,
        "log_level": "INFO",
    }
    base.update(overrides)
    return Settings(**base)


def settings_env(settings: Settings, **extra: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.to_env())
    for name, value in extra.items():
        env[f"SENDSCRIPT_{name.upper()}"] = str(value)
    return env


def cli(settings: Settings, *args: str) -> str:
    """Run `sendscript ARGS` as an operator would, with the test's settings; its
    output (plain text, wide), after asserting it succeeded."""
    env = settings_env(settings)
    env.update({"NO_COLOR": "1", "COLUMNS": "250"})
    done = subprocess.run([sys.executable, "-m", "sendscript", *args], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class Roles:
    """The service's roles as child processes, for one test."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[RoleProcess] = []
        self.central_url: str | None = settings.central_url

    def _start(self, name: str, args: list[str], **env: Any) -> RoleProcess:
        settings = self.settings
        if self.central_url:
            env.setdefault("central_url", self.central_url)
        proc = RoleProcess(name, args, settings_env(settings, **env), self.log_dir).start()
        self.procs.append(proc)
        return proc

    def simulator(self, **farm: Any) -> RoleProcess:
        port = free_port()
        args = ["simulate", "--port", str(port)]
        for key, value in farm.items():
            flag = key.replace("_", "-")
            if isinstance(value, bool):
                args.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                args += [f"--{flag}", str(value)]
        proc = self._start("simulator", args)
        self.central_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self._sim_health(proc), 30, "the simulator")
        return proc

    def consumer(self, name: str = "consumer") -> RoleProcess:
        proc = self._start(name, ["consumer"])
        wait_for(lambda: self._consumer_up(proc), 30, "the consumer")
        return proc

    def master(self, name: str = "master", **env: Any) -> RoleProcess:
        proc = self._start(name, ["master"], **env)
        master_id = env.get("master_id", self.settings.master_id)
        workers = int(env.get("workers", self.settings.workers))
        wait_for(lambda: self._master_up(proc, master_id, workers), 60, "the master's workers")
        return proc

    def masters(self, master_ids: list[str], **env: Any) -> dict[str, RoleProcess]:
        """Several masters started together (their workers start side by side), by id."""
        procs = {m: self._start(f"master-{n}", ["master"], master_id=m, **env)
                 for n, m in enumerate(master_ids)}
        workers = int(env.get("workers", self.settings.workers))
        wait_for(lambda: all(self._master_up(p, m, workers) for m, p in procs.items()), 60,
                 "the masters' workers")
        return procs

    # -- views of the farm and the service --------------------------------------------
    def farm(self, path: str = "stats") -> Any:
        return httpx.get(f"{self.central_url}/{path}", timeout=10).json()

    def configure_farm(self, **config: Any) -> None:
        httpx.post(f"{self.central_url}/config", json=config, timeout=10).raise_for_status()

    def master_info(self, master_id: str | None = None) -> dict[str, Any] | None:
        r = connect.redis_sync(self.settings)
        try:
            raw = r.hget(self.settings.keys.masters, master_id or self.settings.master_id)
            return json.loads(raw) if raw else None
        finally:
            r.close()

    def _sim_health(self, proc: RoleProcess) -> bool:
        assert proc.running, f"simulator exited:\n{proc.log_tail()}"
        try:
            return httpx.get(f"{self.central_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _consumer_up(self, proc: RoleProcess) -> bool:
        assert proc.running, f"consumer exited:\n{proc.log_tail()}"
        r = connect.redis_sync(self.settings)
        try:
            return bool(r.hlen(self.settings.keys.consumers))
        finally:
            r.close()

    def _master_up(self, proc: RoleProcess, master_id: str, workers: int) -> bool:
        assert proc.running, f"master exited:\n{proc.log_tail()}"
        info = self.master_info(master_id)
        # The pid tells this master from the entry a stopped one leaves behind.
        return (info is not None and info.get("pid") == proc.pid
                and info.get("workers_alive") == workers)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.running:
                proc.stop(timeout_s=30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(60)}" for p in self.procs)


class Inspect:
    """Synchronous views of Mongo and Redis for assertions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mongo = MongoClient(settings.mongo_url, tz_aware=True)
        self.db = self.mongo.get_default_database("sendscript")
        self.redis = connect.redis_sync(settings)

    def counts(self) -> dict[str, int]:
        return {d["_id"]: d["n"] for d in self.db.script_tasks.aggregate(
            [{"$group": {"_id": "$status", "n": {"$sum": 1}}}])}

    def count(self, status: str) -> int:
        return self.db.script_tasks.count_documents({"status": status})

    def close(self) -> None:
        self.mongo.close()
        self.redis.close()
