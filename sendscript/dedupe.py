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
replacement is one update computed by the server on the document (no
read-modify-write, so racing producers all apply, the server's last one last); the
delayed-task path fires the task, and its fire filter checks `run_at <= now`, so a
task pushed back does not fire early and a fired one is no longer replaced.
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
                 "dedupe_window_s": 1, "debounce_s": 1}


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


def debounce_merge(holder: dict[str, Any], spec_doc: dict[str, Any],
                   now: datetime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(filter, pipeline update) replacing a debouncing task's spec with that of a
    later submission (`spec_doc`, the later task's document).

    The filter names the task, its key and the quiet period (status waiting): it
    matches nothing once the task fired (then the caller reads again and decides).
    The new due time is `next_due` computed by the server from the document as it
    is then, so two submissions racing need no read-modify-write: both apply, in the
    server's order, the later spec last; neither brings the run forward."""
    due = now + timedelta(seconds=float(spec_doc["debounce_s"]))
    bounded = {"$min": [due, {"$ifNull": ["$debounce_until", due]}]}
    flt = {"_id": holder["_id"], "dedupe_active": holder["dedupe_active"], "status": WAITING,
           "debounce_s": {"$exists": True}}
    # $literal: a script's strings may start with `$`, which a pipeline reads as a path.
    fields: dict[str, Any] = {k: {"$literal": spec_doc[k]} for k in REPLACED_FIELDS
                              if k in spec_doc}
    fields.update(run_at={"$max": ["$run_at", bounded]}, updated_at={"$literal": now},
                  debounce_last_at={"$literal": now},
                  debounce_seq={"$add": [{"$ifNull": ["$debounce_seq", 0]}, 1]})
    update: list[dict[str, Any]] = [{"$set": fields}]
    if gone := [k for k in REPLACED_FIELDS if k not in spec_doc]:
        update.append({"$unset": gone})
    return flt, update


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
    if state == "holds the key" and (finished := doc.get("finished_at")) is not None:
        # Released lazily, by the next submission with the key once the hold is over.
        state += f" until {_clock(finished + timedelta(seconds=hold))}"
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
