"""Which attempt holds a device lock, read through the lock's owner and its task."""

from __future__ import annotations

from sendscript.lock_holders import (
    current_records,
    holding,
    owned_records,
    owner_task,
    unowned_tasks,
)
from sendscript.locks import owner_entry
from sendscript.store import ID_CHUNK


def test_an_owner_entry_counts_only_for_the_fence_it_was_written_with() -> None:
    assert owner_task(b"42 t-1 m-1/w-0", 42) == "t-1"
    assert owner_task("42 t-1 agent:a-7", 42) == "t-1"
    assert owner_task(b"41 t-1 m-1/w-0", 42) is None  # an earlier lock of the device
    assert owner_task(None, 42) is None
    assert owner_task(b"", 42) is None
    assert owner_task(b"42", 42) is None
    assert owner_task(b"42  w", 42) is None


def test_owned_locks_are_read_by_their_tasks_records_and_only_unowned_by_status() -> None:
    held = {"d1": 5, "d2": 6, "d3": 7}
    owned: dict[str, str | None] = {"d1": "t-1", "d2": "t-2", "d3": "t-1", "d9": "t-9"}
    assert owned_records(held, owned) == [{"task_id": {"$in": ["t-1", "t-2"]},
                                           "status": {"$in": ["running", "sent"]}}]
    assert unowned_tasks(held, owned) == []
    assert owned_records(held, {"d1": "t-1", "d2": None}) == [{
        "task_id": {"$in": ["t-1"]}, "status": {"$in": ["running", "sent"]}}]
    assert unowned_tasks(held, {"d1": "t-1", "d2": None}) == [{
        "status": {"$in": ["running", "sent"]}, "device_id": {"$in": ["d2", "d3"]}}]
    assert owned_records(held, {}) == []
    assert owned_records({}, {"d9": "t-9"}) == [] and unowned_tasks({}, {}) == []


def test_a_sweep_of_many_locks_reads_in_short_id_lists() -> None:
    """Every lock held is named in a sweep: its reads go in chunks, each id once."""
    held = {f"d{i:04d}": i for i in range(1, 2001)}
    owned: dict[str, str | None] = {d: (f"t{d}" if i % 4 else None)
                                    for i, d in enumerate(held)}
    for reads, field, expected in [
            (owned_records(held, owned), "task_id", {t for t in owned.values() if t}),
            (unowned_tasks(held, owned), "device_id", {d for d, t in owned.items() if not t})]:
        named = [q[field]["$in"] for q in reads]
        assert max(map(len, named)) <= ID_CHUNK and len(reads) > 1
        assert sorted(x for part in named for x in part) == sorted(expected)
    tasks = [{"_id": f"t{i}", "record_id": f"r{i}"} for i in range(300)]
    assert sum(len(q["_id"]["$in"]) for q in current_records(tasks)) == 300


def test_an_unowned_locks_task_leads_to_its_current_record() -> None:
    assert current_records([{"_id": "t-1"}, {"_id": "t-2", "record_id": None}]) == []
    assert current_records([{"_id": "t-1", "record_id": "r-b"},
                            {"_id": "t-2", "record_id": "r-a"},
                            {"_id": "t-1", "record_id": "r-b"}]) == [{
        "_id": {"$in": ["r-a", "r-b"]}, "status": {"$in": ["running", "sent"]}}]


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


def test_an_owner_entry_is_read_as_the_locks_do() -> None:
    assert owner_entry(b"42 t-1 m-1/w-0", b"42") == (42, "t-1 m-1/w-0")
    assert owner_entry("42 t-1 m-1/w-0", 42) == (42, "t-1 m-1/w-0")
    assert owner_entry(b"41 t-1 m-1/w-0", b"42") is None
    assert owner_entry(b"42 t-1 m-1/w-0", None) is None  # the device is free
    assert owner_entry(None, b"42") is None
