"""The whole service as separate processes on the embedded servers."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections import defaultdict

import pulsar
import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e


def spec(device: str, n: int, **extra: object) -> dict:
    return {"device_id": device, "script": {"id": "tap", "args": {"n": n}}, **extra}


def assert_no_overlap(runs: list[dict]) -> None:
    by_device: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_device[run["device_id"]].append(run)
    for device, device_runs in by_device.items():
        device_runs.sort(key=lambda r: r["started"])
        for a, b in itertools.pairwise(device_runs):
            assert a["ended"] is not None and a["ended"] <= b["started"], (device, a, b)


def test_2000_tasks_over_100_devices(settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.5)
    roles.consumer()
    roles.master()
    # Half as a non-Python producer would send them: raw JSON on the list.
    raw = [json.dumps(spec(f"dev-{i % 100:03d}", i)) for i in range(1000)]
    for start in range(0, len(raw), 250):
        inspect.redis.lpush(settings.keys.ready, *raw[start:start + 250])
    with SendScriptClient(settings) as client:
        sdk = client.submit_many([spec(f"dev-{i % 100:03d}", i) for i in range(1000, 2000)])
    assert len({s.task_id for s in sdk}) == 1000

    wait_for(lambda: inspect.count("success") == 2000, 240, "2000 successes", interval_s=0.5)
    assert inspect.counts() == {"success": 2000}

    farm = roles.farm()
    assert farm["accepted"] == 2000
    assert farm["refused_busy"] == 0 and farm["overlaps"] == 0
    assert_no_overlap(roles.farm("runs"))

    records = list(inspect.db.task_exec_records.find())
    assert len(records) == 2000
    assert {r["status"] for r in records} == {"success"}
    assert all(r.get("sent_at") and r["attempt"] == 1 for r in records)
    by_task = {r["task_id"]: r for r in records}
    assert len(by_task) == 2000
    # Mongo's own view of invariant 1: a device's records never overlap in time.
    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_device[r["device_id"]].append(r)
    for device_records in by_device.values():
        device_records.sort(key=lambda r: r["lock_value"])
        for a, b in itertools.pairwise(device_records):
            assert a["finished_at"] <= b["started_at"]
    success_logs = inspect.db.task_logs.count_documents({"log_type": "SUCCESS"})
    assert success_logs == 2000
    assert set(inspect.db.task_logs.distinct("task_id")) == set(by_task)
    # Every lock is released, nothing waits in any queue.
    assert not list(inspect.redis.scan_iter(match=settings.keys.device_lock_pattern))
    assert inspect.redis.llen(settings.keys.ready) == 0
    assert inspect.redis.llen(settings.keys.processing(settings.master_id)) == 0


def test_worker_killed_mid_task_is_replaced_and_task_completes(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    # The farm starts the script at once but answers the send late (within the
    # worker's central timeout), so the worker is killed while it still holds the task.
    roles.simulator(run_ms=3000, jitter=0, accept_delay_ms=8000, progress=False)
    roles.consumer()
    roles.master()
    with SendScriptClient(settings) as client:
        task_id = client.submit("dev-kill", {"id": "long"}).task_id
    record = wait_for(lambda: inspect.db.task_exec_records.find_one({"task_id": task_id}),
                      20, "the exec record")
    # The record is written before the POST leaves: a kill between the two is a task
    # that may have been sent, left to its result timeout (test_crash_recovery). Here
    # the POST must have reached the farm first (it counts a send as it receives it).
    wait_for(lambda: roles.farm()["accepted"] == 1, 20, "the send to reach the farm")
    victim = int(record["worker"].rsplit(":", 1)[1])
    before = roles.master_info()
    os.kill(victim, signal.SIGKILL)

    wait_for(lambda: inspect.count("success") == 1, 60, "the task to succeed")
    task = inspect.db.script_tasks.find_one({"_id": task_id})
    assert task["status"] == "success"
    farm = roles.farm()
    assert farm["accepted"] == 1, "the script ran once on the device"
    assert farm["refused_busy"] == 0
    info = wait_for(lambda: (i := roles.master_info()) and i["workers_alive"] == 2 and i, 30,
                    "the replacement worker")
    assert info["outcomes"].get("lost") == 1
    assert before is not None and info["pid"] == before["pid"]


def test_malformed_inputs_are_quarantined_and_the_rest_completes(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20)
    roles.consumer()
    roles.master()
    bad_items = [
        "this is not json",
        "[1, 2, 3]",
        json.dumps({"device_id": "", "script": {"id": "x"}}),
        json.dumps({"device_id": "d1"}),
        json.dumps({"device_id": "d1", "script": {"id": "x"}, "priority": 99}),
        json.dumps({"device_id": "d1", "script": "not an object"}),
        json.dumps({"task_id": "no-such-task"}),
        json.dumps({"device_id": "d1", "script": {}, "run_at": "yesterday-ish"}),
    ]
    good = [json.dumps(spec(f"dev-{i % 10}", i)) for i in range(100)]
    mixed = good[:50] + bad_items + good[50:]
    inspect.redis.lpush(settings.keys.ready, *mixed)

    client = pulsar.Client(settings.pulsar_url)
    producer = client.create_producer(settings.task_log_topic)
    bad_logs = [
        b"\x00\x01 garbage",
        json.dumps({"recordId": "r1", "taskId": "t1"}).encode(),
        json.dumps({"recordId": "r1", "taskId": "t1", "deviceId": "d", "logType": "WHATEVER",
                    "timestamp": 1}).encode(),
        json.dumps(["a list"]).encode(),
    ]
    for data in bad_logs:
        producer.send(data)

    wait_for(lambda: inspect.count("success") == 100, 120, "the good tasks")
    wait_for(lambda: inspect.redis.llen(settings.keys.quarantine) == len(bad_items), 20,
             "the quarantined items")
    quarantined = [json.loads(x) for x in inspect.redis.lrange(settings.keys.quarantine, 0, -1)]
    assert sorted(q["item"] for q in quarantined) == sorted(bad_items)
    reasons = {q["item"]: q["reason"] for q in quarantined}
    assert reasons["this is not json"].startswith("not JSON")
    assert "expected a JSON object" in reasons["[1, 2, 3]"]
    assert "no task with task_id 'no-such-task'" in reasons[json.dumps({"task_id": "no-such-task"})]
    assert "priority" in reasons[bad_items[4]]
    assert "script" in reasons[bad_items[3]]
    assert int(inspect.redis.hget(settings.keys.stats, "quarantined")) == len(bad_items)

    dlq = client.subscribe(settings.dlq_topic, "test-reader",
                           initial_position=pulsar.InitialPosition.Earliest)
    dead = []
    for _ in bad_logs:
        msg = dlq.receive(timeout_millis=20000)
        dead.append(json.loads(msg.data()))
        dlq.acknowledge(msg)
    client.close()
    assert all(d["reason"] for d in dead)
    assert sorted(d["data"] for d in dead) == sorted(b.decode("utf-8", "replace")
                                                      for b in bad_logs)
    wait_for(lambda: int(inspect.redis.hget(settings.keys.stats, "dead_lettered") or 0) == 4, 10,
             "the dead-letter count")
    assert all(p.running for p in roles.procs), "no process died of bad input"


def test_task_log_delivered_twice_changes_nothing(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, duplicate_rate=1.0, progress=False)
    roles.consumer()
    roles.master()
    with SendScriptClient(settings) as client:
        client.submit_many([spec(f"dev-{i % 5}", i) for i in range(30)])
    wait_for(lambda: inspect.count("success") == 30, 60, "30 successes")
    wait_for(lambda: roles.farm()["duplicates"] == 30, 10, "the duplicates sent")
    # Counted once the broker has it: each result and its duplicate, 30 tasks.
    wait_for(lambda: roles.farm()["published"] == 60, 10, "the duplicates published")

    def snapshot() -> tuple:
        return (
            sorted(inspect.db.script_tasks.find(), key=lambda d: d["_id"]),
            sorted(inspect.db.task_exec_records.find(), key=lambda d: d["_id"]),
            inspect.db.task_logs.count_documents({}),
        )

    def dead_lettered() -> int:
        """The consumer's own total, in its heartbeat: batches it acknowledged."""
        return sum(json.loads(raw)["dead_lettered"]
                   for raw in inspect.redis.hvals(settings.keys.consumers))

    # A duplicate changes no counter (not saved, not applied), so a message that is
    # dead-lettered follows them: one consumer takes the topic in order, batch after
    # batch, so once it is counted every message published before it was processed.
    client = pulsar.Client(settings.pulsar_url)
    producer = client.create_producer(settings.task_log_topic)
    producer.send(b"marker: not a task log")
    wait_for(lambda: dead_lettered() == 1, 20, "the consumer to take every duplicate")
    first = snapshot()
    # And once more by hand, after everything settled: each SUCCESS log again.
    for log in inspect.db.task_logs.find({"log_type": "SUCCESS"}):
        producer.send(json.dumps({
            "record_id": log["record_id"], "task_id": log["task_id"],
            "device_id": log["device_id"], "log_type": "SUCCESS", "message": log["message"],
            "timestamp": int(log["timestamp"].timestamp() * 1000),
        }).encode())
    producer.send(b"marker: not a task log")
    producer.flush()
    client.close()
    wait_for(lambda: dead_lettered() == 2, 20, "the consumer to take the logs sent by hand")
    assert snapshot() == first
    assert first[2] == 30  # one SUCCESS per task, stored once
    assert roles.farm()["accepted"] == 30


