"""The fleet view's pure parts: hourly buckets, which results count, the updates a batch
makes, and a device's row (state, pauses, 24 h figures)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from console.fleet import decode_cursor, encode_cursor, paused_by, row
from sendscript.fleet import (
    DeviceResult,
    FleetBuffer,
    WrittenThisHour,
    add_to_hours,
    device_results,
    device_updates,
    hour_of,
    last_day,
    slot_of,
)
from sendscript.models import ExecRecord, TaskLogMessage

NOW = datetime(2026, 12, 6, 5, 30, tzinfo=UTC)
H = hour_of(NOW)


def test_counts_add_up_within_the_hour_and_a_slot_starts_again_a_day_later() -> None:
    hours = add_to_hours({}, H, 2, 1)
    hours = add_to_hours(hours, H, 1, 0)
    assert hours == {slot_of(H): {"h": H, "ok": 3, "fail": 1}}
    # 24 hours later the same slot comes round: the old hour is dropped, not added to
    later = add_to_hours(hours, H + 24, 0, 1)
    assert later == {slot_of(H): {"h": H + 24, "ok": 0, "fail": 1}}


def test_the_last_day_holds_this_hour_and_the_23_before_it() -> None:
    hours: dict = {}
    for back, (ok, fail) in {24: (8, 8), 23: (4, 0), 1: (2, 1), 0: (1, 0)}.items():
        hours = add_to_hours(hours, H - back, ok, fail)  # oldest first, as time goes
    # H - 24 shares H's slot: the slot holds H now, so its 8/8 is gone
    assert last_day(hours, NOW) == (1 + 2 + 4, 1)
    assert last_day(hours, NOW + timedelta(hours=1)) == (1 + 2, 1)  # H - 23 left the day
    assert last_day(hours, NOW + timedelta(days=2)) == (0, 0)
    assert last_day(None, NOW) == (0, 0)


def _record(rid: str, device: str, status: str = "sent") -> ExecRecord:
    return ExecRecord(_id=rid, task_id=f"t-{rid}", attempt=1, device_id=device, lock_value=1,
                      worker="w", started_at=NOW, status=status)


def _log(rid: str, device: str, kind: str, message: str = "m") -> TaskLogMessage:
    return TaskLogMessage.model_validate({"recordId": rid, "taskId": f"t-{rid}",
                                          "deviceId": device, "logType": kind,
                                          "message": message, "timestamp": 1})


def test_a_result_counts_once_and_only_while_its_record_is_open() -> None:
    records = {"r1": _record("r1", "a"), "r2": _record("r2", "a"),
               "r3": _record("r3", "b", status="success")}
    finals = [_log("r1", "a", "SUCCESS"), _log("r1", "a", "SUCCESS"),
              _log("r2", "a", "ERROR", "no app"), _log("r3", "b", "SUCCESS"),
              _log("r9", "c", "SUCCESS")]
    assert device_results(finals, records) == [
        DeviceResult("a", "t-r1", "r1", "SUCCESS", ""),
        DeviceResult("a", "t-r2", "r2", "ERROR", "no app")]


def test_a_batch_makes_two_updates_per_device_that_do_what_the_buckets_say() -> None:
    results = [DeviceResult("a", "t1", "r1", "SUCCESS", ""),
               DeviceResult("b", "t2", "r2", "SYSTEM_ERROR", "gone"),
               DeviceResult("a", "t3", "r3", "ERROR", "no app")]
    ops = [op._doc for op in device_updates(results, NOW)]
    filters = [op._filter for op in device_updates(results, NOW)]
    assert len(ops) == 4
    slot = f"hours.{slot_of(H)}"
    # the reset: only where the slot holds another hour
    assert filters[0] == {"_id": "a", f"{slot}.h": {"$ne": H}}
    assert ops[0] == {"$set": {slot: {"h": H, "ok": 0, "fail": 0}}}
    # the count: both of a's results, the last one kept
    assert ops[1]["$inc"] == {f"{slot}.ok": 1, f"{slot}.fail": 1}
    assert ops[1]["$set"]["last_task_id"] == "t3"
    assert ops[1]["$set"]["last_result"] == "ERROR"
    assert ops[3]["$inc"] == {f"{slot}.ok": 0, f"{slot}.fail": 1}
    assert ops[3]["$setOnInsert"] == {f"{slot}.h": H, "first_seen": NOW, "device_id": "b"}
    # a device whose slot this process wrote this hour needs no reset: one update
    again = device_updates(results, NOW, slot_is_current={"a"})
    assert [op._filter for op in again][:2] == [{"_id": "a"}, filters[2]]
    assert len(again) == 3


def test_what_was_written_this_hour_is_forgotten_when_the_hour_turns() -> None:
    written = WrittenThisHour()
    written.written(NOW, ["a", "b"])
    assert written.current(NOW + timedelta(minutes=20)) == {"a", "b"}
    assert written.current(NOW + timedelta(minutes=40)) == set()  # 06:10: another hour


def test_a_row_says_running_before_benched_before_paused_before_free() -> None:
    doc = {"hours": add_to_hours({}, H, 3, 1), "last_task_id": "t9", "last_result": "SUCCESS"}
    common = {"health": None, "groups": ["rack"], "pauses": {"group:rack": "{}"}}
    running = row("p1", doc, NOW, lock="7", running={"task_id": "t9", "attempt": 1},
                  bench_left_ms=5000, **common)
    assert running["state"] == "running" and running["running"]["task_id"] == "t9"
    assert row("p1", doc, NOW, lock=None, running=None, bench_left_ms=5000,
               **common)["state"] == "benched"
    paused = row("p1", doc, NOW, lock=None, running=None, bench_left_ms=0, **common)
    assert (paused["state"], paused["paused"]) == ("paused", ["group:rack"])
    free = row("p1", doc, NOW, lock=None, running=None, bench_left_ms=0, health=b'{"streak": 2}',
               groups=[], pauses={"device:p2": "{}"})
    assert free["state"] == "free" and free["streak"] == 2
    assert (free["day_tasks"], free["day_ok"], free["day_failed"],
            free["day_success_rate"]) == (4, 3, 1, 0.75)
    assert row("new", {}, NOW, lock=None, running=None, bench_left_ms=0, health=None,
               groups=[], pauses={})["day_success_rate"] is None


def test_what_pauses_a_device() -> None:
    pauses = {"global": "{}", "device:p1": "{}", "group:g": "{}", "queue:q": "{}"}
    assert paused_by("p1", ["g"], pauses) == ["device:p1", "global", "group:g"]
    assert paused_by("p2", [], {"queue:q": "{}"}) == []


@pytest.mark.parametrize("device", ["phone-1", "a b/c:d", "电话-7"])
def test_a_cursor_names_its_device(device: str) -> None:
    assert decode_cursor(encode_cursor(device)) == device


def test_a_cursor_we_did_not_give_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_cursor("__not_base64__x")


def test_buffer_is_due_after_its_interval_or_when_full() -> None:
    buf = FleetBuffer(5.0, max_held=4)
    assert not buf.due(100.0)  # nothing held: never due
    buf.add([], NOW, 100.0)
    assert not buf.due(1000.0)
    buf.add([DeviceResult("a", "t1", "r1", "SUCCESS", "")], NOW, 100.0)
    buf.add([DeviceResult("b", "t2", "r2", "SUCCESS", "")], NOW, 103.0)
    assert not buf.due(104.9)  # the oldest held counts, not the newest
    assert buf.due(105.0)
    buf.take()
    assert not buf.due(1000.0)
    buf.add([DeviceResult(d, "t", "r", "SUCCESS", "") for d in "abcd"], NOW, 200.0)
    assert buf.due(200.0)  # full
    assert FleetBuffer(0.0).due(0.0) is False
    zero = FleetBuffer(0.0)
    zero.add([DeviceResult("a", "t1", "r1", "SUCCESS", "")], NOW, 7.0)
    assert zero.due(7.0)  # no interval: every batch


def test_buffer_gives_results_by_hour_with_their_times() -> None:
    buf = FleetBuffer(60.0)
    later = NOW + timedelta(minutes=40)  # the next hour
    buf.add([DeviceResult("a", "t1", "r1", "SUCCESS", ""),
             DeviceResult("b", "t2", "r2", "ERROR", "x")], NOW, 1.0)
    buf.add([DeviceResult("a", "t3", "r3", "SUCCESS", "")], NOW + timedelta(seconds=2), 3.0)
    buf.add([DeviceResult("a", "t4", "r4", "ERROR", "y")], later, 4.0)
    groups = buf.take()
    assert buf.held == [] and buf.since is None
    assert [(at, [r.task_id for r in rs]) for at, rs in groups] == [
        (NOW + timedelta(seconds=2), ["t1", "t2", "t3"]), (later, ["t4"])]
    assert [r.applied_at for r in groups[0][1]] == [NOW, NOW, NOW + timedelta(seconds=2)]
    # one update a device a group, the last result with the time it was applied
    ops = [op._doc for op in device_updates(groups[0][1], groups[0][0], {"a", "b"})]
    assert len(ops) == 2
    a = ops[0]["$set"]
    assert (a["last_task_id"], a["last_finished_at"]) == ("t3", NOW + timedelta(seconds=2))
    assert ops[0]["$inc"] == {f"hours.{slot_of(hour_of(NOW))}.ok": 2,
                              f"hours.{slot_of(hour_of(NOW))}.fail": 0}
    assert ops[1]["$set"]["last_finished_at"] == NOW
