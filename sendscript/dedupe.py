"""Dedupe modes and debounce: how long a task holds its dedupe key, and when a
debounced task runs. Pure rules; the store (sendscript/store.py), the claims
(TaskStore.claim_many, agents/leases.py) and the models apply them.

A task holds its key in `dedupe_active` (a unique index):

- `until_start`: until an attempt starts (the claim pending -> running drops it);
- `until_result`: until it finishes;
- `window`: until `dedupe_window_s` (its own, else SENDSCRIPT_DEDUPE_WINDOW_S)
  after it finishes;
- no mode given: until SENDSCRIPT_DEDUPE_WINDOW_S after it finishes, as always.

A finished task keeps the key in the document and the next submission with that
key releases it (with a compare-and-set) once the hold is over: no extra write
when a task finishes.

Debounce (`debounce_s`, `debounce_max_s`): the first submission stores a waiting
task due `debounce_s` later; each later debounced submission with the key, while
that task is still waiting, replaces its spec and pushes its due time to
`debounce_s` after itself, never past `debounce_max_s` after the first. The
replacement is one update whose filter names the `debounce_seq` read, so of two
producers racing one wins and the other reads again; the delayed-task path fires
the task (its fire filter checks `run_at <= now`, so a pushed-back task does not
fire early).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

UNTIL_START = "until_start"
UNTIL_RESULT = "until_result"
WINDOW = "window"


class DedupeMode(StrEnum):
    UNTIL_START = UNTIL_START
    UNTIL_RESULT = UNTIL_RESULT
    WINDOW = WINDOW


WAITING = "waiting"  # status.TaskStatus.WAITING (this module imports no model)

# What a debounced submission replaces in the task it joins: everything its spec
# says about what runs and how. `dedupe_key` is the same by definition; `mode` and
# `labels` are a pull task's, which is never debounced.
REPLACED_FIELDS = ("device_id", "script", "priority", "max_retries", "timeout_s",
                   "expire_at", "queue", "retry_base_s", "dedupe_mode", "dedupe_window_s",
                   "debounce_s")
# What the store reads of a task holding a key: to release it, or to debounce into it.
HOLDER_FIELDS = {"dedupe_active": 1, "status": 1, "finished_at": 1, "dedupe_mode": 1,
                 "dedupe_window_s": 1, "debounce_s": 1, "debounce_until": 1,
                 "debounce_seq": 1, "run_at": 1}


def hold_after_finish_s(mode: str | None, window_s: float | None, setting_s: float) -> float:
    """Seconds a finished task keeps its key: `setting_s` is SENDSCRIPT_DEDUPE_WINDOW_S."""
    if mode in (UNTIL_START, UNTIL_RESULT):
        return 0.0
    if mode == WINDOW and window_s is not None:
        return window_s
    return setting_s


def holder_hold_s(doc: dict[str, Any], setting_s: float) -> float:
    """hold_after_finish_s of a stored task document."""
    return hold_after_finish_s(doc.get("dedupe_mode"), doc.get("dedupe_window_s"), setting_s)


def released_at_start(mode: str | None) -> bool:
    return mode == UNTIL_START


# The claim's aggregation-pipeline value for `dedupe_active`: dropped for an
# until_start task, kept (or left absent) for any other.
KEY_AT_CLAIM: dict[str, Any] = {
    "$cond": [{"$eq": ["$dedupe_mode", UNTIL_START]}, "$$REMOVE", "$dedupe_active"]}


def first_due(now: datetime, debounce_s: float,
              debounce_max_s: float | None) -> tuple[datetime, datetime | None]:
    """(when it runs, the latest it may run) for the first debounced submission."""
    until = now + timedelta(seconds=debounce_max_s) if debounce_max_s is not None else None
    due = now + timedelta(seconds=debounce_s)
    return (min(due, until) if until else due), until


def next_due(now: datetime, current: datetime, debounce_s: float,
             until: datetime | None) -> datetime:
    """When it runs after another submission at `now`: quiet for `debounce_s` from
    now, never earlier than already set, never past `until`."""
    due = now + timedelta(seconds=debounce_s)
    if until is not None:
        due = min(due, until)
    return max(current, due)


def debouncing(doc: dict[str, Any]) -> bool:
    """Whether a stored task is still in its quiet period (not yet fired)."""
    return doc.get("status") == WAITING and doc.get("debounce_s") is not None


def _aware(when: datetime, like: datetime) -> datetime:
    # pymongo answers naive UTC unless told otherwise
    return when if when.tzinfo else when.replace(tzinfo=like.tzinfo)


def debounce_merge(holder: dict[str, Any], spec_doc: dict[str, Any],
                   now: datetime) -> tuple[dict[str, Any], dict[str, Any], datetime]:
    """(filter, update, new due time) replacing a debouncing task's spec with that of
    a later submission (`spec_doc`, the later task's document). The filter names the
    status, the key and the `debounce_seq` read: it matches nothing if the task fired
    or another submission got in first (read again, then decide)."""
    until = holder.get("debounce_until")
    until = _aware(until, now) if until is not None else None
    due = next_due(now, _aware(holder["run_at"], now), float(spec_doc["debounce_s"]), until)
    flt = {"_id": holder["_id"], "dedupe_active": holder["dedupe_active"], "status": WAITING,
           "debounce_seq": holder.get("debounce_seq", 0)}
    fields: dict[str, Any] = {k: spec_doc[k] for k in REPLACED_FIELDS if k in spec_doc}
    fields.update(run_at=due, updated_at=now, debounce_last_at=now)
    update: dict[str, Any] = {"$set": fields, "$inc": {"debounce_seq": 1}}
    if gone := [k for k in REPLACED_FIELDS if k not in spec_doc]:
        update["$unset"] = {k: "" for k in gone}
    return flt, update, due


def describe(doc: dict[str, Any], setting_s: float) -> str | None:
    """One line on a task's dedupe key and debounce, for the CLI and the console;
    None for a task without a key."""
    key = doc.get("dedupe_key")
    if not key:
        return None
    mode = doc.get("dedupe_mode")
    hold = holder_hold_s(doc, setting_s)
    rule = (f"mode {mode}" if mode else "no mode given") + (
        f", held {hold:g}s after the result" if mode in (None, WINDOW) else "")
    state = "holds the key" if doc.get("dedupe_active") == key else "key released"
    parts = [f"key {key!r}", rule, state]
    if doc.get("debounce_s") is not None:
        merged = int(doc.get("debounce_seq") or 0)
        bound = doc.get("debounce_until")
        when = "debouncing: runs at" if debouncing(doc) else "debounced: ran at or after"
        parts.append(f"{when} {_clock(doc.get('run_at'))} (quiet {doc['debounce_s']:g}s"
                     + (f", at most until {_clock(bound)}" if bound else "")
                     + f"); {merged} later submission(s) merged")
    return " · ".join(parts)


def _clock(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z" if when else "-"
