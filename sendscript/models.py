"""Pydantic models of what crosses a boundary: queue items, Mongo documents, task logs."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

import bson
from bson import ObjectId
from bson.errors import BSONError
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sendscript import tracing
from sendscript.dedupe import WINDOW, DedupeMode, first_due
from sendscript.status import RecordStatus, TaskStatus

# A task's defaults, the one definition the SDK, the CLI and the models use.
DEFAULT_PRIORITY = 5
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_QUEUE = "default"
# The validation context key naming the largest script accepted (BSON bytes). The
# boundaries where producers submit (intake, SDK) pass it; tasks built from what is
# already stored (schedules, fan-out copies) are not measured again.
MAX_SCRIPT_BYTES = "max_script_bytes"
# Pull mode: a task an agent leases over the agents API instead of one a
# master pushes to central-control. Its `master` holds this name for as long as it is
# unfinished, so no master's delay loader, orphan sweep or restore ever takes it; a pull
# task may leave the device open (ANY_DEVICE): any agent with its labels may run it.
PUSH = "push"
PULL = "pull"
PULL_HOLDER = "@agents"  # no host name has an @: never a master id
ANY_DEVICE = "*"


def script_refusal(script: dict[str, Any], max_bytes: int) -> str | None:
    """Why a script is refused, or None: it cannot be encoded as BSON (an int beyond
    8 bytes, a lone surrogate, a NUL in a key), or its BSON size is over `max_bytes`."""
    try:
        size = len(bson.encode(script))
    except (BSONError, OverflowError, ValueError) as exc:  # ValueError: bad UTF-8
        return f"script cannot be stored: {type(exc).__name__}: {exc}"[:500]
    if size > max_bytes:
        return (f"script is {size} bytes as BSON, over the limit of {max_bytes} bytes "
                "(SENDSCRIPT_MAX_SCRIPT_BYTES)")
    return None


# A task's run_at is never further before its creation than this: a past due time
# means "now" to dispatch, and the task search finds a status's tasks created after
# T among those with run_at after T - EARLIEST_DUE (console/search.py). A fire of
# a schedule keeps its fire time unless it comes more than this late.
EARLIEST_DUE = timedelta(hours=1)


def due_time(run_at: datetime | None, now: datetime) -> datetime:
    if run_at is None:
        return now
    return max(run_at, now - EARLIEST_DUE)


def utcnow() -> datetime:
    # Mongo stores milliseconds; truncating here keeps in-memory and stored values equal.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_id() -> str:
    return str(ObjectId())


def id_from_tag(prefix: str, tag: str) -> str:
    """A task id derived from an intake tag, so re-ingesting an item after a crash
    finds the task it already stored instead of creating a second one."""
    return hashlib.blake2b(f"{prefix}:{tag}".encode(), digest_size=12).hexdigest()


def _from_epoch(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"epoch seconds out of range: {seconds!r}") from None


def parse_when(value: Any) -> datetime | None:
    """ISO-8601 string or epoch seconds (int, float or numeric string) to aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bool):
        raise ValueError("expected ISO-8601 or epoch seconds, got a boolean")
    if isinstance(value, int | float):
        return _from_epoch(float(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return _from_epoch(number)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"expected ISO-8601 or epoch seconds, got {type(value).__name__}")


class TaskTemplate(BaseModel):
    """What a task runs and how, without the device: shared by specs, fan-outs, schedules."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    script: dict[str, Any]
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=10)
    run_at: datetime | None = None
    dedupe_key: str | None = Field(None, min_length=1, max_length=500)
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0, le=100)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=7 * 86400)
    expire_at: datetime | None = None
    queue: str = Field(DEFAULT_QUEUE, min_length=1, max_length=100)
    retry_base_s: float | None = Field(None, ge=0, le=86400)  # else the queue's default
    # Pull mode: leased by agents (agents/); `labels` an agent must all carry.
    mode: Literal["push", "pull"] = PUSH
    labels: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=20)
    # How long the dedupe key is held (sendscript/dedupe.py; none: as always, until
    # SENDSCRIPT_DEDUPE_WINDOW_S after the result), and a trailing debounce.
    dedupe_mode: DedupeMode | None = None
    dedupe_window_s: float | None = Field(None, ge=0, le=366 * 86400)
    debounce_s: float | None = Field(None, gt=0, le=86400)
    debounce_max_s: float | None = Field(None, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _dedupe_rules(self) -> TaskTemplate:
        keyed = ("dedupe_mode", "dedupe_window_s", "debounce_s", "debounce_max_s")
        if self.dedupe_key is None and (given := [k for k in keyed if getattr(self, k)
                                                  is not None]):
            raise ValueError(f"{', '.join(given)}: only with a dedupe_key")
        if self.dedupe_window_s is not None:
            if self.dedupe_mode not in (None, DedupeMode.WINDOW):
                raise ValueError(f"dedupe_window_s goes with dedupe_mode {WINDOW!r}, "
                                 f"not {str(self.dedupe_mode)!r}")
            self.dedupe_mode = DedupeMode.WINDOW
        if self.debounce_max_s is not None:
            if self.debounce_s is None:
                raise ValueError("debounce_max_s needs debounce_s")
            if self.debounce_max_s < self.debounce_s:
                raise ValueError("debounce_max_s must be at least debounce_s")
        if self.debounce_s is not None:
            if self.run_at is not None:
                raise ValueError("debounce_s sets when the task runs: give no run_at")
            if self.mode == PULL:
                raise ValueError("debounce_s is for pushed tasks, not mode 'pull'")
        return self

    @field_validator("run_at", "expire_at", mode="before")
    @classmethod
    def _when(cls, value: Any) -> datetime | None:
        return parse_when(value)

    @field_validator("script")
    @classmethod
    def _storable(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        limit = (info.context or {}).get(MAX_SCRIPT_BYTES)
        if limit is not None and (reason := script_refusal(value, limit)):
            raise ValueError(reason)
        return value


class Traced(BaseModel):
    """A submission's trace context, W3C Trace Context strings (sendscript/tracing.py):
    its task's spans join that trace. A malformed `traceparent` is refused."""

    traceparent: str | None = Field(None, max_length=200)
    tracestate: str | None = Field(None, max_length=4096)

    @field_validator("traceparent")
    @classmethod
    def _w3c(cls, value: str | None) -> str | None:
        if value and not tracing.valid_traceparent(value):
            raise ValueError("not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
        return value or None

    def trace_carrier(self) -> dict[str, str] | None:
        return tracing.carrier_of(self.traceparent, self.tracestate)


class TaskSpec(TaskTemplate, Traced):
    """A producer's request for one script run on one device (queue item or SDK call)."""

    device_id: str = Field(min_length=1, max_length=200)

    @model_validator(mode="before")
    @classmethod
    def _pull_any_device(cls, data: Any) -> Any:
        """A pull task may name no device: any agent with its labels runs it."""
        if isinstance(data, dict) and data.get("mode") == PULL and data.get("device_id") is None:
            return {**data, "device_id": ANY_DEVICE}
        return data

    @field_validator("device_id", mode="before")
    @classmethod
    def _device_is_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("device_id must be a string")
        return value


class FanoutSpec(TaskTemplate, Traced):
    """One submission for many devices: a list, or a device group by name."""

    # Each id as a single task's `device_id` takes it: an id a task would refuse must
    # refuse the item here, not stall the intake when its chunk is carved.
    device_ids: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None, min_length=1, max_length=100_000)
    group: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_target(self) -> FanoutSpec:
        if (self.device_ids is None) == (self.group is None):
            raise ValueError("give exactly one of device_ids or group")
        if self.device_ids is not None and any(
            not isinstance(d, str) or not d.strip() for d in self.device_ids
        ):
            raise ValueError("device_ids must be non-empty strings")
        return self

    def for_device(self, device_id: str) -> TaskSpec:
        data = self.model_dump(exclude={"device_ids", "group"})
        if self.dedupe_key:
            data["dedupe_key"] = f"{self.dedupe_key}:{device_id}"
        return TaskSpec(device_id=device_id, **data)


class TaskRef(BaseModel):
    """A queue item naming a task the producer already stored."""

    model_config = ConfigDict(extra="ignore")
    task_id: str = Field(min_length=1, max_length=200)


class Task(BaseModel):
    """One document of `script_tasks`."""

    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(alias="_id")
    device_id: str
    script: dict[str, Any]
    priority: int = DEFAULT_PRIORITY
    status: TaskStatus = TaskStatus.PENDING
    run_at: datetime | None = None
    attempt: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_s: float = DEFAULT_TIMEOUT_S
    dedupe_key: str | None = None
    expire_at: datetime | None = None
    queue: str = DEFAULT_QUEUE
    retry_base_s: float | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    last_error: str | None = None
    # Extensions beyond the contract: which master holds it queued (or, stored by the
    # SDK due now, the live master it named to take it), the current
    # attempt's record and worker, its fan-out batch, the dedupe key while it holds
    # it (a unique index: while unfinished, and SENDSCRIPT_DEDUPE_WINDOW_S after),
    # and when retention deletes it.
    master: str | None = None
    record_id: str | None = None
    worker: str | None = None
    batch_id: str | None = None
    schedule: str | None = None
    dedupe_active: str | None = None
    purge_at: datetime | None = None
    # Pull mode (absent on pushed tasks): the mode, the labels an agent must
    # carry, the last checkpoint an agent saved (handed to the next lease), the lease
    # held now ({token, agent, record_id, fence, seq, leased_at, deadline, cap}), the
    # last lease's end ({token, agent, outcome}: a repeated call is answered from it),
    # and the agent's result.
    mode: str | None = None
    labels: list[str] | None = None
    checkpoint: dict[str, Any] | None = None
    lease: dict[str, Any] | None = None
    last_lease: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    # Dedupe mode and debounce (sendscript/dedupe.py), present when the spec gave
    # them: `debounce_until` the latest it may run (first submission + debounce_max_s),
    # `debounce_seq` how many later submissions replaced its spec, the last at
    # `debounce_last_at`.
    dedupe_mode: str | None = None
    dedupe_window_s: float | None = None
    debounce_s: float | None = None
    debounce_max_s: float | None = None
    debounce_until: datetime | None = None
    debounce_seq: int | None = None
    debounce_last_at: datetime | None = None
    # Its trace context ({"traceparent", "tracestate"}), when it was submitted traced:
    # every span of every attempt is a child of it (sendscript/tracing.py).
    trace: dict[str, str] | None = None

    @property
    def pull(self) -> bool:
        return self.mode == PULL

    def deadline(self, max_wait: dict[str, float]) -> datetime | None:
        """When it must have started: its `expire_at`, or its queue's max wait (queue ->
        seconds) after it was due, whichever comes first; None if neither applies."""
        limits = [self.expire_at] if self.expire_at else []
        if self.queue in max_wait:
            due = self.run_at or self.created_at
            limits.append(due + timedelta(seconds=max_wait[self.queue]))
        return min(limits) if limits else None

    @classmethod
    def from_spec(
        cls, spec: TaskSpec, *, task_id: str | None = None, now: datetime | None = None,
        batch_id: str | None = None,
    ) -> Task:
        now = now or utcnow()
        run_at, until = spec.run_at, None
        if spec.debounce_s is not None:  # quiet for debounce_s first: a delayed task
            run_at, until = first_due(now, spec.debounce_s, spec.debounce_max_s)
        due = run_at is None or run_at <= now
        debounced = spec.debounce_s is not None
        return cls(
            _id=task_id or new_id(),
            device_id=spec.device_id,
            script=spec.script,
            priority=spec.priority,
            status=TaskStatus.PENDING if due else TaskStatus.WAITING,
            run_at=due_time(run_at, now),
            max_retries=spec.max_retries,
            timeout_s=spec.timeout_s,
            dedupe_key=spec.dedupe_key,
            dedupe_active=spec.dedupe_key,
            expire_at=spec.expire_at,
            queue=spec.queue,
            retry_base_s=spec.retry_base_s,
            created_at=now,
            updated_at=now,
            batch_id=batch_id,
            mode=PULL if spec.mode == PULL else None,
            labels=sorted(set(spec.labels)) if spec.mode == PULL else None,
            master=PULL_HOLDER if spec.mode == PULL else None,
            dedupe_mode=str(spec.dedupe_mode) if spec.dedupe_mode else None,
            dedupe_window_s=spec.dedupe_window_s,
            debounce_s=spec.debounce_s,
            debounce_max_s=spec.debounce_max_s,
            debounce_until=until,
            debounce_seq=0 if debounced else None,
            trace=spec.trace_carrier(),
        )

    def to_doc(self) -> dict[str, Any]:
        doc = self.model_dump(by_alias=True, exclude_none=True)
        doc["status"] = str(self.status)
        return doc


class ExecRecord(BaseModel):
    """One document of `task_exec_records`: one dispatch attempt."""

    model_config = ConfigDict(populate_by_name=True)

    id: str = Field(alias="_id")
    task_id: str
    attempt: int
    device_id: str
    lock_value: int
    worker: str
    started_at: datetime
    sent_at: datetime | None = None
    finished_at: datetime | None = None
    status: RecordStatus = RecordStatus.RUNNING
    error: str | None = None
    # The task's deadline when it was sent: a result after it is recorded as late.
    deadline: datetime | None = None
    # The send's trace context, when traced: a result links to it by record id.
    trace: dict[str, str] | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = self.model_dump(by_alias=True, exclude_none=True)
        doc["status"] = str(self.status)
        return doc


class LogType(StrEnum):
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    INFO = "INFO"
    PROGRESS = "PROGRESS"


MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
RESULT_TYPES = frozenset({LogType.SUCCESS, LogType.ERROR, LogType.SYSTEM_ERROR})


class TaskLogMessage(BaseModel):
    """A device's task log as published on Pulsar (camelCase or snake_case)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    record_id: str = Field(min_length=1, validation_alias=AliasChoices("recordId", "record_id"))
    task_id: str = Field(min_length=1, validation_alias=AliasChoices("taskId", "task_id"))
    device_id: str = Field(min_length=1, validation_alias=AliasChoices("deviceId", "device_id"))
    log_type: LogType = Field(validation_alias=AliasChoices("logType", "log_type"))
    message: str = ""
    timestamp: int = Field(ge=0, le=MAX_EPOCH_MS)
    # An ERROR's code; codes listed in SENDSCRIPT_FINAL_ERROR_CODES are not retried.
    code: str | None = Field(None, max_length=200,
                             validation_alias=AliasChoices("code", "errorCode", "error_code"))

    @field_validator("log_type", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("message", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return "" if value is None else value if isinstance(value, str) else str(value)

    @field_validator("code", mode="before")
    @classmethod
    def _code(cls, value: Any) -> Any:
        return None if value in (None, "") else str(value)

    @property
    def log_id(self) -> str:
        """Same log delivered twice -> same id, so saving it twice stores it once."""
        digest = hashlib.blake2b(
            f"{self.log_type}|{self.timestamp}|{self.message}".encode(), digest_size=8
        ).hexdigest()
        return f"{self.record_id}:{digest}"

    def to_doc(self, received_at: datetime) -> dict[str, Any]:
        return {
            "_id": self.log_id,
            "record_id": self.record_id,
            "task_id": self.task_id,
            "device_id": self.device_id,
            "log_type": str(self.log_type),
            "message": self.message,
            "timestamp": datetime.fromtimestamp(self.timestamp / 1000, UTC),
            "received_at": received_at,
        }


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Bytes from a queue or a topic as a JSON object, or ValueError with the reason."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def describe_error(exc: ValidationError) -> str:
    """A one-line reason from a validation error: what a person reads in quarantine."""
    parts = []
    for err in exc.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)

