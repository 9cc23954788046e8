"""Dedupe modes and debounce end to end: queue items taken by two masters, and a
master killed (SIGKILL) inside a debounce's quiet period. What ran is read from the
farm's side (the simulator's runs, with the script each was sent)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings
from tests.support import Inspect, Roles, cli, settings_env, unique_settings, wait_for

pytestmark = pytest.mark.e2e

FAST = {"heartbeat_ttl_s": 2.0, "delay_load_interval_s": 1.0}
SILENT = {"dev-start": "SILENT", "dev-result": "SILENT"}  # sent, never a result


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **FAST)


def item(device: str, key: str, version: int = 1, **fields: Any) -> dict[str, Any]:
    return {"device_id": device, "script": {"id": "job", "args": {"v": version}},
            "dedupe_key": key, "timeout_s": 600, **fields}


class View:
    def __init__(self, settings: Settings, inspect: Inspect, roles: Roles,
                 push: Callable[[list[dict[str, Any]]], None]) -> None:
        self.settings, self.inspect, self.roles, self.push = settings, inspect, roles, push

    def tasks(self, key: str) -> list[dict[str, Any]]:
        return list(self.inspect.db.script_tasks.find({"dedupe_key": key}).sort("created_at"))

    def status(self, key: str) -> str | None:
        found = self.tasks(key)
        return found[0]["status"] if found else None

    def stat(self, name: str) -> int:
        return int(self.inspect.redis.hget(self.settings.keys.stats, name) or 0)

    def runs(self, task_id: str) -> list[dict[str, Any]]:
        return [r for r in self.roles.farm("runs") if r["task_id"] == task_id]


def test_each_mode_with_two_masters(settings: Settings, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=100, jitter=0, progress=False)
    roles.configure_farm(device_outcomes=SILENT)
    roles.consumer()
    roles.masters([settings.master_id, settings.master_id + "-b"], workers=1)
    with SendScriptClient(settings) as client:
        view = View(settings, inspect, roles, client.push_raw)
        firsts = [item("dev-start", "s", dedupe_mode="until_start"),
                  item("dev-result", "r", dedupe_mode="until_result"),
                  item("dev-done", "rr", dedupe_mode="until_result"),
                  item("dev-window", "w", dedupe_window_s=5)]
        view.push(firsts)
        wait_for(lambda: view.status("s") == view.status("r") == "sent"
                 and view.status("rr") == view.status("w") == "success",
                 20, "the first of each mode started (s, r) or done (rr, w)")
        view.push(firsts)  # each mode's second submission, well inside w's window
        # Debounce: five submissions 0.3 s apart, each well inside the 3 s quiet period.
        for version in range(1, 6):
            view.push([item("dev-debounce", "d", version, debounce_s=3, debounce_max_s=20)])
            time.sleep(0.3)
        wait_for(lambda: len(view.tasks("s")) == 2 and len(view.tasks("rr")) == 2
                 and view.stat("deduplicated") - view.stat("debounced") == 2, 20,
                 "until_start and until_result after the result make new tasks; "
                 "until_result and window before their ends do not")
        assert len(view.tasks("r")) == 1 and len(view.tasks("w")) == 1

        window_ends = view.tasks("w")[0]["finished_at"].timestamp() + 5
        wait_for(lambda: time.time() > window_ends + 0.2, 10, "the window to pass")
        view.push([item("dev-window", "w", 2, dedupe_window_s=5)])
        wait_for(lambda: len(view.tasks("w")) == 2, 10, "a new task once the window passed")

        debounced = wait_for(lambda: [t for t in view.tasks("d") if t["status"] == "success"],
                             20, "the debounced task's result")
    assert len(view.tasks("d")) == 1 and view.stat("debounced") == 4
    (task,) = debounced
    assert task["script"]["args"] == {"v": 5} and task["debounce_seq"] == 4
    runs = view.runs(task["_id"])
    assert [r["script"]["args"] for r in runs] == [{"v": 5}], runs  # once, the latest


def test_a_master_killed_in_the_quiet_period_leaves_one_run_of_the_latest_spec(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=100, jitter=0, progress=False)
    roles.consumer()
    masters = roles.masters([settings.master_id, settings.master_id + "-b"], workers=1)
    with SendScriptClient(settings) as client:
        view = View(settings, inspect, roles, client.push_raw)
        # A quiet period long enough that a loaded machine still takes the third
        # submission inside it: past it, the task fires and the third is a duplicate.
        spec = {"debounce_s": 8, "debounce_max_s": 40}
        view.push([item("dev-k", "k", 1, **spec)])
        held = wait_for(lambda: view.tasks("k"), 10, "a master to store the first")[0]
        assert held["status"] == "waiting" and held["master"] in masters
        view.push([item("dev-k", "k", 2, **spec)])
        wait_for(lambda: view.stat("debounced") == 1, 10, "the second debounced")
        masters[held["master"]].kill()  # SIGKILL inside the quiet period: its hold stays
        survivor = next(m for m in masters if m != held["master"])
        view.push([item("dev-k", "k", 3, **spec)])  # only the survivor takes it now
        wait_for(lambda: view.stat("debounced") == 2, 10, "the third debounced")
        assert view.status("k") == "waiting"  # still quiet: nothing ran yet
        assert view.runs(held["_id"]) == []
        done = wait_for(lambda: view.status("k") == "success", 30, "the task's result")
    assert done
    (task,) = view.tasks("k")
    assert task["script"]["args"] == {"v": 3} and task["debounce_seq"] == 2
    assert task["master"] == survivor  # taken over from the dead one
    assert [r["script"]["args"] for r in view.runs(task["_id"])] == [{"v": 3}]
    assert inspect.db.task_exec_records.count_documents({"task_id": task["_id"]}) == 1


def test_the_cli_submits_a_mode_and_a_debounce_and_shows_them(
    settings: Settings, inspect: Inspect
) -> None:
    debounce = ("--dedupe-key", "sync:p1", "--debounce-s", "60")
    first = cli(settings, "submit", "p1", "--script", '{"id": "sync", "args": {"v": 1}}',
                *debounce, "--debounce-max-s", "120", "--dedupe-mode", "until_start")
    task_id, status = first.split()
    assert status == "waiting"
    assert inspect.db.script_tasks.find_one({"_id": task_id})["dedupe_mode"] == "until_start"
    again = cli(settings, "submit", "p1", "--script", '{"id": "sync", "args": {"v": 2}}',
                *debounce)
    assert again.strip() == f"{task_id} waiting (debounced into the existing task with this " \
                            "dedupe key)"
    doc = inspect.db.script_tasks.find_one({"_id": task_id})
    assert doc["script"]["args"] == {"v": 2} and doc["debounce_max_s"] == 120
    assert "dedupe_mode" not in doc  # the latest spec gave none
    info = cli(settings, "task", "info", task_id)
    assert "dedupe: key 'sync:p1' · no mode given" in info
    assert "debouncing: runs at" in info and "1 later submission(s) merged" in info
    refused = subprocess.run(
        [sys.executable, "-m", "sendscript", "submit", "p3", "--debounce-s", "5"],
        env=settings_env(settings), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert refused.returncode != 0
    assert "only with a dedupe_key" in refused.stdout + refused.stderr
    assert inspect.db.script_tasks.count_documents({"device_id": "p3"}) == 0
