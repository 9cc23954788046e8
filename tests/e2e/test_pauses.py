"""Pauses end to end: the master, consumer and simulated farm as processes, one set-up
shared by every case (each case uses devices, queues and groups of its own).

The master re-asks a held device only every 60 s here (SENDSCRIPT_PAUSE_RECHECK_S), so
tasks that run within the waits below after a resume were woken by the resume itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sendscript import pauses
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings
from tests.support import Inspect, Roles, cli, unique_settings, wait_for

pytestmark = pytest.mark.e2e

PER_CASE = 4


class Stack:
    def __init__(self, settings: Settings, roles: Roles, inspect: Inspect) -> None:
        self.settings = settings
        self.roles = roles
        self.inspect = inspect
        self.client = SendScriptClient(settings)

    def pauses_seen(self) -> dict[str, Any]:
        info = self.roles.master_info()
        return (info or {}).get("pauses", {})

    def wait_seen(self, active: set[str]) -> dict[str, Any]:
        """The master's heartbeat shows exactly these pauses in force."""
        return wait_for(lambda: (p := self.pauses_seen()) and set(p["active"]) == active and p,
                        10, f"the master to see pauses {active}")

    def wait_held(self, scope: str, devices: int) -> None:
        wait_for(lambda: self.pauses_seen().get("held", {}).get(scope) == devices, 10,
                 f"the master to hold {devices} device(s) for {scope}")

    def submit(self, devices: list[str], tag: str, **extra: Any) -> list[str]:
        specs = [{"device_id": d, "script": {"id": "tap", "args": {"case": tag}}, **extra}
                 for d in devices]
        return [s.task_id for s in self.client.submit_many(specs)]

    def docs(self, ids: list[str]) -> list[dict[str, Any]]:
        return list(self.inspect.db.script_tasks.find({"_id": {"$in": ids}}))

    def wait_success(self, ids: list[str], what: str) -> None:
        wait_for(lambda: self.inspect.db.script_tasks.count_documents(
            {"_id": {"$in": ids}, "status": "success"}) == len(ids), 20, what, interval_s=0.2)

    def assert_held(self, ids: list[str]) -> None:
        docs = self.docs(ids)
        assert {(d["status"], d["attempt"]) for d in docs} == {("pending", 0)}, docs
        assert self.inspect.db.task_exec_records.count_documents({"task_id": {"$in": ids}}) == 0

    def assert_ran_once(self, ids: list[str]) -> None:
        assert {(d["status"], d["attempt"]) for d in self.docs(ids)} == {("success", 1)}
        records = list(self.inspect.db.task_exec_records.find({"task_id": {"$in": ids}}))
        assert sorted(r["task_id"] for r in records) == sorted(ids)


