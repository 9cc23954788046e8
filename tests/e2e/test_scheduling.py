"""Scheduling on the real servers: delays, schedules, priorities, caps, dedupe,
fan-out, cancel, expiry and retention."""

from __future__ import annotations

import itertools
import json
import random
import re
import signal
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.schedules import Schedule, fire_tasks
from sendscript.settings import Settings
from tests.support import Inspect, Roles, unique_settings, wait_for

pytestmark = pytest.mark.e2e

FAST = {"heartbeat_ttl_s": 2.0, "delay_load_interval_s": 1.0, "schedule_reload_s": 1.0}


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **FAST)


def now() -> datetime:
    return datetime.now(UTC)


def records_by_task(inspect: Inspect) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in inspect.db.task_exec_records.find():
        out[r["task_id"]].append(r)
    return out


def assert_fired_once_never_early(inspect: Inspect, task_ids: list[str]) -> list[float]:
    records = records_by_task(inspect)
    lateness = []
    for task_id in task_ids:
        task = inspect.db.script_tasks.find_one({"_id": task_id})
        assert task["status"] == "success", task
        assert len(records[task_id]) == 1, records[task_id]
        started = records[task_id][0]["started_at"]
        assert started >= task["run_at"], (task_id, started, task["run_at"])
        lateness.append((started - task["run_at"]).total_seconds())
    return lateness


def test_1000_delayed_tasks_fire_once_and_never_early(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=10, progress=False)
    roles.consumer()
    roles.master()
    start = now() + timedelta(seconds=2)
    rand = random.Random(7)
    specs = [{"device_id": f"dev-{i % 200:03d}", "script": {"id": "later", "args": {"n": i}},
              "run_at": (start + timedelta(seconds=rand.uniform(0, 20))).isoformat()}
             for i in range(1000)]
    with SendScriptClient(settings) as client:
        submitted = client.submit_many(specs)
    assert {s.status for s in submitted} == {"waiting"}
    ids = [s.task_id for s in submitted]
    wait_for(lambda: (roles.master_info() or {}).get("delayed_held", 0) > 0, 10,
             "the master to hold the delayed tasks")
    assert inspect.count("success") == 0  # nothing fired ahead of time
    wait_for(lambda: inspect.count("success") == 1000, 90, "1000 delayed tasks", 0.5)
    # How late they fire is a figure for `python -m bench.scheduling`, not a test.
    assert_fired_once_never_early(inspect, ids)
    assert roles.farm()["accepted"] == 1000


def test_killed_master_leaves_its_delayed_tasks_to_another(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=10, progress=False)
    roles.consumer()
    first = roles.master("master-a")
    start = now() + timedelta(seconds=6)
    specs = [{"device_id": f"dev-{i % 50}", "script": {"id": "later"},
              "run_at": (start + timedelta(seconds=i % 6)).isoformat()} for i in range(200)]
    with SendScriptClient(settings) as client:
        ids = [s.task_id for s in client.submit_many(specs)]
    wait_for(lambda: (roles.master_info() or {}).get("delayed_held") == 200, 10,
             "master-a to hold all 200")
    held = inspect.db.script_tasks.count_documents(
        {"status": "waiting", "master": settings.master_id})
    assert held == 200
    first.kill()  # SIGKILL: no hand-back; the claims stay in Mongo

    roles.master("master-b", master_id=settings.master_id + "-b")
    wait_for(lambda: inspect.count("success") == 200, 60, "every delayed task", 0.5)
    assert_fired_once_never_early(inspect, ids)
    assert roles.farm()["accepted"] == 200
    assert inspect.db.script_tasks.count_documents(
        {"master": settings.master_id + "-b"}) == 200


