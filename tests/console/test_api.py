"""The console's HTTP API on the real embedded servers, the console running as its own
role process: auth and roles, hostile parameters, the two-step bulk action, requeue,
pauses, audit, live streams, dead letters, and the refusal to listen openly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pulsar
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import free_port
from sendscript.models import utcnow
from sendscript.settings import Settings
from tests.console.conftest import ConsoleRole, start_console
from tests.support import Inspect, Roles, settings_env, wait_for


def _tasks(settings: Settings, device: str, n: int, **spec: object) -> list[str]:
    with SendScriptClient(settings) as client:
        return [s.task_id for s in client.submit_many(
            [{"device_id": device, "script": {"id": "s1", "args": {"i": i}}, **spec}
             for i in range(n)])]


def _fail(inspect: Inspect, ids: list[str], error: str) -> None:
    inspect.db.script_tasks.update_many(
        {"_id": {"$in": ids}},
        {"$set": {"status": "failed", "last_error": error, "finished_at": utcnow()}})


def _snapshot(inspect: Inspect) -> tuple[list[tuple[str, str]], int, int]:
    tasks = sorted((d["_id"], d["status"]) for d in inspect.db.script_tasks.find({}, {"status": 1}))
    return tasks, inspect.db.audit.count_documents({}), inspect.redis.llen(
        inspect.settings.keys.ready)


def test_open_then_tokens_roles_cookie_and_cross_site(roles: Roles,
                                                      inspect: Inspect) -> None:
    c = start_console(roles, console_open=True)  # as `sendscript demo` runs it
    with c.client() as anon:
        # asked for, loopback and no token yet: open, as the local operator
        assert anon.get("/api/whoami").json() == {"name": "local", "role": "operator",
                                                  "can_act": True, "open": True}
    op, viewer = c.token("ops", "operator"), c.token("eve", "viewer")
    ids = _tasks(c.settings, "phone-a", 1)
    _fail(inspect, ids, "boom")
    with c.client() as anon:
        wait_for(lambda: anon.get("/api/tasks").status_code == 401, 10, "the console to close")
        assert anon.get("/", follow_redirects=False).headers["location"] == "/login"
    with c.client("ssc_not-a-token") as bad:
        assert bad.get("/api/tasks").status_code == 401
    with c.client(viewer) as v:
        assert v.get("/api/whoami").json()["role"] == "viewer"
        assert v.get("/api/tasks", params={"device": "phone-a"}).json()["tasks"][0]["id"] == ids[0]
        refused = v.post(f"/api/tasks/{ids[0]}/retry")
        assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
        assert v.post("/api/pauses", json={"kind": "global"}).status_code == 403
    assert inspect.db.script_tasks.find_one({"_id": ids[0]})["status"] == "failed"
    assert inspect.db.audit.count_documents({}) == 0
    assert not inspect.redis.hlen(c.settings.keys.pauses)

    # the login page sets a signed, HttpOnly, SameSite=Strict cookie
    with httpx.Client(base_url=c.url, timeout=20) as browser:
        assert browser.post("/login", data={"token": "wrong"}).status_code == 401
        login = browser.post("/login", data={"token": op}, follow_redirects=False)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/whoami").json()["name"] == "ops"
        # a page of another site cannot make the browser act
        evil = browser.post(f"/api/tasks/{ids[0]}/retry", headers={"Origin": "http://evil.test"})
        assert evil.status_code == 403
        assert inspect.db.script_tasks.find_one({"_id": ids[0]})["status"] == "failed"
        done = browser.post(f"/api/tasks/{ids[0]}/retry", headers={"Origin": c.url})
        assert done.status_code == 200, done.text
    assert inspect.db.script_tasks.find_one({"_id": ids[0]})["status"] == "pending"
    entry = inspect.db.audit.find_one({"action": "retry"})
    assert entry["who"] == "ops" and entry["target"] == ids[0] and entry["count"] == 1
    assert c.proc.stop(timeout_s=15) == 0  # SIGTERM: a clean exit (supervisord's stop)


HOSTILE_GETS = [
    ("/api/tasks", {"device[$ne]": "x"}),
    ("/api/tasks", {"device": "$where"}),
    ("/api/tasks", {"device": '{"$gt": ""}'}),
    ("/api/tasks", {"status": "bogus"}),
    ("/api/tasks", {"limit": "100000"}),
    ("/api/tasks", {"limit": "-1"}),
    ("/api/tasks", {"error": "x" * 1000}),
    ("/api/tasks", {"since": "yesterday"}),
    ("/api/tasks", {"since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}),
    ("/api/tasks", {"before": "'; drop"}),
    ("/api/tasks", {"before": "AAAAAAAAAAAA"}),
    ("/api/tasks/..%2F..%2Fx", {}),
    ("/api/tasks/%24where", {}),
    ("/api/quarantine", {"limit": "100000"}),
    ("/api/audit", {"limit": "0"}),
    ("/tasks", {"device": "$where"}),
    ("/tasks", {"bogus": "1"}),
]


def test_hostile_parameters_are_refused_and_change_nothing(console_role: ConsoleRole,
                                                           inspect: Inspect) -> None:
    c = console_role
    op = c.token("ops", "operator")
    ids = _tasks(c.settings, "phone-h", 3)
    _fail(inspect, ids[:1], "(a+)+$ boom")
    _fail(inspect, ids[1:2], "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!")
    before = _snapshot(inspect)
    with c.client(op) as api:
        for path, params in HOSTILE_GETS:
            r = api.get(path, params=params)
            assert 400 <= r.status_code < 500, (path, params, r.status_code, r.text[:200])
        # a regex typed as error text is text: matched literally, as a prefix
        found = api.get("/api/tasks", params={"error": "(a+)+$"}).json()["tasks"]
        assert [t["id"] for t in found] == [ids[0]]
        assert api.get("/api/tasks", params={"error": "a+"}).json()["tasks"] == []
        posts = [
            ("/api/bulk/preview", {"action": "cancel", "filter": {"device": {"$ne": ""}}}),
            ("/api/bulk/preview", {"action": "cancel", "filter": {"$where": "1"}}),
            ("/api/bulk/preview", {"action": "cancel", "filter": {}}),
            ("/api/bulk/preview", {"action": "drop", "filter": {"device": "phone-h"}}),
            ("/api/bulk", {"action": "cancel", "filter": {"device": "phone-h"},
                           "confirm": "cancel.forged.3.9999999999.AAAA"}),
            ("/api/pauses", {"kind": "device", "name": {"$gt": ""}}),
            ("/api/pauses", {"kind": "device"}),
            ("/api/pauses", {"kind": "hard"}),
            ("/api/quarantine/not-an-id/requeue", {}),
            ("/api/quarantine/" + "0" * 32 + "/requeue", {}),
            ("/api/tasks/nosuchtask/retry", {}),
        ]
        for path, body in posts:
            r = api.post(path, json=body)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text[:200])
        # a confirmation is bound to its filter: one for phone-h does not cancel phone-x
        ok = api.post("/api/bulk/preview", json={"action": "cancel",
                                                 "filter": {"device": "phone-h"}}).json()
        assert ok["count"] == 1
        other = api.post("/api/bulk", json={"action": "cancel", "filter": {"device": "phone-x"},
                                            "confirm": ok["confirm"]})
        assert other.status_code == 403 and "another" in other.json()["detail"]
        text = api.post("/api/tasks/x/retry", content="token=1",
                        headers={"Content-Type": "text/plain"})
        assert text.status_code == 415
    assert _snapshot(inspect) == before


def test_search_pages_newest_first_by_cursor(console_role: ConsoleRole) -> None:
    c = console_role
    op = c.token("ops", "operator")
    ids = [_tasks(c.settings, "phone-p", 1)[0] for _ in range(4)] + _tasks(c.settings, "phone-p", 3)
    _tasks(c.settings, "phone-other", 2)
    seen: list[str] = []
    cursor = None
    with c.client(op) as api:
        for _ in range(10):
            params = {"device": "phone-p", "limit": 2, **({"before": cursor} if cursor else {})}
            r = api.get("/api/tasks", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            seen += [t["id"] for t in page["tasks"]]
            cursor = page["next"]
            if cursor is None:
                break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert seen[3:] == list(reversed(ids[:4]))  # the four submitted one by one, newest first


def test_bulk_cancel_counts_first_then_cancels_only_the_filter(console_role: ConsoleRole,
                                                               inspect: Inspect) -> None:
    c = console_role
    op = c.token("ops", "operator")
    mine, others = _tasks(c.settings, "phone-b", 5), _tasks(c.settings, "phone-c", 3)
    cap = c.settings.model_copy(update={"console_bulk_max": 2})
    with c.client(op) as api:
        flt = {"device": "phone-b", "status": "pending"}
        preview = api.post("/api/bulk/preview", json={"action": "cancel", "filter": flt})
        assert preview.status_code == 200, preview.text
        assert preview.json()["count"] == 5
        assert inspect.count("cancelled") == 0  # a preview changes nothing
        run = api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                          "confirm": preview.json()["confirm"]}).json()
        assert run["done"] == 5 and run["confirmed"] == 5 and not run["beyond_confirmed"]
        # a confirmation is spent by its action: the same one again is refused
        again = api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                            "confirm": preview.json()["confirm"]})
        assert again.status_code == 403 and "already used" in again.json()["detail"]
    statuses = {d["_id"]: d["status"] for d in inspect.db.script_tasks.find()}
    assert all(statuses[i] == "cancelled" for i in mine)
    assert all(statuses[i] == "pending" for i in others)
    entry = inspect.db.audit.find_one({"action": "bulk cancel", "count": 5})
    assert entry["who"] == "ops" and entry["filter"] == flt
    # the cap: more matches than SENDSCRIPT_CONSOLE_BULK_MAX is refused at the preview
    capped = start_console(Roles(cap, c.proc.log_path.parent / "capped"))
    try:
        with capped.client(op) as api:
            r = api.post("/api/bulk/preview", json={"action": "cancel",
                                                    "filter": {"device": "phone-c"}})
            assert r.status_code == 422 and "narrow" in r.json()["detail"]
    finally:
        capped.proc.stop(10)


def test_requeue_pause_resume_streams_and_dead_letters(console_role: ConsoleRole,
                                                       inspect: Inspect) -> None:
    c = console_role
    op = c.token("ops", "operator")
    keys = c.settings.keys
    entry = json.dumps({"item": '{"device_id": "phone-q", "script": {"id": "s"}}',
                        "reason": "bad thing", "master": "m", "at": "2026-01-01T00:00:00Z"})
    inspect.redis.lpush(keys.quarantine, entry)
    dead = pulsar.Client(c.settings.pulsar_url)
    producer = dead.create_producer(c.settings.dlq_topic)
    producer.send(json.dumps({"reason": "not JSON", "data": "garbage", "message_id": "1:2",
                              "topic": c.settings.task_log_topic}).encode())
    dead.close()
    ids = _tasks(c.settings, "phone-s", 1)
    with c.client(op) as api:
        items = api.get("/api/quarantine").json()
        assert [i["reason"] for i in items] == ["bad thing"]
        assert api.post(f"/api/quarantine/{items[0]['id']}/requeue").status_code == 200
        assert api.post(f"/api/quarantine/{items[0]['id']}/requeue").status_code == 404
        assert inspect.redis.llen(keys.quarantine) == 0
        assert json.loads(inspect.redis.lindex(keys.ready, 0))["device_id"] == "phone-q"

        assert api.post("/api/pauses", json={"kind": "device", "name": "phone-s",
                                             "reason": "repair"}).status_code == 200
        assert json.loads(inspect.redis.hget(keys.pauses, "device:phone-s"))["reason"] == "repair"
        assert "device:phone-s" in api.get("/api/devices/phone-s").json()["paused"]
        assert api.post("/api/pauses/resume", json={"kind": "device", "name": "phone-s"}
                        ).json()["lifted"]["scope"] == "device:phone-s"
        assert not inspect.redis.hexists(keys.pauses, "device:phone-s")

        letters = api.get("/api/dead-letters").json()
        assert [d["reason"] for d in letters] == ["not JSON"]

        # the overview is pushed: a pause set while the stream is open shows up in it
        with api.stream("GET", "/api/stream/overview") as stream, c.client(op) as other:
            assert stream.headers["content-type"].startswith("text/event-stream")
            paused = False
            deadline = time.monotonic() + 15
            for line in stream.iter_lines():
                assert time.monotonic() < deadline, "the pause never reached the stream"
                if not line.startswith("data: "):
                    continue
                snap = json.loads(line[6:])
                if isinstance(snap, dict) and not paused:
                    assert "queue:live" not in snap["pauses"]
                    other.post("/api/pauses", json={"kind": "queue", "name": "live"})
                    paused = True
                elif isinstance(snap, dict) and "queue:live" in snap["pauses"]:
                    break
        assert api.post("/api/pauses/resume", json={"kind": "queue", "name": "live"}
                        ).status_code == 200
        with api.stream("GET", f"/api/stream/tasks/{ids[0]}") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["status"] == "pending"
                    break
        actions = [a["action"] for a in api.get("/api/audit").json()]
        assert actions == ["resume", "pause", "resume", "pause", "requeue"]
        scrape = api.get("/metrics")  # the metrics' router, included by the console
        assert scrape.status_code == 200 and "text/plain" in scrape.headers["content-type"]
        spec = api.get("/openapi.json").json()
        assert {"/api/tasks", "/api/bulk/preview", "/api/bulk", "/api/quarantine/{item_id}/requeue",
                "/api/pauses", "/api/audit", "/api/devices/{device_id}"} <= set(spec["paths"])


def test_refuses_an_open_address_until_an_operator_token_exists(settings: Settings,
                                                                roles: Roles) -> None:
    env = settings_env(settings, console_host="0.0.0.0", console_port=free_port())

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sendscript", "console"], env=env,
                              capture_output=True, text=True, timeout=60)

    first = run()
    assert first.returncode != 0 and "no operator token" in first.stderr
    token = subprocess.run([sys.executable, "-m", "sendscript", "token", "add", "eve",
                            "--role", "viewer"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert token.returncode == 0 and token.stdout.strip().splitlines()[-1].startswith("ssc_")
    assert "no operator token" in run().stderr  # a viewer is not enough
    listed = subprocess.run([sys.executable, "-m", "sendscript", "token", "list"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "eve" in listed.stdout and "ssc_" not in listed.stdout


@pytest.mark.parametrize("role", ["admin", ""])
def test_token_roles_are_checked(console_role: ConsoleRole, role: str) -> None:
    with pytest.raises(ValueError):
        console_role.token("x", role)


def test_the_overview_shows_rate_limits_and_an_adaptive_ones_value_why_and_hold(
        roles: Roles, inspect: Inspect) -> None:
    c = start_console(roles, rate_limits="global=20/1s~2..100,queue:bulk=5/2s")
    now_ms = int(time.time() * 1000)
    # What masters write when 429s lowered the limit and a Retry-After holds it.
    inspect.redis.hset(roles.settings.keys.rate_limit("global"), mapping={
        "cur": "12.5", "why": "429 x3, Retry-After 60s", "at": now_ms, "down_at": now_ms,
        "hold": now_ms + 60_000, "v": 4})
    with c.client(c.token("vera", "viewer")) as api:
        def overview() -> dict[str, dict]:
            return {row["name"]: row for row in api.get("/api/overview").json()["rate_limits"]}

        # The overview is drawn every live interval: wait for one drawn after the write.
        wait_for(lambda: overview()["global"]["current"] == 12.5, 10, "the adaptive value")
        shown = overview()
        assert shown["global"]["current"] == 12.5 and 50 < shown["global"]["hold_s"] <= 60
        assert shown["global"]["shown"].startswith(
            "global 12.5/1s (20/1s~2..100): 429 x3, Retry-After 60s, hold ")
        assert shown["queue:bulk"]["shown"] == "queue:bulk 5/2s"
        page = api.get("/")
        assert page.status_code == 200
        assert "global 12.5/1s (20/1s~2..100): 429 x3, Retry-After 60s, hold" in page.text
        assert "queue:bulk 5/2s" in page.text


def test_the_task_view_shows_the_dedupe_mode_and_the_debounce(console_role: ConsoleRole) -> None:
    c = console_role
    spec = {"dedupe_key": "sync:p9", "dedupe_mode": "until_start", "debounce_s": 600,
            "debounce_max_s": 900}
    [first] = _tasks(c.settings, "p9", 1, **spec)
    assert _tasks(c.settings, "p9", 1, **spec) == [first]  # debounced into it
    with c.client(c.token("eve", "viewer")) as api:
        detail = api.get(f"/api/tasks/{first}").json()
        page = api.get(f"/tasks/{first}").text
    assert detail["task"]["dedupe_mode"] == "until_start"
    assert detail["task"]["debounce_seq"] == 1
    line = detail["dedupe"]
    assert line.startswith("key 'sync:p9' · mode until_start · holds the key · debouncing")
    assert "1 later submission(s) merged" in line
    assert 'id="task-dedupe"' in page and "1 later submission(s) merged" in page
