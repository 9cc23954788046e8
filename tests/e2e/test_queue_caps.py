"""A queue cap across two master processes, checked from the farm's side: never more
of the capped queue's scripts running at once than its cap, though each master alone
would run that many."""

from __future__ import annotations

import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

CAP = 2


def most_at_once(runs: list[dict]) -> int:
    edges = sorted([(r["started"], 1) for r in runs] + [(r["ended"], -1) for r in runs],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same time
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_two_masters_keep_a_queue_to_its_cap(roles: Roles, settings: Settings,
                                             inspect: Inspect) -> None:
    roles.simulator(run_ms=300, jitter=0.2, progress=False)
    roles.consumer()
    for name in ("master-a", "master-b"):
        roles.master(name, master_id=f"{settings.master_id}-{name}", queues=f"vip={CAP}")
    with SendScriptClient(settings) as sdk:
        vip = [s.task_id for s in sdk.submit_many(
            [{"device_id": f"v{i}", "script": {"id": "s"}, "queue": "vip"}
             for i in range(24)])]
        sdk.submit_many([{"device_id": f"o{i}", "script": {"id": "s"}} for i in range(24)])
    wait_for(lambda: inspect.count("success") == 48, 90, "every task a success", 0.3)
    runs = [r for r in roles.farm("runs") if r["task_id"] in set(vip)]
    others = [r for r in roles.farm("runs") if r["task_id"] not in set(vip)]
    assert len(runs) == 24 and roles.farm()["overlaps"] == 0
    assert most_at_once(runs) <= CAP
    assert most_at_once(others) > CAP  # the uncapped queue ran wider meanwhile
    # Both masters dispatched the capped queue's tasks.
    masters = {d["worker"].split("/", 1)[0] for d in inspect.db.task_exec_records.find(
        {"task_id": {"$in": vip}}, {"worker": 1})}
    assert len(masters) == 2, masters
