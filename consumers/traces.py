"""The consumer's spans of a traced task: the device's run and the result applied.

Each result's spans are children of the send that started the run: the context the
farm kept in the Pulsar message's properties (`traceparent`, `tracestate`, copied
from the send's headers), else the one the exec record keeps (linked by record id).
Only called with tracing on (`sendscript.tracing.ON`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulsar

from sendscript import tracing
from sendscript.models import RESULT_TYPES, ExecRecord, TaskLogMessage


def message_context(msg: pulsar.Message) -> dict[str, str] | None:
    try:
        return tracing.from_headers(msg.properties())
    except Exception:  # a property the client cannot decode costs the link only
        return None


def result_spans(good: Sequence[tuple[pulsar.Message, TaskLogMessage, Any]],
                 skipped: Mapping[int, str], records: Mapping[str, ExecRecord],
                 started_ns: int) -> int:
    """Record the spans of the batch's applied results; how many results were traced."""
    traced = 0
    for index, (msg, log, _) in enumerate(good):
        if index in skipped or log.log_type not in RESULT_TYPES:
            continue
        record = records.get(log.record_id)
        from_message = message_context(msg)
        parent = from_message or (record.trace if record is not None else None)
        if not parent:
            continue
        attrs = {"sendscript.task_id": log.task_id, "sendscript.record_id": log.record_id,
                 "sendscript.device_id": log.device_id,
                 "sendscript.log_type": str(log.log_type), "sendscript.code": log.code,
                 "sendscript.attempt": record.attempt if record is not None else None,
                 "sendscript.trace_from": "message" if from_message else "record"}
        failed = None if log.log_type == "SUCCESS" else f"{log.log_type}: {log.message[:200]}"
        if record is not None:
            began = record.sent_at or record.started_at
            tracing.record("sendscript.device.run", parent, began, log.timestamp * 1_000_000,
                           attrs, error=failed)
        else:
            attrs["sendscript.record_unknown"] = True
        tracing.record("sendscript.result", parent, started_ns, None, attrs, error=failed)
        traced += 1
    return traced
