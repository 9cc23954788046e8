"""Which attempt holds a device lock, read through the lock's owner and its task."""

from __future__ import annotations

from sendscript.lock_holders import holding, owner_task, record_query, task_queries


def test_an_owner_entry_counts_only_for_the_fence_it_was_written_with() -> None:
    assert owner_task(b"42 t-1 m-1/w-0", 42) == "t-1"
    assert owner_task("42 t-1 agent:a-7", 42) == "t-1"
    assert owner_task(b"41 t-1 m-1/w-0", 42) is None  # an earlier lock of the device
    assert owner_task(None, 42) is None
    assert owner_task(b"", 42) is None
    assert owner_task(b"42", 42) is None
    assert owner_task(b"42  w", 42) is None


def test_owned_locks_are_read_by_task_id_and_only_unowned_ones_by_status() -> None:
    held = {"d1": 5, "d2": 6, "d3": 7}
    assert task_queries(held, {"d1": "t-1", "d2": "t-2", "d3": "t-1"}) == [
        {"_id": {"$in": ["t-1", "t-2"]}}]
    assert task_queries(held, {"d1": "t-1", "d2": None}) == [
        {"_id": {"$in": ["t-1"]}},
        {"status": {"$in": ["running", "sent"]}, "device_id": {"$in": ["d2", "d3"]}}]
    assert task_queries(held, {}) == [
        {"status": {"$in": ["running", "sent"]}, "device_id": {"$in": ["d1", "d2", "d3"]}}]
    assert task_queries({}, {"d9": "t-9"}) == []


def test_the_records_read_are_the_open_current_attempts_of_those_tasks() -> None:
    assert record_query([{"_id": "t-1"}, {"_id": "t-2", "record_id": None}]) is None
    assert record_query([{"_id": "t-1", "record_id": "r-b"}, {"_id": "t-2", "record_id": "r-a"},
                         {"_id": "t-1", "record_id": "r-b"}]) == {
        "_id": {"$in": ["r-a", "r-b"]}, "status": {"$in": ["running", "sent"]}}


def test_a_record_holds_a_lock_only_while_open_and_with_the_locks_fence() -> None:
    held = {"d1": 5, "d2": 6, "d3": 7, "d4": 8}
    records = [
        {"_id": "r1", "device_id": "d1", "lock_value": 5, "status": "sent"},
        {"_id": "r2", "device_id": "d2", "lock_value": 4, "status": "sent"},  # older fence
        {"_id": "r3", "device_id": "d3", "lock_value": 7, "status": "success"},  # closed
        {"_id": "r4", "device_id": "d4", "lock_value": 8, "status": "running"},
        {"_id": "r5", "device_id": "d9", "lock_value": 8, "status": "running"},  # not held
    ]
    assert {d: r["_id"] for d, r in holding(held, records).items()} == {"d1": "r1", "d4": "r4"}
