"""Task search for the console: filters, newest first, paged by a cursor.

Safe by construction: the query document is built here from typed fields; no text
from a user is ever a query document or an operator. Error text is matched as an
escaped, prefix-anchored regex (`^...`), which cannot be made to backtrack; lists
and lengths are capped.

How a page is found, on any MongoDB-wire server including the embedded one (which
reads every document an index range names, sorts in memory and only then limits):

- Paging is by cursor (`after`: the last item's created_at and id), so a deep page
  costs what the first one does.
- Each query is one *window* of created_at, newest first, over the tasks' search
  documents (`sendscript/task_search.py`), with what they answer of the filter
  (device, batch, queue, script). A window rides the narrowest index there is for
  it: device + created_at for a device, batch + created_at (+ id, for a fan-out's
  ties) for a batch, created_at for the rest, where the server reads the window and
  filters it. A group (a list of devices) of up to `READ_EACH_DEVICE` is read a
  device at a time through each one's index, the window's reads merged. A status
  or error, which change, are matched on the tasks themselves, read by id for the
  window's ids; a search for a few statuses alone reads the tasks' (status,
  run_at) index instead (`_plan_by_status`).
- Windows widen from `FIRST_WINDOW_S` as fast as the matches found so far say
  they must to fill the page, and no faster than the time the last window took
  says the remaining budget allows.
- A page has `BUDGET_MS` of server time (each query's `maxTimeMS`). A filter so rare
  that the budget runs out first gives a *partial* page: what was found, and a
  cursor that goes on from the oldest window searched (`searched_to`).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database
from pymongo.errors import ExecutionTimeout

from sendscript.models import EARLIEST_DUE
from sendscript.status import TaskStatus
from sendscript.store import GROUPS, TASKS, chunks
from sendscript.task_search import SEARCH

MAX_LIMIT = 200
MAX_DEVICES = 1000
MAX_TEXT = 200
BUDGET_MS = 250  # server time one page may take; past it the page is partial
FIRST_WINDOW_S = 60.0
MAX_GROWTH = 16  # a window is at most this many times wider than the one before
EMPTY_GROWTH = 2  # ... after a window that held no tasks,
EMPTY_CAP = timedelta(minutes=15)  # ... up to this: the next may be dense,
IDLE_SPAN = timedelta(hours=6)  # ... for this long; past it, the data may have ended
LONGEST = timedelta(days=36500)
EMPTY_READ_MS = 3.0  # a read this fast read (next to) no documents
MAX_WINDOWS = 240  # windows of a page at most (the time budget ends most sooner)
# A device list this short is read device by device, each through its own index: the
# embedded server reads every document of a window of created_at, so a window read
# whole costs what all the devices' tasks in it do, the group's or not.
READ_EACH_DEVICE = 64
EACH_DEVICE_FIRST_S = 900.0  # ... its first window
EACH_DEVICE_GROWTH = 64  # ... a window at most this many times wider than the one before
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
# No task is older or younger than these: the windows' arithmetic (a bound less a width
# of up to LONGEST, less EARLIEST_DUE) stays inside the years a datetime holds, whatever
# range is asked for (`created_from` of year 243 is read as 1970).
FLOOR = datetime(1970, 1, 1, tzinfo=UTC)
CEILING = datetime(9000, 1, 1, tzinfo=UTC)
LIST_FIELDS = {"script.args": 0, "checkpoint": 0, "result": 0, "lease": 0, "last_lease": 0}
LISTED_FIELDS = {"_id": 1, "created_at": 1, "device_id": 1}
NEWEST_FIRST = [("created_at", DESCENDING), ("_id", DESCENDING)]


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
    queries: int = 0  # queries run (cost, for the benchmark)
    # The time budget ran out before the page was full: fewer items, and
    # `next_after` goes on from `searched_to`, the oldest created_at searched.
    partial: bool = False
    searched_to: datetime | None = None
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
    # OverflowError, OSError: a time no datetime holds ("inf", 1e300, -1e20)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        raise SearchError("after: not a cursor this search gave") from exc


def build_filter(q: TaskQuery, devices: Sequence[str] | None = None) -> dict[str, Any]:
    """The query document of `q`, without its time bounds (see `_window`). `devices`:
    the group's devices, resolved by the caller."""
    flt: dict[str, Any] = {}
    device = _text("device_id", q.device_id)
    listed = [str(d) for d in (devices if devices is not None else q.devices)]
    if len(listed) > MAX_DEVICES:
        raise SearchError(f"at most {MAX_DEVICES} devices")
    if (batch := _text("batch_id", q.batch_id)) is not None:
        flt["batch_id"] = batch
    if device is not None:
        flt["device_id"] = device
    elif listed or q.group is not None:
        flt["device_id"] = {"$in": listed}  # an empty group finds nothing
    if (queue := _text("queue", q.queue)) is not None:
        flt["queue"] = queue
    if (script := _text("script_id", q.script_id)) is not None:
        flt["script.id"] = script
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
    lo = max(_aware(q.created_from) or EARLIEST, FLOOR)
    hi = min(_aware(q.created_to) or now + timedelta(minutes=1), CEILING)  # clocks run ahead
    cursor = decode_cursor(q.after) if q.after else None
    if lo >= hi:
        return lo, lo, cursor
    return lo, hi, cursor


