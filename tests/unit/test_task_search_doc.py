"""A task's search document (sendscript/task_search.py), and which bulk write errors
a second try of its insert may ignore: pure, no servers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo.errors import BulkWriteError

from sendscript.models import Task
from sendscript.task_search import DUPLICATE_KEY, FIELDS, only_duplicates, search_doc

AT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_fanout_tasks_search_document_is_its_search_fields_and_nothing_else() -> None:
    doc = Task(_id="t1", device_id="dev-1", script={"id": "tap", "args": {"x": 1}},
               queue="bulk", batch_id="b1", created_at=AT, updated_at=AT,
               dedupe_key="k", dedupe_active="k", priority=9, master="m1").to_doc()
    assert search_doc(doc) == {"_id": "t1", "created_at": AT, "device_id": "dev-1",
                               "queue": "bulk", "batch_id": "b1", "script_id": "tap"}


def test_a_single_task_has_no_batch_id_and_the_default_queue() -> None:
    doc = Task(_id="t2", device_id="dev-2", script={"id": "swipe"}, created_at=AT).to_doc()
    out = search_doc(doc)
    assert out == {"_id": "t2", "created_at": AT, "device_id": "dev-2",
                   "queue": doc["queue"], "script_id": "swipe"}
    assert "batch_id" not in out and out["queue"] == "default"


@pytest.mark.parametrize("script", [{}, {"steps": [1]}, {"id": None}, "tap", None, ["id"]])
def test_a_script_without_an_id_gives_no_script_id(script: Any) -> None:
    task: dict[str, Any] = {"_id": "t3", "device_id": "d", "created_at": AT, "queue": "q"}
    if script is not None:
        task["script"] = script
    assert search_doc(task) == {"_id": "t3", "device_id": "d", "created_at": AT, "queue": "q"}


def test_missing_and_none_fields_are_left_out_and_the_task_is_not_changed() -> None:
    task = {"_id": "t4", "device_id": None, "batch_id": None, "script": {"id": 7},
            "status": "pending"}
    copy = {**task, "script": dict(task["script"])}
    assert search_doc(task) == {"_id": "t4", "script_id": 7}
    assert task == copy
    # What the backfill reads of a task (its projection) is all search_doc needs.
    assert set(FIELDS) == {"created_at", "device_id", "queue", "batch_id"}


def bulk_error(write_errors: list[dict[str, Any]],
               concern: list[dict[str, Any]] | None = None) -> BulkWriteError:
    return BulkWriteError({"writeErrors": write_errors, "writeConcernErrors": concern or [],
                           "nInserted": 1})


def dup(index: int) -> dict[str, Any]:
    return {"index": index, "code": DUPLICATE_KEY, "errmsg": "E11000 duplicate key"}


def test_only_duplicates_is_true_when_every_refusal_is_a_duplicate() -> None:
    assert DUPLICATE_KEY == 11000
    assert only_duplicates(bulk_error([dup(0)]))
    assert only_duplicates(bulk_error([dup(0), dup(3)]))


@pytest.mark.parametrize("exc", [
    bulk_error([dup(0), {"index": 1, "code": 10334, "errmsg": "too large"}]),
    bulk_error([{"index": 0, "code": 121, "errmsg": "validation"}]),
    bulk_error([{"index": 0, "errmsg": "no code"}]),
    bulk_error([dup(0)], concern=[{"code": 64, "errmsg": "waiting for replication"}]),
    bulk_error([]),  # no write error: whatever failed, it was not a duplicate
    BulkWriteError({}),
])
def test_only_duplicates_is_false_for_anything_else(exc: BulkWriteError) -> None:
    assert not only_duplicates(exc)
