"""The protections around central-control end to end: master, consumer and simulated
farm as processes, the farm's failures changed at run time (`configure_farm`).

- an outage (every send answered 503, later every send timing out) opens the shared
  breaker; nothing starts an attempt while it is open; after recovery it closes and
  every task succeeds;
- a quota answer (HTTP 402) sets the quota pause with no attempt used; the probe
  keeps it while the quota lasts and lifts it once a send is accepted;
- a task that reaches a worker past its deadline is not sent (expired, no record);
- the drop-rate ladder reaches the hard stop, which a plain resume does not lift;
- an outage whose sends lost their results, then 503s, is no drop: every lost result
  is retried, the ladder stays at ok (no hard stop) and every task runs.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sendscript import pauses
from sendscript.client import SendScriptClient
from sendscript.models import utcnow
from sendscript.settings import Settings
from tests.support import Inspect, Roles, cli, wait_for

pytestmark = pytest.mark.e2e

BREAKER = {
    "breaker_trip_after": 10, "breaker_min_volume": 10, "breaker_window_s": 10,
    "breaker_pauses_s": "3,3", "breaker_probe_timeout_s": 5, "breaker_sync_s": 0.3,
    "breaker_degraded_concurrency": 4, "central_timeout_s": 1, "retry_base_s": 0.3,
    "retry_jitter": 0, "pause_recheck_s": 1,
}


def submit(client: SendScriptClient, tag: str, n: int, **extra: Any) -> list[str]:
    specs = [{"device_id": f"{tag}-{i}", "script": {"id": "tap", "args": {"i": i}}, **extra}
             for i in range(n)]
    return [s.task_id for s in client.submit_many(specs)]


def shared_breaker(inspect: Inspect) -> dict[str, Any]:
    raw = inspect.redis.hget(inspect.settings.keys.breaker, "state")
    return json.loads(raw) if raw else {"circuit": "closed", "trips": 0}


def wait_circuit(inspect: Inspect, circuit: str, timeout_s: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (s := shared_breaker(inspect))["circuit"] == circuit and s,
                    timeout_s, f"the breaker to be {circuit}", interval_s=0.05)


def all_succeeded(inspect: Inspect, ids: list[str]) -> bool:
    return inspect.db.script_tasks.count_documents(
        {"_id": {"$in": ids}, "status": "success"}) == len(ids)


def records_started_between(inspect: Inspect, start: float, end: float) -> int:
    return inspect.db.task_exec_records.count_documents({"started_at": {
        "$gt": datetime.fromtimestamp(start, tz=utcnow().tzinfo),
        "$lt": datetime.fromtimestamp(end, tz=utcnow().tzinfo)}})


def assert_quiet_while_open(inspect: Inspect, opened: dict[str, Any]) -> None:
    """No attempt started while it was open: a record is written before each POST, so
    none may start between the open (plus the moment the sync takes to apply it; sends
    already under way then started earlier) and the half-open probe."""
    wait_for(lambda: shared_breaker(inspect)["circuit"] != "open", 30, "the open pause's end")
    assert records_started_between(inspect, opened["since"] + 0.3, opened["open_until"]) == 0


def test_an_outage_opens_the_breaker_and_recovery_closes_it(
        settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.2)
    roles.consumer()
    roles.master(**BREAKER)
    client = SendScriptClient(settings)
    try:
        # Every send answered 503: retried (an attempt each), until ten in a row open it.
        roles.configure_farm(http_error_rate=1.0, http_error_status=503)
        failing = submit(client, "fail", 20, max_retries=20)
        opened = wait_circuit(inspect, "open")
        assert opened["trips"] == 1
        assert_quiet_while_open(inspect, opened)
        # Central-control back: the probe succeeds, the breaker degrades, then closes.
        roles.configure_farm(http_error_rate=0.0)
        wait_circuit(inspect, "closed")
        wait_for(lambda: all_succeeded(inspect, failing), 60, "the failed tasks to succeed")
        docs = inspect.db.script_tasks.find({"_id": {"$in": failing}})
        attempts = [d["attempt"] for d in docs]
        records = inspect.db.task_exec_records.count_documents({"task_id": {"$in": failing}})
        assert max(attempts) <= 20 and sum(attempts) == records
        # Every send timing out (the farm answers after the client's 1 s read timeout):
        # the sends count as made (the device may run it), and ten in a row open it.
        roles.configure_farm(accept_delay_ms=2500)
        slow = submit(client, "slow", 16)
        reopened = wait_circuit(inspect, "open")
        assert reopened["since"] > opened["since"]
        assert_quiet_while_open(inspect, reopened)
        roles.configure_farm(accept_delay_ms=0)
        after = submit(client, "after", 16)
        wait_circuit(inspect, "closed")
        wait_for(lambda: all_succeeded(inspect, slow + after), 60, "every task to succeed")
        status = cli(settings, "status")
        assert "circuit breaker: closed" in status
        info = roles.master_info() or {}
        assert info["breaker"]["opened"] >= 2
        # The breaker_open incident was announced and, once closed, its end too.
        record = inspect.redis.get(settings.keys.alert("breaker_open", "central-control"))
        assert record is not None and record.decode().startswith("resolved:")
    finally:
        client.close()


def test_a_quota_answer_pauses_and_the_probe_lifts_it(
        settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.2)
    roles.consumer()
    roles.master(central_quota_status=402, quota_probe_s=1, pause_recheck_s=60)
    client = SendScriptClient(settings)
    r = inspect.redis
    try:
        roles.configure_farm(http_error_rate=1.0, http_error_status=402)
        ids = submit(client, "quota", 6)
        wait_for(lambda: pauses.QUOTA in pauses.list_sync(r, settings.keys), 20,
                 "the quota pause")
        # A probe goes while the quota lasts: answered quota again, the pause stays.
        wait_for(lambda: ((roles.master_info() or {}).get("pauses") or {}).get(
            "quota_probes", 0) >= 2, 20, "two quota probes")
        assert pauses.QUOTA in pauses.list_sync(r, settings.keys)
        docs = list(inspect.db.script_tasks.find({"_id": {"$in": ids}}))
        assert {(d["status"], d["attempt"]) for d in docs} == {("pending", 0)}
        assert inspect.db.task_exec_records.count_documents({"task_id": {"$in": ids}}) == 0
        roles.configure_farm(http_error_rate=0.0)
        wait_for(lambda: pauses.QUOTA not in pauses.list_sync(r, settings.keys), 20,
                 "the probe to lift the quota pause")
        wait_for(lambda: all_succeeded(inspect, ids), 30, "the tasks after the quota")
        docs = list(inspect.db.script_tasks.find({"_id": {"$in": ids}}))
        assert {d["attempt"] for d in docs} == {1}
    finally:
        client.close()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_task_past_its_deadline_at_the_worker_is_not_sent(
        settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.2)
    roles.consumer()
    master = roles.master(workers=1)
    client = SendScriptClient(settings)
    workers = children(master.pid)
    assert workers
    try:
        # The worker cannot read its pipe: the master hands it the task in time, the
        # worker reads it only after its deadline.
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        deadline = utcnow() + timedelta(seconds=1.5)
        [task_id] = submit(client, "late", 1, expire_at=deadline.isoformat())
        wait_for(lambda: (roles.master_info() or {}).get("inflight") == 1, 10,
                 "the task handed to the stopped worker")
        wait_for(lambda: utcnow() > deadline, 5, "the deadline to pass")
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    try:
        doc = wait_for(lambda: inspect.db.script_tasks.find_one(
            {"_id": task_id, "status": "expired"}), 20, "the task to expire at the worker")
        assert "checked at the worker" in doc["last_error"] and doc["attempt"] == 0
        assert inspect.db.task_exec_records.count_documents({"task_id": task_id}) == 0
        assert task_id not in {run["task_id"] for run in roles.farm("runs")}
        wait_for(lambda: ((roles.master_info() or {}).get("outcomes") or {}).get(
            "expired") == 1, 10, "the master to see the expired answer")
        # Counted as a drop in the shared window.
        wait_for(lambda: (roles.master_info() or {})["breaker"]["drop_rate"]["dropped"] == 1,
                 10, "the drop counted")
        # The device is free again: a next task on it runs.
        [next_id] = submit(client, "late", 1)
        wait_for(lambda: all_succeeded(inspect, [next_id]), 20, "the device's next task")
    finally:
        client.close()


def test_the_drop_rate_ladder_reaches_the_hard_stop_and_a_plain_resume_keeps_it(
        settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.2)
    roles.consumer()
    roles.master(drop_min_volume=5, drop_window_s=30, drop_sync_s=0.3, pause_recheck_s=60)
    client = SendScriptClient(settings)
    r = inspect.redis
    tag = uuid.uuid4().hex[:6]
    try:
        # Held by a pause until they expire: every finished task is a drop.
        cli(settings, "pause", "--reason", "hold them")
        wait_for(lambda: ((roles.master_info() or {}).get("pauses") or {}).get("active"), 10,
                 "the master to see the pause")
        expiring = submit(client, f"x{tag}", 6,
                          expire_at=(utcnow() + timedelta(seconds=1)).isoformat())
        wait_for(lambda: inspect.count("expired") == len(expiring), 20, "the tasks to expire")
        flags = wait_for(lambda: (f := pauses.list_sync(r, settings.keys)).get(pauses.HARD) and f,
                         20, "the hard stop")
        assert "drop rate" in flags[pauses.HARD].reason
        info = wait_for(lambda: (i := roles.master_info() or {}).get("breaker", {}).get(
            "drop_rate", {}).get("level") == "hard_stop" and i, 10, "the ladder at hard stop")
        assert info["breaker"]["drop_rate"]["dropped"] == len(expiring)
        out = cli(settings, "resume")
        assert "hard stop is still on" in out
        assert list(pauses.list_sync(r, settings.keys)) == [pauses.HARD]
        held = submit(client, f"h{tag}", 2)
        wait_for(lambda: ((roles.master_info() or {}).get("pauses") or {}).get("held") == {
            pauses.HARD: 2}, 10, "the hard stop to hold new tasks")
        assert inspect.db.task_exec_records.count_documents({"task_id": {"$in": held}}) == 0
        assert "resumed hard" in cli(settings, "resume", "--hard")
        wait_for(lambda: all_succeeded(inspect, held), 20, "the tasks after resume --hard")
    finally:
        client.close()


def test_lost_results_then_503s_are_retried_with_no_hard_stop_and_every_task_runs(
        settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=20, jitter=0.2)
    roles.consumer()
    roles.master(**BREAKER, drop_min_volume=10, drop_window_s=60, drop_sync_s=0.3,
                 sweep_interval_s=0.5)
    client = SendScriptClient(settings)
    tag = uuid.uuid4().hex[:6]
    try:
        # Central-control takes every send and the device never reports: each send is
        # ambiguous (it may have run), so it waits its result timeout, then retries.
        roles.configure_farm(silent_rate=1.0)
        ids = submit(client, f"o{tag}", 20, timeout_s=2, max_retries=20)
        wait_for(lambda: int(inspect.redis.hget(settings.keys.stats, "result_timeouts")
                             or 0) >= len(ids), 30, "every result to time out once")
        # Then every send answered 503: the breaker holds them, using no attempt.
        roles.configure_farm(silent_rate=0.0, http_error_rate=1.0, http_error_status=503)
        wait_circuit(inspect, "open")
        # The master's report is redrawn on its own beat: wait for the one that has
        # counted the lost results.
        def drop_rate() -> dict:
            return ((roles.master_info() or {}).get("breaker") or {}).get("drop_rate") or {}
        wait_for(lambda: min(drop_rate().get("lost_results", 0),
                             drop_rate().get("finished", 0)) >= len(ids), 10,
                 "the drop-rate window to count every lost result")
        drop = drop_rate()
        assert drop["lost_results"] >= len(ids) and drop["finished"] >= len(ids)
        assert drop["dropped"] == 0 and drop["level"] == "ok"
        # Central-control back: every task runs, none was dropped, nothing stopped.
        roles.configure_farm(http_error_rate=0.0)
        wait_for(lambda: all_succeeded(inspect, ids), 90, "every task to succeed")
        assert pauses.HARD not in pauses.list_sync(inspect.redis, settings.keys)
        drop = (roles.master_info() or {})["breaker"]["drop_rate"]
        assert drop["hard_stops"] == 0 and drop["dropped"] == 0
        assert int(inspect.redis.hget(settings.keys.stats, "result_timeouts_final") or 0) == 0
    finally:
        client.close()
