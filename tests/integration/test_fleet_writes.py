"""The devices' documents on the real server, written as the consumer writes them
(sendscript/fleet.py's write_results): a device's first batch of the hour resets
its slot and counts, later batches only count. Across batches, hours and a slot
that comes round a day later, each document holds what the pure arithmetic
(add_to_hours) says."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase

from sendscript.fleet import (
    DeviceResult,
    WrittenThisHour,
    add_to_hours,
    hour_of,
    write_results,
)
from sendscript.store import DEVICES

NOW = datetime(2026, 12, 6, 5, 30, tzinfo=UTC)


def _result(i: int, device: str, ok: bool) -> DeviceResult:
    return DeviceResult(device, f"t{i}", f"r{i}", "SUCCESS" if ok else "ERROR",
                        "" if ok else f"$err {i} {{$set: 1}}")  # text, never an operator


async def test_batches_count_every_result_once(db: AsyncDatabase) -> None:
    col = db[DEVICES]
    rng = random.Random(3)
    written = WrittenThisHour()
    want: dict[str, dict] = {}
    last: dict[str, DeviceResult] = {}
    i = 0
    # Three hours; the last two batches lie 24 h after the first, in its slot.
    for at in (NOW, NOW + timedelta(minutes=10), NOW + timedelta(hours=1),
               NOW + timedelta(hours=24), NOW + timedelta(hours=24, minutes=5)):
        for _ in range(3):
            batch = []
            for _ in range(rng.randrange(1, 40)):
                i += 1
                batch.append(_result(i, f"p{rng.randrange(12)}", rng.random() < 0.7))
            await write_results(col, batch, at, written)
            for r in batch:
                want[r.device_id] = add_to_hours(want.get(r.device_id, {}), hour_of(at),
                                                 int(r.ok), int(not r.ok))
                last[r.device_id] = r
    docs = {d["_id"]: d async for d in col.find({})}
    assert set(docs) == set(want)
    for device, hours in want.items():
        doc = docs[device]
        assert doc["hours"] == hours, device
        assert (doc["last_task_id"], doc["last_record_id"], doc["last_result"],
                doc["last_error"]) == (last[device].task_id, last[device].record_id,
                                       last[device].result, last[device].error)
        assert doc["device_id"] == device


async def test_a_device_whose_document_went_is_made_again(db: AsyncDatabase) -> None:
    col = db[DEVICES]
    written = WrittenThisHour()
    await write_results(col, [_result(1, "gone", True), _result(2, "kept", True)], NOW, written)
    await col.delete_one({"_id": "gone"})
    # This process wrote both this hour (no reset is sent): the count's upsert makes
    # the document again, with this hour in its slot and the result counted once.
    await write_results(col, [_result(3, "gone", False), _result(4, "kept", True)], NOW, written)
    gone = await col.find_one({"_id": "gone"})
    kept = await col.find_one({"_id": "kept"})
    assert gone is not None and kept is not None
    slot = str(hour_of(NOW) % 24)
    assert gone["hours"][slot] == {"h": hour_of(NOW), "ok": 0, "fail": 1}
    assert gone["last_task_id"] == "t3" and gone["device_id"] == "gone"
    assert kept["hours"][slot] == {"h": hour_of(NOW), "ok": 2, "fail": 0}
