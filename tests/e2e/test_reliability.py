"""Reliability on the real servers: retries, timeouts, recovery, recycling, outages."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.models import Task, TaskSpec, id_from_tag, utcnow
from sendscript.settings import Settings
from tests.support import (
    Inspect,
    Roles,
    needs_one_redis_server,
    session_servers,
    settings_env,
    unique_settings,
    wait_for,
)

pytestmark = pytest.mark.e2e

FAST = {
    "heartbeat_ttl_s": 2.0, "delay_load_interval_s": 1.0, "retry_base_s": 0.3,
    "retry_factor": 2.0, "retry_cap_s": 5.0, "retry_jitter": 0.0, "sweep_interval_s": 0.5,
    "leader_lease_s": 3.0, "orphan_grace_s": 2.0, "free_check_interval_s": 1.0,
    "final_error_codes": frozenset({"E_FINAL"}), "running_stuck_s": 3.0,
}


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **FAST)


def records_of(inspect: Inspect, task_id: str) -> list[dict]:
    return sorted(inspect.db.task_exec_records.find({"task_id": task_id}),
                  key=lambda r: r["attempt"])


def finished(inspect: Inspect, task_id: str) -> bool:
    doc = inspect.db.script_tasks.find_one({"_id": task_id}, {"status": 1})
    return doc is not None and doc["status"] in ("success", "failed")


def test_retry_classes_and_backoff(settings: Settings, roles: Roles, inspect: Inspect) -> None:
    """503 from central-control and SYSTEM_ERROR results are retried with growing
    waits; an ERROR whose code is final fails at once; attempts stop at max+1."""
    roles.simulator(run_ms=20, progress=False, http_error_rate=1.0)
    roles.consumer()
    roles.master()
    with SendScriptClient(settings) as client:
        t503 = client.submit("r-503", {"id": "x"}, max_retries=3).task_id
        wait_for(lambda: finished(inspect, t503), 30, "the 503 task to give up")
        roles.configure_farm(http_error_rate=0.0, system_error_rate=1.0)
        tsys = client.submit("r-sys", {"id": "x"}, max_retries=2).task_id
        wait_for(lambda: finished(inspect, tsys), 30, "the SYSTEM_ERROR task to give up")
        roles.configure_farm(system_error_rate=0.0, fail_rate=1.0, error_code="E_FINAL")
        tfinal = client.submit("r-final", {"id": "x"}, max_retries=3).task_id
        wait_for(lambda: finished(inspect, tfinal), 30, "the final ERROR task")
        roles.configure_farm(fail_rate=0.0)
        ok = client.submit("r-ok", {"id": "x"}).task_id
        wait_for(lambda: finished(inspect, ok), 30, "a healthy task")

    task = inspect.db.script_tasks.find_one({"_id": t503})
    assert task["status"] == "failed" and task["attempt"] == 4
    assert "attempts exhausted" in task["last_error"] and "503" in task["last_error"]
    recs = records_of(inspect, t503)
    assert [r["attempt"] for r in recs] == [1, 2, 3, 4]
    assert {r["status"] for r in recs} == {"failed"}
    gaps = [(b["started_at"] - a["finished_at"]).total_seconds()
            for a, b in itertools.pairwise(recs)]
    # retry_base 0.3 s, factor 2, no jitter: waits of 0.3, 0.6, 1.2 s (plus dispatch).
    for gap, want in zip(gaps, [0.3, 0.6, 1.2], strict=True):
        assert want - 0.05 <= gap <= want + 1.0, gaps
    assert gaps[0] < gaps[1] < gaps[2]

    sys_task = inspect.db.script_tasks.find_one({"_id": tsys})
    assert sys_task["status"] == "failed" and sys_task["attempt"] == 3
    assert len(records_of(inspect, tsys)) == 3

    final = inspect.db.script_tasks.find_one({"_id": tfinal})
    assert final["status"] == "failed" and final["attempt"] == 1
    assert "E_FINAL" in final["last_error"]
    assert inspect.db.script_tasks.find_one({"_id": ok})["status"] == "success"
    farm = roles.farm()
    assert farm["refused_busy"] == 0


def test_result_timeout_swept_once_with_two_masters(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, progress=False, silent_rate=1.0)
    roles.consumer()
    a = roles.master("master-a")
    b = roles.master("master-b", master_id=settings.master_id + "-b")
    with SendScriptClient(settings) as client:
        silent = client.submit("to-1", {"id": "x"}, timeout_s=1.0, max_retries=1).task_id
        wait_for(lambda: finished(inspect, silent), 30, "the silent task to time out")
        roles.configure_farm(silent_rate=0.0)
        after = client.submit("to-1", {"id": "y"}).task_id  # the device is free again
        wait_for(lambda: finished(inspect, after), 20, "the next task on the device")
    task = inspect.db.script_tasks.find_one({"_id": silent})
    assert task["status"] == "failed" and "result timeout" in task["last_error"]
    recs = records_of(inspect, silent)
    assert [r["status"] for r in recs] == ["timeout", "timeout"]
    assert int(inspect.redis.hget(settings.keys.stats, "result_timeouts")) == 2
    leaders = [p for p in (a, b) if "result timeout" in (p.log_path.read_text()
                                                          if p.log_path else "")]
    holder = inspect.redis.get(f"{settings.keys.prefix}:leader")
    assert holder is not None and len(leaders) >= 1
    assert inspect.db.script_tasks.find_one({"_id": after})["status"] == "success"
    assert roles.farm()["refused_busy"] == 0


def test_dead_master_processing_list_and_orphans_recovered(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    """What a master killed between taking items and storing them leaves behind, and
    a producer that stored a task but died before pushing it."""
    dead = "dead-master"
    keys = settings.keys
    # A crash leaves: a tagged entry stored already, one not stored, a raw staging item.
    stored_spec = {"device_id": "dm-1", "script": {"id": "stored"}}
    tag = "77.1700000000123"
    stored = Task.from_spec(TaskSpec.model_validate(stored_spec),
                            task_id=id_from_tag(settings.key_prefix, tag))
    stored.master = dead
    inspect.db.script_tasks.insert_one(stored.to_doc())
    other = json.dumps({"device_id": "dm-2", "script": {"id": "b"}})
    inspect.redis.lpush(keys.processing(dead), f"{tag} {json.dumps(stored_spec)}",
                        f"78.1700000000456 {other}")
    inspect.redis.lpush(keys.staging(dead),
                        json.dumps({"device_id": "dm-3", "script": {"id": "c"}}))
    inspect.redis.hset(keys.masters, dead, json.dumps({"master_id": dead}))
    # A task stored by a producer that never pushed its id.
    orphan = Task.from_spec(TaskSpec(device_id="dm-4", script={"id": "orphan"}))
    inspect.db.script_tasks.insert_one(orphan.to_doc())

    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    roles.master()
    wait_for(lambda: inspect.count("success") == 4, 30, "the four tasks")
    assert inspect.db.script_tasks.count_documents({}) == 4  # the stored one not doubled
    assert inspect.redis.llen(keys.processing(dead)) == 0
    assert inspect.redis.llen(keys.staging(dead)) == 0
    assert inspect.redis.hget(keys.masters, dead) is None
    ran = [r["task_id"] for r in roles.farm("runs")]
    assert len(ran) == len(set(ran)) == 4
    info = roles.master_info()
    assert info is not None and info["recovered"]["dead_masters"] == 1


def test_tasks_a_producer_stored_held_but_never_pushed_run_once_by_their_master(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    """The SDK stores tasks due now held by a live master. A producer that dies
    between its store and its push leaves them pending, held by that master, on no
    board and on no list, where the leader's orphan sweep does not look: that
    master's reconcile queues them."""
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    roles.master(reconcile_interval_s=0.5, reconcile_grace_s=1.0)
    wait_for(lambda: inspect.redis.exists(settings.keys.master_alive(settings.master_id)),
             20, "the master's heartbeat")
    client = SendScriptClient(settings)
    client._push_refs = lambda task_ids: None  # type: ignore[method-assign]  # dies here
    try:
        subs = client.submit_many([TaskSpec(device_id=f"pd-{i}", script={"id": "p"})
                                   for i in range(3)])
    finally:
        client.close()
    held = {d["_id"]: d.get("master") for d in inspect.db.script_tasks.find({})}
    assert held == {s.task_id: settings.master_id for s in subs}
    assert inspect.redis.llen(settings.keys.ready) == 0
    wait_for(lambda: inspect.count("success") == 3, 30, "the three tasks")
    ran = [r["task_id"] for r in roles.farm("runs")]
    assert sorted(ran) == sorted(s.task_id for s in subs)
    assert int(inspect.redis.hget(settings.keys.stats, "reconciled") or 0) == 3


