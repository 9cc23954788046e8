"""Task search for the console: filters, newest first, paged by a cursor.

Safe by construction: the query document is built here from typed fields; no text
from a user is ever a query document or an operator. Error text is matched as an
escaped, prefix-anchored regex (`^...`), which an index could serve and which
cannot be made to backtrack; lists and lengths are capped.

Paging is by cursor (`after`: the last item's created_at and id), so a deep page
costs what the first one does. The scan walks back in time windows that double
(from `FIRST_WINDOW_S`) until the page is full or the range is exhausted, so each
query reads a bounded slice of the `created_at` indexes
(`store.TASK_INDEXES`: created_at, and device_id + created_at) even on a server
that sorts in memory, like the embedded one.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from sendscript.status import TaskStatus
from sendscript.store import GROUPS, TASKS

MAX_LIMIT = 200
MAX_DEVICES = 1000
MAX_TEXT = 200
FIRST_WINDOW_S = 60.0
MAX_WINDOWS = 40
MAX_SCAN = 20_000  # documents one call reads at most
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LIST_FIELDS = {"script.args": 0, "checkpoint": 0, "result": 0, "lease": 0, "last_lease": 0}


class SearchError(ValueError):
    """A search the caller must correct (shown to the user as is)."""


@dataclass(frozen=True)
class TaskQuery:
    device_id: str | None = None
    group: str | None = None  # a stored device group: its devices
    devices: Sequence[str] = ()  # or an explicit list
    queue: str | None = None
    script_id: str | None = None
    statuses: Sequence[str] = ()
    error_prefix: str | None = None  # last_error starts with this (case-sensitive)
    batch_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None  # exclusive
    limit: int = 50
    after: str | None = None  # the cursor of the previous page (`SearchPage.next_after`)


@dataclass
class SearchPage:
    items: list[dict[str, Any]]
    next_after: str | None  # None: no more
    queries: int = 0  # window queries run (cost, for the benchmark)
    # The scan budget ran out before the page was full: fewer items, and `next_after`
    # goes on from where the scan stopped.
    partial: bool = False
    applied: dict[str, Any] = field(default_factory=dict)  # the filter, for display


def _text(name: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise SearchError(f"{name}: text of at most {MAX_TEXT} characters")
    return value


def _aware(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def encode_cursor(doc: dict[str, Any]) -> str:
    at = _aware(doc["created_at"])
    assert at is not None
    raw = json.dumps([at.timestamp(), str(doc["_id"])]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        ts, task_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromtimestamp(float(ts), UTC), str(task_id)
    except (ValueError, TypeError) as exc:
        raise SearchError("after: not a cursor this search gave") from exc


def build_filter(q: TaskQuery, devices: Sequence[str] | None = None) -> dict[str, Any]:
    """The query document of `q`, without its time bounds (see `_window`). `devices`:
    the group's devices, resolved by the caller."""
    flt: dict[str, Any] = {}
    device = _text("device_id", q.device_id)
    listed = [str(d) for d in (devices if devices is not None else q.devices)]
    if len(listed) > MAX_DEVICES:
        raise SearchError(f"at most {MAX_DEVICES} devices")
    if device is not None:
        flt["device_id"] = device
    elif listed or q.group is not None:
        flt["device_id"] = {"$in": listed}  # an empty group finds nothing
    if (queue := _text("queue", q.queue)) is not None:
        flt["queue"] = queue
    if (script := _text("script_id", q.script_id)) is not None:
        flt["script.id"] = script
    if (batch := _text("batch_id", q.batch_id)) is not None:
        flt["batch_id"] = batch
    if q.statuses:
        known = {str(s) for s in TaskStatus}
        bad = [s for s in q.statuses if s not in known]
        if bad:
            raise SearchError(f"unknown status {bad[0]!r}")
        statuses = sorted(set(q.statuses))
        flt["status"] = statuses[0] if len(statuses) == 1 else {"$in": statuses}
    if (prefix := _text("error", q.error_prefix)) is not None:
        flt["last_error"] = {"$regex": "^" + re.escape(prefix)}
    return flt


def _bounds(q: TaskQuery, now: datetime) -> tuple[datetime, datetime, tuple[datetime, str] | None]:
    lo = _aware(q.created_from) or EARLIEST
    hi = _aware(q.created_to) or now + timedelta(minutes=1)  # clocks a little ahead
    cursor = decode_cursor(q.after) if q.after else None
    if lo >= hi:
        return lo, lo, cursor
    return lo, hi, cursor


def _limit(q: TaskQuery) -> int:
    if not 1 <= q.limit <= MAX_LIMIT:
        raise SearchError(f"limit: 1 to {MAX_LIMIT}")
    return q.limit


def _window(flt: dict[str, Any], lo: datetime, hi: datetime) -> dict[str, Any]:
    """What the server is asked for one window: the time range, and the filters an
    index serves (one device). The rest is matched here (`matches`), so that
    no planner trades the created_at range for the status index and reads every
    failed task of the collection for one page."""
    return {**_served(flt), "created_at": {"$gte": lo, "$lt": hi}}


