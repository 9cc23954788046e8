"""CAS updates merged into few statements (sendscript/store.py merged_writes)."""

from __future__ import annotations

from datetime import UTC, datetime

from pymongo import UpdateMany, UpdateOne

from sendscript.status import RecordStatus, TaskStatus, record_cas, record_sent, task_cas
from sendscript.store import ID_CHUNK, merged_writes

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def doc(op: UpdateOne | UpdateMany) -> dict:
    return op._doc  # type: ignore[union-attr]


def test_alike_updates_of_different_tasks_become_one_update_many() -> None:
    updates = [task_cas(f"t{i}", TaskStatus.RUNNING, TaskStatus.SENT, NOW, attempt=1,
                        extra_filter={"record_id": f"r{i}"}) for i in range(3)]
    [op] = merged_writes(updates)
    assert isinstance(op, UpdateMany)
    assert op._filter == {"_id": {"$in": ["t0", "t1", "t2"]},
                          "record_id": {"$in": ["r0", "r1", "r2"]},
                          "status": "running", "attempt": 1}
    assert doc(op) == updates[0][1]


def test_updates_that_differ_beyond_the_ids_stay_apart() -> None:
    updates = [
        task_cas("t1", TaskStatus.RUNNING, TaskStatus.SENT, NOW, attempt=1),
        task_cas("t2", TaskStatus.RUNNING, TaskStatus.SENT, NOW, attempt=2),  # other attempt
        task_cas("t3", TaskStatus.RUNNING, TaskStatus.SENT, NOW, attempt=1),
        record_cas("r1", {RecordStatus.RUNNING}, RecordStatus.SUCCESS, NOW, set_={"late": True}),
        record_cas("r2", {RecordStatus.RUNNING}, RecordStatus.SUCCESS, NOW),
    ]
    ops = merged_writes(updates)
    filters = [op._filter for op in ops]
    assert {"_id": {"$in": ["t1", "t3"]}, "status": "running", "attempt": 1} in filters
    assert {"_id": "t2", "status": "running", "attempt": 2} in filters
    assert {"_id": "r1", "status": "running"} in filters
    assert {"_id": "r2", "status": "running"} in filters
    assert len(ops) == 4


def test_pipeline_updates_merge_too() -> None:
    ops = merged_writes([record_sent("r1", NOW), record_sent("r2", NOW),
                         record_sent("r3", NOW, "answer lost")])
    assert sorted(str(op._filter) for op in ops) == sorted([
        str({"_id": {"$in": ["r1", "r2"]}}), str({"_id": "r3"})])


def test_a_filter_naming_no_single_id_is_kept_as_it_is() -> None:
    flt, upd = task_cas(["a", "b"], TaskStatus.PENDING, TaskStatus.EXPIRED, NOW)
    [op] = merged_writes([(flt, upd)])
    assert isinstance(op, UpdateOne) and op._filter == flt


def test_long_batches_go_in_chunks() -> None:
    updates = [task_cas(f"t{i}", TaskStatus.SENT, TaskStatus.SUCCESS, NOW, attempt=1)
               for i in range(600)]
    ops = merged_writes(updates)
    full, rest = divmod(600, ID_CHUNK)
    assert [len(op._filter["_id"]["$in"]) for op in ops] == [ID_CHUNK] * full + [rest]
    assert [i for op in ops for i in op._filter["_id"]["$in"]] == [f"t{i}" for i in range(600)]