def _limit(q: TaskQuery) -> int:
    if not 1 <= q.limit <= MAX_LIMIT:
        raise SearchError(f"limit: 1 to {MAX_LIMIT}")
    return q.limit


def _at_or_after(at: datetime) -> dict[str, Any]:
    """`>= at` as the wire compares it: dates are whole milliseconds, so this is `>` the
    millisecond before. The embedded server's index scan skips the document that sits
    exactly on a `$gte` bound of a compound index (the batch's), where `$gt` is exact."""
    whole = at.replace(microsecond=at.microsecond - at.microsecond % 1000)
    return {"$gt": whole - timedelta(milliseconds=1)}


def _indexed_first(flt: dict[str, Any], created: Any) -> dict[str, Any]:
    """`flt` with its created_at condition, the keys in the order a server that takes
    the first indexed clause (the embedded one) should read them: a batch's index,
    then created_at, then the rest (matched while the window is read)."""
    doc: dict[str, Any] = {}
    if "batch_id" in flt:
        doc["batch_id"] = flt["batch_id"]
    if isinstance(flt.get("device_id"), str):
        doc["device_id"] = flt["device_id"]
    doc["created_at"] = created
    for key, value in flt.items():
        doc.setdefault(key, value)
    return doc


@dataclass(frozen=True)
class Read:
    """One query of a plan: `find(filter).sort(NEWEST_FIRST).limit(limit)`, within
    the page's time budget unless not `budgeted`."""

    filter: dict[str, Any]
    limit: int
    budgeted: bool = True
    fields: dict[str, Any] | None = None  # the projection; None: LIST_FIELDS
    search: bool = False  # of the search documents (LISTED_FIELDS), not the tasks


class Widths:
    """How wide the next window is (pure). The embedded server's cost is the
    documents a window holds, which only the time a read took tells: wide enough
    for the matches still wanted at the rate found so far, at most `MAX_GROWTH`
    times the last, and no wider than the time left allows at the last read's speed.
    Across a stretch with no tasks at all (reads of a millisecond or two) it grows
    by `EMPTY_GROWTH` up to `EMPTY_CAP` for `IDLE_SPAN`, so the first window into busy
    history after idle hours stays small, then doubles (the tasks may have ended).

    Read a device at a time (`each_device`), a window costs a read a device, whatever
    its width, and its documents are only the devices' own: the first window is
    `EACH_DEVICE_FIRST_S` wide, each grows by up to `EACH_DEVICE_GROWTH`, after an
    empty one too, and `took_ms` is to be the reads' time past the fixed cost of a
    read (`_each_device`)."""

    def __init__(self, each_device: bool = False) -> None:
        self.max_growth = EACH_DEVICE_GROWTH if each_device else MAX_GROWTH
        self.idle_steps = not each_device
        self.width = timedelta(seconds=EACH_DEVICE_FIRST_S if each_device else FIRST_WINDOW_S)
        self.searched = timedelta(0)
        self.found = 0
        self.idle = timedelta(0)  # the stretch of empty reads just crossed

    def next(self, last: timedelta, found: int, wanted: int, took_ms: float,
             left_ms: float) -> timedelta:
        self.searched += last
        self.found += found
        if self.idle_steps and took_ms <= EMPTY_READ_MS and not found:
            # Nothing there says nothing of what comes next: the window into history
            # after idle hours must not be as wide as those hours. Past IDLE_SPAN the
            # tasks may simply have ended, and the windows double to the range's start.
            self.idle += last
            grown = last * EMPTY_GROWTH
            capped = min(max(last, EMPTY_CAP), grown)
            self.width = min(grown, LONGEST) if self.idle >= IDLE_SPAN else capped
            return self.width
        self.idle = timedelta(0)
        if self.found:
            rate = self.found / max(self.searched.total_seconds(), 1e-3)
            grow = (wanted * 1.5 / rate) / max(last.total_seconds(), 1e-3)
        else:
            grow = self.max_growth
        grow = min(grow, left_ms * 0.5 / max(took_ms, EMPTY_READ_MS))
        grow = max(0.5, min(grow, self.max_growth))
        self.width = max(last * grow, timedelta(milliseconds=1))
        return self.width


