"""Queue-item, task and task-log models: validation, defaults, aliases and identities."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import bson
import pytest
from pydantic import ValidationError

from sendscript.models import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    MAX_SCRIPT_BYTES,
    ExecRecord,
    FanoutSpec,
    LogType,
    Task,
    TaskLogMessage,
    TaskSpec,
    describe_error,
    id_from_tag,
    parse_when,
    script_refusal,
)
from sendscript.status import RecordStatus, TaskStatus

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def spec(**fields: Any) -> TaskSpec:
    return TaskSpec.model_validate({"device_id": "dev-1", "script": {"id": "s1"}, **fields})


def reason(fields: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        TaskSpec.model_validate(fields)
    return describe_error(info.value)


# -- TaskSpec ------------------------------------------------------------------------------
def test_spec_defaults() -> None:
    s = spec()
    assert (s.priority, s.max_retries, s.timeout_s, s.queue) == (5, 3, 300.0, "default")
    assert s.run_at is None and s.expire_at is None and s.dedupe_key is None


def test_spec_ignores_unknown_fields_and_strips_device_id() -> None:
    s = TaskSpec.model_validate({"device_id": "  dev-2 ", "script": {}, "colour": "blue"})
    assert s.device_id == "dev-2"
    assert not hasattr(s, "colour")


def test_spec_requires_device_id_and_script() -> None:
    text = reason({})
    assert "device_id: Field required" in text
    assert "script: Field required" in text
    assert "; " in text  # one line, both reasons


@pytest.mark.parametrize("device_id", [123, None, ["d"]])
def test_spec_device_id_must_be_text(device_id: Any) -> None:
    text = reason({"device_id": device_id, "script": {}})
    assert text.startswith("device_id:")
    assert "must be a string" in text


def test_spec_blank_device_id_refused() -> None:
    assert reason({"device_id": "   ", "script": {}}).startswith("device_id:")


@pytest.mark.parametrize("script", ["run.js", 5, ["a"], None])
def test_spec_script_must_be_an_object(script: Any) -> None:
    assert reason({"device_id": "d", "script": script}).startswith("script:")


@pytest.mark.parametrize("priority", [0, 5, 10])
def test_spec_priority_in_range(priority: int) -> None:
    assert spec(priority=priority).priority == priority


@pytest.mark.parametrize(
    ("priority", "words"),
    [(-1, "greater than or equal to 0"), (11, "less than or equal to 10"),
     (2.5, "integer"), ("high", "integer")],
)
def test_spec_priority_out_of_range_refused(priority: Any, words: str) -> None:
    text = reason({"device_id": "d", "script": {}, "priority": priority})
    assert text.startswith("priority:")
    assert words in text


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_retries", -1), ("max_retries", 101), ("timeout_s", 0), ("timeout_s", -5),
     ("timeout_s", 8 * 86400), ("queue", ""), ("dedupe_key", "x" * 501), ("dedupe_key", "")],
)
def test_spec_bounds(field: str, value: Any) -> None:
    assert reason({"device_id": "d", "script": {}, field: value}).startswith(f"{field}:")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-01T12:00:00+00:00", NOW),
        ("2024-05-01T12:00:00Z", NOW),
        ("2024-05-01T14:00:00+02:00", NOW),
        ("2024-05-01T12:00:00", NOW),  # naive is read as UTC
        (NOW.timestamp(), NOW),
        (int(NOW.timestamp()), NOW),
        (str(int(NOW.timestamp())), NOW),
        (f" {NOW.timestamp() + 0.5} ", NOW + timedelta(milliseconds=500)),
    ],
)
def test_spec_run_at_forms(value: Any, expected: datetime) -> None:
    parsed = spec(run_at=value).run_at
    assert parsed == expected
    assert parsed is not None and parsed.tzinfo is not None  # always aware


@pytest.mark.parametrize("value", [None, ""])
def test_spec_run_at_empty_means_now(value: Any) -> None:
    assert spec(run_at=value).run_at is None


@pytest.mark.parametrize(
    ("value", "words"),
    [("tomorrow", "isoformat"), (True, "boolean"), ([1], "list"), ({"t": 1}, "dict")],
)
def test_spec_run_at_bad_values(value: Any, words: str) -> None:
    text = reason({"device_id": "d", "script": {}, "run_at": value})
    assert text.startswith("run_at:")
    assert words in text


def test_spec_expire_at_parsed_like_run_at() -> None:
    assert spec(expire_at="2024-05-01T12:00:00Z").expire_at == NOW
    assert reason({"device_id": "d", "script": {}, "expire_at": "soon"}).startswith("expire_at:")


@pytest.mark.parametrize("value", [1e20, "1e20", float("inf"), "inf"])
def test_spec_run_at_out_of_range_is_a_validation_error(value: Any) -> None:
    with pytest.raises(ValidationError):
        TaskSpec.model_validate({"device_id": "d", "script": {}, "run_at": value})


def test_parse_when_keeps_aware_datetime_and_marks_naive_utc() -> None:
    aware = datetime(2024, 5, 1, 14, tzinfo=UTC)
    assert parse_when(aware) is aware
    assert parse_when(datetime(2024, 5, 1, 12)) == NOW


# -- Task ----------------------------------------------------------------------------------
def test_from_spec_without_run_at_is_pending_now() -> None:
    task = Task.from_spec(spec(priority=7, dedupe_key="k", queue="q"), task_id="t1", now=NOW)
    assert task.id == "t1"
    assert task.status == TaskStatus.PENDING
    assert task.run_at == NOW and task.created_at == NOW and task.updated_at == NOW
    assert (task.priority, task.dedupe_key, task.queue, task.attempt) == (7, "k", "q", 0)


def test_from_spec_due_run_at_is_pending() -> None:
    past = NOW - timedelta(seconds=1)
    assert Task.from_spec(spec(run_at=past), now=NOW).status == TaskStatus.PENDING
    assert Task.from_spec(spec(run_at=NOW), now=NOW).status == TaskStatus.PENDING


def test_from_spec_future_run_at_is_waiting() -> None:
    later = NOW + timedelta(seconds=1)
    task = Task.from_spec(spec(run_at=later), now=NOW)
    assert task.status == TaskStatus.WAITING
    assert task.run_at == later


def test_from_spec_without_id_makes_distinct_ids() -> None:
    a, b = Task.from_spec(spec(), now=NOW), Task.from_spec(spec(), now=NOW)
    assert a.id and b.id and a.id != b.id


def test_task_to_doc_uses_underscore_id_and_plain_status() -> None:
    doc = Task.from_spec(spec(), task_id="t1", now=NOW).to_doc()
    assert doc["_id"] == "t1" and "id" not in doc
    assert doc["status"] == "pending" and type(doc["status"]) is str
    assert "finished_at" not in doc  # None fields are left out


def test_exec_record_to_doc() -> None:
    rec = ExecRecord(_id="r1", task_id="t1", attempt=2, device_id="d", lock_value=9,
                     worker="w", started_at=NOW, status=RecordStatus.SENT)
    doc = rec.to_doc()
    assert doc["_id"] == "r1" and doc["status"] == "sent" and doc["lock_value"] == 9
    assert "sent_at" not in doc


# -- id_from_tag ---------------------------------------------------------------------------
def test_id_from_tag_is_deterministic() -> None:
    assert id_from_tag("p", "tag-1") == id_from_tag("p", "tag-1")


def test_id_from_tag_differs_by_tag_and_prefix() -> None:
    ids = {id_from_tag("p", "tag-1"), id_from_tag("p", "tag-2"), id_from_tag("q", "tag-1")}
    assert len(ids) == 3


def test_id_from_tag_shape() -> None:
    value = id_from_tag("sendscript", "abc")
    assert len(value) == 24
    int(value, 16)  # hex


# -- TaskLogMessage ------------------------------------------------------------------------
CAMEL = {"recordId": "r1", "taskId": "t1", "deviceId": "d1", "logType": "SUCCESS",
         "message": "done", "timestamp": 1714564800000}
SNAKE = {"record_id": "r1", "task_id": "t1", "device_id": "d1", "log_type": "SUCCESS",
         "message": "done", "timestamp": 1714564800000}


def test_log_camel_and_snake_case_are_the_same() -> None:
    a, b = TaskLogMessage.model_validate(CAMEL), TaskLogMessage.model_validate(SNAKE)
    assert a == b
    assert (a.record_id, a.task_id, a.device_id, a.log_type) == ("r1", "t1", "d1",
                                                                 LogType.SUCCESS)


@pytest.mark.parametrize("raw", ["success", "Success", "system_error", "progress"])
def test_log_type_is_upper_cased(raw: str) -> None:
    msg = TaskLogMessage.model_validate({**CAMEL, "logType": raw})
    assert msg.log_type == raw.upper()


def test_log_type_unknown_refused() -> None:
    with pytest.raises(ValidationError) as info:
        TaskLogMessage.model_validate({**CAMEL, "logType": "DEBUG"})
    assert "logType" in describe_error(info.value)


def test_log_message_null_and_number_become_text() -> None:
    assert TaskLogMessage.model_validate({**CAMEL, "message": None}).message == ""
    assert TaskLogMessage.model_validate({**CAMEL, "message": 42}).message == "42"
    assert TaskLogMessage.model_validate({k: v for k, v in CAMEL.items()
                                          if k != "message"}).message == ""


def test_log_id_same_for_same_log() -> None:
    a, b = TaskLogMessage.model_validate(CAMEL), TaskLogMessage.model_validate(SNAKE)
    assert a.log_id == b.log_id
    assert a.log_id.startswith("r1:")


@pytest.mark.parametrize(
    "change",
    [{"message": "other"}, {"timestamp": 1714564800001}, {"logType": "ERROR"},
     {"recordId": "r2"}],
)
def test_log_id_differs_for_different_logs(change: dict[str, Any]) -> None:
    a = TaskLogMessage.model_validate(CAMEL)
    b = TaskLogMessage.model_validate({**CAMEL, **change})
    assert a.log_id != b.log_id


def test_log_to_doc() -> None:
    msg = TaskLogMessage.model_validate(CAMEL)
    doc = msg.to_doc(NOW)
    assert doc["_id"] == msg.log_id
    assert doc["log_type"] == "SUCCESS" and type(doc["log_type"]) is str
    assert doc["timestamp"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert doc["received_at"] == NOW


def test_describe_error_names_nested_location() -> None:
    with pytest.raises(ValidationError) as info:
        TaskLogMessage.model_validate({**CAMEL, "timestamp": -1})
    text = describe_error(info.value)
    assert text == "timestamp: Input should be greater than or equal to 0"


# -- defaults and the script limit ---------------------------------------------------------
def test_one_definition_of_the_task_defaults() -> None:
    assert (DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, DEFAULT_QUEUE) == (
        5, 3, 300.0, "default")
    task = Task(_id="t", device_id="d", script={})
    assert (task.priority, task.max_retries, task.timeout_s, task.queue) == (
        DEFAULT_PRIORITY, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, DEFAULT_QUEUE)


def test_script_refusal_measures_bson_bytes() -> None:
    script = {"blob": "x" * 100}
    size = len(bson.encode(script))
    assert script_refusal(script, size) is None
    assert script_refusal(script, size - 1) == (
        f"script is {size} bytes as BSON, over the limit of {size - 1} bytes "
        "(SENDSCRIPT_MAX_SCRIPT_BYTES)")


@pytest.mark.parametrize(("script", "words"), [
    ({"n": 2**64}, "8-byte ints"),
    ({"s": "\ud800"}, "surrogates not allowed"),
    ({"\ud83d": 1}, "surrogates not allowed"),
    ({"a\x00b": 1}, "NULL byte"),
])
def test_script_refusal_names_what_bson_cannot_hold(script: dict[str, Any], words: str) -> None:
    reason = script_refusal(script, 10**6)
    assert reason is not None and reason.startswith("script cannot be stored") and words in reason


def test_the_limit_applies_where_the_context_names_it() -> None:
    fields = {"device_id": "d", "script": {"blob": "x" * 200}}
    assert TaskSpec.model_validate(fields).script == fields["script"]  # no context: no limit
    with pytest.raises(ValidationError) as info:
        TaskSpec.model_validate(fields, context={MAX_SCRIPT_BYTES: 100})
    assert "over the limit of 100 bytes" in describe_error(info.value)
    fanout = {"device_ids": ["a", "b"], "script": {"blob": "x" * 200}}
    with pytest.raises(ValidationError):
        FanoutSpec.model_validate(fanout, context={MAX_SCRIPT_BYTES: 100})


def test_a_past_due_time_is_kept_up_to_an_hour_before_creation() -> None:
    from datetime import UTC, datetime, timedelta

    from sendscript.models import EARLIEST_DUE, due_time

    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert due_time(None, now) == now
    assert due_time(now - timedelta(seconds=3), now) == now - timedelta(seconds=3)
    assert due_time(now - timedelta(days=2), now) == now - EARLIEST_DUE
    assert due_time(now + timedelta(hours=5), now) == now + timedelta(hours=5)
