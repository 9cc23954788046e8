"""Crash-shaped faults with the service running as processes on the real servers: a
worker that hangs (its process stopped, or a send that never returns) is killed by
its master and its tasks finish; central-control unreachable for a while costs no
attempt."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pulsar
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers, free_port
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, unique_settings, wait_for

pytestmark = pytest.mark.e2e

FAST = {"free_check_interval_s": 1.0, "sweep_interval_s": 0.5, "heartbeat_ttl_s": 3.0}


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **FAST)


def worker_pids(roles: Roles) -> list[int]:
    info = roles.master_info() or {}
    return [int(name.rsplit(":", 1)[1]) for name in info.get("worker_names", [])]


def outcomes(roles: Roles) -> dict[str, int]:
    return (roles.master_info() or {}).get("outcomes", {})


def master_log(proc: RoleProcess) -> str:
    assert proc.log_path is not None
    return proc.log_path.read_text(errors="replace")


def status_of(inspect: Inspect, task_id: str) -> str | None:
    doc = inspect.db.script_tasks.find_one({"_id": task_id}, {"status": 1})
    return doc["status"] if doc else None


def records_of(inspect: Inspect, task_id: str) -> list[dict[str, Any]]:
    return list(inspect.db.task_exec_records.find({"task_id": task_id}))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_stopped_worker_is_killed_replaced_and_its_tasks_finish(
    settings: Settings, roles: Roles, inspect: Inspect,
) -> None:
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    master = roles.master(worker_timeout_s=3.0)
    stopped = worker_pids(roles)[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        with SendScriptClient(settings) as client:
            ids = [client.submit(f"stop-{i}", {"id": "x"}).task_id for i in range(8)]
        wait_for(lambda: all(status_of(inspect, t) == "success" for t in ids), 90,
                 "every task to succeed")
        wait_for(lambda: (p := worker_pids(roles)) and len(p) == 2
                        and stopped not in p and p, 60, "two workers online, one of them new")
    finally:
        if alive(stopped):
            os.kill(stopped, signal.SIGCONT)
    log = master_log(master)
    [hung] = [line for line in log.splitlines() if "is hung" in line]
    assert f":{stopped} is hung: no heartbeat for " in hung and "killing it (SIGKILL)" in hung
    silent = float(re.search(r"no heartbeat for ([\d.]+)s", hung).group(1))  # type: ignore[union-attr]
    assert 3.0 <= silent < 3.0 + 10.0, "killed once silent past the limit, not much later"
    held = int(re.search(r"It held (\d+) task", hung).group(1))  # type: ignore[union-attr]
    assert held >= 1, "the balancer gave the stopped worker some of the tasks"
    assert f"killed as hung (exit code -9); recovering its {held} task(s)" in log
    assert not alive(stopped)
    for task_id in ids:  # the stopped worker never ran them: one attempt each
        doc = inspect.db.script_tasks.find_one({"_id": task_id})
        assert doc["attempt"] == 1
        assert [r["attempt"] for r in records_of(inspect, task_id)] == [1]
    farm = roles.farm()
    assert farm["accepted"] == 8 and farm["refused_busy"] == 0


class SlowFarm:
    """A central-control whose first answer never ends (one byte at a time, so no read
    times out); later sends are accepted at once. Each request is kept."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.closing = threading.Event()
        farm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                farm.requests.append(body)
                if len(farm.requests) == 1:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    while not farm.closing.wait(0.2):
                        try:
                            self.wfile.write(b"z")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                answer = b'{"success": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowFarm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def report(settings: Settings, request: dict[str, Any], log_type: str = "SUCCESS") -> None:
    """What the device does once it has run the script: its result on the topic."""
    client = pulsar.Client(settings.pulsar_url or "", operation_timeout_seconds=10,
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        producer = client.create_producer(settings.task_log_topic, send_timeout_millis=10_000)
        producer.send(json.dumps({
            "recordId": request["recordId"], "taskId": request["taskId"],
            "deviceId": request["deviceId"], "logType": log_type, "message": "done",
            "timestamp": int(time.time() * 1000)}).encode())
        producer.close()
    finally:
        client.close()


@pytest.fixture
def slow_farm(settings: Settings) -> Iterator[tuple[SlowFarm, Settings]]:
    with SlowFarm() as farm:
        yield farm, settings.model_copy(update={"central_url": farm.url})


def test_a_send_that_never_returns_is_killed_and_the_task_is_not_sent_again(
    slow_farm: tuple[SlowFarm, Settings], inspect: Inspect, tmp_path: Path,
) -> None:
    farm, settings = slow_farm
    roles = Roles(settings, tmp_path / "logs")
    try:
        _send_never_returns(farm, settings, roles, inspect)
    except BaseException:
        print(roles.logs())
        raise
    finally:
        roles.stop()


def _send_never_returns(farm: SlowFarm, settings: Settings, roles: Roles,
                        inspect: Inspect) -> None:
    roles.consumer()
    # Short store and central-control timeouts: a short task limit (about 22 s).
    master = roles.master(worker_timeout_s=3.0, redis_timeout_s=1.0, mongo_timeout_s=2.0,
                          central_connect_timeout_s=1.0, central_timeout_s=1.0)
    first_pids = worker_pids(roles)
    with SendScriptClient(settings) as client:
        task_id = client.submit("slow-1", {"id": "x"}).task_id
        wait_for(lambda: farm.requests, 30, "the send to reach central-control")
        wait_for(lambda: "is hung" in master_log(master), 90, "the master to kill the worker")
        # Recovered as a dead worker's: its exec record says a send may have reached
        # central-control, so it waits for its result with its lock held (no retry
        # that would only find the device busy, never a second send).
        wait_for(lambda: "may have been sent" in master_log(master), 60,
                 "the lost task to be left waiting for its result")
        assert status_of(inspect, task_id) == "running" and len(farm.requests) == 1
        report(settings, farm.requests[0])  # the device ran it after all
        wait_for(lambda: status_of(inspect, task_id) == "success", 60, "the task to succeed")
        # The replacement worker serves the device next.
        after = client.submit("slow-1", {"id": "y"}).task_id
        wait_for(lambda: len(farm.requests) == 2, 60, "the next task's send")
        report(settings, farm.requests[1])
        wait_for(lambda: status_of(inspect, after) == "success", 60, "the next task to succeed")
    log = master_log(master)
    [hung] = [line for line in log.splitlines() if "is hung" in line]
    assert f"task {task_id} in its hands for " in hung and "a step that never returns" in hung
    assert f"It held 1 task(s): {task_id} (device slow-1, attempt 0)" in hung
    assert [r["taskId"] for r in farm.requests] == [task_id, after], "sent once, not again"
    doc = inspect.db.script_tasks.find_one({"_id": task_id})
    assert doc["attempt"] == 1
    [rec] = records_of(inspect, task_id)
    assert rec["attempt"] == 1 and rec["status"] == "success"
    assert rec["_id"] == farm.requests[0]["recordId"]
    killed = int(re.search(r":(\d+) is hung", hung).group(1))  # type: ignore[union-attr]
    assert killed in first_pids and not alive(killed)
    # A heartbeat lists the workers online then; under load one may be a beat behind.
    wait_for(lambda: len(pids := worker_pids(roles)) == 2 and killed not in pids, 30,
             "two workers online, the hung one replaced")


def test_central_unreachable_for_a_while_then_the_task_succeeds_on_its_first_attempt(
    inspect: Inspect, tmp_path: Path,
) -> None:
    port = free_port()
    settings = inspect.settings.model_copy(update={"central_url": f"http://127.0.0.1:{port}"})
    roles = Roles(settings, tmp_path / "logs")
    try:
        roles.consumer()
        master = roles.master()
        with SendScriptClient(settings) as client:
            task_id = client.submit("away-1", {"id": "x"}, max_retries=1).task_id
        # More refused connects than the task has attempts.
        wait_for(lambda: outcomes(roles).get("unsent", 0) >= 3, 60, "three unsent tries")
        doc = inspect.db.script_tasks.find_one({"_id": task_id})
        assert doc["status"] == "pending" and doc["attempt"] == 0
        assert "not sent (ConnectError" in doc["last_error"]
        assert records_of(inspect, task_id) == []
        sim = RoleProcess("simulator", ["simulate", "--port", str(port), "--run-ms", "20",
                                        "--no-progress"],
                          settings_env(settings), tmp_path / "logs").start()
        roles.procs.append(sim)
        wait_for(lambda: _healthy(settings.central_url or ""), 30, "the simulator")
        wait_for(lambda: status_of(inspect, task_id) == "success", 60, "the task to succeed")
        doc = inspect.db.script_tasks.find_one({"_id": task_id})
        assert doc["attempt"] == 1
        [rec] = records_of(inspect, task_id)
        assert rec["attempt"] == 1 and rec["status"] == "success"
        assert roles.farm()["requests"] == 1
        assert "central-control unreachable" in master_log(master)  # said once, by the worker
    except BaseException:
        print(roles.logs())
        raise
    finally:
        roles.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
