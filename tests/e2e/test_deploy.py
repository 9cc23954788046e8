"""deploy/supervisord.conf, run for real: supervisord starts the master and the
consumer from it, brings back a master killed with SIGKILL, and stops both cleanly.

The test runs the shipped file itself, its three path roots (install, logs, run)
replaced by the test's own, so the file cannot drift from what is tested.
"""

from __future__ import annotations

import configparser
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import free_port
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

CONF = Path(__file__).resolve().parents[2] / "deploy" / "supervisord.conf"
MASTER = "sendscript-master"
CONSUMER = "sendscript-consumer:sendscript-consumer-0"
# Production roots in the shipped file, as its header documents them.
INSTALL_ROOT, LOG_ROOT, RUN_ROOT = "/opt/sendscript", "/var/log/sendscript", "/run/sendscript"


def render(text: str, *, venv: Path, install: Path, logs: Path, run: Path) -> str:
    """The shipped config with the test's paths in place of the production roots."""
    text = text.replace(f"{INSTALL_ROOT}/.venv", str(venv))
    for root, path in ((INSTALL_ROOT, install), (LOG_ROOT, logs), (RUN_ROOT, run)):
        text = text.replace(root, str(path))
    for root in (INSTALL_ROOT, LOG_ROOT, RUN_ROOT):
        assert root not in text, f"{root} left in the rendered config"
    return text


def shipped() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(CONF)
    return parser


def example_env() -> dict[str, str]:
    """The settings sendscript.env.example sets (not the commented ones)."""
    text = CONF.with_name("sendscript.env.example").read_text()
    return dict(re.findall(r"^SENDSCRIPT_([A-Z0-9_]+)=(.*)$", text, re.MULTILINE))


def test_config_binds_no_tcp_port_and_outwaits_the_roles_own_shutdown() -> None:
    conf = shipped()
    assert "inet_http_server" not in conf.sections()
    assert conf.get("supervisorctl", "serverurl").startswith("unix://")
    # The shipped pair agrees: the example's settings, else the defaults.
    example = example_env()
    settings = Settings(_env_file=None, **{n.lower(): v for n, v in example.items()})
    master = conf[f"program:{MASTER}"]
    # Intake, in-flight sends and the workers' exit may each take a full grace; then
    # each worker still alive gets 4 s to die, and Redis calls their timeout.
    worst = (3 * settings.shutdown_grace_s + 4 * settings.workers
             + 2 * settings.redis_timeout_s)
    assert int(master["stopwaitsecs"]) > worst
    assert master["stopsignal"] == "TERM" and master.getboolean("killasgroup")
    assert not master.getboolean("stopasgroup")
    consumer = conf["program:sendscript-consumer"]
    assert int(consumer["stopwaitsecs"]) > (2 * settings.pulsar_timeout_s
                                            + 2 * settings.redis_timeout_s)