def _served(flt: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flt.items() if k == "device_id" and isinstance(v, str)}


def matches(flt: dict[str, Any], doc: dict[str, Any]) -> bool:
    """`doc` matches the filter `build_filter` made (its operators only)."""
    for key, want in flt.items():
        value: Any = doc
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(want, dict) and "$in" in want:
            if value not in want["$in"]:
                return False
        elif isinstance(want, dict) and "$regex" in want:
            if not isinstance(value, str) or re.match(want["$regex"], value) is None:
                return False
        elif value != want:
            return False
    return True


def _read(cursor: Any, q: TaskQuery, flt: dict[str, Any], window: dict[str, Any]) -> Any:
    """One window's read. Where the server applied the whole filter it returns the
    newest `limit + 1`; elsewhere it returns the window (bounded by the scan budget)
    for `matches`. No hints: forcing an index made the embedded server scan all of it.
    """
    if set(flt) <= set(window):
        return cursor.sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(
            _limit(q) + 1)
    return cursor.limit(MAX_SCAN)


def _key(doc: dict[str, Any]) -> tuple[Any, str]:
    return _aware(doc["created_at"]), str(doc["_id"])


def _plan(q: TaskQuery, flt: dict[str, Any], now: datetime):  # type: ignore[no-untyped-def]
    """The queries to run, newest first: a generator fed each query's documents,
    answering the page when done. A cursor's ties (tasks created in the same
    millisecond, e.g. a fan-out) are read first, by id; then windows of created_at
    that double, back to the range's start. A batch is found the same way (its tasks
    share their created_at): the embedded server reads the whole collection for a
    query on its partial batch_id index."""
    limit = _limit(q)
    lo, hi, cursor = _bounds(q, now)
    items: list[dict[str, Any]] = []
    queries = 0
    if cursor is not None:
        at, task_id = cursor
        hi = min(hi, at)
        if lo <= at:
            ties = yield {**_served(flt), "created_at": at, "_id": {"$lt": task_id}}
            queries += 1
            items += sorted((d for d in ties if matches(flt, d)), key=lambda d: str(d["_id"]),
                            reverse=True)
    width = timedelta(seconds=FIRST_WINDOW_S)
    top = hi
    scanned = 0
    while top > lo and len(items) <= limit and queries < MAX_WINDOWS and scanned < MAX_SCAN:
        last = queries == MAX_WINDOWS - 1
        bottom = lo if last else max(lo, top - width)
        docs = yield _window(flt, bottom, top)
        queries += 1
        scanned += len(docs)
        docs = [d for d in docs if matches(flt, d)]
        docs.sort(key=lambda d: (_aware(d["created_at"]), str(d["_id"])), reverse=True)
        items += docs
        top = bottom
        # Wider while windows are sparse; no wider once one is a large part of the budget.
        if len(docs) * 4 < limit and scanned < MAX_SCAN // 4:
            width *= 2
    more = len(items) > limit
    page = items[:limit]
    if more and page:
        after = encode_cursor(page[-1])
    elif top > lo and not more:  # the scan budget ran out first: go on from its edge
        after = encode_cursor({"_id": "", "created_at": top})
    else:
        after = None
    return SearchPage(page, after, queries, partial=after is not None and not more,
                      applied=flt)


async def search_tasks(db: AsyncDatabase, q: TaskQuery, now: datetime | None = None
                       ) -> SearchPage:
    """One page of tasks matching `q`, newest first (the console's search)."""
    devices = None
    if q.group is not None:
        doc = await db[GROUPS].find_one({"_id": _text("group", q.group)})
        devices = list(doc.get("devices", [])) if doc else []
    flt = build_filter(q, devices)
    plan = _plan(q, flt, now or datetime.now(UTC))
    try:
        window = plan.send(None)
        while True:
            cursor = _read(db[TASKS].find(window, LIST_FIELDS), q, flt, window)
            docs = [d async for d in cursor]
            window = plan.send(docs)
    except StopIteration as done:
        page: SearchPage = done.value
        return page


def search_tasks_sync(db: Database, q: TaskQuery, now: datetime | None = None) -> SearchPage:
    """`search_tasks` with the synchronous client (CLI, benchmark)."""
    devices = None
    if q.group is not None:
        doc = db[GROUPS].find_one({"_id": _text("group", q.group)})
        devices = list(doc.get("devices", [])) if doc else []
    flt = build_filter(q, devices)
    plan = _plan(q, flt, now or datetime.now(UTC))
    try:
        window = plan.send(None)
        while True:
            docs = list(_read(db[TASKS].find(window, LIST_FIELDS), q, flt, window))
            window = plan.send(docs)
    except StopIteration as done:
        page: SearchPage = done.value
        return page
