"""The task and exec-record state machines and the compare-and-set updates built from them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from sendscript.status import (
    IN_FLIGHT,
    RECORD_OPEN,
    RECORD_TRANSITIONS,
    RETENTION,
    TASK_TRANSITIONS,
    TERMINAL,
    InvalidTransition,
    RecordStatus,
    TaskStatus,
    configure_retention,
    dedupe_released,
    record_cas,
    record_sent,
    release_dedupe,
    task_cas,
)

S = TaskStatus
R = RecordStatus
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

# The task life cycle written out from the design, independently of the table under test.
EXPECTED_TASK_EDGES: set[tuple[TaskStatus, TaskStatus]] = {
    (S.WAITING, S.PENDING), (S.WAITING, S.CANCELLED), (S.WAITING, S.EXPIRED),
    (S.PENDING, S.RUNNING), (S.PENDING, S.WAITING), (S.PENDING, S.SUCCESS),
    (S.PENDING, S.FAILED), (S.PENDING, S.CANCELLED), (S.PENDING, S.EXPIRED),
    (S.RUNNING, S.SENT), (S.RUNNING, S.PENDING), (S.RUNNING, S.SUCCESS),
    (S.RUNNING, S.FAILED), (S.RUNNING, S.RETRY_WAITING), (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.EXPIRED),  # the worker found the deadline past right before the POST
    (S.SENT, S.SUCCESS), (S.SENT, S.FAILED), (S.SENT, S.RETRY_WAITING), (S.SENT, S.CANCELLED),
    (S.RETRY_WAITING, S.PENDING), (S.RETRY_WAITING, S.SUCCESS), (S.RETRY_WAITING, S.FAILED),
    (S.RETRY_WAITING, S.CANCELLED), (S.RETRY_WAITING, S.EXPIRED),
}
EXPECTED_RECORD_EDGES: set[tuple[RecordStatus, RecordStatus]] = {
    (R.RUNNING, R.SENT), (R.RUNNING, R.SUCCESS), (R.RUNNING, R.FAILED),
    (R.RUNNING, R.TIMEOUT), (R.RUNNING, R.CANCELLED),
    (R.SENT, R.SUCCESS), (R.SENT, R.FAILED), (R.SENT, R.TIMEOUT), (R.SENT, R.CANCELLED),
}
ALL_TASK_PAIRS = [(a, b) for a in TaskStatus for b in TaskStatus]
ALL_RECORD_PAIRS = [(a, b) for a in RecordStatus for b in RecordStatus]


def test_terminal_statuses_are_the_contracts() -> None:
    assert {S.SUCCESS, S.FAILED, S.CANCELLED, S.EXPIRED} == TERMINAL


def test_the_statuses_that_hold_a_device() -> None:
    """A task running or sent, and a record running or sent: written out from the
    design; an open record is one that can still be closed, by any of the endings."""
    assert {S.RUNNING, S.SENT} == IN_FLIGHT
    assert {R.RUNNING, R.SENT} == RECORD_OPEN
    assert {frm for frm, to in EXPECTED_RECORD_EDGES if to == R.TIMEOUT} == RECORD_OPEN
    assert all(RECORD_TRANSITIONS[r] for r in RECORD_OPEN)
    # a status string read from Mongo is matched as the member is
    assert "sent" in RECORD_OPEN and "success" not in RECORD_OPEN and "running" in IN_FLIGHT


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_task_status_has_no_exit(status: TaskStatus) -> None:
    assert TASK_TRANSITIONS[status] == frozenset()
    for target in TaskStatus:
        with pytest.raises(InvalidTransition):
            task_cas("t1", status, target, NOW)


@pytest.mark.parametrize(("frm", "to"), ALL_TASK_PAIRS, ids=lambda s: str(s))
def test_task_transition_allowed_or_refused(frm: TaskStatus, to: TaskStatus) -> None:
    if (frm, to) in EXPECTED_TASK_EDGES:
        flt, update = task_cas("t1", frm, to, NOW)
        assert flt == {"_id": "t1", "status": str(frm)}
        assert update["$set"]["status"] == str(to)
    else:
        with pytest.raises(InvalidTransition, match=f"{frm} -> {to}"):
            task_cas("t1", frm, to, NOW)


@pytest.mark.parametrize(("frm", "to"), ALL_RECORD_PAIRS, ids=lambda s: str(s))
def test_record_transition_allowed_or_refused(frm: RecordStatus, to: RecordStatus) -> None:
    if (frm, to) in EXPECTED_RECORD_EDGES:
        flt, update = record_cas("r1", frm, to, NOW)
        assert flt == {"_id": "r1", "status": str(frm)}
        assert update["$set"]["status"] == str(to)
    else:
        with pytest.raises(InvalidTransition):
            record_cas("r1", frm, to, NOW)


def test_spine_path_is_allowed() -> None:
    path = [S.WAITING, S.PENDING, S.RUNNING, S.SENT, S.SUCCESS]
    for frm, to in pairwise(path):
        task_cas("t1", frm, to, NOW)  # raises if refused


def test_task_cas_single_source_filter_names_status_and_attempt() -> None:
    flt, update = task_cas("t9", S.RUNNING, S.SENT, NOW, attempt=3)
    assert flt == {"_id": "t9", "status": "running", "attempt": 3}
    assert update["$set"]["status"] == "sent"
    assert update["$set"]["updated_at"] == NOW


def test_task_cas_attempt_zero_is_kept_in_filter() -> None:
    flt, _ = task_cas("t9", S.PENDING, S.RUNNING, NOW, attempt=0)
    assert flt["attempt"] == 0


def test_task_cas_without_attempt_has_no_attempt_in_filter() -> None:
    flt, _ = task_cas("t9", S.PENDING, S.RUNNING, NOW)
    assert "attempt" not in flt


def test_task_cas_many_sources_use_in_sorted_strings() -> None:
    flt, _ = task_cas("t1", [S.SENT, S.RUNNING], S.SUCCESS, NOW, attempt=1)
    assert flt == {"_id": "t1", "status": {"$in": ["running", "sent"]}, "attempt": 1}
    assert all(type(s) is str for s in flt["status"]["$in"])


def test_task_cas_many_sources_refused_if_any_source_cannot_go() -> None:
    # pending -> sent is not an edge, even though running -> sent is.
    with pytest.raises(InvalidTransition, match="pending -> sent"):
        task_cas("t1", [S.RUNNING, S.PENDING], S.SENT, NOW)


@pytest.mark.parametrize("to", [S.SUCCESS, S.FAILED, S.CANCELLED])
def test_finished_at_set_for_terminal_target(to: TaskStatus) -> None:
    _, update = task_cas("t1", S.SENT, to, NOW)
    assert update["$set"]["finished_at"] == NOW
    assert update["$set"]["updated_at"] == NOW


def test_expired_target_sets_finished_at() -> None:
    _, update = task_cas("t1", S.WAITING, S.EXPIRED, NOW)
    assert update["$set"]["finished_at"] == NOW


@pytest.mark.parametrize(
    ("frm", "to"),
    [(S.WAITING, S.PENDING), (S.PENDING, S.RUNNING), (S.RUNNING, S.SENT),
     (S.SENT, S.RETRY_WAITING), (S.RETRY_WAITING, S.PENDING)],
)
def test_finished_at_not_set_for_non_terminal_target(frm: TaskStatus, to: TaskStatus) -> None:
    _, update = task_cas("t1", frm, to, NOW)
    assert "finished_at" not in update["$set"]


def test_task_cas_set_unset_inc_and_extra_filter_shapes() -> None:
    flt, update = task_cas(
        "t1", S.PENDING, S.RUNNING, NOW, attempt=2,
        set_={"worker": "w1", "record_id": "r1"},
        unset=["last_error", "master"],
        inc={"attempt": 1},
        extra_filter={"master": "m1"},
    )
    assert flt == {"_id": "t1", "status": "pending", "attempt": 2, "master": "m1"}
    assert update["$set"] == {
        "status": "running", "updated_at": NOW, "worker": "w1", "record_id": "r1",
    }
    assert update["$inc"] == {"attempt": 1}
    assert update["$unset"] == {"last_error": "", "master": ""}


def test_task_cas_set_overrides_computed_fields() -> None:
    _, update = task_cas("t1", S.RUNNING, S.FAILED, NOW, set_={"last_error": "x"})
    assert update["$set"]["last_error"] == "x"
    assert update["$set"]["status"] == "failed"


def test_task_cas_terminal_keeps_caller_unset() -> None:
    _, update = task_cas("t1", S.SENT, S.SUCCESS, NOW, unset=["worker"])
    assert update["$unset"]["worker"] == ""


def test_task_cas_without_extras_has_no_inc_or_unset() -> None:
    _, update = task_cas("t1", S.PENDING, S.RUNNING, NOW)
    assert "$inc" not in update
    assert "$unset" not in update


def test_task_cas_set_cannot_hide_refusal() -> None:
    with pytest.raises(InvalidTransition):
        task_cas("t1", S.SUCCESS, S.PENDING, NOW, set_={"status": "pending"})


def test_record_cas_terminal_sets_finished_at_and_extra_fields() -> None:
    flt, update = record_cas("r1", [R.SENT, R.RUNNING], R.FAILED, NOW, set_={"error": "boom"})
    assert flt == {"_id": "r1", "status": {"$in": ["running", "sent"]}}
    fields = update["$set"]
    assert (fields["status"], fields["finished_at"], fields["error"]) == ("failed", NOW, "boom")


def test_record_cas_non_terminal_has_no_finished_at() -> None:
    _, update = record_cas("r1", R.RUNNING, R.SENT, NOW)
    assert update["$set"]["status"] == "sent"
    assert "finished_at" not in update["$set"]


@pytest.mark.parametrize("status", [R.SUCCESS, R.FAILED, R.TIMEOUT, R.CANCELLED])
def test_terminal_record_status_has_no_exit(status: RecordStatus) -> None:
    for target in RecordStatus:
        with pytest.raises(InvalidTransition):
            record_cas("r1", status, target, NOW)


def test_record_sent_is_a_pipeline_moving_only_running_to_sent() -> None:
    flt, pipeline = record_sent("r7", NOW)
    assert flt == {"_id": "r7"}
    assert isinstance(pipeline, list) and len(pipeline) == 1
    stage = pipeline[0]["$set"]
    assert stage["sent_at"] == NOW
    assert stage["status"] == {"$cond": [{"$eq": ["$status", "running"]}, "sent", "$status"]}


# -- dedupe window ----------------------------------------------------------------------
@pytest.fixture
def window() -> Any:
    """Set this process's dedupe window for one test, as configure_retention does."""
    before = RETENTION.dedupe_window_s

    def set_to(seconds: float) -> None:
        configure_retention(RETENTION.success_s, RETENTION.failed_s, seconds)

    yield set_to
    RETENTION.dedupe_window_s = before


