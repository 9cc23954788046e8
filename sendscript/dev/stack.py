"""Everything on one host: embedded servers where no URL is set, then the roles.

Used by `sendscript up` and `sendscript demo`, and by tests and benchmarks that
want the service as a user would run it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis

from sendscript import connect
from sendscript.dev.embedded import SERVERS, URL_SETTING, EmbeddedServers, free_port
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.settings import Settings


class LocalStack:
    def __init__(
        self,
        settings: Settings,
        *,
        workers: int | None = None,
        sim_args: Sequence[str] = (),
        data_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        agents: bool = False,
        console: bool = False,
    ) -> None:
        self.settings = settings
        self.workers = workers or settings.workers
        self.sim_args = list(sim_args)
        self.data_dir = Path(data_dir or settings.data_dir).absolute()
        self.extra_env = extra_env or {}
        self.servers: EmbeddedServers | None = None
        self.roles: dict[str, RoleProcess] = {}
        self.env: dict[str, str] = {}
        self.central_url = settings.central_url
        self.agents = agents  # also run the pull-mode agents API (`sendscript up` does)
        # Also run the console (`up`, `demo`) on SENDSCRIPT_CONSOLE_PORT (0: a free port).
        self.console = console
        self.console_url: str | None = None

    def start(self, log_dir: Path | None) -> None:
        missing = [n for n in SERVERS if not getattr(self.settings, URL_SETTING[n])]
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.update(self.extra_env)
        env["SENDSCRIPT_WORKERS"] = str(self.workers)
        if missing:
            self.servers = EmbeddedServers(self.data_dir, missing)
            env.update(self.servers.env())
            self.servers.start()
        try:
            if not self.central_url:
                port = free_port()
                self.central_url = f"http://127.0.0.1:{port}"
                env["SENDSCRIPT_CENTRAL_URL"] = self.central_url
                self.env = env
                self.start_role("simulator", ["simulate", "--port", str(port), *self.sim_args],
                                log_dir)
                wait_until(self._simulator_up, 60, what="the simulator")
            self.env = env
            self.start_role("consumer", ["consumer"], log_dir)
            self.start_role("master", ["master"], log_dir)
            if self.agents:
                self.start_role("agents", ["agents"], log_dir)
            wait_until(self._master_up, 90, 0.2, what="the master and its workers")
            if self.console:
                self._start_console(log_dir)
        except Exception:
            self.stop()
            raise

    def start_role(self, name: str, args: list[str], log_dir: Path | None) -> RoleProcess:
        self.roles[name] = RoleProcess(name, args, self.env, log_dir).start()
        return self.roles[name]

    @property
    def effective(self) -> Settings:
        """Settings as the roles see them (embedded URLs filled in)."""
        overrides = {k.removeprefix("SENDSCRIPT_").lower(): v for k, v in self.env.items()
                     if k.startswith("SENDSCRIPT_")}
        return self.settings.model_copy(update={
            k: v for k, v in overrides.items() if k in Settings.model_fields
            and k in ("redis_url", "mongo_url", "pulsar_url", "central_url")
        })

    def _start_console(self, log_dir: Path | None) -> None:
        port = int(self.env.get("SENDSCRIPT_CONSOLE_PORT", self.settings.console_port)) \
            or free_port()
        self.env = {**self.env, "SENDSCRIPT_CONSOLE_PORT": str(port)}
        host = self.env.get("SENDSCRIPT_CONSOLE_HOST", self.settings.console_host)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.console_url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
        self.start_role("console", ["console"], log_dir)
        wait_until(self._console_up, 60, 0.2, what="the console")

    def _console_up(self) -> bool:
        role = self.roles["console"]
        if not role.running:
            raise RuntimeError(f"console exited during start:\n{role.log_tail()}")
        try:
            return httpx.get(f"{self.console_url}openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _simulator_up(self) -> bool:
        try:
            return httpx.get(f"{self.central_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _master_up(self) -> bool:
        for name in ("master", "consumer"):
            role = self.roles.get(name)
            if role is not None and not role.running:
                raise RuntimeError(f"{name} exited during start:\n{role.log_tail()}")
        return self._heartbeats(self.roles["master"], self.settings.master_id)

    def start_masters(self, master_ids: Sequence[str], log_dir: Path | None) -> list[RoleProcess]:
        """More masters beside the stack's own, one per id; returns once each heartbeats
        with all its workers alive. The caller stops them (all of them, if this raises)."""
        started: list[RoleProcess] = []
        try:
            for master_id in master_ids:
                env = {**self.env, "SENDSCRIPT_MASTER_ID": master_id}
                started.append(RoleProcess(master_id, ["master"], env, log_dir).start())
            for proc, master_id in zip(started, master_ids, strict=True):
                wait_until(lambda p=proc, m=master_id: self._heartbeats(p, m), 90, 0.2,
                           what=f"master {master_id}")
        except Exception:
            for proc in started:
                proc.stop(timeout_s=60)
            raise
        return started

    def _heartbeats(self, role: RoleProcess, master_id: str) -> bool:
        if not role.running:
            raise RuntimeError(f"{master_id} exited during start:\n{role.log_tail()}")
        settings = self.effective
        client = connect.redis_sync(settings)
        try:
            raw = client.hget(settings.keys.masters, master_id)
            info = json.loads(raw) if raw else {}
            # The pid tells our master from the entry an earlier run left behind.
            return info.get("pid") == role.pid and info.get("workers_alive") == self.workers
        except redis.RedisError:
            return False
        finally:
            client.close()

    def simulator_stats(self) -> dict:
        return httpx.get(f"{self.central_url}/stats", timeout=10).json()

    def describe(self) -> str:
        s = self.effective
        parts = [f"redis {s.redis_url}", f"mongo {s.mongo_url}", f"pulsar {s.pulsar_url}",
                 f"central {self.central_url}"]
        if self.console_url:
            parts.append(f"console {self.console_url}")
        if self.servers:
            parts.append(f"data in {self.data_dir}")
        return ", ".join(parts)

    def dead_roles(self) -> list[str]:
        return [name for name, role in self.roles.items() if not role.running]

    def stop(self) -> None:
        for name in ("console", "agents", "master", "consumer", "simulator"):
            role = self.roles.get(name)
            if role is not None:
                role.stop(timeout_s=max(30.0, self.settings.shutdown_grace_s + 10))
        if self.servers is not None:
            self.servers.stop()
