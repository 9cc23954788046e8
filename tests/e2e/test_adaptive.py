"""An adaptive global limit against a farm with a hidden capacity below its start, two
masters: the farm's 429s bring the limit down, a 429 uses no attempt, every task
succeeds, and a Retry-After holds both masters (the farm sees nothing in the hold)."""

from __future__ import annotations

import json
import re

import pytest

from sendscript.limits import RateLimit, window_use
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

START, CAPACITY, RETRY_AFTER_S, TASKS = 20, 14, 3.0, 80
LIMIT = f"global={START}/1s~2..40"
# A master that has tokens when another's 429 sets the hold spends them until its
# spending window ends (2 ticks, 2 round trips and the send allowance); a send it
# dispatched before reaches the farm within the allowance. Past this much after a
# 429, nothing may reach the farm until its Retry-After has passed.
GRACE_S = 1.5
ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\b", re.MULTILINE)


def test_farm_429s_lower_an_adaptive_limit_and_its_hold_stops_both_masters(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, jitter=0, progress=False, capacity=CAPACITY,
                    retry_after=RETRY_AFTER_S)
    roles.consumer()
    env = {"rate_limits": LIMIT, "intake_batch": 3, "rate_limit_send_allowance_s": 0.5}
    masters = [roles.master("master-a", **env),
               roles.master("master-b", master_id=settings.master_id + "-b", **env)]
    for i in range(TASKS):  # one item at a time: each master blocked on the list gets some
        inspect.redis.lpush(settings.keys.ready, json.dumps(
            {"device_id": f"ad-{i:03d}", "script": {"id": "tap", "args": {"n": i}}}))
    wait_for(lambda: inspect.count("success") == TASKS, 50, f"{TASKS} tasks to succeed")

    throttles = roles.farm("throttled")
    assert throttles, "the farm never answered 429: the test proves nothing"
    # The limit came down from its start, for the 429s, and Redis holds it for all.
    limit = RateLimit("global", START, 1000, 2, 40)
    shared = window_use(inspect.redis, settings.keys, [limit])["global"]
    assert shared["current"] < START, shared
    assert inspect.redis.hget(settings.keys.rate_limit("global"), "down_at"), \
        "the limit was never lowered"

    # No 429 used an attempt: one accepted send, one exec record, attempt 1 per task.
    runs = roles.farm("runs")
    assert len(runs) == TASKS and len({r["task_id"] for r in runs}) == TASKS
    assert inspect.db.script_tasks.count_documents({"status": "success", "attempt": 1}) == TASKS
    assert inspect.db.task_exec_records.count_documents({}) == TASKS
    throttled_ids = {t["task_id"] for t in throttles}
    assert throttled_ids <= {r["task_id"] for r in runs}  # each one ran later, once

    # The hold: from GRACE_S after a 429 until its Retry-After ends, no send at all
    # reached the farm, from either master (accepted or refused).
    sends = sorted([r["started"] for r in runs] + [t["at"] for t in throttles])
    for t in throttles:
        inside = [s - t["at"] for s in sends if t["at"] + GRACE_S <= s < t["at"] + RETRY_AFTER_S]
        assert not inside, f"sends {inside} s after a 429 with Retry-After {RETRY_AFTER_S}"

    def both() -> list[dict] | None:  # heartbeats are a moment behind: wait for the last
        reports = [roles.master_info(), roles.master_info(settings.master_id + "-b")]
        limits = [r["rate_limits"] for r in reports if r]
        spent = sum(x["limits"]["global"]["spent"] for x in limits)
        return limits if len(limits) == 2 and spent >= TASKS else None

    reports = wait_for(both, 10, "both masters' reports of every token spent")
    assert all(x["limits"]["global"]["spent"] > 0 for x in reports), reports  # both sent
    assert all(x["adaptive"]["global"]["current"] < START for x in reports), reports
    for proc in masters:
        log = proc.log_path.read_text(errors="replace") if proc.log_path else ""
        assert not ERROR_LINE.search(log), log[-3000:]
