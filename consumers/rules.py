"""What the task-log consumer decides without I/O: a message parsed or refused, the log
document it saves, the dead letter of a refused one, and the compare-and-set writes a
result makes to its task and exec record. Pure functions, unit-tested on their own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from sendscript import device_health
from sendscript.models import (
    LogType,
    TaskLogMessage,
    describe_error,
    parse_json_object,
)
from sendscript.refusals import (
    encoding_refusal,
)
from sendscript.retry import Decision, decide, failure_cas, log_retryable
from sendscript.settings import Settings
from sendscript.status import IN_FLIGHT, RECORD_OPEN, RecordStatus, TaskStatus, record_cas, task_cas

# A result for attempt k applies while the task is still on attempt k. SUCCESS
# also applies to a task put back after its worker died mid-send: the device did
# run it, so running it again would be the mistake.
APPLIES_TO = {
    LogType.SUCCESS: frozenset({TaskStatus.RUNNING, TaskStatus.SENT, TaskStatus.PENDING,
                                TaskStatus.RETRY_WAITING}),
    LogType.ERROR: IN_FLIGHT,
    LogType.SYSTEM_ERROR: IN_FLIGHT,
}

# A dead letter keeps this much of the refused message: the dead-letter topic has
# the same message size limit as the task-log topic, and the payload adds to it.
DEAD_LETTER_DATA_BYTES = 256 * 1024


def parse_message(data: bytes) -> TaskLogMessage:
    """A task-log message, or ValueError with the reason it is refused."""
    obj = parse_json_object(data)
    try:
        return TaskLogMessage.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from None


def cut_message(message: str, max_chars: int) -> str:
    """`message` as stored: at most `max_chars`, saying how long it was if cut."""
    if len(message) <= max_chars:
        return message
    note = f" [cut: {len(message)} characters]"
    return message[:max(0, max_chars - len(note))] + note


def log_document(msg: TaskLogMessage, received_at: datetime, max_chars: int) -> dict[str, Any]:
    """The document a log is stored as, its message cut; ValueError with the reason
    when the store could never hold it (retrying the batch would not change that)."""
    try:
        doc = msg.to_doc(received_at)
    except ValueError as exc:  # its identity hashes text UTF-8 cannot carry
        raise ValueError(f"cannot be stored: {type(exc).__name__}: {exc}"[:500]) from None
    doc["message"] = cut_message(doc["message"], max_chars)
    reason = encoding_refusal(doc)
    if reason is not None:
        raise ValueError(reason)
    return doc


def safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter_payload(data: bytes, reason: str, message_id: str, topic: str) -> bytes:
    """The dead letter of a refused message: its reason and (the head of) its data."""
    payload: dict[str, Any] = {
        "reason": safe_text(reason),
        "data": data[:DEAD_LETTER_DATA_BYTES].decode("utf-8", "replace"),
        "message_id": message_id,
        "topic": topic,
    }
    if len(data) > DEAD_LETTER_DATA_BYTES:
        payload["data_bytes"] = len(data)  # the data above is its head only
    return json.dumps(payload).encode()


@dataclass
class BatchResult:
    saved: int = 0
    applied: int = 0
    dead_lettered: int = 0
    released: int = 0
    retries: int = 0
    unknown_records: list[str] = field(default_factory=list)


@dataclass
class ResultWrites:
    """What a batch of result logs changes."""

    tasks: list[tuple[dict, dict]] = field(default_factory=list)  # in message order
    # Which of `tasks` end a failed attempt: (index, task id, waits for a retry). They
    # are applied one by one, so a retry is queued only where the task did move.
    failures: list[tuple[int, str, bool]] = field(default_factory=list)
    records: list[tuple[dict, dict]] = field(default_factory=list)
    releases: list[tuple[str, int]] = field(default_factory=list)

    @property
    def retries(self) -> list[str]:
        """Tasks to queue for a retry, if their update applies."""
        return [task_id for _, task_id, retry in self.failures if retry]

    def successes(self) -> list[tuple[dict, dict]]:
        failed = {i for i, _, _ in self.failures}
        return [u for i, u in enumerate(self.tasks) if i not in failed]


def result_updates(
    results: Sequence[TaskLogMessage],
    records: dict[str, Any],
    tasks: dict[str, dict[str, Any]],
    settings: Settings,
    now: datetime,
) -> ResultWrites:
    """CAS updates for tasks and records, locks to release and retries, for result logs.

    `tasks` holds the retry fields (max_retries, queue, retry_base_s) of the tasks
    with a failed result; a task missing there is failed without a retry.
    """
    out = ResultWrites()
    for msg in results:
        record = records.get(msg.record_id)
        if record is None:
            continue
        out.releases.append((record.device_id, record.lock_value))
        # Past the task's deadline the result still applies (the device did run it).
        late = {"late": True} if device_health.is_late(record, now) else {}
        if msg.log_type == LogType.SUCCESS:
            out.tasks.append(task_cas(record.task_id, APPLIES_TO[msg.log_type],
                                      TaskStatus.SUCCESS, now, attempt=record.attempt))
            out.records.append(record_cas(msg.record_id, RECORD_OPEN, RecordStatus.SUCCESS, now,
                                          set_=late))
            continue
        error = f"{msg.log_type}{f' [{msg.code}]' if msg.code else ''}: {msg.message}"[:1000]
        task = tasks.get(record.task_id)
        if task is None:
            decision = Decision(False, error)
        else:
            policy = settings.retry_policy(task.get("max_retries", 0),
                                           task.get("queue", "default"),
                                           task.get("retry_base_s"))
            retryable = log_retryable(msg.log_type, msg.code, settings.final_error_codes)
            decision = decide(policy, record.attempt, retryable, error, now)
        out.failures.append((len(out.tasks), record.task_id, decision.retry))
        out.tasks.append(failure_cas(record.task_id, APPLIES_TO[msg.log_type], record.attempt,
                                     decision, now))
        out.records.append(record_cas(msg.record_id, RECORD_OPEN, RecordStatus.FAILED, now,
                                      set_={"error": error, **late}))
    return out