# What a read answers: its documents, the ms it took and the ms of budget left; None
# when the budget ran out first.
Answer = tuple[list[dict[str, Any]], float, float] | None
Plan = Generator[Read, Answer, "SearchPage"]


def _plan(q: TaskQuery, flt: dict[str, Any], now: datetime) -> Plan:
    """The queries to run, newest first: a generator sent each query's documents
    (an `Answer`), answering the page."""
    statuses = _by_status(flt)
    if statuses:
        return (yield from _plan_by_status(q, flt, statuses, now))
    return (yield from _plan_windows(q, flt, now))


def _plan_windows(q: TaskQuery, flt: dict[str, Any], now: datetime) -> Plan:
    """Windows of created_at over the tasks' search documents, then the tasks by id. A
    cursor's ties (tasks created in the same millisecond, e.g. a fan-out) are read
    first, by id, whatever the budget (they cannot be skipped); then windows back to
    the range's start. What a task is found by (device, batch, queue, script) is in
    its search document; what changes (status, error) is matched on the task, read by
    id for the window's ids. The page's tasks are read by id at the end."""
    limit = _limit(q)
    lo, hi, cursor = _bounds(q, now)
    found_by, changing = _split(flt)
    if found_by.get("device_id") == {"$in": []}:  # an empty group
        return _page([], limit, flt, 0, top=None)
    items: list[dict[str, Any]] = []
    queries = 0
    if cursor is not None:
        at, task_id = cursor
        hi = min(hi, at)
        if lo <= at and task_id:
            got = yield Read({**_indexed_first(found_by, at), "_id": {"$lt": task_id}},
                             0 if changing else limit + 1, budgeted=False, search=True)
            queries += 1
            docs = got[0] if got else []
            if changing and docs:
                kept = yield from _tasks_matching(docs, changing, budgeted=False)
                queries += len(chunks(docs))
                docs = kept[0] if kept else []
            items += docs
    # A device list read in whole windows is matched here, not by the server: the
    # embedded one spends ~45 us a document on a 50-value $in.
    listed = found_by.get("device_id") if isinstance(found_by.get("device_id"), dict) else None
    served = {k: v for k, v in found_by.items() if k != "device_id"} if listed else found_by
    # A device at a time only for a device list alone: a batch's index is narrower
    # than a device's, and the embedded server reads a device's index for its every
    # task when the filter holds more than the device and created_at.
    each = list(dict.fromkeys(listed["$in"])) if listed and not served else None
    if each is not None and len(each) > READ_EACH_DEVICE:
        each = None
    widths = Widths(each_device=each is not None)
    width = widths.width
    top = hi
    windows = 0
    page: SearchPage | None = None
    while top > lo and len(items) <= limit and windows < MAX_WINDOWS:
        bottom = max(lo, top - width)
        created = {**_at_or_after(bottom), "$lt": top}
        if each is not None:
            got = yield from _each_device(each, created)
            queries += len(each)
        else:
            whole = listed is not None or bool(changing)  # every id of the window is wanted
            got = yield Read(_indexed_first(served, created),
                             0 if whole else limit + 1 - len(items), search=True)
            queries += 1
        windows += 1
        if got is None:
            page = _page(items, limit, flt, queries, top=top, partial_at=top)
            break
        docs, took_ms, left_ms = got
        # read a device at a time, every document is the devices' own already
        whole_window = listed is not None and each is None
        found = [d for d in docs if matches({"device_id": listed}, d)] if whole_window else docs
        if changing and found:
            kept = yield from _tasks_matching(found, changing)
            queries += len(chunks(found))
            if kept is None:
                page = _page(items, limit, flt, queries, top=top, partial_at=top)
                break
            found, took_ms, left_ms = kept[0], took_ms + kept[1], kept[2]
        items += found
        width = widths.next(top - bottom, len(found), limit + 1 - len(items), took_ms, left_ms)
        top = bottom
    if page is None:
        page = _page(items, limit, flt, queries, top=top if top > lo else None)
    if page.items:
        got = yield Read({"_id": {"$in": [d["_id"] for d in page.items]}}, 0, budgeted=False)
        full = {d["_id"]: d for d in (got[0] if got else [])}
        # A search document whose task is not there (yet, or any more) lists nothing.
        page.items = [full[d["_id"]] for d in page.items if d["_id"] in full]
        page.queries += 1
    return page


