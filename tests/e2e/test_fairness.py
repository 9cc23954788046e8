"""Single tasks for idle devices go within a few dispatches behind a 20,000-device
fan-out at the same priority (fan-out batches and queues take turns at dispatch)."""

from __future__ import annotations

import json

import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

FANOUT = 20_000
SINGLES = 20


def test_singles_take_turns_with_a_20000_device_fanout(
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
        singles = client.submit_many(
            [{"device_id": f"idle-{i}", "script": {"id": "one"}, "priority": 5}
             for i in range(SINGLES)])
    ids = [s.task_id for s in singles]
    # A deadline against a hang only: the figure that matters is a count, below.
    wait_for(lambda: inspect.db.script_tasks.count_documents(
        {"_id": {"$in": ids}, "status": "success"}) == SINGLES, 300,
        "the single tasks to succeed")
    # Strict age order would have sent every fan-out task first; most still wait.
    sent = inspect.db.task_exec_records.count_documents({})
    assert sent < FANOUT // 2, sent
    # Turns: once the singles are on the board, the fan-out and the singles' queue go in
    # turn, so while the singles are dispatched the fan-out gets about one dispatch per
    # single, give or take what the workers had in hand (their order of starting is
    # theirs). Unfair turns (k fan-out tasks per single) would show k x SINGLES here.
    starts = sorted(r["started_at"] for r in inspect.db.task_exec_records.find(
        {"task_id": {"$in": ids}}, {"started_at": 1}))
    assert len(starts) == SINGLES
    between = inspect.db.task_exec_records.count_documents(
        {"started_at": {"$gte": starts[0], "$lte": starts[-1]}}) - SINGLES
    in_hand = settings.workers * settings.worker_concurrency
    assert between <= SINGLES + in_hand, (between, SINGLES, in_hand)
