"""Alerts end to end: a local webhook receiver on 127.0.0.1 takes the WeCom robot's
and the generic webhook's messages.

- A master SIGKILLed: the leader says "started" once in each format, and
  "resolved" once when the master is back.
- The same incident seen by two masters (the shared breaker's case) is announced
  once across them, through the Redis record.
- A receiver that hangs longer than the timeout and a closed port delay no
  dispatch: tasks succeed while the alerts fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from master.alerts import Alerting
from master.bus import Bus
from master.events import Incident
from sendscript import connect
from sendscript.alerts import Alert, State
from sendscript.client import SendScriptClient
from sendscript.dev.embedded import free_port
from sendscript.models import utcnow
from sendscript.report import gather
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, wait_for


@dataclass
class Receiver:
    """POSTs to /wecom (answered like the robot) and /hook, recorded as JSON. With
    `hang_s`, every request is held that long before it is answered."""

    hang_s: float = 0.0
    got: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.got.append((self.path.split("?")[0], body))
                if receiver.hang_s:
                    receiver.released.wait(receiver.hang_s)
                answer = json.dumps({"errcode": 0, "errmsg": "ok"}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def at(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in list(self.got) if p == path]

    def states(self, kind: str, key: str) -> dict[str, list[str]]:
        """The states announced for one incident, per format."""
        hook = [b["state"] for b in self.at("/hook")
                if b["incident"] == kind and b["key"] == key]
        wecom = [("started" if "STARTED:" in b["text"]["content"] else "resolved")
                 for b in self.at("/wecom")
                 if f": {kind} {key}\n" in b["text"]["content"]]
        return {"hook": hook, "wecom": wecom}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def alert_env(wecom: str, hook: str, **extra: Any) -> dict[str, Any]:
    return {"alert_wecom_url": f"{wecom}/wecom?key=test-key", "alert_webhook_url": f"{hook}/hook",
            "alert_check_interval_s": 0.5, "heartbeat_ttl_s": 3, "sweep_interval_s": 1,
            "leader_lease_s": 5, "alert_master_gone_after_s": 0, **extra}


def leader(roles: Roles, master_id: str) -> bool:
    info = roles.master_info(master_id)
    return bool(info and info.get("leader"))


def test_a_killed_master_is_announced_once_and_its_return_once(
    settings: Settings, roles: Roles, receiver: Receiver
) -> None:
    env = alert_env(receiver.url, receiver.url)
    roles.simulator(run_ms=20)
    roles.master("master-a", **env)
    wait_for(lambda: leader(roles, settings.master_id), 30, "master-a to lead the sweeps")
    other = settings.master_id + "-b"
    b = roles.master("master-b", master_id=other, **env)
    b.kill_group()  # SIGKILL, workers and all
    wait_for(lambda: all(receiver.states("master_gone", other).values()), 60,
             "master_gone started in both formats")
    assert receiver.states("master_gone", other) == {"hook": ["started"], "wecom": ["started"]}
    started = receiver.at("/hook")[0]
    assert started["service"] == "sendscript" and started["master"] == settings.master_id
    assert "heartbeat" in started["detail"] and started["at"]
    assert incident_record(settings, "master_gone", other) == (True, settings.master_id)
    roles.master("master-b-again", master_id=other, **env)
    wait_for(lambda: len(receiver.states("master_gone", other)["hook"]) == 2
             and len(receiver.states("master_gone", other)["wecom"]) == 2, 60,
             "master_gone resolved in both formats")
    assert receiver.states("master_gone", other) == {
        "hook": ["started", "resolved"], "wecom": ["started", "resolved"]}
    wecom = receiver.at("/wecom")
    assert wecom[0]["msgtype"] == "text" and f"master_gone {other}" in wecom[0]["text"]["content"]
    assert "RESOLVED: master_gone" in wecom[1]["text"]["content"]
    info = roles.master_info(settings.master_id)
    assert info is not None and info["alerts"]["sent"] == 2
    assert info["alerts"]["failed"] == {"wecom": 0, "webhook": 0}
    assert info["alerts"]["delivered"] == {"wecom": 2, "webhook": 2}
    assert incident_record(settings, "master_gone", other) == (False, settings.master_id)
    cli_env = settings_env(settings, **{k: v for k, v in env.items() if k.startswith("alert_")})
    cli_env["COLUMNS"] = "200"
    shown = subprocess.run([sys.executable, "-m", "sendscript", "status"], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL, env=cli_env)
    assert shown.returncode == 0, shown.stderr
    assert "alerts: wecom, webhook; at most 20/min, 10s timeout per POST" in shown.stdout
    assert "master_gone" in shown.stdout and "alerts by master" in shown.stdout


def incident_record(settings: Settings, kind: str, key: str) -> tuple[bool, str]:
    """(on, announced by) of an incident's cluster-wide record, as status shows it."""
    incidents = gather(settings)["alerts"]["incidents"]
    found = [(i["on"], i["by"]) for i in incidents if (i["incident"], i["key"]) == (kind, key)]
    assert len(found) == 1, incidents
    return found[0]


