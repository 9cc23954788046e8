"""Task search: what a user may ask for, validated, and the Mongo query it becomes (pure).

Text typed by a user never becomes a query document or an unescaped regex: each
field is checked by pydantic, used as an equality value, or (error text) as an
anchored prefix of `re.escape`d text, so the server's work is bounded by its index
and no pattern can backtrack. Operators (`$where`, `$gt`, ...) cannot appear: every
value is a plain string checked against a pattern that has no `$`.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from sendscript.status import TaskStatus

# Names (devices, groups, queues, scripts, batches): printable, no `$`, no braces.
NAME = r"^[A-Za-z0-9_.:@/+=-][A-Za-z0-9_.:@/+= -]{0,199}$"
TASK_ID = r"^[A-Za-z0-9_.:-]{1,100}$"
MAX_ERROR_TEXT = 200
MAX_PAGE = 200
# A date and a time (seconds, fraction and offset optional; no offset: UTC). Dates
# alone and epoch numbers are refused: "2024" must not quietly mean 1970 + 2024 s.
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?"
                       r"([Zz]|[+-]\d{2}:?\d{2})?")
# What the document promises: RFC 3339, or "" (a form's empty field) meaning none. The
# pages' own form also sends a time without offset (datetime-local), taken as UTC.
Instant = Annotated[datetime | None, WithJsonSchema({"anyOf": [
    {"type": "string", "format": "date-time"}, {"type": "string", "maxLength": 0},
    {"type": "null"}]})]

# Spaces and tabs around a name are dropped; a blank field is no filter (forms send them).
PAD = " \t"
PADDED_NAME = r"^[ \t]*([A-Za-z0-9_.:@/+=-][A-Za-z0-9_.:@/+= -]{0,199})?[ \t]*$"
Name = Annotated[str | None, Field(pattern=NAME), WithJsonSchema({"anyOf": [
    {"type": "string", "pattern": PADDED_NAME, "maxLength": MAX_ERROR_TEXT},
    {"type": "null"}]})]
ErrorText = Annotated[str | None, Field(max_length=MAX_ERROR_TEXT), WithJsonSchema({"anyOf": [
    {"type": "string", "maxLength": MAX_ERROR_TEXT}, {"type": "null"}]})]


class TaskFilter(BaseModel):
    """What the Tasks view and the bulk actions select. Every field is optional; they
    combine with AND. Unknown fields are refused (a typo must not widen a bulk action)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Name = None
    group: Name = None
    queue: Name = None
    script: Name = None
    status: TaskStatus | None = None
    error: ErrorText = None
    batch: Name = None
    since: Instant = None
    until: Instant = None

    @field_validator("device", "group", "queue", "script", "batch", "error", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > MAX_ERROR_TEXT:
                raise ValueError(f"at most {MAX_ERROR_TEXT} characters")
            return value.strip(PAD) or None
        if value is not None and not isinstance(value, str):
            raise ValueError("must be text")  # an object here would be a query document
        return value

    @field_validator("since", "until", mode="before")
    @classmethod
    def _blank_time(cls, value: Any) -> Any:
        if value is None or isinstance(value, datetime):
            return value
        if not isinstance(value, str):
            raise ValueError("must be a date and time in text (ISO 8601)")
        value = value.strip()
        if not value:
            return None
        if not DATE_TIME.fullmatch(value):
            raise ValueError("must be a date and time, e.g. 2024-05-01T10:00:00Z")
        return value

    @field_validator("since", "until", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """In UTC (no offset given: UTC), so no store or query has to shift it."""
        if value is None:
            return None
        try:
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        except OverflowError:
            raise ValueError("out of the range of dates") from None

    @model_validator(mode="after")
    def _range(self) -> TaskFilter:
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    def is_empty(self) -> bool:
        return not any(self.model_dump(exclude_none=True).values())

    def canonical(self) -> str:
        """A stable text of this filter (bulk confirmation tokens are bound to it)."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()


def error_prefix(text: str) -> dict[str, str]:
    """An anchored, escaped prefix match: served by an index, no backtracking."""
    return {"$regex": "^" + re.escape(text[:MAX_ERROR_TEXT])}


def to_query(flt: TaskFilter, group_devices: list[str] | None = None) -> dict[str, Any]:
    """The Mongo filter of a TaskFilter. `group_devices` are the members of `flt.group`
    (the caller reads them; an unknown group matches nothing)."""
    q: dict[str, Any] = {}
    if flt.device is not None:
        q["device_id"] = flt.device
    if flt.group is not None:
        members = list(group_devices or [])
        if flt.device is not None:
            # both named: the device, if it is in the group
            q["device_id"] = flt.device if flt.device in members else {"$in": []}
        else:
            q["device_id"] = {"$in": members}
    if flt.queue is not None:
        q["queue"] = flt.queue
    if flt.script is not None:
        q["script.id"] = flt.script
    if flt.status is not None:
        q["status"] = str(flt.status)
    if flt.error is not None:
        q["last_error"] = error_prefix(flt.error)
    if flt.batch is not None:
        q["batch_id"] = flt.batch
    if flt.since is not None or flt.until is not None:
        span: dict[str, datetime] = {}
        if flt.since is not None:
            span["$gte"] = flt.since
        if flt.until is not None:
            span["$lt"] = flt.until
        q["created_at"] = span
    return q


class Page(BaseModel):
    """Newest first, `limit` at a time; `before` is the cursor the previous page gave
    (keyset paging in console/search.py: no skip over thousands of rows)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(50, ge=1, le=MAX_PAGE)
    before: str | None = Field(None, pattern=r"^[A-Za-z0-9_=-]{8,200}$")