def test_env_example_names_every_setting_with_a_valid_value() -> None:
    example = CONF.with_name("sendscript.env.example").read_text()
    lines = re.findall(r"^(#?) ?SENDSCRIPT_([A-Z0-9_]+)=(.*)$", example, re.MULTILINE)
    named = {name.lower() for _, name, _ in lines}
    assert set(Settings.model_fields) - named == set(), "settings missing from the example"
    assert named - set(Settings.model_fields) == set(), "the example names unknown settings"
    live = {name.lower(): value for hash_, name, value in lines if not hash_}
    Settings(_env_file=None, **live)
    for hash_, name, value in lines:  # each value shown commented out is accepted too
        if hash_:
            Settings(_env_file=None, **{**live, name.lower(): value})


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket, every call under a timeout."""

    def __init__(self, path: str, timeout_s: float = 10.0) -> None:
        super().__init__()
        self.socket_path = path
        self.timeout_s = timeout_s

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self.socket_path, self.timeout_s)


class Supervisord:
    """supervisord run from a rendered config. Control goes through supervisorctl;
    polling reads process info over the same socket. Every process it started is
    remembered, so that tear-down leaves none behind whatever happened."""

    def __init__(self, conf: Path, socket_path: Path, env: dict[str, str], out: Path) -> None:
        self.conf = conf
        self.socket_path = socket_path
        self.env = env
        self.out = out
        self.bin = Path(sys.prefix) / "bin"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bin / "supervisord"), "-c", str(self.conf), "-n"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "supervisorctl"), "-c", str(self.conf), *args],
            env=self.env, capture_output=True, text=True, timeout=150,
        )

    def states(self) -> dict[str, str]:
        """Program -> state, as `supervisorctl status` shows them."""
        lines = self.ctl("status").stdout.splitlines()
        return {parts[0]: parts[1] for parts in (line.split() for line in lines) if parts}

    def info(self, name: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.poll() is None, "supervisord exited"
        proxy = xmlrpc.client.ServerProxy("http://localhost",
                                          transport=_UnixTransport(str(self.socket_path)))
        with proxy:
            info: dict[str, Any] = proxy.supervisor.getProcessInfo(name)
        assert info["statename"] != "FATAL", f"{name} FATAL: {info['spawnerr']}"
        return info

    def pid(self, name: str) -> int:
        """The program's pid while it runs, else 0; remembers what it started."""
        pid = int(self.info(name)["pid"])
        if pid:
            self.remember()
        return pid

    def remember(self) -> None:
        assert self.proc is not None
        try:
            for child in self.process.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def tear_down(self) -> None:
        """SIGKILL supervisord and every group it started: nothing survives the test."""
        if self.proc is None:
            return
        self.remember()
        own_group = os.getpgid(0)
        if self.proc.poll() is None:
            self.proc.kill()
        for child in self.seen.values():
            try:
                if not child.is_running():  # also false for a recycled pid
                    continue
                group = os.getpgid(child.pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)  # late-spawned workers too
                child.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        self.proc.wait(30)
        psutil.wait_procs(list(self.seen.values()), timeout=30)


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """A sendscript host in miniature: install dir, log dir, run dir."""
    dirs = {name: tmp_path / name for name in ("install", "logs", "run")}
    for path in dirs.values():
        path.mkdir()
    sock = dirs["run"] / "supervisor.sock"
    assert len(str(sock)) < 100, f"unix socket path too long: {sock}"
    return dirs


@pytest.fixture
def supervisord(host: dict[str, Path]) -> Iterator[Supervisord]:
    conf = host["install"] / "supervisord.conf"
    conf.write_text(render(CONF.read_text(), venv=Path(sys.prefix), **host))
    # The roles must get their settings from the .env file, not from us.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDSCRIPT_")}
    sv = Supervisord(conf, host["run"] / "supervisor.sock", env,
                     host["logs"] / "supervisord.out")
    try:
        yield sv
    finally:
        sv.tear_down()
        for log in sorted(host["logs"].glob("*.log")):  # shown when the test failed
            print(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-40:]))


def write_env_file(path: Path, settings: Settings) -> None:
    lines = []
    for name, value in sorted(settings.to_env().items()):
        assert not re.search(r"[\s#'\"]", value), (name, value)
        lines.append(f"{name}={value}")
    path.write_text("\n".join(lines) + "\n")


def spec(device: str, n: int) -> dict[str, object]:
    return {"device_id": device, "script": {"id": "tap", "args": {"n": n}}}


@pytest.mark.e2e
def test_supervised_master_restarts_after_sigkill_and_all_stop_cleanly(
    settings: Settings, roles: Roles, inspect: Inspect, host: dict[str, Path],
    supervisord: Supervisord,
) -> None:
    roles.simulator(run_ms=150, jitter=0.2)
    assert roles.central_url
    # Ports of their own: `sendscript up` in another test may hold the default ones.
    role_settings = settings.model_copy(update={"central_url": roles.central_url,
                                                "console_port": free_port(),
                                                "agents_port": free_port()})
    write_env_file(host["install"] / ".env", role_settings)
    run_supervised(settings, roles, inspect, host, supervisord)


def master_up(sv: Supervisord, roles: Roles, pid: int, workers: int) -> bool:
    """The master supervisord runs as `pid` heartbeats with all its workers online."""
    assert sv.pid(MASTER) == pid, "the master exited"
    info = roles.master_info()
    return info is not None and info.get("pid") == pid and info.get("workers_alive") == workers