def test_restarted_master_takes_back_its_delayed_tasks_at_once(
    servers: EmbeddedServers, tmp_path
) -> None:
    # A short horizon, so that at the restart the retries this master holds are past it:
    # a restarted master that took back only what is due within its horizon never
    # loaded them again (later loads leave a live master's tasks alone).
    settings = unique_settings(servers, delay_horizon_s=5.0, **FAST)
    roles = Roles(settings, tmp_path / "logs")
    view = Inspect(settings)
    try:
        roles.simulator(run_ms=10, progress=False, http_error_rate=1.0)
        roles.consumer()
        first = roles.master()
        with SendScriptClient(settings) as client:
            retries = [s.task_id for s in client.submit_many(
                [{"device_id": f"rt-{i}", "script": {"id": "retried"}, "retry_base_s": 20.0}
                 for i in range(20)])]
            wait_for(lambda: view.db.script_tasks.count_documents(
                {"_id": {"$in": retries}, "status": "retry_waiting",
                 "master": settings.master_id}) == 20, 30, "20 retries held by the master")
            roles.configure_farm(http_error_rate=0.0)
            start = now() + timedelta(seconds=2)
            delayed = [s.task_id for s in client.submit_many(
                [{"device_id": f"dl-{i % 50}", "script": {"id": "later"},
                  "run_at": (start + timedelta(seconds=12 * i / 150)).isoformat()}
                 for i in range(150)])]
        every = retries + delayed

        def succeeded(ids: list[str]) -> int:
            return view.db.script_tasks.count_documents(
                {"_id": {"$in": ids}, "status": "success"})

        wait_for(lambda: succeeded(delayed) >= 10, 30, "the first delayed tasks", 0.05)
        assert (roles.master_info() or {}).get("delayed_held", 0) > 0
        first.kill()  # SIGKILL: its claims stay in Mongo

        def held() -> int:
            return view.db.script_tasks.count_documents(
                {"master": settings.master_id, "status": {"$in": ["waiting", "retry_waiting"]}})

        # What it held once its last writes landed: one sent just before the kill, or
        # by a worker yet to notice the kill, may still move a task.
        counts = [held()]
        wait_for(lambda: counts.append(held()) or counts[-1] == counts[-2], 15,
                 "the dead master's last writes to land", 1.0)
        held_at_kill = counts[-1]
        assert held_at_kill >= len(retries)  # the retries are due well after the restart
        second = roles.master("master-2")  # the same master id, at once
        wait_for(lambda: succeeded(every) == len(every), 90, "every delayed task", 0.5)

        tasks = {t["_id"]: t for t in view.db.script_tasks.find({"_id": {"$in": every}})}
        runs: dict[str, list[float]] = defaultdict(list)
        for run in roles.farm("runs"):
            runs[run["task_id"]].append(run["started"])
        records = records_by_task(view)
        for task_id in every:
            task = tasks[task_id]
            due = task["run_at"].timestamp()
            assert len(runs[task_id]) == 1, (task_id, runs[task_id])  # ran once
            assert runs[task_id][0] >= due, (task_id, runs[task_id][0], due)  # never early
            ok = [r for r in records[task_id] if r["status"] == "success"]
            assert len(ok) == 1 and ok[0]["started_at"] >= task["run_at"], records[task_id]
        assert all(len(records[t]) == 2 for t in retries)  # the failed try and the retry
        # At once: the restarted master's first load takes back every task it held, the
        # ones past its horizon too (no later load would: they are a live master's).
        # How late that makes a fire is `python -m bench.scheduling --restart`'s figure.
        log = second.log_path.read_text(errors="replace") if second.log_path else ""
        taken = [int(n) for n in re.findall(r"took back (\d+) delayed task", log)]
        assert taken[:1] == [held_at_kill], (held_at_kill, taken)
    finally:
        roles.stop()
        view.close()


def interval_schedule(name: str, devices: list[str], misfire: str = "fire_once") -> Schedule:
    return Schedule.model_validate({
        "_id": name, "interval_s": 1.0, "template": {"script": {"id": name}},
        "device_ids": devices, "misfire": misfire,
    })


def fire_times(inspect: Inspect, name: str) -> Counter[datetime]:
    return Counter(t["run_at"] for t in inspect.db.script_tasks.find({"schedule": name}))


def test_two_masters_create_each_fire_once(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=10, progress=False)
    roles.consumer()
    roles.master("master-a")
    roles.master("master-b", master_id=settings.master_id + "-b")
    devices = ["sch-1", "sch-2", "sch-3"]
    with SendScriptClient(settings) as client:
        client.schedule_add(interval_schedule("every-second", devices))
        wait_for(lambda: len(fire_times(inspect, "every-second")) >= 12, 30, "12 fires", 0.2)
        client.schedule_pause("every-second")
        # A canary added after the pause: its fires show the masters' schedulers have
        # loaded the schedules since and go on running while the paused one stays quiet.
        client.schedule_add(interval_schedule("canary", ["sch-canary"]))

        def canary() -> int:
            return len(fire_times(inspect, "canary"))

        wait_for(lambda: canary() >= 2, 20, "the canary to fire twice after the pause", 0.2)
        paused = fire_times(inspect, "every-second")
        wait_for(lambda: canary() >= 5, 20, "three more canary fires", 0.2)
        assert fire_times(inspect, "every-second") == paused
        client.schedule_remove("canary")
        sched = client.schedule_get("every-second")
    fires = fire_times(inspect, "every-second")
    assert all(n == len(devices) for n in fires.values()), fires
    times = sorted(fires)
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
    assert gaps == {1.0}, f"fires not every second: {gaps}"
    keys = [t["dedupe_key"] for t in inspect.db.script_tasks.find({"schedule": "every-second"})]
    assert len(keys) == len(set(keys)) == len(times) * len(devices)
    assert sched is not None and sched.fires == len(times)
    wait_for(lambda: inspect.db.script_tasks.count_documents(
        {"schedule": "every-second", "status": "success"}) == len(keys), 30,
        "the fired tasks to finish")
    # Both masters took part.
    owners = {t["master"] for t in inspect.db.script_tasks.find({"schedule": "every-second"})}
    assert owners <= {settings.master_id, settings.master_id + "-b"}


