"""A global rate limit shared by two masters: the farm accepts no more than the limit
allows, every task still succeeds on its first attempt, and waiting is not an error."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from sendscript.client import SendScriptClient
from sendscript.report import gather
from sendscript.settings import Settings
from tests.integration.test_limits import max_in_any_interval
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

LIMIT, TASKS = 10, 60
ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\b", re.MULTILINE)


def test_two_masters_share_a_global_limit_and_held_tasks_use_no_attempt(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, jitter=0, progress=False)
    roles.consumer()
    # Small intake batches, so that both masters take a share of the tasks.
    # The farm sees no more than the limit in any second as long as a dispatched task
    # reaches it within the send allowance: a generous one, for a loaded machine.
    env = {"rate_limits": f"global={LIMIT}/1s", "intake_batch": 3,
           "rate_limit_send_allowance_s": 1.0}
    a = roles.master("master-a", **env)
    b = roles.master("master-b", master_id=settings.master_id + "-b", **env)
    pushed_at = time.time()  # no token of a window before this one: no task existed
    for i in range(TASKS):  # one item at a time: each master blocked on the list gets some
        inspect.redis.lpush(settings.keys.ready, json.dumps(
            {"device_id": f"lim-{i:03d}", "script": {"id": "tap", "args": {"n": i}}}))
    wait_for(lambda: inspect.count("success") == TASKS, 90, f"{TASKS} tasks to succeed")

    # The farm's accept times: never more sends than the windows begun so far allow.
    started = [r["started"] for r in roles.farm("runs")]
    assert len(started) == TASKS
    assert_within_windows(started, LIMIT, 1.0, pushed_at)
    # And in every second, wherever it starts: no burst at a window's edge.
    assert max_in_any_interval(started, 1.0) <= LIMIT, sorted(t - pushed_at for t in started)

    # Held tasks used no attempt: one exec record each, attempt 1, no error.
    assert inspect.db.script_tasks.count_documents({"attempt": 1, "last_error": None}) == TASKS
    assert inspect.db.task_exec_records.count_documents({}) == TASKS
    assert roles.farm()["refused_busy"] == 0

    def both() -> list[dict] | None:  # heartbeats are a moment behind: wait for the last
        reports = [roles.master_info(), roles.master_info(settings.master_id + "-b")]
        limits = [r["rate_limits"] for r in reports if r]
        spent = sum(x["limits"]["global"]["spent"] for x in limits)
        return limits if len(limits) == 2 and spent == TASKS else None

    limits = wait_for(both, 10, "both masters' reports of every token spent")
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


def assert_within_windows(times: list[float], limit: int, window_s: float,
                          since: float) -> None:
    """Each send reached the farm after its token was granted, and a token of window w
    is granted within w (Redis server time, the same clock as the farm's), never before
    `since`: so by the k-th accept, at time t, at most `limit` tokens of each window
    from since's to t's can have been spent. A count, so a limit let through at 1.5x
    fails within a few windows however slow or loaded the machine is."""
    first = math.floor(since / window_s)
    for k, t in enumerate(sorted(times), start=1):
        windows = math.floor(t / window_s) - first + 1
        assert k <= limit * windows, (
            f"send {k} at {t - since:.2f}s after the push: {windows} window(s) of "
            f"{limit} allow {limit * windows}")


def test_group_and_queue_limits_hold_only_their_tasks(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    roles.simulator(run_ms=20, jitter=0, progress=False)
    roles.consumer()
    rack = [f"rack-{i}" for i in range(4)]
    with SendScriptClient(settings) as client:
        client.group_add("rack-7", rack)  # before the master starts: it loads groups then
        roles.master(rate_limits="group:rack-7=2/1s,queue:bulk=3/1s")
        specs = ([{"device_id": rack[i % 4], "script": {"id": "rack"}} for i in range(12)]
                 + [{"device_id": f"bulk-{i}", "script": {"id": "bulk"}, "queue": "bulk"}
                    for i in range(15)]
                 + [{"device_id": f"free-{i}", "script": {"id": "free"}} for i in range(10)])
        submitted_at = time.time()
        client.submit_many(specs)
    wait_for(lambda: inspect.count("success") == len(specs), 90, "every task to succeed")
    runs = roles.farm("runs")
    kinds = {t["_id"]: t["script"]["id"] for t in inspect.db.script_tasks.find({}, {"script": 1})}
    started: dict[str, list[float]] = {}
    for r in runs:
        started.setdefault(kinds[r["task_id"]], []).append(r["started"])
    assert_within_windows(started["rack"], 2, 1.0, submitted_at)
    assert_within_windows(started["bulk"], 3, 1.0, submitted_at)
    # Tasks no limit applies to are not held behind the limited ones.
    assert max(started["free"]) < max(started["rack"]), started
    assert inspect.db.script_tasks.count_documents({"attempt": 1}) == len(specs)
    limits = wait_for(lambda: _limits_spent(roles, {"group:rack-7": 12, "queue:bulk": 15}),
                      10, "the heartbeat to report every token spent")
    assert limits["group:rack-7"]["held"] > 0 and limits["queue:bulk"]["held"] > 0


def _limits_spent(roles: Roles, spent: dict[str, int]) -> dict | None:
    limits = (roles.master_info() or {}).get("rate_limits", {}).get("limits", {})
    done = all(limits.get(name, {}).get("spent") == n for name, n in spent.items())
    return limits if done else None