def run_supervised(settings: Settings, roles: Roles, inspect: Inspect, host: dict[str, Path],
                   sv: Supervisord) -> None:
    sv.start()
    wait_for(lambda: (host["run"] / "supervisor.sock").exists(), 30, "the control socket")
    first = wait_for(lambda: sv.pid(MASTER), 30, "supervisord to start the master")
    # The roles read the .env file: the master heartbeats under the id it names.
    wait_for(lambda: master_up(sv, roles, first, settings.workers), 60, "the master's workers",
             interval_s=0.3)
    wait_for(lambda: sv.pid(CONSUMER) and inspect.redis.hlen(settings.keys.consumers), 60,
             "the consumer", interval_s=0.3)
    wait_for(lambda: all(sv.info(n)["statename"] == "RUNNING" for n in (MASTER, CONSUMER)), 30,
             "both programs RUNNING (past startsecs)", interval_s=0.3)
    assert not sv.process.net_connections(kind="inet"), "supervisord must bind no TCP port"
    # The master leads a process group holding its workers: what killasgroup reaches.
    sv.remember()
    first_workers = psutil.Process(first).children()
    assert len(first_workers) >= settings.workers
    assert all(os.getpgid(p.pid) == first for p in [psutil.Process(first), *first_workers])

    total = 120
    with SendScriptClient(settings) as client:
        client.submit_many([spec(f"dev-{i % 10:02d}", i) for i in range(total)])
    # Kill while the master holds queued work, not after the run is over.
    wait_for(lambda: inspect.count("success") >= 15, 60, "the first successes")
    os.kill(first, signal.SIGKILL)
    assert inspect.count("success") < total, "the kill came too late to prove anything"

    second = wait_for(lambda: (pid := sv.pid(MASTER)) not in (0, first) and pid, 30,
                      "supervisord to restart the master", interval_s=0.2)
    wait_for(lambda: master_up(sv, roles, second, settings.workers), 60,
             "the new master's workers", interval_s=0.3)
    # The killed master's workers finish what they hold and go: none is orphaned for good.
    psutil.wait_procs(first_workers, timeout=30)
    assert not [p for p in first_workers if p.is_running()], "a dead master's worker stayed"

    wait_for(lambda: inspect.count("success") == total, 60, "every task to succeed",
             interval_s=0.5)
    assert inspect.counts() == {"success": total}
    farm = roles.farm()
    assert farm["accepted"] == total, "each script ran once"
    assert farm["overlaps"] == 0
    assert sv.pid(MASTER) == second, "the master restarted again"

    second_group = [psutil.Process(second), *psutil.Process(second).children(recursive=True)]
    stop = sv.ctl("stop", "all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    # The HTTP roles (agents, console) run beside them and stop as cleanly.
    others = ("sendscript-agents", "sendscript-console")
    assert sv.states() == dict.fromkeys((MASTER, CONSUMER, *others), "STOPPED")
    for name in (MASTER, CONSUMER, "sendscript-console"):
        info = sv.info(name)
        assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), info
    log = (host["logs"] / "supervisord.log").read_text()
    # supervisord reports a clean exit as "exit status 0", a signal by its name.
    assert f"stopped: {MASTER} (exit status 0)" in log, log
    assert "stopped: sendscript-consumer-0 (exit status 0)" in log, log
    assert f"exited: {MASTER} (terminated by SIGKILL; not expected)" in log, log
    assert "with SIGKILL" not in log, "a stop needed supervisord's SIGKILL"
    psutil.wait_procs(second_group, timeout=10)
    assert not [p for p in second_group if p.is_running()], "a worker outlived its master"

    master_log = (host["logs"] / "master.log").read_text()
    assert f"master {settings.master_id} stopped" in master_log
    for key in (settings.keys.processing(settings.master_id),
                settings.keys.staging(settings.master_id), settings.keys.ready):
        assert inspect.redis.llen(key) == 0, key

    shutdown = sv.ctl("shutdown")
    assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
    assert sv.proc is not None and sv.proc.wait(30) == 0