def test_sigterm_master_exits_cleanly_with_nothing_in_processing(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=300, jitter=0.2)
    roles.consumer()
    master = roles.master()
    items = [json.dumps(spec(f"dev-{i % 20}", i)) for i in range(300)]
    inspect.redis.lpush(settings.keys.ready, *items)
    wait_for(lambda: inspect.count("success") >= 20, 60, "some progress")

    master.signal(signal.SIGTERM)
    assert master.wait(40) == 0, master.log_tail()
    keys = settings.keys
    assert inspect.redis.llen(keys.processing(settings.master_id)) == 0
    assert inspect.redis.llen(keys.staging(settings.master_id)) == 0
    # Not alive any more: to the others it is a dead master to take over from.
    assert not inspect.redis.exists(keys.master_alive(settings.master_id))
    counts = inspect.counts()
    assert counts.get("running", 0) == 0, counts
    # Nothing lost: every task not started waits in the ready queue for the next
    # master, either handed back by id or never taken.
    ready = [json.loads(x) for x in inspect.redis.lrange(keys.ready, 0, -1)]
    handed_back = {x["task_id"] for x in ready if "task_id" in x}
    never_taken = [x for x in ready if "task_id" not in x]
    pending = {d["_id"] for d in inspect.db.script_tasks.find({"status": "pending"})}
    assert pending == handed_back
    assert not inspect.db.script_tasks.count_documents({"status": "pending", "master": {
        "$exists": True}})
    stored = sum(counts.values())
    assert stored + len(never_taken) == 300
    assert set(counts) <= {"success", "sent", "pending"}

    roles.master("master-2")
    wait_for(lambda: inspect.count("success") == 300, 120, "all 300 after the restart")
    assert roles.farm()["refused_busy"] == 0