def test_workers_that_keep_dying_are_announced_and_their_end(
    settings: Settings, roles: Roles, receiver: Receiver
) -> None:
    """Three workers SIGKILLed within the window: "started"; none dying for the
    window (10 s here): "resolved"."""
    roles.simulator(run_ms=20)
    roles.master(**alert_env(receiver.url, receiver.url, alert_worker_deaths=3,
                             alert_worker_deaths_window_s=10))
    killed: set[int] = set()

    def kill(most: int) -> bool:
        info = roles.master_info(settings.master_id) or {}
        pids = sorted({int(n.rsplit(":", 1)[1]) for n in info.get("worker_names", [])}
                      - killed)[:most]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        return bool(pids)  # none: wait for a replacement to come online

    assert kill(2)  # both workers, then one of their replacements
    wait_for(lambda: kill(1), 30, "a replacement worker to kill")
    wait_for(lambda: receiver.states("workers_dying", settings.master_id)["hook"], 30,
             "workers_dying started")
    wait_for(lambda: len(receiver.states("workers_dying", settings.master_id)["wecom"]) == 2,
             30, "workers_dying resolved")
    assert receiver.states("workers_dying", settings.master_id) == {
        "hook": ["started", "resolved"], "wecom": ["started", "resolved"]}
    started = next(b for b in receiver.at("/hook") if b["incident"] == "workers_dying")
    assert "worker(s) died within 10s" in started["detail"]
    assert len(killed) == 3


def test_one_incident_seen_by_two_masters_is_announced_once(
    settings: Settings, receiver: Receiver
) -> None:
    """Two masters' alerting (in this process, on the real Redis) both see the shared
    breaker open, flap and close: one "started" and one "resolved" in all."""
    async def go() -> None:
        stop = asyncio.Event()
        parts = []
        for master_id in ("m-one", "m-two"):
            s = settings.model_copy(update={
                "master_id": master_id, "alert_wecom_url": f"{receiver.url}/wecom",
                "alert_webhook_url": f"{receiver.url}/hook"})
            bus = Bus()
            client = connect.redis_async(settings)
            alerting = Alerting(s, client)
            bus.attach(alerting)
            parts.append((bus, alerting, client))
        loops = [asyncio.create_task(a.run(stop)) for _, a, _ in parts]
        for bus, _, _ in parts:
            bus.emit(Incident("breaker_open", "central", True, "central-control failing"))
            bus.emit(Incident("breaker_open", "central", True, "still failing"))  # a repeat
        await asyncio.to_thread(wait_for, lambda: len(receiver.at("/hook")) == 1, 20,
                                "the started alert")
        for bus, alerting, _ in parts:
            await asyncio.to_thread(wait_for, lambda a=alerting: not len(a.notifier.outbox)
                                    and a.notifier.offered == a.notifier.sent
                                    + a.notifier.not_ours, 20, "both masters' claims")
            bus.emit(Incident("breaker_open", "central", False, "closed again"))
        await asyncio.to_thread(wait_for, lambda: len(receiver.at("/hook")) == 2, 20,
                                "the resolved alert")
        for _, alerting, _ in parts:
            await asyncio.to_thread(wait_for, lambda a=alerting: a.notifier.offered
                                    == a.notifier.sent + a.notifier.not_ours, 20,
                                    "both masters' claims")
        stop.set()
        await asyncio.gather(*loops)
        sent = sorted((a.notifier.sent, a.notifier.not_ours) for _, a, _ in parts)
        assert sum(s for s, _ in sent) == 2 and sum(n for _, n in sent) == 2
        record = await parts[0][2].get(settings.keys.alert("breaker_open", "central"))
        assert record is not None and record.decode().startswith("resolved:")
        assert await parts[0][2].pttl(settings.keys.alert("breaker_open", "central")) > 0
        for _, _, client in parts:
            await client.aclose()

    asyncio.run(go())
    assert receiver.states("breaker_open", "central") == {
        "hook": ["started", "resolved"], "wecom": ["started", "resolved"]}


