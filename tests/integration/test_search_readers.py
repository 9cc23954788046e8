"""What reads tasks through their search documents, on the real servers: the SDK's
newest tasks and a batch's progress and cancel, the CLI's batch progress, and the
console's device history and batch list. Each answer is checked against the tasks
themselves, read back from Mongo."""

from __future__ import annotations

from collections import Counter

import pytest

from console import data
from sendscript import report
from sendscript.client import SendScriptClient
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import TASKS
from sendscript.task_search import SEARCH

FAN_OUT = 30


def newest(client: SendScriptClient, flt: dict | None = None) -> list[str]:
    docs = client._db[TASKS].find(flt or {}, {"created_at": 1})
    return [d["_id"] for d in sorted(docs, key=lambda d: (d["created_at"], d["_id"]),
                                     reverse=True)]


def finish(client: SendScriptClient, ids: list[str], to: TaskStatus) -> None:
    flt, upd = task_cas(ids, TaskStatus.PENDING, to, utcnow())
    assert client._db[TASKS].update_many(flt, upd).matched_count == len(ids)


@pytest.fixture
def stored(sdk: SendScriptClient) -> str:
    """Twelve single tasks on four devices and a fan-out of FAN_OUT; its batch id."""
    for i in range(12):
        sdk.submit(f"solo-{i % 4}", {"id": "s1"})
    batch = sdk.submit_fanout({"id": "s2"}, devices=[f"fan-{i:02d}" for i in range(FAN_OUT)])
    assert sdk._db[SEARCH].count_documents({}) == 12 + FAN_OUT
    return batch.batch_id


def test_the_sdk_lists_the_newest_tasks_of_any_status_or_one(
        sdk: SendScriptClient, stored: str) -> None:
    assert [t.id for t in sdk.list(limit=7)] == newest(sdk)[:7]
    assert [t.id for t in sdk.list(limit=500)] == newest(sdk)
    solo = newest(sdk, {"device_id": {"$regex": "^solo-"}})
    finish(sdk, solo[3:9], TaskStatus.SUCCESS)
    assert [t.id for t in sdk.list(status="success", limit=4)] == solo[3:7]
    assert [t.id for t in sdk.list(status="success", limit=50)] == solo[3:9]
    assert sdk.list(status="expired") == []


def test_a_batch_is_counted_and_cancelled_through_its_search_documents(
        sdk: SendScriptClient, stored: str, settings: Settings) -> None:
    ids = newest(sdk, {"batch_id": stored})
    assert len(ids) == FAN_OUT
    finish(sdk, ids[:5], TaskStatus.SUCCESS)
    finish(sdk, ids[5:7], TaskStatus.FAILED)
    expected = {"success": 5, "failed": 2, "pending": FAN_OUT - 7}
    assert sdk.batch_info(stored) == expected
    assert report.progress_counts(settings, stored) == expected
    assert sdk.batch_info("no-such-batch") == {}

    assert sdk.cancel_batch(stored) == FAN_OUT - 7
    by_status = Counter(d["status"] for d in sdk._db[TASKS].find({"batch_id": stored}))
    assert by_status == {"cancelled": FAN_OUT - 7, "success": 5, "failed": 2}
    # The single tasks are no batch's: none was cancelled.
    assert sdk._db[TASKS].count_documents({"batch_id": None, "status": "pending"}) == 12
    assert sdk.cancel_batch(stored) == 0


def test_the_console_shows_a_devices_history_and_the_batches(
        sdk: SendScriptClient, stored: str, settings: Settings) -> None:
    stores = data.Stores.open(settings)
    try:
        recent = data.device_detail(stores, "solo-1")["recent"]
        assert [d["id"] for d in recent] == newest(sdk, {"device_id": "solo-1"})
        assert all(d["device_id"] == "solo-1" and "status" in d for d in recent)
        batches = data.batches(stores)
        assert [(b["batch_id"], b["total"], b["done"]) for b in batches] == [
            (stored, FAN_OUT, 0)]
        finish(sdk, newest(sdk, {"batch_id": stored})[:3], TaskStatus.SUCCESS)
        assert data.batches(stores)[0]["counts"] == {"success": 3, "pending": FAN_OUT - 3}
    finally:
        stores.redis.close()
        stores.mongo.close()
