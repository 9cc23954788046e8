"""Dedupe modes and debounce as rules: which mode holds the key how long, the debounce
time maths, the replacement's update, the spec's refusals, and the store's
plan when a debounced spec meets the task holding its key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sendscript.dedupe import (
    KEY_AT_CLAIM,
    debounce_merge,
    debouncing,
    describe,
    first_due,
    hold_after_finish_s,
    next_due,
    released_at_start,
)
from sendscript.models import FanoutSpec, Task, TaskSpec, describe_error
from sendscript.schedules import Schedule, fire_tasks
from sendscript.status import TaskStatus
from sendscript.store import FindOp, InsertOp, UpdateOp, store_plan
from tests.unit.test_store_plan import drive, dup_key, refusal

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
S = timedelta(seconds=1)


@pytest.mark.parametrize(("mode", "window", "setting", "hold"), [
    (None, None, 86400, 86400),          # no mode: as always, the setting
    (None, None, 0, 0),
    ("until_result", None, 86400, 0),    # free at the result whatever the setting
    ("until_start", None, 86400, 0),     # (free already at the start)
    ("window", None, 600, 600),          # window without its own: the setting
    ("window", 30, 600, 30),             # its own window wins
    ("window", 0, 600, 0),
])
def test_how_long_a_finished_task_holds_its_key(
    mode: str | None, window: float | None, setting: float, hold: float
) -> None:
    assert hold_after_finish_s(mode, window, setting) == hold


def test_only_until_start_frees_the_key_when_an_attempt_starts() -> None:
    assert released_at_start("until_start")
    assert not any(released_at_start(m) for m in (None, "until_result", "window"))
    assert KEY_AT_CLAIM["$cond"][0] == {"$eq": ["$dedupe_mode", "until_start"]}


def test_the_first_submission_waits_the_quiet_period_bounded_by_the_max() -> None:
    assert first_due(NOW, 5, 60) == (NOW + 5 * S, NOW + 60 * S)
    assert first_due(NOW, 5, None) == (NOW + 5 * S, None)
    assert first_due(NOW, 5, 5) == (NOW + 5 * S, NOW + 5 * S)


def test_a_later_submission_pushes_the_run_back_never_past_the_max() -> None:
    until = NOW + 10 * S
    assert next_due(NOW + 3 * S, NOW + 5 * S, 5, until) == NOW + 8 * S
    assert next_due(NOW + 8 * S, NOW + 8 * S, 5, until) == until  # the bound
    assert next_due(NOW + 9 * S, NOW + 10 * S, 5, None) == NOW + 14 * S  # no bound
    # A shorter quiet period never brings it forward.
    assert next_due(NOW + 1 * S, NOW + 5 * S, 1, until) == NOW + 5 * S


@given(st.lists(st.floats(0, 30), min_size=1, max_size=20), st.floats(0.1, 10),
       st.floats(0, 60))
def test_the_run_is_quiet_after_the_last_submission_or_at_the_max(
    gaps: list[float], quiet: float, extra: float
) -> None:
    """Whatever the submissions, the run is `quiet` after the last one, or at the max
    (first + max), whichever comes first; never before the last submission."""
    max_s = quiet + extra
    due, until = first_due(NOW, quiet, max_s)
    assert until is not None
    at = NOW
    for gap in gaps:
        at = at + timedelta(seconds=gap)
        if at >= due:  # it ran: later submissions are not debounced into it
            break
        due = next_due(at, due, quiet, until)
        assert due == min(at + timedelta(seconds=quiet), until)
        assert at <= due <= until


def holder(**fields: Any) -> dict[str, Any]:
    doc = Task.from_spec(TaskSpec(device_id="d1", script={"v": 1}, dedupe_key="k",
                                  debounce_s=5, debounce_max_s=20, expire_at=NOW + 99 * S),
                         task_id="h", now=NOW).to_doc()
    doc.update(fields)
    return doc


def test_the_replacement_is_one_update_the_server_computes() -> None:
    later = Task.from_spec(TaskSpec(device_id="d2", script={"v": "$x"}, dedupe_key="k",
                                    debounce_s=5, priority=9), task_id="x",
                           now=NOW + 2 * S).to_doc()
    flt, update = debounce_merge(holder(debounce_seq=3), later, NOW + 2 * S)
    assert flt == {"_id": "h", "dedupe_active": "k", "status": "waiting",
                   "debounce_s": {"$exists": True}}  # still in its quiet period
    fields = update[0]["$set"]
    # What the spec says goes in as literals: "$x" is a string, not a field path.
    assert fields["script"] == {"$literal": {"v": "$x"}}
    assert fields["device_id"] == {"$literal": "d2"} and fields["priority"] == {"$literal": 9}
    # next_due on the document as it is: never earlier, never past debounce_until.
    due = NOW + 7 * S
    assert fields["run_at"] == {"$max": ["$run_at", {"$min": [
        due, {"$ifNull": ["$debounce_until", due]}]}]}
    assert fields["debounce_seq"] == {"$add": [{"$ifNull": ["$debounce_seq", 0]}, 1]}
    assert "expire_at" in update[1]["$unset"]  # the latest spec has none: none is kept
    assert "debounce_until" not in fields  # the bound stays the first's


def test_debouncing_means_waiting_with_a_quiet_period() -> None:
    assert debouncing(holder())
    assert not debouncing(holder(status="pending"))
    assert not debouncing({"status": "waiting", "dedupe_key": "k"})  # delayed, not debounced


def test_the_description_says_mode_state_and_debounce() -> None:
    line = describe(holder(debounce_seq=2), 3600) or ""
    assert "key 'k'" in line and "holds the key" in line and "debouncing: runs at" in line
    assert "2 later submission(s) merged" in line and "at most until" in line
    gone = describe({"dedupe_key": "k", "dedupe_mode": "until_start", "status": "running"}, 0)
    assert gone == "key 'k' · mode until_start · key released"
    assert describe({"status": "pending"}, 0) is None


@pytest.mark.parametrize(("fields", "reason"), [
    ({"debounce_s": 1}, "debounce_s: only with a dedupe_key"),
    ({"dedupe_mode": "window"}, "dedupe_mode: only with a dedupe_key"),
    ({"dedupe_key": "k", "debounce_max_s": 3}, "debounce_max_s needs debounce_s"),
    ({"dedupe_key": "k", "debounce_s": 3, "debounce_max_s": 2},
     "debounce_max_s must be at least debounce_s"),
    ({"dedupe_key": "k", "debounce_s": 3, "run_at": 1.7e9}, "give no run_at"),
    ({"dedupe_key": "k", "debounce_s": 3, "mode": "pull"}, "not mode 'pull'"),
    ({"dedupe_key": "k", "dedupe_mode": "until_start", "dedupe_window_s": 3},
     "dedupe_window_s goes with dedupe_mode 'window'"),
    ({"dedupe_key": "k", "dedupe_mode": "later"}, "dedupe_mode: Input should be"),
    ({"dedupe_key": "k", "debounce_s": 0}, "debounce_s: Input should be greater than 0"),
])
def test_bad_combinations_are_refused_with_the_reason(fields: dict[str, Any],
                                                      reason: str) -> None:
    with pytest.raises(ValidationError) as exc:
        TaskSpec.model_validate({"device_id": "d", "script": {}, **fields})
    assert reason in describe_error(exc.value)


def test_a_window_alone_means_mode_window_and_a_fanout_debounces_per_device() -> None:
    spec = TaskSpec(device_id="d", script={}, dedupe_key="k", dedupe_window_s=30)
    assert spec.dedupe_mode == "window"
    fan = FanoutSpec(device_ids=["a", "b"], script={}, dedupe_key="k", debounce_s=2)
    tasks = [Task.from_spec(fan.for_device(d), now=NOW) for d in ("a", "b")]
    assert [t.dedupe_active for t in tasks] == ["k:a", "k:b"]
    assert all(t.status == TaskStatus.WAITING and t.run_at == NOW + 2 * S for t in tasks)


def test_a_debounced_spec_is_stored_waiting_with_its_bound() -> None:
    task = Task.from_spec(TaskSpec(device_id="d", script={}, dedupe_key="k", debounce_s=3,
                                   debounce_max_s=10, dedupe_mode="until_start"), now=NOW)
    assert task.status == TaskStatus.WAITING and task.run_at == NOW + 3 * S
    assert task.debounce_until == NOW + 10 * S and task.debounce_seq == 0
    assert task.dedupe_mode == "until_start"


def later_task(task_id: str, version: int) -> Task:
    return Task.from_spec(TaskSpec(device_id="d1", script={"v": version}, dedupe_key="k",
                                   debounce_s=5), task_id=task_id, now=NOW + 2 * S)


def test_the_plan_replaces_a_debouncing_holders_spec() -> None:
    mine = later_task("x", 2)
    search: list[Any] = []
    ops, stored = drive(store_plan([mine], NOW + 2 * S, 3600),
                        [refusal(dup_key(0)), [holder()], 1,
                         [holder(script={"v": 2}, debounce_seq=1)]], search)
    assert [type(o) for o in ops] == [InsertOp, FindOp, UpdateOp, FindOp]
    assert ops[2].update[0]["$set"]["script"] == {"$literal": {"v": 2}}
    assert ops[3].filter == {"_id": "h"}  # the spec the task holds now, read back
    assert [u.update["$set"]["debounce_seq"] for u in search if isinstance(u, UpdateOp)] == [1]
    assert stored.debounced == {"x": "h"} and stored.deduplicated == {"x": "h"}
    assert stored.existing_status == {"h": "waiting"} and not stored.created


def test_the_plan_looks_again_when_the_holder_moved_on() -> None:
    """The update missed (the task fired meanwhile): insert again, read again; now
    pending, the spec is a plain duplicate."""
    mine = later_task("x", 2)
    ops, stored = drive(store_plan([mine], NOW + 2 * S, 3600), [
        refusal(dup_key(0)), [holder()], 0,
        refusal(dup_key(0)), [holder(status="pending")]])
    assert [type(o) for o in ops] == [InsertOp, FindOp, UpdateOp, InsertOp, FindOp]
    assert stored.deduplicated == {"x": "h"} and not stored.debounced
    assert stored.existing_status == {"h": "pending"}


def test_several_of_one_batch_replace_in_order() -> None:
    first, second = later_task("x", 2), later_task("y", 3)
    ops, stored = drive(store_plan([first, second], NOW + 2 * S, 3600),
                        [refusal(dup_key(0), dup_key(1)), [holder()], 1,
                         [holder(debounce_seq=1)], 1, [holder(debounce_seq=2)]])
    updates = [o for o in ops if isinstance(o, UpdateOp)]
    assert [u.update[0]["$set"]["script"] for u in updates] == [
        {"$literal": {"v": 2}}, {"$literal": {"v": 3}}]
    assert stored.debounced == {"x": "h", "y": "h"}


def test_a_finished_until_result_holder_gives_its_key_up_at_once() -> None:
    done = {"_id": "old", "dedupe_active": "k", "status": "success",
            "finished_at": NOW - S, "dedupe_mode": "until_result"}
    mine = Task.from_spec(TaskSpec(device_id="d", script={}, dedupe_key="k"), task_id="n",
                          now=NOW)
    ops, stored = drive(store_plan([mine], NOW, 86400), [refusal(dup_key(0)), [done], 1, None])
    assert [type(o) for o in ops] == [InsertOp, FindOp, UpdateOp, InsertOp]
    assert [t.id for t in stored.created] == ["n"]


def test_a_schedule_template_takes_no_debounce() -> None:
    """Each fire has its own time and key: a debounce there would make every fire's
    spec invalid, so the schedule is refused when it is made, not at its fires."""
    template = {"script": {}, "dedupe_key": "k", "debounce_s": 5}
    with pytest.raises(ValidationError, match="takes no debounce_s"):
        Schedule.model_validate({"_id": "s", "interval_s": 60, "device_ids": ["d"],
                                 "template": template})
    ok = Schedule.model_validate({"_id": "s", "interval_s": 60, "device_ids": ["d"],
                                  "template": {"script": {}, "dedupe_key": "k",
                                               "dedupe_mode": "until_start"}})
    [fired] = fire_tasks(ok, NOW, ["d"], "p", None, NOW)
    assert fired.dedupe_mode == "until_start"


def test_a_finished_holder_is_described_with_the_end_of_its_hold() -> None:
    done = {"dedupe_key": "k", "dedupe_active": "k", "status": "success",
            "finished_at": NOW, "dedupe_mode": "window", "dedupe_window_s": 90}
    assert describe(done, 3600) == ("key 'k' · mode window, held 90s after the result · "
                                    "holds the key until 2024-05-01 12:01:30.000Z")
