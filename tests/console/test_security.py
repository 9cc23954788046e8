"""The console's defences, against the console running as its own role process: the
Host allow-list (DNS rebinding), single-use bulk confirmations bound to their count,
token removal ending sessions on a running console, /metrics behind a token when
exposed, forwarded headers from trusted proxies only, /healthz and /readyz."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx

from console.health import _check
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import free_port
from sendscript.settings import Settings
from tests.console.conftest import ConsoleRole, start_console
from tests.support import Inspect, Roles, cli, settings_env, wait_for


def _pending(settings: Settings, device: str, n: int) -> list[str]:
    with SendScriptClient(settings) as client:
        return [s.task_id for s in client.submit_many(
            [{"device_id": device, "script": {"id": "s1", "args": {"i": i}}}
             for i in range(n)])]


def test_forged_host_and_origin_are_refused_in_open_mode(roles: Roles,
                                                         inspect: Inspect) -> None:
    c = start_console(roles, console_open=True)
    port = c.url.rsplit(":", 1)[1]
    ids = _pending(c.settings, "phone-h", 2)
    # A page whose name was rebound to 127.0.0.1: its browser sends its own name as
    # Host and Origin, so same-origin checks pass; the Host allow-list does not.
    evil = {"Host": f"evil.test:{port}", "Origin": f"http://evil.test:{port}"}
    with c.client() as anon:
        assert anon.get("/api/whoami").json()["open"] is True  # open, for a real local name
        assert anon.get("/api/whoami", headers=evil).status_code == 400
        assert anon.get("/", headers=evil).status_code == 400
        paused = anon.post("/api/pauses", json={"kind": "global", "reason": "x"}, headers=evil)
        assert paused.status_code == 400
        preview = anon.post("/api/bulk/preview", headers=evil, json={
            "action": "cancel", "filter": {"device": "phone-h"}})
        assert preview.status_code == 400
        assert anon.post(f"/api/tasks/{ids[0]}/cancel", headers=evil).status_code == 400
        # the names it is meant for still work
        for name in ("localhost", "127.0.0.1"):
            assert anon.get("/api/whoami", headers={"Host": f"{name}:{port}"}).status_code == 200
    assert not inspect.redis.hlen(c.settings.keys.pauses)
    assert inspect.count("cancelled") == 0 and inspect.db.audit.count_documents({}) == 0


def test_the_console_role_alone_is_not_open(console_role: ConsoleRole) -> None:
    """Open mode is the demo's (SENDSCRIPT_CONSOLE_OPEN): a plain console on loopback
    with no token at all still wants one."""
    with console_role.client() as anon:
        assert anon.get("/api/whoami").status_code == 401
        assert anon.post("/api/pauses", json={"kind": "global"},
                         headers={"Origin": console_role.url}).status_code == 401


def test_bulk_confirmation_is_single_use_and_bounded_by_its_count(
        console_role: ConsoleRole, inspect: Inspect) -> None:
    c = console_role
    op = c.token("ops", "operator")
    first = _pending(c.settings, "phone-q", 3)
    flt = {"device": "phone-q", "status": "pending"}
    with c.client(op) as api:
        preview = api.post("/api/bulk/preview", json={"action": "cancel", "filter": flt}).json()
        assert preview["count"] == 3
        later = _pending(c.settings, "phone-q", 2)  # arrive between preview and action
        run = api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                          "confirm": preview["confirm"]})
        assert run.status_code == 200, run.text
        body = run.json()
        assert body["done"] == 3 and body["confirmed"] == 3 and body["beyond_confirmed"]
        assert "preview again" in body["note"]
        # the replay, and a second preview's token used twice, are refused and audited
        again = api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                            "confirm": preview["confirm"]})
        assert again.status_code == 403 and "already used" in again.json()["detail"]
        second = api.post("/api/bulk/preview", json={"action": "cancel", "filter": flt}).json()
        assert second["count"] == 2
        assert api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                           "confirm": second["confirm"]}).json()["done"] == 2
        assert api.post("/api/bulk", json={"action": "cancel", "filter": flt,
                                           "confirm": second["confirm"]}).status_code == 403
    statuses = {d["_id"]: d["status"] for d in inspect.db.script_tasks.find()}
    assert all(statuses[i] == "cancelled" for i in first + later)
    refused = list(inspect.db.audit.find({"action": "bulk cancel refused"}))
    assert len(refused) == 2 and all("already used" in e["result"]["reason"] for e in refused)
    assert [e["count"] for e in inspect.db.audit.find({"action": "bulk cancel"}).sort(
        "at", 1)] == [3, 2]


def test_removed_token_ends_sessions_on_a_running_console(console_role: ConsoleRole) -> None:
    c = console_role
    op = c.token("gone", "operator")
    c.token("stays", "operator")
    with httpx.Client(base_url=c.url, timeout=20) as browser, c.client(op) as bearer:
        assert browser.post("/login", data={"token": op}).status_code == 303
        assert browser.get("/api/whoami").json()["name"] == "gone"
        assert bearer.get("/api/whoami").status_code == 200
        cli(c.settings, "token", "remove", "gone")
        wait_for(lambda: browser.get("/api/whoami").status_code == 401, 5,
                 "the session to end")
        assert bearer.get("/api/whoami").status_code == 401


def test_metrics_need_a_token_when_exposed_and_probes_answer(settings: Settings,
                                                              roles: Roles) -> None:
    env = settings_env(settings, console_host="0.0.0.0", console_port=free_port())
    # Bound to every address with no Host names configured: refused at start.
    done = subprocess.run([sys.executable, "-m", "sendscript", "console"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no operator token" in done.stderr
    start = start_console(roles)  # only to make tokens the operator's way
    op = start.token("ops", "operator")
    viewer = start.token("eve", "viewer")
    start.proc.stop(10)
    done = subprocess.run([sys.executable, "-m", "sendscript", "console"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "SENDSCRIPT_CONSOLE_HOSTS" in done.stderr

    c = start_console(roles, console_host="0.0.0.0", console_hosts="127.0.0.1,console.lan",
                      metrics_token="scrape-secret")
    with httpx.Client(base_url=c.url, timeout=20) as anon:
        refused = anon.get("/metrics")
        assert refused.status_code == 401 and "SENDSCRIPT_METRICS_TOKEN" in refused.text
        assert anon.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        for token in ("scrape-secret", viewer, op):
            scraped = anon.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert scraped.status_code == 200 and "sendscript_queue_length" in scraped.text
        health = anon.get("/healthz")
        assert health.status_code == 200 and health.json()["role"] == "console"
        ready = anon.get("/readyz", headers={"Host": "console.lan"})
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"redis": {"ok": True, "detail": "ok"},
                                          "mongo": {"ok": True, "detail": "ok"}}
        assert anon.get("/healthz", headers={"Host": "evil.test"}).status_code == 400


def test_metrics_on_loopback_need_no_token(console_role: ConsoleRole) -> None:
    with console_role.client() as anon:
        assert anon.get("/metrics").status_code == 200


def test_forwarded_headers_are_believed_from_trusted_proxies_only(roles: Roles) -> None:
    plain = start_console(roles)
    op = plain.token("ops", "operator")
    https = {"X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=plain.url, timeout=20) as browser:
        login = browser.post("/login", data={"token": op}, headers=https,
                             follow_redirects=False)
        assert login.status_code == 303 and "secure" not in login.headers["set-cookie"].lower()
    plain.proc.stop(10)
    proxied = start_console(roles, trusted_proxies="127.0.0.1")
    with httpx.Client(base_url=proxied.url, timeout=20) as browser:
        login = browser.post("/login", data={"token": op}, headers=https,
                             follow_redirects=False)
        assert login.status_code == 303 and "secure" in login.headers["set-cookie"].lower()
        # behind a proxy the console is exposed: /metrics wants a token
        assert browser.get("/metrics").status_code == 401


def test_readiness_reports_a_failing_or_silent_store() -> None:
    def broken() -> None:
        raise ConnectionError("refused")

    def silent() -> None:
        time.sleep(1)

    assert asyncio.run(_check(broken, 1)) == {"ok": False, "detail": "ConnectionError: refused"}
    assert asyncio.run(_check(silent, 0.1))["detail"] == "no answer within 0.1s"
    assert asyncio.run(_check(lambda: None, 1)) == {"ok": True, "detail": "ok"}
