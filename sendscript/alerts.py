"""Alerts: tell operators an incident started or ended, without ever slowing dispatch.

Two optional channels, each a full URL setting:
- a WeCom group robot (`alert_wecom_url`): `{"msgtype": "text", "text": {"content"}}`;
  it answers HTTP 200 with `{"errcode": 0}` when it took the message;
- a generic JSON webhook (`alert_webhook_url`): `{"incident", "key", "state",
  "detail", "service", "master", "at", "dropped"}`; any 2xx is taken.
With neither set, alerts are only logged.

`Notifier.offer` never blocks and never raises: an alert goes into a bounded
queue (a full queue drops its oldest alert and counts it) that the notifier's
own loop drains. Before sending, the loop asks `claim` whether this process is
the one to send it (the cluster-wide once, see `master.alerts`); then a
throttle allows at most `alert_max_per_minute` messages a minute in all. What
the throttle or a full queue dropped is counted and said in the next message.
Each POST has a timeout and a few retries with backoff; a channel's failures are
logged once per outage.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx
import redis
from loguru import logger

from sendscript.backoff import OutageLog, exponential_delay
from sendscript.keys import Keys
from sendscript.settings import Settings

SERVICE = "sendscript"
# An incident's cluster-wide record (master/alerts.py) holds the id of the master
# that announced it while it is on, this prefix and the id of the one that announced
# its end after.
RESOLVED = "resolved:"
State = Literal["started", "resolved"]
# Asked before an alert is sent: True when this process is the one to send it.
Claim = Callable[["Alert"], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Alert:
    incident: str  # the incident's kind: breaker_open, master_gone, ...
    key: str  # which one: a device, a master, "central", ...
    state: State
    detail: str
    master: str  # the master that saw it
    at: datetime


@dataclass
class Dropped:
    """Alerts not sent since the last message that went out, by why."""

    throttled: int = 0
    queue_full: int = 0

    @property
    def total(self) -> int:
        return self.throttled + self.queue_full

    def note(self) -> str:
        parts = [f"{n} by {why}" for n, why in ((self.throttled, "the throttle"),
                                                 (self.queue_full, "a full queue")) if n]
        return f"{self.total} earlier alert(s) not sent ({', '.join(parts)})" if parts else ""


def text(alert: Alert, dropped: Dropped) -> str:
    """The human form, for chat robots and the log."""
    head = "STARTED" if alert.state == "started" else "RESOLVED"
    lines = [f"[{SERVICE}] {head}: {alert.incident} {alert.key}"]
    if alert.detail:
        lines.append(alert.detail)
    lines.append(f"master {alert.master}, at {alert.at.isoformat()}")
    if dropped.total:
        lines.append(dropped.note())
    return "\n".join(lines)


def wecom_body(alert: Alert, dropped: Dropped) -> dict[str, Any]:
    return {"msgtype": "text", "text": {"content": text(alert, dropped)}}


def webhook_body(alert: Alert, dropped: Dropped) -> dict[str, Any]:
    return {
        "incident": alert.incident, "key": alert.key, "state": alert.state,
        "detail": alert.detail, "service": SERVICE, "master": alert.master,
        "at": alert.at.isoformat(), "dropped": dropped.total,
    }


class Throttle:
    """At most `per_minute` messages in any 60 s (a sliding window of send times)."""

    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self._sent: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._sent and self._sent[0] <= now - self.window_s:
            self._sent.popleft()
        if len(self._sent) >= self.per_minute:
            return False
        self._sent.append(now)
        return True


class Outbox:
    """A bounded queue that drops its oldest item when full, and counts the drops."""

    def __init__(self, size: int) -> None:
        self._items: deque[Alert] = deque()
        self.size = size
        self.overflowed = 0
        self.ready = asyncio.Event()

    def put(self, alert: Alert) -> None:
        if len(self._items) >= self.size:
            self._items.popleft()
            self.overflowed += 1
        self._items.append(alert)
        self.ready.set()

    def take(self) -> Alert | None:
        if not self._items:
            self.ready.clear()
            return None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


Body = Callable[[Alert, Dropped], dict[str, Any]]


@dataclass
class Channel:
    name: str
    url: str
    body: Body
    outage: OutageLog = field(init=False)
    sent: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.outage = OutageLog(f"alert channel {self.name}")


def accepted(channel: Channel, response: httpx.Response) -> None:
    """Raise unless the channel took the message."""
    response.raise_for_status()
    if channel.name == "wecom":
        # The robot answers 200 with an error code when it refuses (bad key, rate limit).
        answer = response.json()
        if answer.get("errcode", 0) != 0:
            raise RuntimeError(f"wecom errcode {answer.get('errcode')}: {answer.get('errmsg')}")


class Notifier:
    def __init__(self, settings: Settings, claim: Claim | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.claim = claim
        self.channels = [
            Channel(name, url, body) for name, url, body in (
                ("wecom", settings.alert_wecom_url, wecom_body),
                ("webhook", settings.alert_webhook_url, webhook_body),
            ) if url
        ]
        self.outbox = Outbox(settings.alert_queue_size)
        self.throttle = Throttle(settings.alert_max_per_minute)
        self.dropped = Dropped()
        self._counted_overflow = 0
        self._client = client
        self.offered = 0
        self.sent = 0
        self.not_ours = 0  # another master sends them
        self.throttled = 0

    def offer(self, alert: Alert) -> None:
        """Queue an alert to send; returns at once."""
        self.offered += 1
        self.outbox.put(alert)

    async def run(self, stop: asyncio.Event) -> None:
        """Send queued alerts until stopped; once stopped, what is still queued is sent
        while the process lets this loop run (the master cancels it last)."""
        timeout = httpx.Timeout(self.settings.alert_timeout_s)
        async with self._client or httpx.AsyncClient(timeout=timeout) as client:
            while True:
                alert = self.outbox.take()
                if alert is None:
                    if stop.is_set():
                        return
                    await _either(self.outbox.ready, stop)
                    continue
                try:
                    await self.handle(client, alert)
                except Exception:  # one bad alert must not end the loop
                    logger.exception("alert {} {} not sent", alert.incident, alert.key)

    async def handle(self, client: httpx.AsyncClient, alert: Alert) -> bool:
        """Send one alert if it is ours and the throttle allows it; True when sent."""
        if not await self._ours(alert):
            self.not_ours += 1
            return False
        self.dropped.queue_full += self.outbox.overflowed - self._counted_overflow
        self._counted_overflow = self.outbox.overflowed
        if not self.throttle.allow(time.monotonic()):
            self.dropped.throttled += 1
            self.throttled += 1
            logger.info("alert throttled ({}/min): {}", self.throttle.per_minute,
                           text(alert, Dropped()).replace("\n", " | "))
            return False
        dropped, self.dropped = self.dropped, Dropped()
        logger.warning("alert: {}", text(alert, dropped).replace("\n", " | "))
        if self.channels:
            await asyncio.gather(*(self._post(client, ch, ch.body(alert, dropped))
                                   for ch in self.channels))
        self.sent += 1
        return True

    async def _ours(self, alert: Alert) -> bool:
        if self.claim is None:
            return True
        try:
            return await asyncio.wait_for(self.claim(alert), self.settings.redis_timeout_s)
        except Exception as exc:
            # Better the same alert from several masters than none at all.
            logger.warning("alert claim failed ({!r}); sending {} {} anyway", exc,
                           alert.incident, alert.key)
            return True

    async def _post(self, client: httpx.AsyncClient, channel: Channel,
                    body: dict[str, Any]) -> bool:
        """POST with retries; logs an outage once, never raises."""
        tries = 1 + self.settings.alert_retries
        for attempt in range(1, tries + 1):
            try:
                response = await client.post(channel.url, json=body,
                                             timeout=self.settings.alert_timeout_s)
                accepted(channel, response)
            except Exception as exc:
                channel.outage.failed(exc)
                if attempt < tries:
                    await asyncio.sleep(exponential_delay(attempt, base_s=1.0, cap_s=10.0))
                continue
            channel.outage.ok()
            channel.sent += 1
            return True
        channel.failed += 1
        return False

    def report(self) -> dict[str, Any]:
        return {
            "channels": [c.name for c in self.channels],
            "max_per_minute": self.throttle.per_minute,
            "queued": len(self.outbox),
            "offered": self.offered,
            "sent": self.sent,  # let through the claim and the throttle (and logged)
            "not_ours": self.not_ours,
            "dropped_throttled": self.throttled,
            "dropped_queue_full": self.outbox.overflowed,
            "delivered": {c.name: c.sent for c in self.channels},
            "failed": {c.name: c.failed for c in self.channels},
        }


async def _either(ready: asyncio.Event, stop: asyncio.Event) -> None:
    """Wait until an alert is queued or the process stops."""
    waits = [asyncio.create_task(ready.wait()), asyncio.create_task(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def records(client: redis.Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """For `sendscript status`: the alert limits of these settings and the incidents
    the cluster has a record of (on, or ended lately), with who announced them."""
    head = keys.alert("", "")[:-2]  # "{prefix}:alert"
    incidents = []
    for raw_key in client.scan_iter(match=f"{head}:*", count=1000):
        name = raw_key.decode()
        value, ttl_ms = client.get(raw_key), client.pttl(raw_key)
        if value is None:
            continue
        kind, _, key = name[len(head) + 1:].partition(":")
        by = value.decode()
        on = not by.startswith(RESOLVED)
        incidents.append({"incident": kind, "key": key, "on": on,
                          "by": by if on else by[len(RESOLVED):],
                          "record_ttl_s": round(ttl_ms / 1000, 1) if ttl_ms > 0 else None})
    return {
        "channels": [name for name, url in (("wecom", settings.alert_wecom_url),
                                            ("webhook", settings.alert_webhook_url)) if url],
        "max_per_minute": settings.alert_max_per_minute,
        "timeout_s": settings.alert_timeout_s,
        "incidents": sorted(incidents, key=lambda i: (not i["on"], i["incident"], i["key"])),
    }
