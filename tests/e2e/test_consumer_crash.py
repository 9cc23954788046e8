"""The task-log consumer as a process: SIGKILLed mid-batch, killed in a loop under load
(one of them hung first, which the embedded broker mishandles), two at once, and stopped
by SIGTERM while a server it needs does not answer."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pulsar
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers, PulsarServer, free_port
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, unique_settings, wait_for

pytestmark = pytest.mark.e2e


def spec(device: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"device_id": device, "script": {"id": "tap", "args": {"n": n}}, **extra}


def consumer_entry(inspect: Inspect, proc: RoleProcess) -> dict[str, Any] | None:
    """The heartbeat of this consumer process: it has subscribed and is consuming."""
    raw = inspect.redis.hget(inspect.settings.keys.consumers, f"{socket.gethostname()}:{proc.pid}")
    return json.loads(raw) if raw else None


def start_consumer(roles: Roles, inspect: Inspect, name: str) -> RoleProcess:
    # roles.consumer() would take a killed consumer's heartbeat for this one's.
    proc = roles._start(name, ["consumer"])
    wait_for(lambda: (proc.running and consumer_entry(inspect, proc)) or not proc.running, 60,
             f"{name} to subscribe")
    assert proc.running, f"{name} exited:\n{proc.log_tail()}"
    return proc


def torn_results(inspect: Inspect) -> int:
    """SUCCESS logs saved whose task the consumer has not moved yet: what a kill
    between a batch's first write and its last leaves."""
    logged = set(inspect.db.task_logs.distinct("task_id", {"log_type": "SUCCESS"}))
    done = set(inspect.db.script_tasks.distinct("_id", {"status": "success"}))
    return len(logged - done)


def assert_every_task_succeeded_once(settings: Settings, roles: Roles, inspect: Inspect,
                                     n: int) -> None:
    assert inspect.counts() == {"success": n}
    tasks = list(inspect.db.script_tasks.find({}, {"attempt": 1, "finished_at": 1}))
    assert {t["attempt"] for t in tasks} == {1}, "no task was sent twice"
    records = list(inspect.db.task_exec_records.find())
    assert len(records) == n and len({r["task_id"] for r in records}) == n
    assert {r["status"] for r in records} == {"success"}
    assert all(r["finished_at"] and r["sent_at"] for r in records)
    success_logs = Counter(d["task_id"] for d in inspect.db.task_logs.find(
        {"log_type": "SUCCESS"}, {"task_id": 1}))
    assert len(success_logs) == n and set(success_logs.values()) == {1}
    farm = roles.farm()
    assert farm["accepted"] == n, "each script ran once on its device"
    assert farm["overlaps"] == 0
    assert not list(inspect.redis.scan_iter(match=settings.keys.device_lock_pattern))
    stats = inspect.redis.hgetall(settings.keys.stats)
    assert int(stats.get(b"dead_lettered", 0)) == 0


@pytest.fixture
def big_batches(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, consumer_batch=500, consumer_batch_wait_ms=200)


@pytest.fixture
def crash_roles(big_batches: Settings, tmp_path: Path) -> Any:
    r = Roles(big_batches, tmp_path / "logs")
    yield r
    r.stop()


def test_consumer_sigkilled_mid_batch_applies_the_redelivered_logs_once(
    big_batches: Settings, crash_roles: Roles,
) -> None:
    settings, roles, n = big_batches, crash_roles, 800
    inspect = Inspect(settings)
    try:
        roles.simulator(run_ms=20, jitter=0.5)
        consumer = start_consumer(roles, inspect, "consumer")
        roles.master()
        with SendScriptClient(settings) as client:
            client.submit_many([spec(f"dev-{i % 80:02d}", i) for i in range(n)])
        torn_kills = 0
        for cycle in range(1, 7):
            # Results are flowing and a batch is half applied: its logs are saved,
            # its tasks not yet moved. Kill the consumer right there.
            floor = inspect.count("success")
            wait_for(lambda f=floor: inspect.count("success") > f and torn_results(inspect), 60,
                     "a batch half applied", interval_s=0.05)
            consumer.kill()
            torn_kills += torn_results(inspect) > 0
            consumer = start_consumer(roles, inspect, f"consumer-{cycle}")
            if torn_kills >= 2 or inspect.count("success") > n * 0.8:
                break
        assert torn_kills >= 1, "no kill landed in the middle of a batch"

        wait_for(lambda: inspect.count("success") == n, 180, f"{n} successes", interval_s=0.5)
        assert_every_task_succeeded_once(settings, roles, inspect, n)
    finally:
        inspect.close()


