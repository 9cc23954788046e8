"""The task-log consumer's pure part: message parsing, the CAS updates of results, what
is stored of a log and what a dead letter carries."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from consumers.rules import (
    DEAD_LETTER_DATA_BYTES,
    ResultWrites,
    cut_message,
    dead_letter_payload,
    log_document,
    parse_message,
    result_updates,
    safe_text,
)
from consumers.subscription import ClientSignals
from sendscript.models import MAX_EPOCH_MS, ExecRecord, LogType, TaskLogMessage
from sendscript.settings import Settings
from sendscript.status import RecordStatus

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
BASE: dict[str, Any] = {"recordId": "r1", "taskId": "t1", "deviceId": "d1",
                        "logType": "SUCCESS", "message": "ok", "timestamp": 1714564800000}


def raw(**changes: Any) -> bytes:
    return json.dumps({**BASE, **changes}).encode()


def log(record_id: str, log_type: str, message: str = "", task_id: str = "t1",
        code: str | None = None) -> TaskLogMessage:
    fields: dict[str, Any] = {"recordId": record_id, "taskId": task_id, "deviceId": "d1",
                              "logType": log_type, "message": message, "timestamp": 1}
    if code is not None:
        fields["errorCode"] = code
    return TaskLogMessage.model_validate(fields)


def settings(**changes: Any) -> Settings:
    """Settings with a known retry schedule, whatever the environment says."""
    fields: dict[str, Any] = {"retry_base_s": 10.0, "retry_factor": 2.0, "retry_cap_s": 600.0,
                              "retry_jitter": 0.2, "queue_retry_base_s": {},
                              "final_error_codes": frozenset()}
    fields.update(changes)
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def task_fields(max_retries: int = 3, queue: str = "default",
                retry_base_s: float | None = None) -> dict[str, Any]:
    """What the consumer reads of a task with a failed result (TaskStore.retry_fields)."""
    doc: dict[str, Any] = {"max_retries": max_retries, "queue": queue}
    if retry_base_s is not None:
        doc["retry_base_s"] = retry_base_s
    return doc


def record(record_id: str, task_id: str, attempt: int, device: str, fence: int) -> ExecRecord:
    return ExecRecord(_id=record_id, task_id=task_id, attempt=attempt, device_id=device,
                      lock_value=fence, worker="w1", started_at=NOW,
                      status=RecordStatus.SENT)


# -- parse_message ------------------------------------------------------------------------------
def test_parse_camel_case() -> None:
    msg = parse_message(raw())
    assert (msg.record_id, msg.task_id, msg.device_id) == ("r1", "t1", "d1")
    assert msg.log_type == LogType.SUCCESS and msg.timestamp == 1714564800000


def test_parse_snake_case_and_lower_log_type() -> None:
    msg = parse_message(json.dumps({"record_id": "r1", "task_id": "t1", "device_id": "d1",
                                    "log_type": "error", "message": "x",
                                    "timestamp": 5}).encode())
    assert msg.log_type == LogType.ERROR and msg.record_id == "r1"


@pytest.mark.parametrize("data", [b"", b"nope", b"\xff", b'{"recordId": '])
def test_parse_not_json(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not JSON"):
        parse_message(data)


@pytest.mark.parametrize(("data", "kind"), [(b"[1]", "list"), (b"3", "int"), (b'"s"', "str")])
def test_parse_not_object(data: bytes, kind: str) -> None:
    with pytest.raises(ValueError, match=f"got {kind}$"):
        parse_message(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (json.dumps({k: v for k, v in BASE.items() if k != "recordId"}).encode(), "recordId"),
        (raw(taskId=""), "taskId"),
        (raw(logType="WARN"), "logType"),
        (raw(timestamp=-1), "timestamp"),
        (raw(timestamp="soon"), "timestamp"),
        (json.dumps({k: v for k, v in BASE.items() if k != "timestamp"}).encode(), "timestamp"),
    ],
)
def test_parse_refusal_names_field(data: bytes, field: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_message(data)
    assert str(info.value).startswith(f"{field}:")


def test_the_latest_timestamp_accepted_can_be_stored_and_the_next_is_refused() -> None:
    # The bound is the last millisecond a BSON/Python datetime holds (year 9999): what
    # validation lets through must convert, and one past it must be refused by name.
    doc = parse_message(raw(timestamp=MAX_EPOCH_MS)).to_doc(NOW)
    assert doc["timestamp"].year == 9999
    for too_late in (MAX_EPOCH_MS + 1, 10**20):
        with pytest.raises(ValueError, match=r"^timestamp:"):
            parse_message(raw(timestamp=too_late))


# -- result_updates ------------------------------------------------------------------------------
DEFAULTS = settings()


def test_success_applies_to_open_and_put_back_task_of_same_attempt() -> None:
    rec = record("r1", "t1", attempt=2, device="d1", fence=41)
    out = result_updates([log("r1", "SUCCESS", "fine")], {"r1": rec},
                         {"t1": task_fields()}, DEFAULTS, NOW)
    assert len(out.tasks) == len(out.records) == 1
    flt, update = out.tasks[0]
    assert flt == {"_id": "t1", "attempt": 2,
                   "status": {"$in": ["pending", "retry_waiting", "running", "sent"]}}
    assert update["$set"]["status"] == "success"
    assert update["$set"]["finished_at"] == NOW
    assert "last_error" not in update["$set"]
    rflt, rupdate = out.records[0]
    assert rflt == {"_id": "r1", "status": {"$in": ["running", "sent"]}}
    assert rupdate["$set"]["status"] == "success"
    assert "error" not in rupdate["$set"]
    assert out.releases == [("d1", 41)]
    assert out.retries == [], "a success is never retried"


@pytest.mark.parametrize("log_type", ["ERROR", "SYSTEM_ERROR"])
def test_error_on_the_last_attempt_fails_and_applies_only_to_running_or_sent(
    log_type: str,
) -> None:
    rec = record("r1", "t1", attempt=3, device="d1", fence=7)
    out = result_updates([log("r1", log_type, "bad")], {"r1": rec},
                         {"t1": task_fields(max_retries=2)}, DEFAULTS, NOW)
    flt, update = out.tasks[0]
    assert flt == {"_id": "t1", "attempt": 3, "status": {"$in": ["running", "sent"]}}
    assert update["$set"]["status"] == "failed"
    assert update["$set"]["finished_at"] == NOW
    assert update["$set"]["last_error"] == f"{log_type}: bad (attempts exhausted: 3 of 3)"
    assert "run_at" not in update["$set"]
    rflt, rupdate = out.records[0]
    assert rflt["status"] == {"$in": ["running", "sent"]}
    assert rupdate["$set"]["status"] == "failed"
    assert rupdate["$set"]["error"] == f"{log_type}: bad"
    assert out.releases == [("d1", 7)]
    assert out.retries == []


@pytest.mark.parametrize("log_type", ["ERROR", "SYSTEM_ERROR"])
def test_error_with_attempts_left_waits_for_a_retry(log_type: str) -> None:
    rec = record("r1", "t1", attempt=2, device="d1", fence=7)
    out = result_updates([log("r1", log_type, "bad")], {"r1": rec},
                         {"t1": task_fields(max_retries=3)}, DEFAULTS, NOW)
    flt, update = out.tasks[0]
    assert flt == {"_id": "t1", "attempt": 2, "status": {"$in": ["running", "sent"]}}
    fields = update["$set"]
    assert fields["status"] == "retry_waiting"
    assert fields["last_error"] == f"{log_type}: bad"
    assert "finished_at" not in fields and "purge_at" not in fields
    # After attempt 2: base 10 s * 2^1 = 20 s, +/- 20 % jitter.
    assert NOW + timedelta(seconds=16) <= fields["run_at"] <= NOW + timedelta(seconds=24)
    # Nobody holds it: any master takes it from the ready list and fires it at run_at.
    assert update["$unset"] == {"master": ""} and "master" not in fields
    rflt, rupdate = out.records[0]
    assert rflt == {"_id": "r1", "status": {"$in": ["running", "sent"]}}
    assert rupdate["$set"]["status"] == "failed" and rupdate["$set"]["error"] == f"{log_type}: bad"
    assert out.releases == [("d1", 7)]
    assert out.retries == ["t1"]


@pytest.mark.parametrize(("log_type", "code", "retried"), [
    ("ERROR", "E_SCRIPT_MISSING", False),   # a final code
    ("ERROR", "E_FLAKY", True),             # a code not marked final
    ("ERROR", None, True),                  # no code at all
    ("SYSTEM_ERROR", "E_SCRIPT_MISSING", True),  # system errors retry whatever the code
])
def test_error_codes_decide_the_retry(log_type: str, code: str | None, retried: bool) -> None:
    s = settings(final_error_codes=frozenset({"E_SCRIPT_MISSING", "E_NO_APP"}))
    rec = record("r1", "t1", attempt=1, device="d1", fence=2)
    out = result_updates([log("r1", log_type, "oops", code=code)], {"r1": rec},
                         {"t1": task_fields(max_retries=3)}, s, NOW)
    [(_, update)] = out.tasks
    expected_error = f"{log_type}{f' [{code}]' if code else ''}: oops"
    assert update["$set"]["last_error"] == expected_error
    assert update["$set"]["status"] == ("retry_waiting" if retried else "failed")
    assert out.retries == (["t1"] if retried else [])
    assert out.records[0][1]["$set"]["error"] == expected_error


def test_a_task_not_found_is_failed_without_a_retry() -> None:
    rec = record("r1", "t1", attempt=1, device="d1", fence=2)
    out = result_updates([log("r1", "SYSTEM_ERROR", "crash")], {"r1": rec}, {}, DEFAULTS, NOW)
    assert out.tasks[0][1]["$set"]["status"] == "failed"
    assert out.tasks[0][1]["$set"]["last_error"] == "SYSTEM_ERROR: crash"
    assert out.retries == [] and out.releases == [("d1", 2)]


@pytest.mark.parametrize(("task", "queues", "low", "high"), [
    (task_fields(retry_base_s=100.0, queue="bulk"), {"bulk": 50.0}, 80.0, 120.0),  # the task's
    (task_fields(queue="bulk"), {"bulk": 50.0}, 40.0, 60.0),                      # its queue's
    (task_fields(queue="other"), {"bulk": 50.0}, 8.0, 12.0),                       # the default
])
def test_retry_delay_takes_the_task_then_the_queue_then_the_default_base(
    task: dict[str, Any], queues: dict[str, float], low: float, high: float
) -> None:
    s = settings(queue_retry_base_s=queues)
    rec = record("r1", "t1", attempt=1, device="d1", fence=2)
    out = result_updates([log("r1", "ERROR", "x")], {"r1": rec}, {"t1": task}, s, NOW)
    run_at = out.tasks[0][1]["$set"]["run_at"]
    assert NOW + timedelta(seconds=low) <= run_at <= NOW + timedelta(seconds=high)


def test_task_filter_uses_the_records_attempt_and_task() -> None:
    # The message's taskId is not trusted: the record decides which task and attempt.
    rec = record("r1", "t-real", attempt=5, device="d9", fence=3)
    out = result_updates([log("r1", "SUCCESS", task_id="t-claimed")], {"r1": rec}, {},
                         DEFAULTS, NOW)
    assert out.tasks[0][0]["_id"] == "t-real"
    assert out.tasks[0][0]["attempt"] == 5
    assert out.releases == [("d9", 3)]


def test_a_retry_names_the_records_task_not_the_messages() -> None:
    rec = record("r1", "t-real", attempt=1, device="d9", fence=3)
    out = result_updates([log("r1", "ERROR", task_id="t-claimed")], {"r1": rec},
                         {"t-real": task_fields()}, DEFAULTS, NOW)
    assert out.retries == ["t-real"]
    assert out.tasks[0][0]["_id"] == "t-real"


def test_unknown_record_is_skipped() -> None:
    rec = record("r2", "t2", attempt=1, device="d2", fence=8)
    out = result_updates(
        [log("r-missing", "SUCCESS"), log("r2", "ERROR", "x")], {"r2": rec},
        {"t2": task_fields()}, DEFAULTS, NOW,
    )
    assert [t[0]["_id"] for t in out.tasks] == ["t2"]
    assert [r[0]["_id"] for r in out.records] == ["r2"]
    assert out.releases == [("d2", 8)]
    assert out.retries == ["t2"]


def test_many_results_in_message_order() -> None:
    recs = {
        "ra": record("ra", "ta", attempt=1, device="dA", fence=10),
        "rb": record("rb", "tb", attempt=3, device="dB", fence=11),
        "rc": record("rc", "tc", attempt=4, device="dC", fence=12),
    }
    tasks = {"ta": task_fields(max_retries=3), "tc": task_fields(max_retries=3)}
    out = result_updates(
        [log("rb", "SUCCESS"), log("ra", "SYSTEM_ERROR", "crash"),
         log("rc", "SYSTEM_ERROR", "crash")], recs, tasks, DEFAULTS, NOW,
    )
    assert [(f["_id"], f["attempt"]) for f, _ in out.tasks] == [("tb", 3), ("ta", 1), ("tc", 4)]
    assert [u["$set"]["status"] for _, u in out.tasks] == ["success", "retry_waiting", "failed"]
    assert [f["_id"] for f, _ in out.records] == ["rb", "ra", "rc"]
    assert out.releases == [("dB", 11), ("dA", 10), ("dC", 12)]
    assert out.retries == ["ta"]


def test_error_text_is_cut_to_1000_characters() -> None:
    rec = record("r1", "t1", attempt=1, device="d1", fence=1)
    out = result_updates([log("r1", "ERROR", "x" * 5000)], {"r1": rec},
                         {"t1": task_fields()}, DEFAULTS, NOW)
    assert len(out.tasks[0][1]["$set"]["last_error"]) == 1000
    assert out.tasks[0][1]["$set"]["last_error"].startswith("ERROR: xxx")
    assert len(out.records[0][1]["$set"]["error"]) == 1000


def test_no_results_no_updates() -> None:
    out = result_updates([], {}, {}, DEFAULTS, NOW)
    assert out == ResultWrites()
    assert (out.tasks, out.records, out.releases, out.retries) == ([], [], [], [])


def test_a_message_within_the_cut_is_stored_as_it_is() -> None:
    assert cut_message("x" * 100, 100) == "x" * 100
    assert cut_message("", 100) == ""


def test_a_long_message_is_cut_to_the_limit_and_says_how_long_it_was() -> None:
    stored = cut_message("x" * 5_000_000, 1000)
    assert len(stored) == 1000
    assert stored.startswith("x" * 900)
    assert stored.endswith(" [cut: 5000000 characters]")


def test_a_log_bson_cannot_hold_is_valid_json_but_refused_with_the_reason() -> None:
    # JSON may escape a lone surrogate and Python keeps it; UTF-8, so BSON, cannot.
    data = raw(message="a \\ud800 b").replace(b"\\\\", b"\\")
    assert b"\\ud800" in data
    msg = parse_message(data)
    with pytest.raises(ValueError, match="cannot be stored") as refused:
        log_document(msg, NOW, 1000)
    assert safe_text(str(refused.value)).encode("utf-8")  # a dead letter can carry it
    # In an id, validation refuses it before anything is stored.
    with pytest.raises(ValueError, match="recordId"):
        parse_message(raw(recordId="a \\ud800 b").replace(b"\\\\", b"\\"))


def test_a_stored_log_has_its_message_cut() -> None:
    doc = log_document(parse_message(raw(message="z" * 5000)), NOW, 1000)
    assert len(doc["message"]) == 1000 and doc["message"].endswith("[cut: 5000 characters]")
    # The identity is the whole message's: the same log delivered again is the same.
    assert doc["_id"] == parse_message(raw(message="z" * 5000)).log_id


def test_a_dead_letter_keeps_the_head_of_a_huge_message_and_its_size() -> None:
    data = b"{" + b"y" * (2 * DEAD_LETTER_DATA_BYTES)
    letter = json.loads(dead_letter_payload(data, "why \ud800", "1:2:-1", "topic"))
    assert letter["reason"] == "why \\ud800"
    assert letter["data_bytes"] == len(data)
    assert len(letter["data"]) == DEAD_LETTER_DATA_BYTES
    assert (letter["message_id"], letter["topic"]) == ("1:2:-1", "topic")
    small = json.loads(dead_letter_payload(b"{oops", "not JSON", "1", "t"))
    assert small["data"] == "{oops" and "data_bytes" not in small


async def test_a_refused_subscription_in_the_client_log_is_signalled_to_the_loop() -> None:
    signals = ClientSignals(asyncio.get_running_loop())
    signals(logging.INFO, "[t, sub, 0] Getting connection from pool")
    signals(logging.WARNING, "Connection refused")
    await asyncio.sleep(0)
    assert not signals.refused.is_set()
    signals(logging.WARNING,
            "[t, sub, 0] Temporary error in creating consumer: ResultDisconnected")
    await asyncio.wait_for(signals.refused.wait(), 1)
