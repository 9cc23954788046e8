"""Benching end to end: the master, consumer and simulated farm as processes.

One device of the farm always answers SYSTEM_ERROR. After SENDSCRIPT_BENCH_AFTER (3)
attempts in a row it is benched (a 120 s cool-down here, so only the resume can end
it within the test): its tasks wait on the master's board, pending with no attempt
used, while other devices' tasks run; `sendscript status` shows the bench and the
incident; once the device is fixed, `sendscript device resume` lets its tasks run.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from tests.support import Inspect, Roles, cli, unique_settings, wait_for

pytestmark = pytest.mark.e2e


def test_a_sick_device_is_benched_its_tasks_wait_and_resume_runs_them(
        servers: EmbeddedServers, tmp_path: Path) -> None:
    settings = unique_settings(servers, bench_after=3, bench_cooldown_s=120,
                               retry_base_s=0.3, retry_jitter=0.0, bench_alert_count=5)
    roles = Roles(settings, tmp_path)
    inspect = Inspect(settings)
    client = SendScriptClient(settings)
    tag = uuid.uuid4().hex[:6]
    sick, well = f"sick-{tag}", [f"well-{tag}-{i}" for i in range(4)]
    db = inspect.db

    def docs(ids: list[str]) -> list[dict[str, Any]]:
        return list(db.script_tasks.find({"_id": {"$in": ids}}))

    def succeeded(ids: list[str]) -> bool:
        return db.script_tasks.count_documents(
            {"_id": {"$in": ids}, "status": "success"}) == len(ids)

    def submit(devices: list[str], **extra: Any) -> list[str]:
        return [s.task_id for s in client.submit_many(
            [{"device_id": d, "script": {"id": "tap"}, **extra} for d in devices])]

    def benching() -> dict[str, Any]:
        return (roles.master_info() or {}).get("benching", {})

    try:
        roles.simulator(run_ms=20, jitter=0.2)
        roles.configure_farm(device_outcomes={sick: "SYSTEM_ERROR"})
        roles.consumer()
        roles.master()

        first = submit([sick], max_retries=6)
        early = submit(well)
        wait_for(lambda: sick in client.benched_devices(), 30, "the sick device benched",
                 interval_s=0.2)
        # Its first task failed 3 times; its retry comes back and waits at the gate.
        wait_for(lambda: benching().get("held") == 1 and docs(first)[0]["status"] == "pending",
                 20, "the master to hold the sick device's task")
        waiting = submit([sick] * 3)
        later = submit(well * 2)
        wait_for(lambda: succeeded(early + later), 30, "the other devices' tasks")

        [a] = docs(first)
        assert a["attempt"] == 3 and a["status"] == "pending", a
        records = list(db.task_exec_records.find({"task_id": a["_id"]}))
        assert sorted((r["attempt"], r["status"]) for r in records) == [
            (1, "failed"), (2, "failed"), (3, "failed")]
        assert all(r["error"].startswith("SYSTEM_ERROR") for r in records)
        assert {(d["status"], d["attempt"]) for d in docs(waiting)} == {("pending", 0)}
        assert db.task_exec_records.count_documents({"task_id": {"$in": waiting}}) == 0
        runs = [r for r in roles.farm("runs") if r["device_id"] == sick]
        assert len(runs) == 3
        bench = client.benched_devices()[sick]
        assert (bench["streak"], bench["level"]) == (3, 1)
        assert bench["why"].startswith("SYSTEM_ERROR") and 60 < bench["left_s"] <= 120

        info = json.loads(cli(settings, "status", "--json"))
        assert list(info["benched"]["devices"]) == [sick]
        assert info["benched"]["limits"]["after"] == 3
        assert {(i["incident"], i["key"], i["on"]) for i in info["alerts"]["incidents"]} >= {
            ("device_benched", sick, True)}
        text = cli(settings, "status")
        assert "benched devices" in text and sick in text
        assert sick in cli(settings, "device", "list")

        roles.configure_farm(device_outcomes={})  # fixed
        assert f"resumed device {sick}" in cli(settings, "device", "resume", sick)
        # The master re-asks a held device only when its 120 s bench ends: the resume
        # itself woke it.
        wait_for(lambda: succeeded(first + waiting), 20, "the sick device's tasks after resume")
        assert docs(first)[0]["attempt"] == 4
        assert {d["attempt"] for d in docs(waiting)} == {1}
        assert client.benched_devices() == {}
        wait_for(lambda: benching().get("benched_count") == 0 and benching().get("held") == 0,
                 10, "the master to drop the bench")
        incidents = json.loads(cli(settings, "status", "--json"))["alerts"]["incidents"]
        assert ("device_benched", sick, False) in {
            (i["incident"], i["key"], i["on"]) for i in incidents}
        stats = {k.decode(): int(v) for k, v in inspect.redis.hgetall(
            settings.keys.stats).items()}
        assert stats["devices_benched"] == 1 and stats.get("late_results", 0) == 0
    except BaseException:
        print(roles.logs())
        raise
    finally:
        client.close()
        roles.stop()
        inspect.close()


def test_a_result_after_the_deadline_is_applied_and_recorded_late(
        servers: EmbeddedServers, tmp_path: Path) -> None:
    settings = unique_settings(servers)
    roles = Roles(settings, tmp_path)
    inspect = Inspect(settings)
    client = SendScriptClient(settings)
    tag = uuid.uuid4().hex[:6]
    try:
        roles.simulator(run_ms=3000, jitter=0.0)
        roles.consumer()
        roles.master()
        now = datetime.now(UTC)
        # Both are sent at once; the devices answer 3 s later: after one's deadline.
        late = submit_one(client, f"late-{tag}", expire_at=now + timedelta(seconds=1.5))
        in_time = submit_one(client, f"ok-{tag}", expire_at=now + timedelta(seconds=60))
        wait_for(lambda: inspect.db.script_tasks.count_documents(
            {"_id": {"$in": [late, in_time]}, "status": "success"}) == 2, 30,
            "both results applied")
        records = {r["task_id"]: r for r in inspect.db.task_exec_records.find(
            {"task_id": {"$in": [late, in_time]}})}
        assert records[late]["status"] == "success" and records[late]["late"] is True
        assert records[late]["deadline"] < records[late]["finished_at"]
        assert "late" not in records[in_time]
        assert int(inspect.redis.hget(settings.keys.stats, "late_results") or 0) == 1
    except BaseException:
        print(roles.logs())
        raise
    finally:
        client.close()
        roles.stop()
        inspect.close()


def submit_one(client: SendScriptClient, device: str, **extra: Any) -> str:
    return client.submit(device, {"id": "tap"}, **extra).task_id
