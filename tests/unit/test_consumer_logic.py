"""The task-log consumer's pure part: message parsing and the CAS updates of results."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from consumers.task_log import parse_message, result_updates
from sendscript.models import ExecRecord, LogType, TaskLogMessage
from sendscript.status import RecordStatus

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
BASE: dict[str, Any] = {"recordId": "r1", "taskId": "t1", "deviceId": "d1",
                        "logType": "SUCCESS", "message": "ok", "timestamp": 1714564800000}


def raw(**changes: Any) -> bytes:
    return json.dumps({**BASE, **changes}).encode()


def log(record_id: str, log_type: str, message: str = "", task_id: str = "t1") -> TaskLogMessage:
    return TaskLogMessage.model_validate({"recordId": record_id, "taskId": task_id,
                                          "deviceId": "d1", "logType": log_type,
                                          "message": message, "timestamp": 1})


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


@pytest.mark.parametrize("timestamp", [10**20, 253402300800000])
def test_every_accepted_message_can_be_stored(timestamp: int) -> None:
    try:
        msg = parse_message(raw(timestamp=timestamp))
    except ValueError:
        return  # refused with a reason: fine
    msg.to_doc(NOW)


# -- result_updates ------------------------------------------------------------------------------
def test_success_applies_to_open_and_put_back_task_of_same_attempt() -> None:
    rec = record("r1", "t1", attempt=2, device="d1", fence=41)
    tasks, records, releases = result_updates([log("r1", "SUCCESS", "fine")], {"r1": rec}, NOW)
    assert len(tasks) == len(records) == 1
    flt, update = tasks[0]
    assert flt == {"_id": "t1", "attempt": 2,
                   "status": {"$in": ["pending", "retry_waiting", "running", "sent"]}}
    assert update["$set"]["status"] == "success"
    assert update["$set"]["finished_at"] == NOW
    assert "last_error" not in update["$set"]
    rflt, rupdate = records[0]
    assert rflt == {"_id": "r1", "status": {"$in": ["running", "sent"]}}
    assert rupdate["$set"]["status"] == "success"
    assert "error" not in rupdate["$set"]
    assert releases == [("d1", 41)]


@pytest.mark.parametrize("log_type", ["ERROR", "SYSTEM_ERROR"])
def test_error_applies_only_to_running_or_sent(log_type: str) -> None:
    rec = record("r1", "t1", attempt=0, device="d1", fence=7)
    tasks, records, releases = result_updates([log("r1", log_type, "bad")], {"r1": rec}, NOW)
    flt, update = tasks[0]
    assert flt == {"_id": "t1", "attempt": 0, "status": {"$in": ["running", "sent"]}}
    assert update["$set"]["status"] == "failed"
    assert update["$set"]["last_error"] == f"{log_type}: bad"
    rflt, rupdate = records[0]
    assert rflt["status"] == {"$in": ["running", "sent"]}
    assert rupdate["$set"]["status"] == "failed"
    assert rupdate["$set"]["error"] == f"{log_type}: bad"
    assert releases == [("d1", 7)]


def test_task_filter_uses_the_records_attempt_and_task() -> None:
    # The message's taskId is not trusted: the record decides which task and attempt.
    rec = record("r1", "t-real", attempt=5, device="d9", fence=3)
    tasks, _, releases = result_updates([log("r1", "SUCCESS", task_id="t-claimed")],
                                        {"r1": rec}, NOW)
    assert tasks[0][0]["_id"] == "t-real"
    assert tasks[0][0]["attempt"] == 5
    assert releases == [("d9", 3)]


def test_unknown_record_is_skipped() -> None:
    rec = record("r2", "t2", attempt=1, device="d2", fence=8)
    tasks, records, releases = result_updates(
        [log("r-missing", "SUCCESS"), log("r2", "ERROR", "x")], {"r2": rec}, NOW
    )
    assert [t[0]["_id"] for t in tasks] == ["t2"]
    assert [r[0]["_id"] for r in records] == ["r2"]
    assert releases == [("d2", 8)]


def test_many_results_in_message_order() -> None:
    recs = {
        "ra": record("ra", "ta", attempt=1, device="dA", fence=10),
        "rb": record("rb", "tb", attempt=3, device="dB", fence=11),
    }
    tasks, records, releases = result_updates(
        [log("rb", "SUCCESS"), log("ra", "SYSTEM_ERROR", "crash")], recs, NOW
    )
    assert [(f["_id"], f["attempt"]) for f, _ in tasks] == [("tb", 3), ("ta", 1)]
    assert [u["$set"]["status"] for _, u in tasks] == ["success", "failed"]
    assert [f["_id"] for f, _ in records] == ["rb", "ra"]
    assert releases == [("dB", 11), ("dA", 10)]


def test_error_text_is_cut_to_1000_characters() -> None:
    rec = record("r1", "t1", attempt=1, device="d1", fence=1)
    tasks, records, _ = result_updates([log("r1", "ERROR", "x" * 5000)], {"r1": rec}, NOW)
    assert len(tasks[0][1]["$set"]["last_error"]) == 1000
    assert tasks[0][1]["$set"]["last_error"].startswith("ERROR: xxx")
    assert len(records[0][1]["$set"]["error"]) == 1000


def test_no_results_no_updates() -> None:
    assert result_updates([], {}, NOW) == ([], [], [])