@pytest.mark.timeout(600)
def test_crash_loop_every_restart_subscribes_and_applies_until_every_task_finishes(
    servers: EmbeddedServers, settings: Settings, roles: Roles, inspect: Inspect,
) -> None:
    # 20 devices at 400 ms a script run at most 50 tasks/s: 1500 tasks outlast the six
    # kills about 5 s apart however fast the machine is.
    n, devices = 1500, 20
    broker = servers["pulsar"]
    assert isinstance(broker, PulsarServer)
    roles.simulator(run_ms=400, jitter=0.5)
    consumer = start_consumer(roles, inspect, "consumer")
    roles.master()
    with SendScriptClient(settings) as client:
        client.submit_many([spec(f"dev-{i % devices:02d}", i) for i in range(n)])
    applied_after: list[int] = []
    for cycle in range(1, 7):
        started = time.monotonic()
        before = inspect.count("success")
        # The restarted consumer applies results again (its own counter proves it
        # is this process that did), then dies like the others, about every 5 s.
        wait_for(lambda c=consumer: (consumer_entry(inspect, c) or {}).get("applied", 0) > 0,
                 60, f"consumer {cycle} to apply results", interval_s=0.05)
        time.sleep(max(0.0, 5 - (time.monotonic() - started)))
        if inspect.count("success") == n:
            break
        heals = broker.heals
        if cycle == 3:
            # This one hangs first, so the broker's deliveries wait unread in its
            # socket: killed so, its connection ends with a reset, which pulsar-lite
            # mishandles (see PulsarServer) and the embedded broker heals.
            consumer.signal(signal.SIGSTOP)
            published = roles.farm()["published"]
            wait_for(lambda p=published: roles.farm()["published"] >= p + 5, 30,
                     "results sent to the hung consumer")
        consumer.kill()
        if cycle == 3:
            wait_for(lambda h=heals: broker.heals > h, 15, "the broker to restart")
        applied_after.append(inspect.count("success") - before)
        consumer = start_consumer(roles, inspect, f"consumer-{cycle}")
    assert len(applied_after) >= 5, f"only {len(applied_after)} kills under load"
    assert all(applied_after), applied_after
    wait_for(lambda: inspect.count("success") == n, 400, f"{n} successes", interval_s=0.5)
    # Nothing waited for a result timeout: what each dead consumer held came back.
    assert_every_task_succeeded_once(settings, roles, inspect, n)
    # The last consumer is alive and consuming: it is in the heartbeats.
    assert consumer.running and consumer_entry(inspect, consumer)


def test_two_consumers_share_the_subscription(
    settings: Settings, roles: Roles, inspect: Inspect,
) -> None:
    # pulsar-lite refuses a second consumer under the first one's id (the client's,
    # 0 in every process); the second takes the next id and both consume.
    n = 200
    roles.simulator(run_ms=20)
    first = start_consumer(roles, inspect, "consumer-a")
    second = start_consumer(roles, inspect, "consumer-b")
    roles.master()
    with SendScriptClient(settings) as client:
        client.submit_many([spec(f"dev-{i % 20:02d}", i) for i in range(n)])
    wait_for(lambda: inspect.count("success") == n, 120, f"{n} successes", interval_s=0.5)
    assert first.running and second.running
    assert "consumer id 1" in second.log_tail(200)
    wait_for(lambda: all((consumer_entry(inspect, c) or {}).get("saved", 0) > 0
                         for c in (first, second)), 10, "both consumers to have saved logs")


def closed_url(scheme: str) -> str:
    """A URL where nothing listens."""
    return f"{scheme}://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("down", ["pulsar", "mongo", "redis"])
def test_sigterm_stops_a_consumer_whose_server_does_not_answer(
    down: str, settings: Settings, tmp_path: Path,
) -> None:
    env: dict[str, Any] = {}
    if down == "pulsar":
        env["pulsar_url"] = closed_url("pulsar")
        waits_on = "pulsar broker"
    else:
        env[f"{down}_url"] = closed_url("mongodb" if down == "mongo" else "redis")
        waits_on = "batches negatively acked"
        # Something to apply, so that the consumer needs the server that is away: a
        # result for Mongo, a malformed log (counted in Redis) for Redis.
        client = pulsar.Client(settings.pulsar_url or "",
                               logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
        try:
            producer = client.create_producer(settings.task_log_topic)
            producer.send(b"{oops" if down == "redis" else json.dumps({
                "recordId": "r-1", "taskId": "t-1", "deviceId": "d-1", "logType": "SUCCESS",
                "message": "ok", "timestamp": 1}).encode())
        finally:
            client.close()
    # Shorter than any of the timeouts the consumer waits on (10 s): only a wait
    # that ends when told to stop lets it go in time.
    grace_s = 3.0
    proc = RoleProcess("consumer", ["consumer"],
                       settings_env(settings, shutdown_grace_s=grace_s, **env), tmp_path).start()
    try:
        wait_for(lambda: waits_on in (proc.log_tail(200) or "") or not proc.running, 60,
                 f"the consumer to retry {down}")
        assert proc.running, proc.log_tail()
        proc.signal(signal.SIGTERM)
        code = proc.wait(grace_s)
        assert code == 0, f"exit {code} after SIGTERM:\n{proc.log_tail()}"
        assert "consumer stopped" in proc.log_tail(50)
    finally:
        proc.kill_group()