def test_a_dead_receiver_delays_no_dispatch(
    settings: Settings, roles: Roles, inspect: Inspect
) -> None:
    """The webhook hangs longer than the timeout; the robot's port is closed. While the
    alert of a master gone is stuck on them, 200 tasks all succeed; then both
    channels give up, each outage logged once."""
    hanging = Receiver(hang_s=120).start()
    try:
        closed = f"http://127.0.0.1:{free_port()}"
        roles.simulator(run_ms=20)
        roles.consumer()
        # Sweeps far apart: the leader's watch sees the ghost below before recovery
        # removes its entry.
        master = roles.master(**alert_env(closed, hanging.url, alert_timeout_s=10,
                                          alert_retries=1, sweep_interval_s=30,
                                          leader_lease_s=90))
        wait_for(lambda: leader(roles, settings.master_id), 30, "the master to lead")
        # A master that left its entry and no heartbeat: gone, to the leader.
        inspect.redis.hset(settings.keys.masters, "ghost", json.dumps({"master_id": "ghost"}))
        wait_for(lambda: hanging.at("/hook"), 30, "the alert to reach the hanging receiver")
        with SendScriptClient(settings) as client:
            ids = [s.task_id for s in client.submit_many(
                [{"device_id": f"dr-{i % 20}", "script": {"id": i}} for i in range(200)])]
        wait_for(lambda: inspect.db.script_tasks.count_documents(
            {"_id": {"$in": ids}, "status": "success"}) == 200, 60, "every task to succeed")

        def alerts() -> dict[str, Any]:
            return (roles.master_info(settings.master_id) or {}).get("alerts", {})

        # The robot failed at once; the webhook's POST (two tries of 10 s) is still
        # hanging: every task went through while it hung.
        wait_for(lambda: alerts().get("failed", {}).get("wecom") == 1, 30,
                 "the robot's channel to give up")
        assert alerts()["failed"]["webhook"] == 0 and alerts()["sent"] == 0
        wait_for(lambda: alerts().get("failed", {}).get("webhook") == 1, 60,
                 "the webhook to time out twice")
        assert len(hanging.at("/hook")) == 2  # the first try and one retry
        assert alerts()["sent"] == 1  # the alert went through its steps (logged)
        log = master.log_path.read_text() if master.log_path else ""
        for channel in ("wecom", "webhook"):
            assert log.count(f"alert channel {channel}: ") == 1  # one outage, said once
    finally:
        hanging.stop()


def test_incident_records_outlive_their_announcer_but_not_the_incident(
    settings: Settings
) -> None:
    """The Lua claims on the real Redis: a record renewed by a master still seeing the
    incident; one that lapsed (its announcer died) taken over silently; the end
    announced once; a new start after the end announced again."""
    async def go() -> None:
        client = connect.redis_async(settings)
        a, b = (Alerting(settings.model_copy(update={"master_id": m}), client)
                for m in ("m-a", "m-b"))
        record = settings.keys.alert("drop_rate", "bulk")
        on = Incident("drop_rate", "bulk", True)
        for alerting in (a, b):
            alerting.on_incident(on)
        started, resolved = alert(a, "started"), alert(a, "resolved")
        assert [await a.claim(started), await b.claim(started)] == [True, False]
        assert await client.get(record) == b"m-a"
        await client.delete(record)  # m-a died and its record lapsed
        await b.renew()
        assert await client.get(record) == b"m-b"  # taken over, nothing announced
        assert 0 < await client.pttl(record) <= settings.alert_claim_ttl_s * 1000
        assert [await b.claim(resolved), await a.claim(resolved)] == [True, False]
        assert await client.get(record) == b"resolved:m-b"
        await a.renew()  # a master late to see the end keeps no ended record alive
        assert await client.get(record) == b"resolved:m-b"
        assert await a.claim(started)  # it started again: a new incident
        await client.aclose()

    def alert(alerting: Alerting, state: State) -> Alert:
        return Alert("drop_rate", "bulk", state, "", alerting.settings.master_id, utcnow())

    asyncio.run(go())
