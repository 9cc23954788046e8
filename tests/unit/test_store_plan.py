"""store_plan, the store's steps as operations: what it asks for, given the server's
answers. The same plan runs on real servers in tests/integration/test_store.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.errors import BulkWriteError

from sendscript.models import Task
from sendscript.queue import QUARANTINE_ITEM_BYTES, quarantine_record, ref_item
from sendscript.store import (
    DeleteOp,
    FindOp,
    InsertOp,
    SearchInsertOp,
    Stored,
    StorePlan,
    UpdateOp,
    store_plan,
)
from sendscript.task_search import search_doc

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def task(task_id: str, **fields: Any) -> Task:
    return Task(_id=task_id, device_id=fields.pop("device_id", "d"), script={"id": "s"},
                **fields)


def refusal(*errors: dict[str, Any]) -> BulkWriteError:
    return BulkWriteError({"writeErrors": list(errors), "writeConcernErrors": [],
                           "nInserted": 0})


def drive(plan: StorePlan, answers: list[Any],
          search: list[Any] | None = None) -> tuple[list[Any], Stored]:
    """Run a plan on scripted answers; the operations it asked for and its result. The
    writes of search documents are answered here and kept apart, in `search`."""
    ops: list[Any] = []
    answer: Any = None
    try:
        while True:
            op = plan.send(answer)
            if isinstance(op, SearchInsertOp) or (isinstance(op, DeleteOp | UpdateOp)
                                                  and op.search):
                if search is not None:
                    search.append(op)
                answer = None if isinstance(op, SearchInsertOp) else 1
                continue
            ops.append(op)
            answer = answers.pop(0)
    except StopIteration as done:
        return ops, done.value


def test_a_clean_batch_is_one_insert() -> None:
    ops, stored = drive(store_plan([task("a"), task("b")], NOW, 3600), [None])
    assert [type(o) for o in ops] == [InsertOp]
    assert [t.id for t in stored.created] == ["a", "b"]


@pytest.mark.parametrize("code", [91, 10107, 189, 11600])
def test_an_error_retrying_can_cure_holds_the_batch(code: int) -> None:
    plan = store_plan([task("a"), task("b")], NOW, 3600)
    with pytest.raises(BulkWriteError):
        drive(plan, [refusal({"index": 1, "code": code, "errmsg": "away"})])


def test_a_write_concern_error_holds_the_batch() -> None:
    exc = BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]})
    with pytest.raises(BulkWriteError):
        drive(store_plan([task("a")], NOW, 3600), [exc])


def test_a_document_the_encoder_refuses_is_never_sent() -> None:
    good, wide = task("a"), Task(_id="w", device_id="d", script={"n": 2**70})
    ops, stored = drive(store_plan([good, wide], NOW, 3600), [None])
    assert ops == [InsertOp([good.to_doc()])]  # one Task: two would differ by created_at
    assert list(stored.refused) == ["w"] and "8-byte ints" in stored.refused["w"]


def test_a_server_refusal_takes_back_the_stored_siblings_of_its_fanout() -> None:
    part = [task("f1", batch_id="b"), task("f2", batch_id="b"), task("x")]
    bad = refusal({"index": 1, "code": 10334, "errmsg": "object to insert too large"})
    ops, stored = drive(store_plan(part, NOW, 3600), [bad, 1])
    assert ops[1] == DeleteOp({"_id": {"$in": ["f1"]}, "attempt": 0})
    assert [t.id for t in stored.created] == ["x"]
    assert stored.refused == {
        "f1": "refused by the store (code 10334): object to insert too large",
        "f2": "refused by the store (code 10334): object to insert too large"}


def dup_key(index: int) -> dict[str, Any]:
    return {"index": index, "code": 11000, "keyPattern": {"dedupe_active": 1},
            "errmsg": "E11000 duplicate key error dedupe_active"}


def test_a_duplicate_of_a_task_finished_long_ago_releases_its_key_and_inserts_again() -> None:
    mine = task("new", dedupe_key="k", dedupe_active="k")
    holder = {"_id": "old", "dedupe_active": "k", "status": "success",
              "finished_at": NOW - timedelta(hours=2)}
    ops, stored = drive(store_plan([mine], NOW, 3600), [refusal(dup_key(0)), [holder], 1, None])
    assert [type(o) for o in ops] == [InsertOp, FindOp, UpdateOp, InsertOp]
    assert ops[2].filter["_id"] == "old" and ops[2].update == {"$unset": {"dedupe_active": ""}}
    assert [t.id for t in stored.created] == ["new"] and stored.deduplicated == {}


def test_a_duplicate_within_the_window_answers_the_holder() -> None:
    mine = task("new", dedupe_key="k", dedupe_active="k")
    holder = {"_id": "old", "dedupe_active": "k", "status": "success",
              "finished_at": NOW - timedelta(minutes=5)}
    ops, stored = drive(store_plan([mine], NOW, 3600), [refusal(dup_key(0)), [holder]])
    assert [type(o) for o in ops] == [InsertOp, FindOp]
    assert stored.deduplicated == {"new": "old"} and stored.existing_status == {"old": "success"}


def test_a_key_that_keeps_changing_hands_is_an_error_to_retry() -> None:
    mine = task("new", dedupe_key="k", dedupe_active="k")
    answers: list[Any] = []
    for _ in range(10):
        answers += [refusal(dup_key(0)), []]  # refused, yet nobody holds it when we look
    with pytest.raises(RuntimeError, match="changing hands"):
        drive(store_plan([mine], NOW, 3600), answers)


def test_search_documents_go_in_before_their_tasks() -> None:
    a, b = task("a", queue="q"), task("b", batch_id="bt")
    search: list[Any] = []
    plan = store_plan([a, b], NOW, 3600)
    first = plan.send(None)
    assert first == SearchInsertOp([search_doc(a.to_doc()), search_doc(b.to_doc())])
    assert search_doc(b.to_doc()) == {"_id": "b", "created_at": b.created_at,
                                      "device_id": "d", "queue": "default",
                                      "batch_id": "bt", "script_id": "s"}
    assert isinstance(plan.send(None), InsertOp)
    drive(store_plan([a, b], NOW, 3600), [None], search)
    assert search == [first]  # and none taken out: both were stored


def test_the_search_documents_of_tasks_not_stored_come_out_again() -> None:
    # a refused fan-out (its siblings too), a duplicate of a dedupe key's holder, and
    # one stored before (a re-ingest: the search document is that task's, and stays)
    part = [task("f1", batch_id="b"), task("f2", batch_id="b"),
            task("dup", dedupe_key="k", dedupe_active="k"), task("again"), task("x")]
    holder = {"_id": "old", "dedupe_active": "k", "status": "pending"}
    bad = refusal({"index": 1, "code": 10334, "errmsg": "object to insert too large"},
                  dup_key(2), {"index": 3, "code": 11000, "keyPattern": {"_id": 1},
                               "errmsg": "E11000 duplicate key error _id"})
    search: list[Any] = []
    _, stored = drive(store_plan(part, NOW, 3600), [bad, [holder], 1], search)
    assert [t.id for t in stored.created] == ["x"]
    assert [type(o) for o in search] == [SearchInsertOp, DeleteOp]
    assert search[1] == DeleteOp({"_id": {"$in": ["f1", "f2", "dup"]}}, search=True)


def test_a_document_the_encoder_refuses_has_no_search_document_written() -> None:
    wide = Task(_id="w", device_id="d", script={"n": 2**70})
    search: list[Any] = []
    drive(store_plan([task("a"), wide], NOW, 3600), [None], search)
    assert [[d["_id"] for d in op.docs] for op in search] == [["a"]]


def test_the_ref_item_is_the_contracts() -> None:
    assert ref_item("t1") == '{"task_id": "t1"}'


def test_a_large_quarantined_item_is_kept_truncated_with_its_size() -> None:
    item = b"x" * (QUARANTINE_ITEM_BYTES * 3)
    record = quarantine_record(item, "too big", "m1", "now")
    assert record["item"] == "x" * QUARANTINE_ITEM_BYTES
    assert record["item_bytes"] == len(item)
    assert record["reason"] == (f"too big (item of {len(item)} bytes: only its first "
                                f"{QUARANTINE_ITEM_BYTES} bytes are kept here)")
    assert quarantine_record(b"small", "r", "m1", "now") == {
        "item": "small", "reason": "r", "master": "m1", "at": "now"}


def test_a_fanout_refused_in_a_later_chunk_is_taken_back_from_the_earlier_ones() -> None:
    part = [task(f"f{i}", batch_id="b") for i in range(4)] + [task("x")]
    bad = refusal({"index": 0, "code": 121, "errmsg": "Document failed validation"})
    # f3 was claimed by a worker meanwhile: it is not deleted, and keeps its search doc
    search: list[Any] = []
    ops, stored = drive(store_plan(part, NOW, 3600, chunk=2),
                        [None, bad, None, 2, [{"_id": "f3"}]], search)
    assert [type(o) for o in ops] == [InsertOp, InsertOp, InsertOp, DeleteOp, FindOp]
    assert ops[3] == DeleteOp({"_id": {"$in": ["f0", "f1", "f3"]}, "attempt": 0})
    assert [t.id for t in stored.created] == ["x"] and len(stored.refused) == 4
    assert search[-1] == DeleteOp({"_id": {"$in": ["f0", "f1", "f2"]}}, search=True)
