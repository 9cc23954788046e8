"""The producer SDK's submissions on the real servers: refusals before anything is
stored, the server's refusals, and dedupe keys that outlive their task's end."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta

import pytest

from sendscript.client import SendScriptClient, SubmitRefused, Submitted
from sendscript.models import TaskSpec, utcnow
from sendscript.settings import Settings
from sendscript.status import RETENTION, TaskStatus, task_cas
from sendscript.store import TASKS


@pytest.fixture
def sdk(settings: Settings) -> Iterator[SendScriptClient]:
    window = RETENTION.dedupe_window_s  # the client configures this process's window
    client = SendScriptClient(settings.model_copy(update={"max_script_bytes": 4096}))
    yield client
    client._mongo.drop_database(client._db.name)
    client._redis.delete(settings.keys.ready)
    client.close()
    RETENTION.dedupe_window_s = window


def refs(client: SendScriptClient) -> list[str]:
    """Task ids pushed on the ready list, oldest first."""
    raw = client._redis.lrange(client.settings.keys.ready, 0, -1)
    return [json.loads(r)["task_id"] for r in reversed(raw)]


def finish(client: SendScriptClient, task_id: str, ago_s: float) -> None:
    flt, upd = task_cas(task_id, TaskStatus.PENDING, TaskStatus.SUCCESS,
                        utcnow() - timedelta(seconds=ago_s))
    assert client._db[TASKS].update_one(flt, upd).matched_count == 1


@pytest.mark.parametrize(("script", "words"), [
    ({"blob": "x" * 5000}, "over the limit of 4096 bytes (SENDSCRIPT_MAX_SCRIPT_BYTES)"),
    ({"n": 2**70}, "8-byte ints"),
    ({"s": "\ud800"}, "surrogates not allowed"),
])
def test_a_script_that_cannot_be_stored_is_refused_and_nothing_stored(
    sdk: SendScriptClient, script: dict, words: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        sdk.submit("d1", script)
    with pytest.raises(ValueError, match="spec 1: "):
        sdk.submit_many([TaskSpec(device_id="d0", script={}),
                         TaskSpec(device_id="d1", script=script)])
    with pytest.raises(ValueError):
        sdk.submit_fanout(script, devices=["a", "b"])
    assert sdk._db[TASKS].count_documents({}) == 0 and refs(sdk) == []


def test_a_server_refusal_is_a_value_error_and_the_others_are_stored(
    sdk: SendScriptClient,
) -> None:
    sdk._db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-refused"}})
    with pytest.raises(SubmitRefused) as info:
        sdk.submit_many([{"device_id": "d0", "script": {}},
                         {"device_id": "dev-refused", "script": {}},
                         {"device_id": "d2", "script": {}}])
    assert list(info.value.reasons) == [1] and "code 121" in info.value.reasons[1]
    kept = [r.task_id for r in info.value.results if r is not None]
    assert len(kept) == 2 and info.value.results[1] is None
    assert refs(sdk) == kept

    with pytest.raises(ValueError, match=r"fan-out refused: .*code 121"):
        sdk.submit_fanout({"id": "x"}, devices=["f1", "dev-refused", "f2"])
    assert sorted(d["device_id"] for d in sdk._db[TASKS].find({})) == ["d0", "d2"], \
        "nothing of the refused fan-out is kept"
    assert refs(sdk) == kept


def test_a_duplicate_after_the_original_succeeded_gets_the_existing_task(
    sdk: SendScriptClient,
) -> None:
    first = sdk.submit("d1", {"id": "x"}, dedupe_key="order-1")
    finish(sdk, first.task_id, ago_s=60)
    again = sdk.submit("d1", {"id": "x"}, dedupe_key="order-1")
    assert again.created is False and again.task_id == first.task_id
    assert again.status == "success"
    assert refs(sdk) == [first.task_id]


def test_a_duplicate_after_the_window_is_a_new_task(sdk: SendScriptClient) -> None:
    sdk.settings.dedupe_window_s = 3600
    first = sdk.submit("d1", {"id": "x"}, dedupe_key="order-2")
    finish(sdk, first.task_id, ago_s=3700)
    again = sdk.submit("d1", {"id": "x"}, dedupe_key="order-2")
    assert again.created and again.task_id != first.task_id
    assert refs(sdk) == [first.task_id, again.task_id]
    old = sdk._db[TASKS].find_one({"_id": first.task_id})
    assert "dedupe_active" not in old, "the old task gave its key up"


def test_window_zero_keeps_the_old_behaviour(settings: Settings) -> None:
    window = RETENTION.dedupe_window_s
    client = SendScriptClient(settings.model_copy(update={"dedupe_window_s": 0}))
    try:
        first = client.submit("d1", {"id": "x"}, dedupe_key="order-3")
        assert not client.submit("d1", {"id": "x"}, dedupe_key="order-3").created
        finish(client, first.task_id, ago_s=0)
        assert "dedupe_active" not in client._db[TASKS].find_one({"_id": first.task_id})
        again = client.submit("d1", {"id": "x"}, dedupe_key="order-3")
        assert again.created and again.task_id != first.task_id
    finally:
        client._mongo.drop_database(client._db.name)
        client._redis.delete(settings.keys.ready)
        client.close()
        RETENTION.dedupe_window_s = window


def expired_holder(sdk: SendScriptClient, key: str) -> str:
    """A task cancelled two hours ago whose key a newer task has since taken."""
    old = sdk.submit("d1", {"id": "x"}, dedupe_key=key)
    flt, upd = task_cas(old.task_id, TaskStatus.PENDING, TaskStatus.CANCELLED,
                        utcnow() - timedelta(hours=2))
    assert sdk._db[TASKS].update_one(flt, upd).matched_count == 1
    return old.task_id


def test_a_retry_by_hand_takes_the_key_back_from_a_finished_holder(
    sdk: SendScriptClient,
) -> None:
    sdk.settings.dedupe_window_s = 3600
    old = expired_holder(sdk, "order-4")
    new = sdk.submit("d1", {"id": "x"}, dedupe_key="order-4")
    assert new.created
    finish(sdk, new.task_id, ago_s=0)  # finished, within the window: it holds the key

    assert sdk.retry(old)
    holders = [d["_id"] for d in sdk._db[TASKS].find({"dedupe_active": "order-4"})]
    assert holders == [old]
    assert sdk.submit("d1", {"id": "x"}, dedupe_key="order-4").task_id == old


def test_a_retry_by_hand_is_refused_while_an_unfinished_task_holds_the_key(
    sdk: SendScriptClient,
) -> None:
    sdk.settings.dedupe_window_s = 3600
    old = expired_holder(sdk, "order-5")
    new = sdk.submit("d1", {"id": "x"}, dedupe_key="order-5")
    assert new.created
    with pytest.raises(ValueError, match="belongs to an unfinished task"):
        sdk.retry(old)
    assert sdk._db[TASKS].find_one({"_id": old})["status"] == "cancelled"


def test_a_fan_out_is_stored_in_chunks_and_resumed_by_its_batch_id(
    settings: Settings,
) -> None:
    sdk = SendScriptClient(settings.model_copy(update={"intake_fanout_chunk": 3}))
    try:
        devices = [f"d{i}" for i in range(8)]
        # A producer cut short: it stored the first six devices' chunks, then died.
        first = sdk.submit_fanout({"id": "x"}, devices=devices[:6], batch_id="b-1")
        assert [t.created for t in first.tasks] == [True] * 6
        again = sdk.submit_fanout({"id": "x"}, devices=list(reversed(devices)),
                                  batch_id="b-1")
        assert again.batch_id == "b-1"
        assert [t.created for t in again.tasks] == [False] * 6 + [True] * 2
        assert [t.task_id for t in again.tasks[:6]] == [t.task_id for t in first.tasks]
        docs = list(sdk._db[TASKS].find({"batch_id": "b-1"}))
        assert sorted(d["device_id"] for d in docs) == devices
        # Every stored task is pushed (the resumed ones again: a push may be what was cut).
        assert set(refs(sdk)) == {d["_id"] for d in docs}
    finally:
        sdk._mongo.drop_database(sdk._db.name)
        sdk._redis.delete(settings.keys.ready)
        sdk.close()


def test_a_fan_out_refused_on_a_later_chunk_keeps_the_chunks_before(
    settings: Settings,
) -> None:
    sdk = SendScriptClient(settings.model_copy(update={"intake_fanout_chunk": 3}))
    try:
        sdk._db.command("collMod", TASKS, validator={"device_id": {"$ne": "f4"}})
        with pytest.raises(ValueError, match=r"code 121.*3 device\(s\) before it stored"):
            sdk.submit_fanout({"id": "x"}, devices=[f"f{i}" for i in range(8)])
        assert sorted(d["device_id"] for d in sdk._db[TASKS].find({})) == ["f0", "f1", "f2"]
    finally:
        sdk._mongo.drop_database(sdk._db.name)
        sdk._redis.delete(settings.keys.ready)
        sdk.close()


def test_the_sdk_debounces_and_answers_which_task_took_the_spec(sdk: SendScriptClient) -> None:
    keyed = {"dedupe_key": "sync:p1", "debounce_s": 600, "debounce_max_s": 900}
    first = sdk.submit("p1", {"id": "sync", "args": {"v": 1}}, **keyed)
    assert first.created and first.status == "waiting" and not first.debounced
    later = sdk.submit("p2", {"id": "sync", "args": {"v": 2}}, priority=9, **keyed)
    assert later == Submitted(first.task_id, "waiting", created=False, debounced=True)
    task = sdk.get(first.task_id)
    assert task is not None and task.script == {"id": "sync", "args": {"v": 2}}
    assert task.device_id == "p2" and task.priority == 9 and task.debounce_seq == 1
    assert refs(sdk) == [first.task_id]  # the later one pushed nothing
    with pytest.raises(ValueError, match="debounce_max_s must be at least debounce_s"):
        sdk.submit("p1", {"id": "sync"}, dedupe_key="k", debounce_s=5, debounce_max_s=1)


def alive(client: SendScriptClient, master_id: str) -> None:
    """A master whose heartbeat is fresh, as master/heartbeat.py writes it."""
    keys = client.settings.keys
    client._redis.hset(keys.masters, master_id, json.dumps({"updated_at": "now"}))
    client._redis.set(keys.master_alive(master_id), "now", px=60_000)


def holders(client: SendScriptClient) -> dict[str, str | None]:
    return {d["_id"]: d.get("master") for d in client._db[TASKS].find({}, {"master": 1})}


def test_tasks_due_now_are_stored_held_by_a_live_master(sdk: SendScriptClient) -> None:
    """The master that takes them need not write them again to hold them; a delayed
    task stays unheld (the loaders of whichever master take it in time)."""
    keys = sdk.settings.keys
    sdk._redis.hset(keys.masters, "gone", "{}")  # listed, not alive
    alive(sdk, "m1")
    try:
        now = sdk.submit_many([TaskSpec(device_id=f"d{i}", script={}) for i in range(3)])
        later = sdk.submit("d9", {}, run_at=utcnow() + timedelta(hours=1))
        kept = holders(sdk)
        assert [kept[s.task_id] for s in now] == ["m1"] * 3
        assert kept[later.task_id] is None
        assert refs(sdk) == [s.task_id for s in now] + [later.task_id]
    finally:
        sdk._redis.delete(keys.masters, keys.master_alive("m1"))


def test_with_no_master_alive_tasks_are_stored_unheld(sdk: SendScriptClient) -> None:
    sdk._redis.hset(sdk.settings.keys.masters, "gone", "{}")
    try:
        sub = sdk.submit("d1", {})
        assert holders(sdk)[sub.task_id] is None
    finally:
        sdk._redis.delete(sdk.settings.keys.masters)


def test_a_holder_dead_by_the_push_leaves_its_tasks_unheld(
        sdk: SendScriptClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The master named may die between the choice and the store; its recovery may
    have looked in Mongo already. Seen dead after the push, the tasks are stored
    unheld again: the orphan sweep's."""
    keys = sdk.settings.keys
    monkeypatch.setattr("sendscript.client.HOLDER_KEPT_S", 3600.0)
    alive(sdk, "m1")
    first = sdk.submit("d0", {})  # m1 chosen, and kept
    assert holders(sdk)[first.task_id] == "m1"
    sdk._redis.delete(keys.master_alive("m1"))  # m1 dies
    try:
        subs = sdk.submit_many([TaskSpec(device_id=f"d{i}", script={}) for i in (1, 2)])
        kept = holders(sdk)
        assert [kept[s.task_id] for s in subs] == [None, None]
        assert refs(sdk)[-2:] == [s.task_id for s in subs]
    finally:
        sdk._redis.delete(keys.masters)