def test_worker_recycling_by_task_count_and_by_memory(
    servers: EmbeddedServers, tmp_path: Path
) -> None:
    for limit, name in (({"worker_max_tasks": 5}, "tasks"),
                        ({"worker_max_memory_mb": 1.0}, "memory")):
        settings = unique_settings(servers, **FAST, **limit)
        roles = Roles(settings, tmp_path / name)
        view = Inspect(settings)
        try:
            roles.simulator(run_ms=20, progress=False)
            roles.consumer()
            roles.master()
            with SendScriptClient(settings) as client:
                client.submit_many([{"device_id": f"rc-{i % 10}", "script": {"id": "x"}}
                                    for i in range(40)])
            wait_for(lambda v=view: v.count("success") == 40, 90, f"40 tasks ({name})", 0.3)
            assert view.counts() == {"success": 40}
            assert len({r["task_id"] for r in roles.farm("runs")}) == 40
            info = wait_for(lambda r=roles: (i := r.master_info()) and i["workers_alive"] == 2
                            and i, 30, "the pool at full size")
            log = roles.procs[-1].log_path.read_text()  # the master's
            assert "recycling worker" in log
            assert "keeps dying" not in log and info["outcomes"].get("lost", 0) == 0
            # A retiring worker finishes what it holds, so it may run a few past its limit.
            workers = {r["worker"] for r in view.db.task_exec_records.find()}
            assert len(workers) >= 3, workers
            assert info["workers_recycled"] >= 2
        finally:
            roles.stop()
            view.close()