@pytest.mark.parametrize("to", sorted(TERMINAL))
def test_finishing_keeps_the_dedupe_key_within_a_window(window: Any, to: TaskStatus) -> None:
    window(86400)
    _, update = task_cas("t1", S.PENDING, to, NOW)
    assert "dedupe_active" not in update.get("$unset", {})


@pytest.mark.parametrize("to", sorted(TERMINAL))
def test_finishing_frees_the_dedupe_key_without_a_window(window: Any, to: TaskStatus) -> None:
    window(0)
    _, update = task_cas("t1", S.PENDING, to, NOW)
    assert update["$unset"]["dedupe_active"] == ""


def test_release_dedupe_names_key_final_status_and_age() -> None:
    flt, update = release_dedupe("t1", "k1", NOW, 3600)
    assert flt == {"_id": "t1", "dedupe_active": "k1",
                   "status": {"$in": sorted(str(s) for s in TERMINAL)},
                   "finished_at": {"$lte": NOW - timedelta(hours=1)}}
    assert update == {"$unset": {"dedupe_active": ""}}


@pytest.mark.parametrize(("doc", "released"), [
    ({"status": "success", "finished_at": NOW - timedelta(hours=2)}, True),
    ({"status": "failed", "finished_at": NOW - timedelta(hours=1)}, True),  # exactly the window
    ({"status": "cancelled", "finished_at": NOW - timedelta(minutes=59)}, False),
    ({"status": "pending", "finished_at": NOW - timedelta(days=9)}, False),  # retried by hand
    ({"status": "success"}, False),
    ({"status": "expired", "finished_at": (NOW - timedelta(hours=2)).replace(tzinfo=None)}, True),
])
def test_dedupe_released_only_for_tasks_finished_before_the_window(
    doc: dict[str, Any], released: bool
) -> None:
    assert dedupe_released(doc, NOW, 3600) is released
