"""Hostile queue items against the running service (master, consumer, simulated farm):
each is quarantined with its reason, every good task runs, and intake keeps going."""

from __future__ import annotations

import json

import pytest

from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def good(n: int, **script: object) -> str:
    return json.dumps({"device_id": f"dev-{n % 20}", "script": {"id": "tap", "n": n, **script}})


def hostile() -> dict[str, tuple[bytes, str]]:
    """Kind -> (item, words its quarantine reason holds)."""
    def item(obj: object) -> bytes:
        return json.dumps(obj).encode()

    return {
        # Just under the script limit, over Mongo's 16 MiB as a document: the store's refusal.
        "document too large": (item({"device_id": "d", "script": {"b": "x" * (16 * MIB - 64)}}),
                               "over the store's limit of 16777216 bytes"),
        "17 MB script": (item({"device_id": "d", "script": {"b": "x" * (17 * MIB)}}),
                         "over the limit of 16777216 bytes (SENDSCRIPT_MAX_SCRIPT_BYTES)"),
        "int beyond 8 bytes": (b'{"device_id": "d", "script": {"n": 99999999999999999999999}}',
                               "8-byte ints"),
        "lone surrogate": (b'{"device_id": "d", "script": {"s": "\\udc00"}}',
                           "surrogates not allowed"),
        "NaN priority": (b'{"device_id": "d", "script": {}, "priority": NaN}', "priority"),
        "NaN timeout": (b'{"device_id": "d", "script": {}, "timeout_s": NaN}', "timeout_s"),
        "server refusal": (item({"device_id": "dev-refused", "script": {}}), "code 121"),
        "fan-out with a refused task": (
            item({"device_ids": ["fa", "dev-refused", "fb"], "script": {}}), "code 121"),
        "not JSON": (b"{nope", "not JSON"),
        "invalid UTF-8": (b'{"device_id": "\xff\xfe", "script": {}}', "not JSON"),
        "a list": (b"[1, 2]", "expected a JSON object"),
        "empty fan-out": (item({"device_ids": [], "script": {}}), "device_ids"),
        "unknown group": (item({"group": "no-such-group", "script": {}}), "unknown or empty"),
        "long device id": (item({"device_id": "d" * 10_000, "script": {}}), "device_id"),
        "unknown task": (item({"task_id": "no-such-task"}), "no task with task_id"),
        "priority out of range": (item({"device_id": "d", "script": {}, "priority": 99}),
                                  "priority"),
    }


def test_hostile_items_are_quarantined_and_every_good_task_runs(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    # A refusal only the server knows (a validator), for one device.
    inspect.db.create_collection("script_tasks", validator={"device_id": {"$ne": "dev-refused"}})
    roles.simulator(run_ms=10)
    roles.consumer()
    master = roles.master(max_script_bytes=16 * MIB)
    bad = hostile()
    # `$` and dotted keys inside a script: this store takes them, so they are good tasks.
    before = [good(i) for i in range(98)] + [good(98, **{"$set": 1}), good(99, **{"a.b": 1})]
    mixed: list[str | bytes] = []
    for i, (item, _) in enumerate(bad.values()):
        mixed += [*before[i * 6:(i + 1) * 6], item]
    mixed += before[len(bad) * 6:]
    inspect.redis.lpush(settings.keys.ready, *mixed)

    wait_for(lambda: inspect.redis.llen(settings.keys.quarantine) == len(bad), 120,
             "every hostile item in quarantine")
    # Intake is still running: good tasks pushed after the poison pills run too.
    inspect.redis.lpush(settings.keys.ready, *[good(i) for i in range(100, 200)])
    wait_for(lambda: inspect.count("success") == 200, 180, "the 200 good tasks")

    assert master.running
    assert inspect.db.script_tasks.count_documents({}) == 200
    assert inspect.db.script_tasks.count_documents({"device_id": {"$in": ["fa", "fb"]}}) == 0
    assert inspect.redis.llen(settings.keys.processing(settings.master_id)) == 0
    records = [json.loads(r) for r in inspect.redis.lrange(settings.keys.quarantine, 0, -1)]
    assert len(records) == len(bad)
    for kind, (item, words) in bad.items():
        text = item[:8192].decode("utf-8", "replace")
        found = [r for r in records if r["item"] == text
                 and r.get("item_bytes", len(item)) == len(item)]
        assert len(found) == 1, kind
        record = found[0]
        assert words in record["reason"], (kind, record["reason"])
        assert record["master"] == settings.master_id and record["at"], kind
        if len(item) > 8192:
            assert record["item_bytes"] == len(item), kind
            assert f"item of {len(item)} bytes" in record["reason"], kind
    assert int(inspect.redis.hget(settings.keys.stats, "quarantined")) == len(bad)