def test_manual_retry_and_recover_command(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, progress=False, fail_rate=1.0, error_code="E_FINAL")
    roles.consumer()
    master = roles.master()
    with SendScriptClient(settings) as client:
        ids = [s.task_id for s in client.submit_many(
            [{"device_id": f"mr-{i}", "script": {"id": "x"}} for i in range(3)])]
        wait_for(lambda: inspect.count("failed") == 3, 30, "three failures")
        roles.configure_farm(fail_rate=0.0)
    env = settings_env(settings)
    run = subprocess.run([sys.executable, "-m", "sendscript", "task", "retry", ids[0]],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    wait_for(lambda: finished(inspect, ids[0]) and inspect.db.script_tasks.find_one(
        {"_id": ids[0]})["status"] == "success", 30, "the retried task")
    bulk = subprocess.run([sys.executable, "-m", "sendscript", "task", "retry", "--status",
                           "failed", "--since", "2000-01-01T00:00:00Z"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert bulk.returncode == 0 and "queued 2 task(s) again" in bulk.stdout, bulk.stdout
    wait_for(lambda: inspect.count("success") == 3, 30, "all three")
    assert [r["attempt"] for r in records_of(inspect, ids[0])] == [1, 2]
    again = subprocess.run([sys.executable, "-m", "sendscript", "task", "retry", ids[0]],
                           env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1  # success is not retried

    # recover, with no master running (its leader would fix these by itself): an
    # orphaned lock (no attempt holds its fence) and a task nobody pushed.
    master.stop()
    inspect.redis.set(settings.keys.device_lock("stuck-dev"), 999_999, px=600_000)
    orphan = Task.from_spec(TaskSpec(device_id="stuck-dev", script={"id": "o"}))
    orphan.updated_at = utcnow().replace(year=2020)
    inspect.db.script_tasks.insert_one(orphan.to_doc())
    show = subprocess.run([sys.executable, "-m", "sendscript", "recover", "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    assert "stuck-dev (fence 999999)" in show.stdout
    assert inspect.redis.exists(settings.keys.device_lock("stuck-dev"))
    fix = subprocess.run([sys.executable, "-m", "sendscript", "recover", "--lock-confirm-s",
                          "1"], env=env, capture_output=True, text=True, timeout=60)
    assert fix.returncode == 0, fix.stderr
    assert "stuck-dev (fence 999999)" in fix.stdout
    assert not inspect.redis.exists(settings.keys.device_lock("stuck-dev"))
    queued = [json.loads(x) for x in inspect.redis.lrange(settings.keys.ready, 0, -1)]
    assert {"task_id": orphan.id} in queued
    roles.master("master-2")
    wait_for(lambda: finished(inspect, orphan.id), 30, "the task behind the orphaned lock")
    assert inspect.db.script_tasks.find_one({"_id": orphan.id})["status"] == "success"


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServers]:
    """Servers of this module's own, to stop and start without disturbing others."""
    embedded = session_servers(tmp_path_factory.mktemp("restart-servers"))
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.mark.parametrize("server", [pytest.param("redis", marks=needs_one_redis_server),
                                    "mongo", "pulsar"])
def test_every_process_rides_out_a_server_restart(
    own_servers: EmbeddedServers, tmp_path: Path, server: str
) -> None:
    # Short client timeouts, so an outage of a few seconds shows as errors.
    settings = unique_settings(own_servers, **FAST, redis_timeout_s=1.5, mongo_timeout_s=1.5,
                               pulsar_timeout_s=2.0)
    roles = Roles(settings, tmp_path / "logs")
    view = Inspect(settings)
    try:
        roles.simulator(run_ms=30, progress=False)
        roles.consumer()
        roles.master()
        with SendScriptClient(settings) as client:
            first = client.submit_many([{"device_id": f"rs-{i % 10}", "script": {"id": "a"}}
                                        for i in range(30)])
        wait_for(lambda: view.count("success") >= 10, 30, "progress before the outage")
        own_servers[server].stop()
        time.sleep(4)
        own_servers[server].start()
        with SendScriptClient(settings) as client:
            second = client.submit_many([{"device_id": f"rs-{i % 10}", "script": {"id": "b"}}
                                         for i in range(30)])
        ids = [s.task_id for s in first + second]
        try:
            wait_for(lambda: view.db.script_tasks.count_documents(
                {"_id": {"$in": ids}, "status": "success"}) == 60, 120, "all 60 tasks", 0.5)
        except AssertionError:
            stuck = list(view.db.script_tasks.find(
                {"_id": {"$in": ids}, "status": {"$ne": "success"}},
                {"status": 1, "attempt": 1, "device_id": 1, "last_error": 1, "master": 1}))
            print("tasks not done:", stuck, "\n", roles.logs())
            raise
        assert all(p.running for p in roles.procs), roles.logs()
        runs = roles.farm("runs")
        per_task: dict[str, int] = defaultdict(int)
        for r in runs:
            per_task[r["task_id"]] += 1
        assert roles.farm()["refused_busy"] == 0
        assert max(per_task.values()) <= 4
        logs = "\n".join(p.log_path.read_text() for p in roles.procs if p.log_path)
        assert "recovered after" in logs, "an outage was seen and its end logged"
        # Said once per loop that saw it, not once per failed try.
        down = [line for line in logs.splitlines() if "until it answers" in line]
        back = [line for line in logs.splitlines() if "recovered after" in line]
        assert 1 <= len(down) <= 20 and len(back) <= len(down), "\n".join(down)
    finally:
        roles.stop()
        view.close()
