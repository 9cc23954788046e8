"""Alerts without servers: message formats, throttle, bounded queue, local dedupe of
incidents, and the watches' decisions (worker deaths, gone masters, rising counts)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio

from master.alerts import Alerting
from master.bus import Bus
from master.events import Incident
from master.watches import Episode, GoneMasters, PoolDeaths, unplanned
from sendscript.alerts import (
    Alert,
    Dropped,
    Notifier,
    Outbox,
    Throttle,
    text,
    webhook_body,
    wecom_body,
)
from sendscript.settings import Settings

AT = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)


def alert(state: str = "started", key: str = "central", **kw: Any) -> Alert:
    values: dict[str, Any] = {"incident": "breaker_open", "key": key, "state": state,
                              "detail": "central-control failing", "master": "m-a", "at": AT}
    values.update(kw)
    return Alert(**values)


def settings(**kw: Any) -> Settings:
    kw.setdefault("alert_retries", 0)
    return Settings(master_id="m-a", **kw)


# -- formats ------------------------------------------------------------------------


def test_wecom_body_is_a_text_message_naming_the_incident() -> None:
    body = wecom_body(alert(), Dropped())
    assert body["msgtype"] == "text"
    content = body["text"]["content"]
    assert content.splitlines() == [
        "[sendscript] STARTED: breaker_open central", "central-control failing",
        f"master m-a, at {AT.isoformat()}"]
    assert "RESOLVED: breaker_open central" in text(alert("resolved"), Dropped())


def test_webhook_body_has_every_field() -> None:
    body = webhook_body(alert("resolved"), Dropped(throttled=2, queue_full=1))
    assert body == {"incident": "breaker_open", "key": "central", "state": "resolved",
                    "detail": "central-control failing", "service": "sendscript",
                    "master": "m-a", "at": AT.isoformat(), "dropped": 3}
    json.dumps(body)


def test_dropped_alerts_are_said_in_the_message() -> None:
    assert Dropped().note() == ""
    content = text(alert(), Dropped(throttled=4, queue_full=1))
    assert content.endswith("5 earlier alert(s) not sent (4 by the throttle, 1 by a full queue)")
    assert Dropped(throttled=2).note() == "2 earlier alert(s) not sent (2 by the throttle)"


# -- throttle and queue -------------------------------------------------------------------


def test_throttle_allows_n_per_sliding_minute() -> None:
    throttle = Throttle(3)
    assert [throttle.allow(t) for t in (0.0, 1.0, 2.0, 3.0, 59.9)] == [True] * 3 + [False] * 2
    assert throttle.allow(60.0)  # the first send left the window
    assert not throttle.allow(60.5)
    assert throttle.allow(61.0) and throttle.allow(62.0)


def test_outbox_drops_the_oldest_when_full_and_counts() -> None:
    box = Outbox(2)
    for key in ("a", "b", "c"):
        box.put(alert(key=key))
    assert box.overflowed == 1 and len(box) == 2
    assert [box.take().key, box.take().key] == ["b", "c"]  # type: ignore[union-attr]
    assert box.take() is None and not box.ready.is_set()


# -- the notifier (HTTP through httpx's in-process transport) --------------------------


@dataclass
class Receiver:
    """Answers every POST per `answer`, recording the bodies."""

    answers: list[httpx.Response] = field(default_factory=list)
    bodies: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append((request.url.host, json.loads(request.content)))
        if self.answers:
            return self.answers.pop(0)
        return httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})


def notifier(receiver: Receiver, **kw: Any) -> tuple[Notifier, httpx.AsyncClient]:
    s = settings(alert_wecom_url="http://wecom.test/send?key=k",
                 alert_webhook_url="http://hook.test/in", **kw)
    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    return Notifier(s, client=client), client


def test_throttled_alerts_are_counted_into_the_next_message() -> None:
    async def go() -> tuple[list[bool], Notifier]:
        n, client = notifier(receiver, alert_max_per_minute=1)
        sent = [await n.handle(client, alert(key=str(i))) for i in range(3)]
        n.throttle._sent.clear()  # the minute passed
        sent.append(await n.handle(client, alert(key="3")))
        return sent, n

    receiver = Receiver()
    sent, n = asyncio.run(go())
    assert sent == [True, False, False, True]
    hooks = [b for host, b in receiver.bodies if host == "hook.test"]
    assert [b["key"] for b in hooks] == ["0", "3"]
    assert [b["dropped"] for b in hooks] == [0, 2]
    wecom = [b for host, b in receiver.bodies if host == "wecom.test"]
    assert "2 earlier alert(s) not sent (2 by the throttle)" in wecom[1]["text"]["content"]
    assert n.report()["dropped_throttled"] == 2 and n.sent == 2


def test_a_wecom_error_code_is_a_failure_and_is_retried() -> None:
    receiver = Receiver([httpx.Response(200, json={"errcode": 45009, "errmsg": "freq"})])

    async def go() -> Notifier:
        n, client = notifier(receiver, alert_retries=1)
        n.channels = [c for c in n.channels if c.name == "wecom"]
        await n.handle(client, alert())
        return n

    n = asyncio.run(go())
    assert len(receiver.bodies) == 2  # refused, then taken
    assert n.channels[0].sent == 1 and n.channels[0].failed == 0


def test_a_failing_channel_never_raises_and_counts_the_failure() -> None:
    receiver = Receiver([httpx.Response(500)] * 4)

    async def go() -> Notifier:
        n, client = notifier(receiver)
        assert await n.handle(client, alert())
        return n

    n = asyncio.run(go())
    assert n.report()["failed"] == {"wecom": 1, "webhook": 1}


def test_an_alert_another_master_claimed_is_not_sent_nor_throttled() -> None:
    receiver = Receiver()

    async def no(_: Alert) -> bool:
        return False

    async def go() -> Notifier:
        n, client = notifier(receiver, alert_max_per_minute=1)
        n.claim = no
        assert not await n.handle(client, alert())
        return n

    n = asyncio.run(go())
    assert receiver.bodies == [] and n.not_ours == 1
    assert len(n.throttle._sent) == 0  # a message this master did not send costs no turn


# -- local dedupe of incidents --------------------------------------------------------


def test_an_incident_is_offered_once_when_it_starts_and_once_when_it_ends() -> None:
    bus = Bus()
    alerting = Alerting(settings(), redis.asyncio.Redis())  # never connects here
    bus.attach(alerting)
    events = [Incident("high_water", "m-a", True, "5000 held"),
              Incident("high_water", "m-a", True, "5100 held"),  # a repeat
              Incident("breaker_open", "central", False),  # the end of one never seen
              Incident("high_water", "m-a", False, "back under"),
              Incident("high_water", "m-a", False),
              Incident("high_water", "m-a", True, "again")]
    for event in events:
        bus.emit(event)
    box = alerting.notifier.outbox
    offered = [box.take() for _ in range(len(box))]
    assert [(a.incident, a.state, a.detail) for a in offered if a] == [
        ("high_water", "started", "5000 held"), ("high_water", "resolved", "back under"),
        ("high_water", "started", "again")]
    alerting.forget("high_water", "m-a")
    bus.emit(Incident("high_water", "m-a", False))
    assert len(box) == 0


# -- watches -----------------------------------------------------------------------


def test_episode_turns_on_at_threshold_and_off_after_a_quiet_window() -> None:
    ep = Episode(3, 60.0)
    ep.add(0.0)
    ep.add(10.0)
    assert ep.update(10.0) is None
    ep.add(20.0)
    assert ep.update(20.0) is True
    ep.add(50.0)
    assert ep.update(100.0) is None  # the death at 50 s is still within the window
    assert ep.update(110.0) is False
    assert ep.update(200.0) is None
    ep.add(300.0, 0)
    ep.add(300.0, -5)  # a counter that went down (reset) is no rise
    assert ep.within(300.0) == 0


@dataclass
class Proc:
    exitcode: int | None


@dataclass
class FakeSlot:
    name: str
    exit_reason: str | None = None
    hung: str | None = None
    process: Proc = field(default_factory=lambda: Proc(None))


def test_pool_deaths_are_unplanned_exits_and_unseen_young_deaths() -> None:
    w0, w1, w2 = FakeSlot("w0"), FakeSlot("w1"), FakeSlot("w2")
    deaths = PoolDeaths()
    assert deaths.look({0: w0, 1: w1, 2: w2}) == []
    w0.process.exitcode = -9  # crashed
    w1.exit_reason, w1.process.exitcode = "recycled", 0  # retired on purpose
    w2.hung, w2.process.exitcode = "silent 30s", -9  # killed as hung
    assert not unplanned(w1) and unplanned(w0) and unplanned(w2)
    w6 = FakeSlot("w6")
    # w3, w4 and w5 came and went between two looks; w6 is the one now running.
    assert sorted(deaths.look({6: w6})) == [
        "w0", "w2", "worker 3 (before it came online)", "worker 4 (before it came online)",
        "worker 5 (before it came online)"]
    assert deaths.look({6: w6}) == []


def test_gone_masters_from_the_hash_and_alive_keys() -> None:
    gone = GoneMasters("me")
    assert gone.look({"me", "b", "c"}, {"me", "b"}, 0) == [("c", True)]  # listed, not alive
    assert gone.look({"me", "b", "c"}, {"me", "b"}, 1) == []  # said once
    # b's entry was removed by recovery before we looked: it was alive, now it is gone.
    assert gone.look({"me"}, {"me"}, 2) == [("b", True)]
    assert gone.look({"me", "b"}, {"me", "b"}, 3) == [("b", False)]
    assert gone.look({"me", "b", "c"}, {"me", "b", "c"}, 4) == [("c", False)]
    assert gone.look(set(), set(), 5) == [("b", True), ("c", True)]  # never "me"


def test_a_master_back_within_the_grace_is_not_gone() -> None:
    gone = GoneMasters("me", grace_s=30)
    assert gone.look({"me", "b"}, {"me", "b"}, 0) == []
    assert gone.look({"me", "b"}, {"me"}, 10) == []  # restarting
    assert gone.look({"me", "b"}, {"me", "b"}, 25) == []  # back in time: nothing said
    assert gone.look({"me", "b"}, {"me"}, 30) == []
    assert gone.look({"me"}, {"me"}, 59) == []  # recovery removed its entry meanwhile
    assert gone.look({"me"}, {"me"}, 60) == [("b", True)]
    # Listed, never alive, removed before the grace ran out: forgotten.
    assert gone.look({"me", "ghost"}, {"me"}, 61) == []
    assert gone.look({"me"}, {"me"}, 100) == []
    assert "ghost" not in gone.missing


@pytest.mark.parametrize("state", ["started", "resolved"])
def test_log_only_without_channels(state: str) -> None:
    async def go() -> bool:
        n = Notifier(settings())
        async with httpx.AsyncClient() as client:
            return await n.handle(client, alert(state))

    assert asyncio.run(go())
