"""A global rate limit shared by two masters: the farm accepts no more than the limit
allows, every task still succeeds on its first attempt, and waiting is not an error."""

from __future__ import annotations

import json
import math
import re

import pytest

from sendscript.report import gather
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

LIMIT, PER_S, TASKS = 10, 1.0, 60
ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\b", re.MULTILINE)


def test_two_masters_share_a_global_limit_and_held_tasks_use_no_attempt(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, jitter=0, progress=False)
    roles.consumer()
    # Small intake batches, so that both masters take a share of the tasks.
    env = {"rate_limits": f"global={LIMIT}/1s", "intake_batch": 3}
    a = roles.master("master-a", **env)
    b = roles.master("master-b", master_id=settings.master_id + "-b", **env)
    for i in range(TASKS):  # one item at a time: each master blocked on the list gets some
        inspect.redis.lpush(settings.keys.ready, json.dumps(
            {"device_id": f"lim-{i:03d}", "script": {"id": "tap", "args": {"n": i}}}))
    wait_for(lambda: inspect.count("success") == TASKS, 90, f"{TASKS} tasks to succeed")

    # The farm's accept times: TASKS sends at LIMIT a window need TASKS / LIMIT windows;
    # however they fall, a span of s seconds touches at most floor(s) + 2 windows.
    started = sorted(r["started"] for r in roles.farm("runs"))
    assert len(started) == TASKS
    span = started[-1] - started[0]
    windows = math.floor(span / PER_S) + 2
    assert TASKS <= LIMIT * windows, f"{TASKS} sends in {span:.2f}s: over {LIMIT}/s"
    per_second: dict[int, int] = {}
    for t in started:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) <= 2 * LIMIT, per_second  # fixed windows' worst case

    # Held tasks used no attempt: one exec record each, attempt 1, no error.
    assert inspect.db.script_tasks.count_documents({"attempt": 1, "last_error": None}) == TASKS
    assert inspect.db.task_exec_records.count_documents({}) == TASKS
    assert roles.farm()["refused_busy"] == 0

    reports = [roles.master_info(), roles.master_info(settings.master_id + "-b")]
    limits = [r["rate_limits"] for r in reports if r]
    assert len(limits) == 2
    assert sum(x["limits"]["global"]["spent"] for x in limits) == TASKS
    assert all(x["limits"]["global"]["spent"] > 0 for x in limits), limits  # both sent
    assert sum(x["held"] for x in limits) > 0  # the limit did hold tasks back
    for proc in (a, b):
        log = proc.log_path.read_text(errors="replace") if proc.log_path else ""
        assert not ERROR_LINE.search(log), log[-3000:]

    # `sendscript status` shows the limit from the live masters' reports, with the
    # current window's use read from Redis.
    shown = {x["name"]: x for x in gather(settings)["rate_limits"]}
    assert shown["global"]["rule"] == f"{LIMIT}/1s"
    assert shown["global"]["spent"] == TASKS and shown["global"]["held"] > 0
    assert 0 <= shown["global"]["used"] <= LIMIT
