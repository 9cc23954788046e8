"""Read back from the stores what a benchmark's figures rest on: each submitted task
by id (or by a key its producer put in the spec), never an assumed status.

    docs = tasks_by_id(db, ids)                     # id -> document, absent if never stored
    docs = tasks_by_arg(db, "n", range(600))        # script.args.n -> document (raw pushes)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from sendscript.store import RECORDS, TASKS

CHUNK = 1000  # values per `$in` query


def _chunks(values: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    it = iter(values)
    while chunk := list(islice(it, size)):
        yield chunk


def tasks_by_id(db: Any, ids: Iterable[str],
                projection: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The task documents of `ids` that Mongo holds."""
    out: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        for doc in db[TASKS].find({"_id": {"$in": chunk}}, _projection(projection)):
            out[doc["_id"]] = doc
    return out


def tasks_by_arg(db: Any, arg: str, values: Iterable[Any],
                 projection: Sequence[str] | None = None) -> dict[Any, list[dict[str, Any]]]:
    """Task documents by the value of `script.args.<arg>`: a list each, so that an item
    stored twice shows as two."""
    field = f"script.args.{arg}"
    out: dict[Any, list[dict[str, Any]]] = {}
    for chunk in _chunks(values):
        for doc in db[TASKS].find({field: {"$in": chunk}}, _projection(projection, field)):
            out.setdefault(doc["script"]["args"][arg], []).append(doc)
    return out


def records_of(db: Any, task_ids: Iterable[str],
               projection: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The exec records of these tasks."""
    out: list[dict[str, Any]] = []
    for chunk in _chunks(task_ids):
        out += db[RECORDS].find({"task_id": {"$in": chunk}}, _projection(projection))
    return out


def _projection(fields: Sequence[str] | None, *extra: str) -> dict[str, int] | None:
    return None if fields is None else {f: 1 for f in (*fields, *extra)}