# Filter fields a task's search document carries (sendscript/task_search.py), by the
# name the task has them under: they never change, so the search document answers them.
FOUND_BY = {"batch_id": "batch_id", "device_id": "device_id", "queue": "queue",
            "script.id": "script_id"}


def _split(flt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`flt` as (what the search documents answer, by their names; what only the task
    does: its status and error, which change)."""
    found_by = {FOUND_BY[k]: v for k, v in flt.items() if k in FOUND_BY}
    return found_by, {k: v for k, v in flt.items() if k not in FOUND_BY}


def _each_device(devices: list[str], created: dict[str, Any]) -> Generator[Read, Answer, Answer]:
    """The window `created` of each device's search documents, through the device's
    index, merged newest first (None: the budget ran out). With the ms the reads took
    past the fastest one's, each (what the window's documents cost, as `Widths`
    wants it), and the ms left less a window's reads at the fastest one's."""
    docs: list[dict[str, Any]] = []
    took: list[float] = []
    left_ms = 0.0
    for device in devices:
        got = yield Read({"device_id": device, "created_at": created}, 0, search=True)
        if got is None:
            return None
        docs += got[0]
        took.append(got[1])
        left_ms = got[2]
    docs.sort(key=_key, reverse=True)
    fixed = min(took, default=0.0)
    return docs, sum(took) - fixed * len(took), left_ms - fixed * len(took)


def _tasks_matching(docs: list[dict[str, Any]], changing: dict[str, Any],
                    budgeted: bool = True) -> Generator[Read, Answer, Answer]:
    """Of the search documents `docs`, those whose task matches `changing`, read by id
    in chunks; with the ms the reads took and the ms left (None: the budget ran out)."""
    wanted: set[str] = set()
    took_ms = left_ms = 0.0
    for ids in chunks([d["_id"] for d in docs]):
        got = yield Read({"_id": {"$in": ids}, **changing}, 0, budgeted=budgeted,
                         fields={"_id": 1})
        if got is None:
            return None
        wanted.update(d["_id"] for d in got[0])
        took_ms += got[1]
        left_ms = got[2]
    return [d for d in docs if d["_id"] in wanted], took_ms, left_ms


def _by_status(flt: dict[str, Any]) -> list[str] | None:
    """The statuses to search through the (status, run_at) index, or None when another
    way is better: a device's or a batch's own index, or no status named. Waiting
    tasks are due far ahead of their creation, so their run_at says little of it."""
    if "batch_id" in flt or isinstance(flt.get("device_id"), str) or "status" not in flt:
        return None
    named = flt["status"]
    statuses = [named] if isinstance(named, str) else list(named["$in"])
    return None if TaskStatus.WAITING in statuses else statuses


def _key(doc: dict[str, Any]) -> tuple[datetime, str]:
    at = doc.get("created_at")
    return (_aware(at) if isinstance(at, datetime) else EARLIEST), str(doc["_id"])


def _plan_by_status(q: TaskQuery, flt: dict[str, Any], statuses: list[str],
                    now: datetime) -> Plan:
    """Tasks of a few statuses, through the index the dispatcher keeps anyway
    (`status`, `run_at`): no task is due more than `EARLIEST_DUE` before it is
    created (`models.due_time`), so every task created in a window of created_at
    [lo, top) has run_at >= lo - EARLIEST_DUE. Each window reads the slice of run_at
    not read yet; a task read early whose created_at is older waits (carried) for its
    own window. So each matching task is read once, and the cost is that of the
    status's tasks, not of the collection's."""
    limit = _limit(q)
    lo, hi, cursor = _bounds(q, now)
    upper = (hi, "")  # keys below this: created_at < hi, or below the cursor
    if cursor is not None and cursor < upper:
        upper = cursor
    rest = {k: v for k, v in flt.items() if k != "status"}
    items: list[dict[str, Any]] = []
    carried: list[dict[str, Any]] = []
    queries = 0
    widths = Widths()
    width = widths.width
    top = upper[0]
    read_down_to: datetime | None = None  # run_at at and above this has been read
    windows = 0
    while top > lo and len(items) <= limit and windows < MAX_WINDOWS:
        windows += 1
        bottom = max(lo, top - width)
        run_at: dict[str, Any] = _at_or_after(bottom - EARLIEST_DUE)
        if read_down_to is not None:
            run_at["$lt"] = read_down_to
        took_ms = left_ms = 0.0
        fresh: list[dict[str, Any]] = []
        for status in statuses:
            got = yield Read({"status": status, "run_at": run_at}, 0)
            queries += 1
            if got is None:
                return _page(items, limit, flt, queries, top=top, partial_at=top)
            fresh += got[0]
            took_ms += got[1]
            left_ms = got[2]
        read_down_to = bottom - EARLIEST_DUE
        pool = carried + [d for d in fresh if _key(d) < upper and matches(rest, d)]
        found = [d for d in pool if _key(d)[0] >= bottom]
        carried = [d for d in pool if lo <= _key(d)[0] < bottom]
        found.sort(key=_key, reverse=True)
        items += found
        width = widths.next(top - bottom, len(found), limit + 1 - len(items), took_ms, left_ms)
        top = bottom
    return _page(items, limit, flt, queries, top=top if top > lo else None)


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


def _page(items: list[dict[str, Any]], limit: int, flt: dict[str, Any], queries: int,
          top: datetime | None, partial_at: datetime | None = None) -> SearchPage:
    """The page of `items` (newest first). `top`: where the search stopped, None when
    it reached the range's start; `partial_at`: the budget ran out there."""
    more = len(items) > limit
    page = items[:limit]
    if more:
        return SearchPage(page, encode_cursor(page[-1]), queries, applied=flt)
    if top is None:
        return SearchPage(page, None, queries, applied=flt)
    # Not reached the start: the next page goes on below `top` (all of `top` and above
    # was read; an empty id reads no ties).
    stop = partial_at or top
    return SearchPage(page, encode_cursor({"_id": "", "created_at": stop}), queries,
                      partial=True, searched_to=stop, applied=flt)