@pytest.fixture(scope="module")
def stack(servers: EmbeddedServers,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = unique_settings(servers)
    roles = Roles(settings, tmp_path_factory.mktemp("pause-logs"))
    inspect = Inspect(settings)
    try:
        roles.simulator(run_ms=20, jitter=0.2)
        roles.consumer()
        roles.master(pause_recheck_s=60, quota_probe_s=1)
        s = Stack(settings, roles, inspect)
        s.wait_seen(set())
        yield s
        s.client.close()
    except BaseException:
        print(roles.logs())
        raise
    finally:
        roles.stop()
        inspect.close()


@pytest.mark.parametrize("kind", ["global", "queue", "group", "device"])
def test_a_pause_holds_its_scope_only_and_resume_runs_it_on_attempt_1(
        stack: Stack, kind: str) -> None:
    tag = f"{kind}-{uuid.uuid4().hex[:6]}"
    held_devices = [f"{tag}-p{i}" for i in range(PER_CASE)]
    free_devices = [f"{tag}-f{i}" for i in range(PER_CASE)]
    queue = f"q-{tag}"
    target: dict[str, str] = {}
    if kind == "queue":
        target = {"queue": queue}
    elif kind == "group":
        stack.client.group_add(f"g-{tag}", held_devices)
        target = {"group": f"g-{tag}"}
    elif kind == "device":
        target = {"device": held_devices[0]}
        held_devices = held_devices[:1] * 3  # three tasks queued on the one paused device
    pause = stack.client.pause(**target, reason=f"test {tag}")
    try:
        stack.wait_seen({pause.scope})
        held = stack.submit(held_devices, tag, **({"queue": queue} if kind == "queue" else {}))
        # Same queue, other devices (group, device) or other queue, same kind of devices.
        free = [] if kind == "global" else stack.submit(free_devices, tag)
        stack.wait_success(free, "the tasks no pause covers")
        stack.wait_held(pause.scope, len(set(held_devices)))
        stack.assert_held(held)
    finally:
        lifted = stack.client.resume(**target)
    assert lifted is not None and lifted.scope == pause.scope
    stack.wait_success(held, "the held tasks, after resume")
    stack.assert_ran_once(held + free)
    assert stack.wait_seen(set())["held"] == {}


def test_the_hard_stop_holds_until_resume_hard(stack: Stack) -> None:
    settings = stack.settings
    tag = f"hard-{uuid.uuid4().hex[:6]}"
    r = stack.inspect.redis
    incidents = stack.pauses_seen()["incidents"]
    pauses.set_hard_stop_sync(r, settings.keys, "drop rate 40% over 60 s")
    assert "paused global: maintenance" in cli(settings, "pause", "--reason", "maintenance")
    try:
        stack.wait_seen({pauses.HARD, pauses.GLOBAL})
        ids = stack.submit([f"{tag}-{i}" for i in range(PER_CASE)], tag)
        stack.wait_held(pauses.HARD, PER_CASE)
        shown = cli(settings, "status", "--json")
        assert '"hard"' in shown and "drop rate 40% over 60 s" in shown
        assert "maintenance" in cli(settings, "status")
        # A plain resume lifts the global pause only: the master sees it gone, and the
        # hard stop still holds every task.
        out = cli(settings, "resume")
        assert "resumed global" in out and "hard stop is still on" in out
        seen = stack.wait_seen({pauses.HARD})
        assert seen["held"] == {pauses.HARD: PER_CASE}
        stack.assert_held(ids)
        assert list(stack.client.pauses()) == [pauses.HARD]
        assert "drop-rate" in cli(settings, "pause", "list")
    finally:
        out = cli(settings, "resume", "--hard")
    assert "resumed hard" in out
    stack.wait_success(ids, "the tasks after resume --hard")
    stack.assert_ran_once(ids)
    assert stack.client.pauses() == {}
    # Each pause raised its incident once when it began and once when it ended.
    after = stack.wait_seen(set())["incidents"]
    assert after.get("hard_stop", 0) - incidents.get("hard_stop", 0) == 2
    assert after.get("paused", 0) - incidents.get("paused", 0) == 2


def test_the_quota_pause_lets_one_probe_through_and_its_success_lifts_it(
        stack: Stack) -> None:
    settings = stack.settings
    tag = f"quota-{uuid.uuid4().hex[:6]}"
    before = stack.pauses_seen()["quota_probes"]
    pauses.set_quota_sync(stack.inspect.redis, settings.keys, "quota exhausted")
    try:
        stack.wait_seen({pauses.QUOTA})
        ids = stack.submit([f"{tag}-{i}" for i in range(PER_CASE)], tag)
        stack.wait_success(ids, "the tasks, once a probe lifted the quota pause")
        wait_for(lambda: stack.client.pauses() == {}, 10, "the probe to lift the quota pause")
    finally:
        pauses.clear_quota_sync(stack.inspect.redis, settings.keys)
    stack.assert_ran_once(ids)
    seen = stack.wait_seen(set())
    assert seen["quota_probes"] == before + 1