def test_a_fire_stored_but_never_queued_is_reconciled_and_runs_once(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    """A fire whose insert landed though the call timed out: its task is stored under
    the master, pending at attempt 0, on no board, and no retry of the fire will queue
    it (that fire's time has moved on). The master's reconcile duty finds it."""
    roles.simulator(run_ms=10, progress=False)
    roles.consumer()
    master = roles.master(reconcile_interval_s=0.5, reconcile_grace_s=1.0)
    fire_at = now() - timedelta(seconds=5)
    [task] = fire_tasks(interval_schedule("lost-fire", ["rc-1"]), fire_at, ["rc-1"],
                        settings.key_prefix, settings.master_id, fire_at)
    inspect.db.script_tasks.insert_one(task.to_doc())
    wait_for(lambda: (inspect.db.script_tasks.find_one({"_id": task.id}) or {}).get(
        "status") == "success", 20, "the lost fire's task to run")
    runs = [r for r in httpx.get(f"{roles.central_url}/runs", timeout=10).json()
            if r["task_id"] == task.id]
    assert len(runs) == 1
    assert [r["attempt"] for r in records_by_task(inspect)[task.id]] == [1]
    assert int(inspect.redis.hget(settings.keys.stats, "reconciled") or 0) == 1
    time.sleep(1.5)  # more looks: nothing is queued again
    assert int(inspect.redis.hget(settings.keys.stats, "reconciled") or 0) == 1
    log = master.log_path.read_text() if master.log_path else ""
    assert "were on no board" in log


def test_misfire_policies_after_a_master_outage(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=10, progress=False)
    roles.consumer()
    master = roles.master()
    with SendScriptClient(settings) as client:
        client.schedule_add(interval_schedule("catch-up", ["mf-1"], "fire_once"))
        client.schedule_add(interval_schedule("skip-it", ["mf-2"], "skip"))
    wait_for(lambda: len(fire_times(inspect, "skip-it")) >= 3, 20, "a few fires")
    master.signal(signal.SIGTERM)
    assert master.wait(30) == 0
    stopped = now()
    time.sleep(4.5)  # at least three fire times pass with no master
    roles.master("master-2")
    info = roles.master_info()
    assert info is not None
    online = datetime.fromisoformat(info["started_at"])
    wait_for(lambda: max(fire_times(inspect, "skip-it")) > online + timedelta(seconds=2), 20,
             "fires after the restart")
    with SendScriptClient(settings) as client:
        client.schedule_pause("catch-up")
        client.schedule_pause("skip-it")
        catch_up, skip = client.schedule_get("catch-up"), client.schedule_get("skip-it")
    assert catch_up is not None and skip is not None
    assert catch_up.missed >= 3 and skip.missed >= 3

    def during_outage(name: str) -> list[datetime]:
        return [t for t in fire_times(inspect, name) if stopped < t < online]

    # fire_once: one run stands for the whole missed window, at its latest fire time.
    assert len(during_outage("catch-up")) == 1
    # skip: the missed fire times are dropped.
    assert during_outage("skip-it") == []
    # Both go on firing every second after the restart.
    for name in ("catch-up", "skip-it"):
        after = sorted(t for t in fire_times(inspect, name) if t >= online)
        assert len(after) >= 2
        assert {(b - a).total_seconds() for a, b in itertools.pairwise(after)} == {1.0}


def test_priorities_within_a_device_and_queue_caps(
    servers: EmbeddedServers, tmp_path, inspect: Inspect
) -> None:
    settings = unique_settings(servers, queues={"bulk": 3}, **FAST)
    roles = Roles(settings, tmp_path / "logs")
    view = Inspect(settings)
    try:
        roles.simulator(run_ms=400, jitter=0, progress=False)
        roles.consumer()
        roles.master()
        with SendScriptClient(settings) as client:
            first = client.submit("prio-dev", {"id": "first"}).task_id
            wait_for(lambda: view.db.task_exec_records.find_one({"task_id": first}), 10,
                     "the first task to start")
            low = [s.task_id for s in client.submit_many(
                [{"device_id": "prio-dev", "script": {"id": "low"}, "priority": 1}] * 4)]
            high = [s.task_id for s in client.submit_many(
                [{"device_id": "prio-dev", "script": {"id": "high"}, "priority": 9}] * 4)]
            bulk = [s.task_id for s in client.submit_many(
                [{"device_id": f"bulk-{i}", "script": {"id": "bulk"}, "queue": "bulk"}
                 for i in range(15)])]
            urgent = [s.task_id for s in client.submit_many(
                [{"device_id": f"urgent-{i}", "script": {"id": "urgent"}, "queue": "high"}
                 for i in range(6)])]
        every = [first, *low, *high, *bulk, *urgent]
        wait_for(lambda: view.db.script_tasks.count_documents(
            {"_id": {"$in": every}, "status": "success"}) == len(every), 60, "every task", 0.3)
        runs = roles.farm("runs")
        order = [r["task_id"] for r in sorted(runs, key=lambda r: r["started"])
                 if r["device_id"] == "prio-dev"]
        assert order[0] == first
        assert set(order[1:5]) == set(high) and set(order[5:]) == set(low)
        # Never more than 3 bulk scripts running on the farm at once.
        events = sorted([(r["started"], 1) for r in runs if r["task_id"] in bulk]
                        + [(r["ended"], -1) for r in runs if r["task_id"] in bulk])
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert peak == 3
        # The bulk backlog did not hold up the other queue.
        urgent_done = max(r["ended"] for r in runs if r["task_id"] in urgent)
        bulk_done = max(r["ended"] for r in runs if r["task_id"] in bulk)
        assert urgent_done < bulk_done
    finally:
        roles.stop()
        view.close()


def test_dedupe_fanout_cancel_and_expiry(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=1500, jitter=0, progress=False)
    roles.consumer()
    roles.master()
    with SendScriptClient(settings) as client:
        # Duplicate submissions with one dedupe key give one task, and say so.
        one = client.submit("dd-dev", {"id": "x"}, dedupe_key="order-42")
        again = client.submit("dd-dev", {"id": "x"}, dedupe_key="order-42")
        assert one.created and not again.created and again.task_id == one.task_id
        inspect.redis.lpush(settings.keys.ready, json.dumps(
            {"device_id": "dd-dev", "script": {"id": "x"}, "dedupe_key": "order-42"}))

        # Fan-out to a group of 50 devices.
        client.group_add("rack-7", [f"rack7-{i:02d}" for i in range(50)])
        batch = client.submit_fanout({"id": "update"}, group="rack-7")
        assert len(batch.tasks) == 50

        # Cancel in each status: waiting, pending (behind a long task), sent.
        waiting = client.submit("cx-1", {"id": "w"}, run_at=time.time() + 30)
        busy = client.submit("cx-2", {"id": "long"})
        pending = client.submit("cx-2", {"id": "queued"})
        wait_for(lambda: inspect.db.script_tasks.find_one({"_id": busy.task_id})["status"]
                 == "sent", 10, "the long task to be sent")
        assert client.cancel(waiting.task_id) == "waiting"
        assert client.cancel(pending.task_id) == "pending"
        assert client.cancel(busy.task_id) == "sent"
        assert client.cancel(busy.task_id) is None  # already over

        # Expiry: behind a long task, with a deadline it cannot meet.
        client.submit("ex-1", {"id": "long"})
        late = client.submit("ex-1", {"id": "late"}, expire_at=time.time() + 0.5)

    wait_for(lambda: client_batch_done(settings, batch.batch_id), 60, "the fan-out batch")
    wait_for(lambda: inspect.count("expired") == 1, 20, "the expiry")
    wait_for(lambda: inspect.db.task_exec_records.find_one(
        {"task_id": busy.task_id, "status": "success"}), 20, "the cancelled task's result")

    def stat(name: str) -> int:
        return int(inspect.redis.hget(settings.keys.stats, name) or 0)

    # Each count is written right after the change it counts: seen, not assumed.
    wait_for(lambda: stat("expired") >= 1 and stat("deduplicated") >= 1, 10,
             "the expired and deduplicated counts")
    dd = list(inspect.db.script_tasks.find({"dedupe_key": "order-42"}))
    assert len(dd) == 1
    assert int(inspect.redis.hget(settings.keys.stats, "deduplicated")) == 1
    statuses = {t["_id"]: t["status"] for t in inspect.db.script_tasks.find()}
    assert statuses[waiting.task_id] == "cancelled"
    assert statuses[pending.task_id] == "cancelled"
    assert statuses[busy.task_id] == "cancelled"  # its late result was recorded, not applied
    assert statuses[late.task_id] == "expired"
    expired = inspect.db.script_tasks.find_one({"_id": late.task_id})
    assert expired["last_error"].startswith("expired")
    assert int(inspect.redis.hget(settings.keys.stats, "expired")) == 1
    ran = {r["task_id"] for r in roles.farm("runs")}
    assert waiting.task_id not in ran and pending.task_id not in ran
    assert late.task_id not in ran
    # Over, the task keeps its dedupe key for the dedupe window (a day by default).
    with SendScriptClient(settings) as client:
        wait_for(lambda: inspect.db.script_tasks.find_one({"_id": one.task_id})["status"]
                 == "success", 20, "the deduped task")
        third = client.submit("dd-dev", {"id": "x"}, dedupe_key="order-42")
        assert not third.created and third.task_id == one.task_id


def test_cancel_a_task_waiting_for_its_retry(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=10, progress=False, http_error_rate=1.0)
    roles.consumer()
    roles.master()
    with SendScriptClient(settings) as client:
        task_id = client.submit("rw-1", {"id": "x"}, retry_base_s=1.0).task_id
        wait_for(lambda: inspect.db.script_tasks.find_one({"_id": task_id})["status"]
                 == "retry_waiting", 20, "the first attempt to fail")
        assert client.cancel(task_id) == "retry_waiting"
        roles.configure_farm(http_error_rate=0.0)
        # A canary on the same device, due after the retry would have been: once it
        # has run, the cancelled retry had its time and the device was free for it.
        retry_at = inspect.db.script_tasks.find_one({"_id": task_id})["run_at"].timestamp()
        canary = client.submit("rw-1", {"id": "canary"}, run_at=retry_at + 1.0).task_id
    wait_for(lambda: inspect.db.script_tasks.find_one({"_id": canary})["status"] == "success",
             20, "the canary due after the retry")
    task = inspect.db.script_tasks.find_one({"_id": task_id})
    assert task["status"] == "cancelled" and task["attempt"] == 1
    assert roles.farm()["requests"] == 2  # the first attempt and the canary: no retry


def client_batch_done(settings: Settings, batch_id: str) -> bool:
    with SendScriptClient(settings) as client:
        return client.batch_info(batch_id) == {"success": 50}


def test_retention_deletes_finished_tasks_records_and_logs(
    servers: EmbeddedServers, tmp_path
) -> None:
    settings = unique_settings(servers, retention_success_s=1.0, retention_failed_s=600.0,
                               retention_sweep_s=0.5)
    roles = Roles(settings, tmp_path / "logs")
    view = Inspect(settings)
    try:
        roles.simulator(run_ms=10, progress=False, fail_rate=0.0)
        roles.consumer()
        roles.master()
        with SendScriptClient(settings) as client:
            ok = client.submit("ret-1", {"id": "x"}).task_id
            kept = client.submit("ret-2", {"id": "y"}, run_at=time.time() + 3600).task_id
            assert client.cancel(kept) == "waiting"  # cancelled: kept 600 s
        wait_for(lambda: view.db.task_exec_records.count_documents({"task_id": ok}) > 0, 30,
                 "the successful task's exec record")
        # Tasks and records are swept one after the other, and a record's purge time
        # is set a moment after its task's: wait for both to go.
        wait_for(lambda: view.db.script_tasks.find_one({"_id": ok}, {"status": 1}) is None, 30,
                 "retention to delete the successful task")
        wait_for(lambda: view.db.task_exec_records.count_documents({"task_id": ok}) == 0, 10,
                 "retention to delete the successful task's records")
        assert view.db.script_tasks.find_one({"_id": kept})["status"] == "cancelled"
        indexes = view.db.task_logs.index_information()
        assert any(i.get("expireAfterSeconds") == 600 for i in indexes.values())
    finally:
        roles.stop()
        view.close()