class _Budget:
    """The page's time budget across its reads: each read's cursor gets what is left
    as its maxTimeMS (none for a read that is not `budgeted`); no cursor once it is
    spent. Shared by the two drivers below, which differ only in how they iterate."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + BUDGET_MS / 1000
        self.started = 0.0

    def left_ms(self) -> float:
        return (self.deadline - time.monotonic()) * 1000

    def cursor(self, db: Any, read: Read) -> Any | None:
        if read.search:
            found = db[SEARCH].find(read.filter, LISTED_FIELDS)
        else:
            found = db[TASKS].find(read.filter, read.fields or LIST_FIELDS)
        cursor = found.sort(NEWEST_FIRST).limit(read.limit)
        self.started = time.monotonic()
        if not read.budgeted:
            return cursor
        left = int(self.left_ms())
        return cursor.max_time_ms(left) if left > 0 else None

    def answer(self, docs: list[dict[str, Any]]) -> Answer:
        return docs, (time.monotonic() - self.started) * 1000, self.left_ms()


async def search_tasks(db: AsyncDatabase, q: TaskQuery, now: datetime | None = None
                       ) -> SearchPage:
    """One page of tasks matching `q`, newest first (the console's search)."""
    devices = None
    if q.group is not None:
        doc = await db[GROUPS].find_one({"_id": _text("group", q.group)})
        devices = list(doc.get("devices", [])) if doc else []
    plan, budget = _plan(q, build_filter(q, devices), now or datetime.now(UTC)), _Budget()
    try:
        read = plan.send(None)
        while True:
            answer: Answer = None
            if (cursor := budget.cursor(db, read)) is not None:
                try:
                    answer = budget.answer([d async for d in cursor])
                except ExecutionTimeout:
                    pass
            read = plan.send(answer)
    except StopIteration as done:
        page: SearchPage = done.value
        return page


def search_tasks_sync(db: Database, q: TaskQuery, now: datetime | None = None) -> SearchPage:
    """`search_tasks` with the synchronous client (CLI, console, benchmark)."""
    devices = None
    if q.group is not None:
        doc = db[GROUPS].find_one({"_id": _text("group", q.group)})
        devices = list(doc.get("devices", [])) if doc else []
    plan, budget = _plan(q, build_filter(q, devices), now or datetime.now(UTC)), _Budget()
    try:
        read = plan.send(None)
        while True:
            answer: Answer = None
            if (cursor := budget.cursor(db, read)) is not None:
                try:
                    answer = budget.answer(list(cursor))
                except ExecutionTimeout:
                    pass
            read = plan.send(answer)
    except StopIteration as done:
        page: SearchPage = done.value
        return page
