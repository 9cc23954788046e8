"""Backpressure against the running service: a master holds no more than its high
water (plus one intake batch) however many items wait in the ready list, resumes
at low water and runs every task; producers opted in to SENDSCRIPT_READY_MAX are
refused with QueueFull and store nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sendscript.client import QueueFull, SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, wait_for

pytestmark = pytest.mark.e2e

HIGH, LOW, BATCH = 50, 10, 20
TASKS, DEVICES = 500, 25


def item(n: int) -> str:
    return json.dumps({"device_id": f"bp-{n % DEVICES}", "script": {"id": "tap", "n": n}})


def test_master_holds_at_most_high_water_and_runs_every_task(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=150)  # devices slower than intake: without marks the board fills
    roles.consumer()
    master = roles.master(high_water=HIGH, low_water=LOW, intake_batch=BATCH)
    inspect.redis.lpush(settings.keys.ready, *[item(i) for i in range(TASKS)])

    samples: list[dict[str, Any]] = []

    def sampled_until_done() -> bool:
        info = roles.master_info() or {}
        if bp := info.get("backpressure"):
            samples.append({**bp, "ready": inspect.redis.llen(settings.keys.ready)})
        assert master.running, roles.logs()
        return inspect.count("success") == TASKS

    wait_for(sampled_until_done, 240, f"the {TASKS} tasks to succeed", interval_s=0.25)

    # Every heartbeat sample, and the peak the master itself saw at each event.
    assert samples and max(s["held"] for s in samples) <= HIGH + BATCH
    # The rest waited in Redis meanwhile, not in the master.
    assert any(s["state"] == "throttled" and s["ready"] > 0 for s in samples), samples[:20]
    final = wait_for(lambda: (roles.master_info() or {}).get("backpressure", {}).get(
        "state") == "open" and roles.master_info(), 10, "intake open again")
    bp = final["backpressure"]
    assert bp["peak_held"] <= HIGH + BATCH
    assert (bp["high_water"], bp["low_water"]) == (HIGH, LOW)
    # It did close (and so it reopened: every task was taken afterwards); the incident
    # was announced once each way per closing.
    assert bp["throttled_times"] >= 1
    assert final["events"].get("Incident", 0) == 2 * bp["throttled_times"]
    assert inspect.redis.llen(settings.keys.ready) == 0
    assert inspect.db.script_tasks.count_documents({}) == TASKS
    assert inspect.db.task_exec_records.count_documents({}) == TASKS  # one attempt each
    assert roles.farm()["refused_busy"] == 0  # one script per device at a time still


def test_producers_are_refused_at_the_ready_cap_and_store_nothing(
    settings: Settings, inspect: Inspect
) -> None:
    cap = 5
    capped = settings.model_copy(update={"ready_max": cap})
    with SendScriptClient(capped) as client:
        # Below the cap: accepted (no master runs, so the items stay on the list).
        client.submit_many([{"device_id": f"d{i}", "script": {"id": "x"}} for i in range(4)])
        assert inspect.redis.llen(settings.keys.ready) == 4
        client.submit("d4", {"id": "x"})  # 4 < 5: taken; the list now holds 5
        stored = inspect.db.script_tasks.count_documents({})
        assert stored == 5

        calls = {
            "submit": lambda: client.submit("d9", {"id": "x"}),
            "submit_many": lambda: client.submit_many(
                [{"device_id": "d9", "script": {"id": "x"}}] * 3),
            "submit_fanout": lambda: client.submit_fanout({"id": "x"}, devices=["a", "b"]),
        }
        for name, call in calls.items():
            with pytest.raises(QueueFull) as refused:
                call()
            assert (refused.value.length, refused.value.cap) == (5, cap), name
            assert "5" in str(refused.value) and "SENDSCRIPT_READY_MAX" in str(refused.value)
        assert inspect.db.script_tasks.count_documents({}) == stored  # nothing stored
        assert inspect.redis.llen(settings.keys.ready) == 5  # nothing pushed

    # The CLI prints the refusal and exits non-zero (75, EX_TEMPFAIL), storing nothing.
    env = settings_env(settings, ready_max=cap)
    env["NO_COLOR"], env["COLUMNS"] = "1", "200"
    for args in (["submit", "d9"], ["submit", "--device-list", "a,b"]):
        done = subprocess.run([sys.executable, "-m", "sendscript", *args], env=env,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 75, done.stdout + done.stderr
        assert "ready queue full" in done.stdout and "cap 5" in done.stdout
    assert inspect.db.script_tasks.count_documents({}) == stored

    # With the cap off (the default), the same client is not refused.
    with SendScriptClient(settings) as client:
        client.submit("d9", {"id": "x"})
    assert inspect.redis.llen(settings.keys.ready) == 6


def test_status_shows_the_marks_and_the_cap(settings: Settings, roles: Roles) -> None:
    roles.simulator(run_ms=10)
    roles.master(high_water=HIGH, low_water=LOW)
    env = settings_env(settings, ready_max=7)
    env["NO_COLOR"], env["COLUMNS"] = "1", "250"
    done = subprocess.run([sys.executable, "-m", "sendscript", "status"], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "(cap 7)" in done.stdout
    assert f"open: 0/{HIGH}/{LOW}" in done.stdout, done.stdout
    done = subprocess.run([sys.executable, "-m", "sendscript", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    info = json.loads(done.stdout)
    assert info["queue_ready_max"] == 7
    bp = info["masters"][0]["backpressure"]
    assert (bp["state"], bp["high_water"], bp["low_water"]) == ("open", HIGH, LOW)
