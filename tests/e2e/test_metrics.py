"""/metrics during a real run (master, consumer, simulated farm on the embedded
servers) agrees with the tasks in Mongo; every role answers /healthz and /readyz."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from console.metrics import metrics_router
from sendscript import metrics
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import free_port
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, wait_for

pytestmark = pytest.mark.e2e
N = 200


def _scrape(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """sample name -> labels (without role/instance) -> value summed over the roles."""
    response = client.get("/metrics")
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    assert metrics.naming_problems(families) == []
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(
        lambda: defaultdict(float))
    for family in families:
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                  if k not in ("role", "instance")))
            out[s.name][labels] += s.value
    return out


def _total(scraped: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in scraped.get(name, {}).items() if want <= set(k))


def _health(port: int, path: str) -> tuple[int, dict]:
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    return response.status_code, response.json()


def test_metrics_agree_with_mongo_during_a_run(settings: Settings, roles: Roles,
                                               inspect: Inspect) -> None:
    master_port, consumer_port = free_port(), free_port()
    roles.simulator(run_ms=30, jitter=0.5, fail_rate=0.25)
    roles._start("consumer", ["consumer"], consumer_health_port=consumer_port)
    wait_for(lambda: inspect.redis.hlen(settings.keys.consumers), 30, "the consumer")
    app = FastAPI()
    app.include_router(metrics_router(settings))
    client = TestClient(app)
    # Before any master: the lists hold exactly what was pushed.
    with SendScriptClient(settings) as sdk:
        sdk.submit_many([{"device_id": f"dev-{i % 20:02d}", "script": {"id": "tap"},
                          "max_retries": 1, "retry_base_s": 0.1} for i in range(N)])
    inspect.redis.lpush(settings.keys.ready, "not json", json.dumps({"script": {}}))
    before = _scrape(client)
    assert _total(before, "sendscript_queue_length", list="ready") == N + 2
    assert _total(before, "sendscript_queue_length", list="quarantine") == 0
    roles.master(master_health_port=master_port, counts_interval_s=0.5)

    for port, role in ((master_port, "master"), (consumer_port, "consumer")):
        code, body = _health(port, "/healthz")
        assert code == 200 and body["role"] == role and body["status"] == "ok"
        code, body = wait_for(lambda p=port: (lambda r: r if r[0] == 200 else None)(
            _health(p, "/readyz")), 30, f"{role} ready")
        assert all(c["ok"] for c in body["checks"].values())
    assert "workers" in _health(master_port, "/readyz")[1]["checks"]
    assert _health(consumer_port, "/readyz")[1]["checks"]["subscribed"]["ok"]
    assert _health(master_port, "/nothing")[0] == 404

    _scrape(client)  # during the run: scrapes work (and name well) while tasks move
    wait_for(lambda: inspect.count("success") + inspect.count("failed") == N, 240,
             "every task finished", interval_s=0.5)
    success, failed = inspect.count("success"), inspect.count("failed")
    assert failed > 0 and success > 0  # the run had failures and retries
    records = inspect.db.task_exec_records.count_documents({})
    assert records > N  # retries happened

    # Each dispatch made a record, was answered and timed; each result was applied
    # once, timed from its send and from its submit; each retry came from a result.
    expected = {
        ("sendscript_results_applied_total", "outcome", "success"): success,
        ("sendscript_results_applied_total", "outcome", "failed"): failed,
        ("sendscript_results_applied_total", "outcome", "retry"): records - N,
        ("sendscript_tasks", "status", "success"): success,
        ("sendscript_tasks", "status", "failed"): failed,
        ("sendscript_tasks", None, None): N,
        ("sendscript_tasks_dispatched_total", None, None): records,
        ("sendscript_tasks_answered_total", None, None): records,
        ("sendscript_task_queue_wait_seconds_count", None, None): records,
        ("sendscript_task_send_seconds_count", None, None): records,
        ("sendscript_device_run_seconds_count", None, None): records,
        ("sendscript_task_finish_seconds_count", None, None): records,
        ("sendscript_workers_alive", None, None): settings.workers,
        ("sendscript_masters_alive", None, None): 1,
        ("sendscript_consumers_alive", None, None): 1,
        ("sendscript_breaker_state", "state", "closed"): 1,
        ("sendscript_queue_length", "list", "ready"): 0,
        ("sendscript_queue_length", "list", "quarantine"): 2,  # the two malformed items
    }

    def mismatches() -> dict:
        s = _scrape(client)
        got = {k: _total(s, k[0], **({k[1]: k[2]} if k[1] else {})) for k in expected}
        return {k: (got[k], v) for k, v in expected.items() if got[k] != v}

    deadline = time.monotonic() + 30  # published every heartbeat, counted every pass
    while (left := mismatches()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == {}
    assert sum(inspect.counts().values()) == N

    # The CLI's views of the same run.
    env = settings_env(settings, central_url=roles.central_url)
    health = subprocess.run([sys.executable, "-m", "sendscript", "monitor", "health", "--json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr
    assert json.loads(health.stdout)["healthy"] is True
    done = subprocess.run([sys.executable, "-m", "sendscript", "monitor", "progress", "--once",
                           "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout) | {"by_status": None} == {
        "total": N, "done": N, "left": 0, "percent": 100.0, "rate_per_s": None, "eta_s": 0.0,
        "by_status": None}
    roles.stop()  # no master, no consumer: unhealthy, and the exit code says so
    sick = subprocess.run([sys.executable, "-m", "sendscript", "monitor", "health", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert sick.returncode == 1
    failing = {c["check"] for c in json.loads(sick.stdout)["checks"] if not c["ok"]}
    assert {"consumers alive", "central-control"} <= failing
