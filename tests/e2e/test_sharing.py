"""Work sharing across masters, checked from the stores: a burst pushed on the ready
list at once is run by every live master, not by the one that woke first."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

TASKS = 80
PREFETCH = 8


def test_a_burst_is_shared_by_the_live_masters(roles: Roles, settings: Settings,
                                              inspect: Inspect) -> None:
    roles.simulator(run_ms=150, jitter=0.2, progress=False)
    roles.consumer()
    ids = [f"{settings.master_id}-{n}" for n in ("a", "b")]
    roles.masters(ids, share_prefetch=PREFETCH)
    # Each counts the other before the burst (the count is renewed once a heartbeat).
    wait_for(lambda: all((roles.master_info(m) or {}).get("backpressure", {})
                         .get("live_peers") == 1 for m in ids), 30, "each master sees its peer")
    client = connect.redis_sync(settings)
    try:  # raw items, as a producer pushes them: one LPUSH, all at once
        client.lpush(settings.keys.ready, *[json.dumps(
            {"device_id": f"d{n % 40}", "script": {"id": "s", "args": {"n": n}}})
            for n in range(TASKS)])
    finally:
        client.close()
    wait_for(lambda: inspect.count("success") == TASKS, 120, "every task a success", 0.3)
    by_master = Counter(d["worker"].split("/", 1)[0] for d in
                        inspect.db.task_exec_records.find({}, {"worker": 1}))
    assert sum(by_master.values()) == TASKS and roles.farm()["overlaps"] == 0
    # Alone, the first master to wake takes the whole burst (its batch is 200). Sharing,
    # each holds at most PREFETCH queued, and the other takes the rest as it frees room.
    assert min(by_master[m] for m in ids) >= TASKS // 4, by_master
    waits = [roles.master_info(m)["backpressure"]["share_waits"] for m in ids]
    assert sum(waits) > 0, "intake waited at the share mark"


def test_tasks_held_on_the_boards_do_not_shut_the_masters_out(
        roles: Roles, settings: Settings, inspect: Inspect) -> None:
    # A paused queue's tasks fill both boards past the share mark; the masters' slots
    # are idle, so they go on taking, and the other queue's tasks run meanwhile.
    roles.simulator(run_ms=20, progress=False)
    roles.consumer()
    ids = [f"{settings.master_id}-{n}" for n in ("a", "b")]
    roles.masters(ids, share_prefetch=PREFETCH)
    wait_for(lambda: all((roles.master_info(m) or {}).get("backpressure", {})
                         .get("live_peers") == 1 for m in ids), 30, "each master sees its peer")
    with SendScriptClient(settings) as sdk:
        sdk.pause(queue="slow", reason="test")
        wait_for(lambda: all("queue:slow" in (roles.master_info(m) or {}).get("pauses", {})
                             .get("active", []) for m in ids), 10, "both masters see the pause")
        held = [s.task_id for s in sdk.submit_many(
            [{"device_id": f"h{n}", "script": {"id": "s"}, "queue": "slow"}
             for n in range(10 * PREFETCH)])]
        wait_for(lambda: inspect.db.script_tasks.count_documents(
            {"_id": {"$in": held}, "master": {"$in": ids}}) == len(held), 30,
            "the paused queue's tasks taken onto the boards")
        free = [s.task_id for s in sdk.submit_many(
            [{"device_id": f"f{n}", "script": {"id": "s"}} for n in range(20)])]
        wait_for(lambda: inspect.db.script_tasks.count_documents(
            {"_id": {"$in": free}, "status": "success"}) == len(free), 60,
            "the other queue's tasks run while the paused ones are held")
        assert inspect.db.script_tasks.count_documents(
            {"_id": {"$in": held}, "status": "pending"}) == len(held)
        sdk.resume(queue="slow")
    wait_for(lambda: inspect.count("success") == len(held) + len(free), 60,
             "the held tasks run once resumed")
