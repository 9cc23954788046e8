"""The fleet view's API (`GET /api/devices`) on the real servers: every device the
consumer's documents or a group name, in id order, paged by cursor, searched by
prefix and group, each with its state now; the id index is rebuilt when Redis lost it."""

from __future__ import annotations

import time

from pymongo import UpdateOne

from sendscript.client import SendScriptClient
from sendscript.fleet import DeviceResult, device_updates
from sendscript.models import utcnow
from sendscript.store import DEVICES, RECORDS, TASKS
from tests.console.conftest import ConsoleRole
from tests.support import Inspect


def _results(inspect: Inspect, *results: DeviceResult) -> None:
    """What the consumer writes for these results (its own updates)."""
    ops: list[UpdateOne] = device_updates(list(results), utcnow())
    inspect.db[DEVICES].bulk_write(ops, ordered=True)


def test_every_device_paged_searched_with_its_state(console_role: ConsoleRole,
                                                    inspect: Inspect) -> None:
    c, keys = console_role, console_role.settings.keys
    for n, device in enumerate(["phone-01", "phone-03", "phone-04", "phone-05", "tab-1"]):
        _results(inspect, DeviceResult(device, f"t-{n}a", f"r-{n}a", "SUCCESS", ""),
                 DeviceResult(device, f"t-{n}b", f"r-{n}b", "ERROR", "no app"))
    with SendScriptClient(c.settings) as client:  # group-only devices: phone-02, phone-09
        client.group_add("rack", ["phone-02", "phone-09"])
    inspect.redis.delete(keys.devices_known)  # Redis lost the index: rebuilt from Mongo
    # A worker's lock names its task; the task points at its open exec record.
    inspect.redis.set(keys.device_lock("phone-01"), 42)
    inspect.redis.hset(keys.lock_owners, "phone-01", "42 t-run m-1/w-0")
    inspect.db[TASKS].insert_one({"_id": "t-run", "device_id": "phone-01",
                                  "status": "sent", "attempt": 2, "record_id": "r-run"})
    inspect.db[RECORDS].insert_one({"_id": "r-run", "task_id": "t-run", "attempt": 2,
                                    "device_id": "phone-01", "lock_value": 42,
                                    "status": "sent"})
    inspect.redis.zadd(keys.devices_benched, {"phone-03": int(time.time() * 1000) + 60_000})
    op = c.token("ops", "operator")
    with c.client(op) as api:
        assert api.post("/api/pauses", json={"kind": "group", "name": "rack"}).status_code == 200
        pages: list[list[str]] = []
        rows: dict[str, dict] = {}
        after = None
        while len(pages) < 5:
            page = api.get("/api/devices", params={"limit": 3, **({"after": after} if after
                                                                  else {})}).json()
            pages.append([d["device_id"] for d in page["devices"]])
            rows.update({d["device_id"]: d for d in page["devices"]})
            after = page["next"]
            if after is None:
                break
        assert pages == [["phone-01", "phone-02", "phone-03"],
                         ["phone-04", "phone-05", "phone-09"], ["tab-1"]]
        running = rows["phone-01"]
        assert running["state"] == "running"
        assert running["running"] == {"task_id": "t-run", "attempt": 2}
        detail = api.get("/api/devices/phone-01").json()
        assert detail["running"] == {"task_id": "t-run", "attempt": 2, "record_id": "r-run",
                                     "status": "sent"}
        # Once the record closes, the lock (until released) is held by no attempt.
        inspect.db[RECORDS].update_one({"_id": "r-run"}, {"$set": {"status": "success"}})
        assert api.get("/api/devices/phone-01").json()["running"] is None
        inspect.db[RECORDS].update_one({"_id": "r-run"}, {"$set": {"status": "sent"}})
        assert (rows["phone-02"]["state"], rows["phone-02"]["paused"]) == ("paused",
                                                                          ["group:rack"])
        assert rows["phone-03"]["state"] == "benched" and rows["phone-03"]["benched_left_s"] > 0
        free = rows["phone-04"]
        assert (free["state"], free["last_task_id"], free["last_result"], free["last_error"],
                free["day_tasks"], free["day_ok"], free["day_success_rate"]) == (
            "free", "t-2b", "ERROR", "no app", 2, 1, 0.5)
        assert rows["phone-09"]["day_tasks"] == 0 and rows["phone-09"]["last_result"] is None

        def ids(**params: object) -> list[str]:
            answer = api.get("/api/devices", params=params)
            assert answer.status_code == 200, answer.text
            return [d["device_id"] for d in answer.json()["devices"]]

        assert ids(prefix="tab") == ["tab-1"]
        assert ids(prefix="phone-0", limit=2) == ["phone-01", "phone-02"]
        assert ids(group="rack") == ["phone-02", "phone-09"]
        assert ids(group="rack", prefix="phone-09") == ["phone-09"]
        assert ids(prefix="nothing") == []
        for bad in ({"after": "!!"}, {"prefix": "$where"}, {"limit": 0}, {"group": "a b"}):
            assert api.get("/api/devices", params=bad).status_code == 422, bad
