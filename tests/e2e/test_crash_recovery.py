"""A worker killed mid-task, at a chosen step (the handler's test-only crash point),
or a master SIGKILLed with its workers while they hold tasks at chosen steps: a
task that provably never reached central-control runs again at once, with its
attempt unused; one that may have reached it waits for its result or its result
timeout, and is never sent twice for one attempt (checked from the farm's side)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from tests.support import Inspect, Roles, unique_settings, wait_for

pytestmark = pytest.mark.e2e

# The sweeps that used to free such a task (stuck running, orphaned lock) are far
# off: a task back within the wait below was released by the master itself.
SLOW_SWEEPS = {"running_stuck_s": 300.0, "orphan_lock_grace_s": 300.0, "workers": 1,
               "sweep_interval_s": 0.5, "leader_lease_s": 3.0, "heartbeat_ttl_s": 2.0}
SOON_S = 12.0  # far below the tasks' timeout_s (120) and the sweeps' graces (300)


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **SLOW_SWEEPS)


def task_doc(inspect: Inspect, task_id: str) -> dict:
    return inspect.db.script_tasks.find_one({"_id": task_id}) or {}


def records(inspect: Inspect, task_id: str) -> list[dict]:
    return sorted(inspect.db.task_exec_records.find({"task_id": task_id}),
                  key=lambda r: r["attempt"])


def farm_runs(roles: Roles, task_id: str) -> int:
    return sum(1 for run in roles.farm("runs") if run["task_id"] == task_id)


def crash(point_file: Path, point: str, device: str) -> None:
    point_file.write_text(f"{point} {device}")


def test_a_dead_worker_s_unsent_task_runs_again_at_once_and_a_sent_one_waits(
    settings: Settings, roles: Roles, inspect: Inspect, tmp_path: Path,
) -> None:
    point_file = tmp_path / "crash-point"
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    master = roles.master(test_crash_point=point_file)
    with SendScriptClient(settings) as client:
        # 1. Killed after locking and claiming, before its record: never sent. Its one
        # attempt (max_retries 0) is not used: it runs again, now, and succeeds.
        crash(point_file, "before-record", "cr-1")
        unsent = client.submit("cr-1", {"id": "x"}, timeout_s=120, max_retries=0).task_id
        wait_for(lambda: task_doc(inspect, unsent).get("status") == "success", SOON_S,
                 "the unsent task to run again at once")
        assert not point_file.exists(), "the worker did not reach the crash point"
        doc = task_doc(inspect, unsent)
        assert doc["attempt"] == 1 and "died before sending" in (doc.get("last_error") or "")
        assert [(r["attempt"], r["status"]) for r in records(inspect, unsent)] == [
            (1, "success")]
        assert farm_runs(roles, unsent) == 1

        # 2. Killed after the POST: the device runs it and reports; nothing re-sends it.
        crash(point_file, "after-send", "cr-2")
        sent = client.submit("cr-2", {"id": "x"}, timeout_s=120, max_retries=2).task_id
        wait_for(lambda: task_doc(inspect, sent).get("status") == "success", SOON_S + 10,
                 "the sent task's result")
        assert not point_file.exists()
        assert task_doc(inspect, sent)["attempt"] == 1
        assert [r["status"] for r in records(inspect, sent)] == ["success"]
        assert farm_runs(roles, sent) == 1

        # 3. Killed with its record written, before the POST: it may have been sent as
        # far as anyone can tell, so it waits for its result timeout; then its record
        # is closed (not left running) and the retry runs.
        crash(point_file, "before-send", "cr-3")
        maybe = client.submit("cr-3", {"id": "x"}, timeout_s=3.0, max_retries=1).task_id
        wait_for(lambda: task_doc(inspect, maybe).get("status") == "success", SOON_S + 10,
                 "the maybe-sent task, after its result timeout")
        assert not point_file.exists()
        first, second = records(inspect, maybe)
        assert (first["attempt"], first["status"]) == (1, "timeout")
        assert first.get("sent_at") is None
        assert (second["attempt"], second["status"]) == (2, "success")
        # Not before the timeout: the first attempt's silence was waited for.
        assert (second["started_at"] - first["started_at"]).total_seconds() >= 3.0
        assert farm_runs(roles, maybe) == 1
    assert roles.farm()["refused_busy"] == 0
    log = master.log_path.read_text() if master.log_path else ""
    assert log.count("died (exit code -9)") == 3, roles.logs()


# -- a master SIGKILLed with its workers -----------------------------------------------------
NEVER_SENT = ("mk-1", "before-record")
NEVER_SENT_2 = ("mk-2", "before-record")
MAYBE_SENT = ("mk-3", "before-send")
MAYBE_TIMEOUT_S = 4.0


def hold_file(point_file: Path, device: str, point: str) -> Path:
    return Path(f"{point_file}.hold-{point}-{device}")


def park_three(client: SendScriptClient, point_file: Path) -> dict[str, str]:
    """Three tasks, each parked by its worker at a known step: two claimed with no
    record (never sent), one with its record written (as good as sent). Task ids by
    device."""
    ids = {}
    for device, point in (NEVER_SENT, NEVER_SENT_2, MAYBE_SENT):
        hold_file(point_file, device, point).write_text("")
        maybe = (device, point) == MAYBE_SENT
        ids[device] = client.submit(device, {"id": "x"}, max_retries=1 if maybe else 0,
                                    timeout_s=MAYBE_TIMEOUT_S if maybe else 120).task_id
    for device, point in (NEVER_SENT, NEVER_SENT_2, MAYBE_SENT):
        held = Path(f"{hold_file(point_file, device, point)}.held")
        wait_for(held.exists, 15, f"a worker parked at {point} with {device}'s task")
    return ids


def check_after_recovery(roles: Roles, inspect: Inspect, ids: dict[str, str],
                         killed_at: float) -> None:
    for device, _ in (NEVER_SENT, NEVER_SENT_2):
        task_id = ids[device]
        wait_for(lambda t=task_id: task_doc(inspect, t).get("status") == "success", SOON_S,
                 f"{device}'s never-sent task to run again at once")
        doc = task_doc(inspect, task_id)
        assert doc["attempt"] == 1 and "died before its worker sent it" in doc["last_error"]
        # The taken attempt is filed as never sent; the one that ran is attempt 1.
        assert [(r["attempt"], r["status"]) for r in records(inspect, task_id)] == [
            (-1, "cancelled"), (1, "success")]
        assert farm_runs(roles, task_id) == 1
    # Back well before its 120 s result timeout and the sweeps' 300 s graces.
    assert time.monotonic() - killed_at < 60
    maybe = ids[MAYBE_SENT[0]]
    wait_for(lambda: task_doc(inspect, maybe).get("status") == "success",
             SOON_S + MAYBE_TIMEOUT_S, "the maybe-sent task, after its result timeout")
    first, second = records(inspect, maybe)
    assert (first["attempt"], first["status"]) == (1, "timeout")
    assert (second["attempt"], second["status"]) == (2, "success")
    assert (second["started_at"] - first["started_at"]).total_seconds() >= MAYBE_TIMEOUT_S
    assert farm_runs(roles, maybe) == 1  # parked before its POST: only attempt 2 ran
    runs = roles.farm("runs")
    per_record: dict[str, int] = {}
    for run in runs:
        per_record[run["record_id"]] = per_record.get(run["record_id"], 0) + 1
    assert max(per_record.values()) == 1, "a record was sent twice"
    assert roles.farm()["refused_busy"] == 0


def kill_group(master: RoleProcess) -> float:
    master.kill_group()
    return time.monotonic()


def test_a_master_killed_with_its_workers_takes_back_their_unsent_tasks_on_restart(
    settings: Settings, roles: Roles, inspect: Inspect, tmp_path: Path,
) -> None:
    point_file = tmp_path / "crash-point"
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    master = roles.master(test_crash_point=point_file)
    with SendScriptClient(settings) as client:
        ids = park_three(client, point_file)
    killed_at = kill_group(master)
    again = roles.master("master-again")
    check_after_recovery(roles, inspect, ids, killed_at)
    log = again.log_path.read_text() if again.log_path else ""
    assert f"dead master {settings.master_id}: 2 attempt(s) in flight never sent" in log


def test_the_leader_takes_back_a_dead_peer_s_unsent_tasks(
    settings: Settings, roles: Roles, inspect: Inspect, tmp_path: Path,
) -> None:
    point_file = tmp_path / "crash-point"
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    doomed = roles.master(test_crash_point=point_file)
    with SendScriptClient(settings) as client:
        ids = park_three(client, point_file)
    peer = roles.master("peer", master_id=f"{settings.master_id}-peer")
    killed_at = kill_group(doomed)
    check_after_recovery(roles, inspect, ids, killed_at)
    log = peer.log_path.read_text() if peer.log_path else ""
    assert f"dead master {settings.master_id}: 2 attempt(s) in flight never sent" in log
