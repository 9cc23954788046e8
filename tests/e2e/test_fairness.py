"""Single tasks for idle devices start within seconds behind a 20,000-device fan-out
at the same priority (fan-out batches and queues take turns at dispatch)."""

from __future__ import annotations

import json
import time

import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

FANOUT = 20_000
SINGLES = 20


def test_singles_finish_within_seconds_behind_a_20000_device_fanout(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, jitter=0, progress=False)
    roles.consumer()
    roles.master()
    devices = [f"fan-{i:05d}" for i in range(FANOUT)]
    inspect.redis.lpush(settings.keys.ready, json.dumps(
        {"device_ids": devices, "script": {"id": "update"}, "priority": 5}))
    # The batch is stored and dispatching before the singles arrive.
    wait_for(lambda: inspect.db.task_exec_records.count_documents({}) >= 100, 180,
             "the fan-out to be dispatching")
    with SendScriptClient(settings) as client:
        pushed_at = time.monotonic()
        singles = client.submit_many(
            [{"device_id": f"idle-{i}", "script": {"id": "one"}, "priority": 5}
             for i in range(SINGLES)])
        ids = [s.task_id for s in singles]
        wait_for(lambda: inspect.db.script_tasks.count_documents(
            {"_id": {"$in": ids}, "status": "success"}) == SINGLES, 60,
            "the single tasks to succeed")
        took = time.monotonic() - pushed_at
        # Strict age order would have sent every fan-out task first; most still wait.
        sent = inspect.db.task_exec_records.count_documents({})
        assert sent < FANOUT // 2, (sent, took)
        print(f"{SINGLES} single tasks succeeded {took:.1f}s after they were submitted, "
              f"with {sent} of {FANOUT} fan-out tasks dispatched")
